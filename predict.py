"""Predict with a trained checkpoint on arbitrary inputs: segmentation maps of images, or change
maps of co-registered image pairs (the config's dataset says which task).

    python predict.py --checkpoint exp/pascal/92/best.pth --input photos/ --output out/
    python predict.py --checkpoint released:<name> --input photo.jpg --output out/      # --list-released
    python predict.py --config configs/cityscapes.yaml --checkpoint best.pth --input street.jpg \
        --output out/ --mode sliding_window --flip --scales 0.75,1.0,1.25
    python predict.py --config configs/levir.yaml --checkpoint best.pth --input before/ after/ \
        --output out/ [--labels label/]

Segmentation: one image file or a directory (not searched recursively) of images in any format PIL
reads and any size or mode (RGB, gray, 16-bit gray, RGBA, palette...); files that are not images
are skipped with a warning. For each image `<stem>` the output directory gets `<stem>.png`, a palette
PNG whose pixel values are class ids (255 where nothing was predicted, outside a centre crop), and
`<stem>_overlay.jpg`, the colours blended over the image.
Change detection: two directories of co-registered images with the same file names (date A, date
B); for each pair `<stem>.png`, the change mask (0 unchanged, 255 changed), and `<stem>_pair.jpg`,
A | B | label (from --labels, else blank) | prediction.
Classification: one image file or a directory; `predictions.csv` holds each file's class, its
probability and the top-5 classes (images normalised with the dataset's mean/std).
Images are otherwise normalised with the ImageNet mean/std. The config is the checkpoint's own (this
project's checkpoints carry it; a released name gives configs/<dataset>.yaml with its encoder), or
--config; trailing `key=value` words override it. The model, its preprocessing and evaluation mode
are those of `segmenter.Segmenter` (docs/export.md). No checkpoint, a file that is not one, or no
image to predict ends with one line and exit status 1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.hub import format_released
from segmenter import Segmenter
from engine.eval_model import parse_scales
from engine.failures import guarded
from model.inference import EVAL_MODES
from util.dist import setup


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    listing = '--list-released' in (sys.argv[1:] if argv is None else argv)   # needs nothing else
    p.add_argument('--list-released', action='store_true', help='print the released checkpoint names and exit')
    p.add_argument('--config', default=None, help="default: the checkpoint's own (or the released name's)")
    p.add_argument('--checkpoint', required=not listing, help='a file, or released:<name> (see --list-released)')
    p.add_argument('--input', required=not listing, nargs='+',
                   help='an image file or a directory of images; change detection: the A and B directories')
    p.add_argument('--output', required=not listing, help='directory for the predictions and pictures')
    p.add_argument('--labels', default=None, help='change detection: a directory of reference masks to show')
    p.add_argument('--weights', choices=('ema', 'student'), default=None)
    p.add_argument('--mode', choices=EVAL_MODES, default=None)
    p.add_argument('--flip', action='store_true')
    p.add_argument('--scales', default='1.0', help='comma-separated test scales, e.g. 0.75,1.0,1.25')
    p.add_argument('overrides', nargs='*', help='config overrides, key=value')
    return p.parse_args(argv)


@guarded
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_released:
        print(format_released())
        return 0
    segmenter = Segmenter.from_checkpoint(args.checkpoint, args.config, weights=args.weights, device=setup(),
                                          mode=args.mode, flip=args.flip, scales=parse_scales(args.scales),
                                          overrides=args.overrides)
    out_dir = Path(args.output)
    existed = out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = segmenter.write_predictions([Path(p) for p in args.input], out_dir,
                                          Path(args.labels) if args.labels else None)
    if not written:
        if not existed and not any(out_dir.iterdir()):
            out_dir.rmdir()          # made for nothing
        raise SystemExit(f'error: no image to predict in {" ".join(args.input)}')
    print(f'wrote {written} predictions to {out_dir}')
    return written


if __name__ == '__main__':
    main()
