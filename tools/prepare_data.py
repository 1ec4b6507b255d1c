"""Prepare a dataset from the files its publisher distributes, in the layout the split lists name.

    python tools/prepare_data.py pascal --src VOCtrainval_11-May-2012.tar benchmark.tgz --dst data/pascal
    python tools/prepare_data.py cityscapes --src leftImg8bit_trainvaltest.zip gtFine_trainvaltest.zip --dst data/cityscapes
    python tools/prepare_data.py ade20k --src ADEChallengeData2016.zip --dst data/ade20k
    python tools/prepare_data.py coco --src train2017.zip val2017.zip annotations_trainval2017.zip --dst data/coco
    python tools/prepare_data.py levir --src LEVIR-CD.zip --dst data/levir
    python tools/prepare_data.py whu --dst data/whu       # fetches the original's WHU-CD.zip first

Each --src is an archive or the folder it was extracted to. Without --src, levir and whu fetch the
archive the original's Hugging Face repository publishes into <dst>/.sources/download/ (model/hub.py's
download: a progress bar, a temporary file renamed when complete, `$SEMISEG_MIRROR` in place of the
official host). Archives are extracted under <dst>/.sources/ (removed at the end, a download with
it, unless --keep-extracted). Rerunning resumes: finished files are kept, each output is written to
a temporary file and renamed. The run ends by counting every split list of splits/<dataset>/
against the output and running the same checks as --check-data. Mask conventions:
dataset/prepare/converters.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zipfile  # noqa: E402

from dataset.checks import DataError  # noqa: E402
from dataset.prepare import DATASETS, SourceSpec, prepare  # noqa: E402
from dataset.prepare.core import SOURCES_DIR, PrepareError  # noqa: E402
from model import hub  # noqa: E402

SPLITS_ROOT = Path(__file__).resolve().parents[1] / 'splits'


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    sources = '\n'.join(f'  {name:11s} {spec.sources}'
                        + (f' (fetched from {hub.release_file_url(spec.published)} without --src)' if spec.published else '')
                        for name, spec in DATASETS.items())
    p = argparse.ArgumentParser(description=__doc__ + '\nWhat to download:\n' + sources,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('dataset', choices=DATASETS)
    p.add_argument('--src', nargs='+', help='archives or extracted folders (levir, whu: fetched when not given)')
    p.add_argument('--dst', required=True, help='the dataset root, e.g. data/pascal')
    p.add_argument('--splits', default=None, help='split lists to check against (default: splits/<dataset>)')
    p.add_argument('--keep-extracted', action='store_true', help='keep <dst>/.sources/ at the end')
    return p.parse_args(argv)


def fetch_published(spec: SourceSpec, dst: Path) -> Path:
    """The original's archive of the dataset, downloaded into <dst>/.sources/download/ unless there."""
    def verify(tmp: Path) -> None:     # a truncated download has no readable central directory
        if not zipfile.is_zipfile(tmp):
            raise PrepareError(f'the download of {spec.published} is not a zip archive (truncated?); it was deleted')
    remote = hub.Remote(hub.release_file_url(spec.published))
    return hub.fetch(remote, dst / SOURCES_DIR / 'download' / spec.published, verify, f"the original's {spec.published}")


def sources(dataset: str, src: list[str] | None, dst: Path) -> list[str | Path]:
    """--src as given, else the published archive (fetched)."""
    if src:
        return src
    spec = DATASETS[dataset]
    if spec.published is None:
        raise PrepareError(f'{dataset} needs --src: {spec.sources} (see --help)')
    return [fetch_published(spec, dst)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    splits = Path(args.splits) if args.splits else SPLITS_ROOT / args.dataset
    try:
        srcs = sources(args.dataset, args.src, Path(args.dst))
        prepare(args.dataset, srcs, args.dst, splits, keep_extracted=args.keep_extracted)
    except (PrepareError, DataError, hub.WeightsUnavailableError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
