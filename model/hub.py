"""Weights on demand: the DINOv2 encoders and the original's released checkpoints, fetched safely.

Where a file is looked for, in order:
1. `pretrained/<backbone>.pth` (encoders only; the original's layout);
2. the cache: `$SEMISEG_CACHE`, else torch's hub cache (`torch.hub.get_dir()/checkpoints`, where
   `torch.hub.load('facebookresearch/dinov2', ...)` leaves the same DINOv2 files);
3. the official address, or the same path under `$SEMISEG_MIRROR` (any URL urllib opens, e.g.
   `file:///data/mirror`), which replaces the official host: a site mirror, or tests without network.

A download goes to a temporary file beside its final name, with a progress bar; it is renamed
into the cache only after it loaded strictly (an encoder into a freshly built encoder of its size,
a released checkpoint through the weights-only loader) and matched its SHA-256 where one is known.
A lock file makes concurrent processes (torchrun ranks) wait for one download instead of each
fetching it. No code from a download runs: every load is `weights_only`.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import quote, unquote, urlsplit

import torch
from torch import nn

from model.loading import WeightsMismatchError, load_pretrained_encoder, load_weights, model_state_from
from util.checkpoint import atomic_path, safe_load

AUTO = 'auto'                    # config value: find or fetch the official encoder for `backbone`
RELEASED_PREFIX = 'released:'    # `released:<name>`: one of the original's published checkpoints
PRETRAINED_DIR = Path('pretrained')
CACHE_ENV = 'SEMISEG_CACHE'
MIRROR_ENV = 'SEMISEG_MIRROR'

DINOV2_HOST = 'https://dl.fbaipublicfiles.com/dinov2'
RELEASE_HOST = 'https://huggingface.co/LiheYoung/UniMatch-V2/resolve/main'


@dataclass(frozen=True)
class Remote:
    url: str
    sha256: str | None = None    # checked when known; the DINOv2 names carry no hash

    @property
    def filename(self) -> str:
        """The file's name, unescaped (`5%labels`, not `5%25labels`)."""
        return unquote(self.url.rsplit('/', 1)[-1])


# The addresses the original's README gives (DINOv2's own release; giant as DINOv2 publishes it).
DINOV2_WEIGHTS = {
    f'dinov2_{size}': Remote(f'{DINOV2_HOST}/dinov2_vit{s}14/dinov2_vit{s}14_pretrain.pth')
    for size, s in (('small', 's'), ('base', 'b'), ('large', 'l'), ('giant', 'g'))
}

# The original's published checkpoints (its README links the Hugging Face repository
# LiheYoung/UniMatch-V2: "all the checkpoints of our core experiments"). Every file sits at the
# repository's root under the name of its training log without the table prefix:
# `<dataset>[_cd]_unimatch_v2_<split>labels_<encoder>.pth` (`_cd` for change detection), e.g.
# training-logs/table14-levir_cd_unimatch_v2_5%labels_dinov2_base.log and the checkpoint
# levir_cd_unimatch_v2_5%labels_dinov2_base.pth. `confirmed`: the name was seen in the repository's
# "Upload checkpoints" commit (1a32f81, pascal, levir, whu; its listing was cut off after whu) or is
# linked by the original's issue #17 (ade20k 1_16 base); the others (Cityscapes and COCO, which the
# model card says are there, and the other ADE20K cells) follow the pattern for the encoders and
# splits of the paper's Tables 1-4 and 14, unchecked: a wrong one fails with the "could not be
# downloaded" error, which names the URL and says the name is a guess. This table is the one place
# to correct them.
@dataclass(frozen=True)
class Released:
    dataset: str          # this project's dataset (configs/<dataset>.yaml)
    split: str            # as splits/<dataset>/ names it
    backbone: str
    confirmed: bool       # the file name was seen (else it follows the pattern)

    @property
    def filename(self) -> str:
        kind = '_cd' if self.dataset in CHANGE_DETECTION_DATASETS else ''
        return f'{self.dataset}{kind}_unimatch_v2_{self.split}labels_{self.backbone}.pth'

    @property
    def name(self) -> str:
        """What `released:<name>` takes: the file name without `.pth`."""
        return self.filename.removesuffix('.pth')


CHANGE_DETECTION_DATASETS = ('levir', 'whu')
_S, _B, _L = 'dinov2_small', 'dinov2_base', 'dinov2_large'
_RELEASES = (   # (dataset, splits, encoders, confirmed)
    ('pascal', ('92', '183', '366', '732', '1464'), (_S, _B, _L), True),
    ('levir', ('5%', '10%', '20%', '40%'), (_S, _B), True),
    ('whu', ('20%', '40%'), (_S, _B), True),
    ('ade20k', ('1_16',), (_B,), True),
    ('ade20k', ('1_64', '1_32', '1_8', '1_4'), (_B,), False),
    ('ade20k', ('1_64', '1_32', '1_16', '1_8', '1_4'), (_S, _L), False),
    ('cityscapes', ('1_16', '1_8', '1_4', '1_2'), (_S, _B), False),
    ('coco', ('1_512', '1_256', '1_128', '1_64', '1_32'), (_S, _B), False),
)
RELEASED: dict[str, Released] = {r.name: r for r in (
    Released(dataset, split, backbone, confirmed)
    for dataset, splits, backbones, confirmed in _RELEASES for backbone in backbones for split in splits)}


def release_file_url(filename: str) -> str:
    """The address of a file at the root of the original's repository -- a checkpoint, or the
    LEVIR-CD.zip / WHU-CD.zip that tools/prepare_data.py fetches -- with `%` and the other reserved
    characters escaped (`5%labels` is `5%25labels` in the URL)."""
    return f'{RELEASE_HOST}/{quote(filename)}'


class WeightsUnavailableError(FileNotFoundError):
    """A file that is neither on disk nor fetchable; the message says where to put it."""


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(torch.hub.get_dir()) / 'checkpoints'


def source_url(url: str) -> str:
    """`url`, or the same path under `$SEMISEG_MIRROR` when set."""
    mirror = os.environ.get(MIRROR_ENV)
    return f'{mirror.rstrip("/")}{urlsplit(url).path}' if mirror else url


def released_remote(name: str) -> Remote:
    if name not in RELEASED:
        raise WeightsUnavailableError(f'no released checkpoint {name!r}; the names are:\n{format_released()}')
    return Remote(release_file_url(RELEASED[name].filename))


def format_released() -> str:
    """One line per released checkpoint: the name to pass, its dataset and encoder, and whether the
    name was seen in the repository or follows its pattern."""
    width = max(map(len, RELEASED))
    lines = [f'  {"--checkpoint released:<name>":{width}s}  {"dataset":10s} {"backbone":12s} file name']
    lines += [f'  {name:{width}s}  {r.dataset:10s} {r.backbone:12s} {"confirmed" if r.confirmed else "pattern"}'
              for name, r in RELEASED.items()]
    return '\n'.join(lines + ['  confirmed: seen in the repository; pattern: named like the confirmed ones, unchecked'])


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive lock on `path` (created if needed), released on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'a') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(remote: Remote, final: Path, verify: Callable[[Path], None], what: str,
          put_here: Path | None = None, progress: bool = True) -> Path:
    """`final` (a path in the cache), downloading `remote` there first if it is absent (see the
    module docstring).

    verify(tmp): raises if the downloaded file is not what it should be (it is then deleted).
    put_here: an extra place named in the error when the file cannot be fetched."""
    if final.is_file():
        return final
    with _lock(final.with_name(f'.{final.name}.lock')):
        if final.is_file():                # another process fetched it while we waited
            return final
        url = source_url(remote.url)
        with atomic_path(final) as tmp:
            try:
                torch.hub.download_url_to_file(url, str(tmp), progress=progress)
            except (urllib.error.URLError, OSError, ValueError) as err:
                places = f'{put_here} or {final}' if put_here else str(final)
                raise WeightsUnavailableError(
                    f'{what} is not on disk and could not be downloaded from {url}: '
                    f'{getattr(err, "reason", err)}\n  Without network access, download '
                    f'{remote.url} on another machine and put it at {places}'
                    f'{"" if os.environ.get(MIRROR_ENV) else f" (or set {MIRROR_ENV} to a local mirror)"}.'
                ) from None
            if remote.sha256 and (got := _sha256(tmp)) != remote.sha256:
                raise WeightsMismatchError(f'{url}: SHA-256 {got} differs from the published '
                                           f'{remote.sha256}; the download is corrupt and was deleted')
            verify(tmp)
    return final


def encoder_file(backbone: str, verify: Callable[[Path], None], progress: bool = True) -> Path:
    """The DINOv2 weights for `backbone`: `pretrained/<backbone>.pth`, else the cache, else fetched."""
    local = PRETRAINED_DIR / f'{backbone}.pth'
    if local.is_file():
        return local
    if backbone.startswith('dinov3_'):     # licence-gated: looked for on disk and explained, never fetched
        from model.loading import dinov3_weights_help, find_dinov3_weights
        folders = (PRETRAINED_DIR, cache_dir())
        found = find_dinov3_weights(backbone, folders)
        if found is None:
            raise WeightsUnavailableError(dinov3_weights_help(backbone, folders))
        return found
    if backbone not in DINOV2_WEIGHTS:
        raise WeightsUnavailableError(
            f'no official weights exist for {backbone}: put an encoder at {local}, set '
            f'pretrained=<path>, or pretrained=null for random weights')
    remote = DINOV2_WEIGHTS[backbone]
    return fetch(remote, cache_dir() / remote.filename, verify,
                 f'the {backbone} encoder ({remote.filename})', local, progress)


def released_file(spec: str, progress: bool = True) -> Path:
    """`released:<name>` -> the cached checkpoint (fetched if needed); other paths unchanged."""
    if not str(spec).startswith(RELEASED_PREFIX):
        return Path(spec)
    name = str(spec)[len(RELEASED_PREFIX):]
    remote = released_remote(name)

    def verify(tmp: Path) -> None:
        model_state_from(safe_load(tmp))   # weights only, and it holds model weights

    what = f'released checkpoint {name}'
    if not RELEASED[name].confirmed:
        what += " (a name that follows the repository's pattern but was not seen in its listing)"
    return fetch(remote, cache_dir() / remote.filename, verify, what, progress=progress)


def is_full_model(path: str | Path) -> bool:
    """True for a whole-model file (a checkpoint or a state dict with head.* keys)."""
    obj = safe_load(path)
    return isinstance(obj, dict) and ('model' in obj or any(str(k).startswith('head.') for k in obj))


def load_pretrained(model: nn.Module, spec: str, backbone: str, progress: bool = True) -> Path:
    """Load the config's `pretrained` into `model` and return the file used.

    spec: 'auto' (the official DINOv2 encoder for `backbone`, found or fetched), `released:<name>`
    (a released checkpoint, every weight), or a path (an encoder in any DINOv2 format, or a
    whole model)."""
    if spec == AUTO:
        # Verifying a download = loading it strictly into this model, which is the load we want.
        path = encoder_file(backbone, lambda tmp: load_pretrained_encoder(model, tmp), progress)
        load_pretrained_encoder(model, path)
        return path
    path = released_file(spec, progress)
    if not path.is_file():
        raise WeightsUnavailableError(
            f'pretrained encoder {path} not found: put the DINOv2 weights there (see docs/weights.md), '
            f'use pretrained=auto, or pretrained=null to start from random weights')
    load_weights(model, path) if is_full_model(path) else load_pretrained_encoder(model, path)
    return path
