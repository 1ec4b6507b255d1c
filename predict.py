"""Predict segmentation maps for arbitrary images with a trained checkpoint.

    python predict.py --config configs/pascal.yaml --checkpoint exp/pascal/92/best.pth \
        --input photos/ --output out/
    python predict.py --config configs/cityscapes.yaml --checkpoint best.pth --input street.jpg \
        --output out/ --mode sliding_window --flip --scales 0.75,1.0,1.25

Input: one image file or a directory (not searched recursively) of images in any format PIL reads
and any size or mode (RGB, gray, 16-bit gray, RGBA, palette...); files that are not images are
skipped with a warning. For each image `<stem>` the output directory gets `<stem>.png`, a palette
PNG whose pixel values are class ids (255 where nothing was predicted, outside a centre crop), and
`<stem>_overlay.jpg`, the colours blended over the image. Images are normalised with the ImageNet
mean/std. Trailing `key=value` words override the config.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from dataset.registry import default_eval_mode, get_palette
from dataset.transforms import normalize
from model.hub import format_released
from util.config import EVAL_MODES, load_config
from util.dist import setup
from util.evaluation import build_eval_model, overlay, parse_scales, save_prediction
from util.inference import predict
from util.metrics import IGNORE_INDEX

HIGH_BIT_DEPTH_MODES = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F')  # gray > 8 bit


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    listing = '--list-released' in (sys.argv[1:] if argv is None else argv)   # needs nothing else
    p.add_argument('--list-released', action='store_true', help='print the released checkpoint names and exit')
    p.add_argument('--config', required=not listing)
    p.add_argument('--checkpoint', required=not listing, help='a file, or released:<name> (see --list-released)')
    p.add_argument('--input', required=not listing, help='an image file or a directory of images')
    p.add_argument('--output', required=not listing, help='directory for <stem>.png and <stem>_overlay.jpg')
    p.add_argument('--weights', choices=('ema', 'student'), default=None)
    p.add_argument('--mode', choices=EVAL_MODES, default=None)
    p.add_argument('--flip', action='store_true')
    p.add_argument('--scales', default='1.0', help='comma-separated test scales, e.g. 0.75,1.0,1.25')
    p.add_argument('overrides', nargs='*', help='config overrides, key=value')
    return p.parse_args(argv)


def load_rgb(path: Path) -> Image.Image:
    """Any image PIL reads, upright (EXIF orientation) and as 8-bit RGB; raises
    UnidentifiedImageError or OSError for files that are not readable images."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        img.load()
    if img.mode in HIGH_BIT_DEPTH_MODES:  # stretch to 8 bit; convert('RGB') would clip at 255
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = arr.min(), arr.max()
        arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.round().astype(np.uint8))
    if img.mode in ('P', 'LA', 'PA') or 'transparency' in img.info:
        img = img.convert('RGBA')  # resolve palette transparency before dropping alpha
    return img.convert('RGB')


def list_inputs(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file())
    raise SystemExit(f'error: input {path} does not exist')


def output_stem(path: Path, taken: set[str]) -> str:
    """The file stem, or stem_<ext> when another input (a.jpg next to a.png) already has it."""
    stem = path.stem if path.stem not in taken else f'{path.stem}_{path.suffix.lstrip(".")}'
    taken.add(stem)
    return stem


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_released:
        print(format_released())
        return 0
    device = setup()
    cfg = load_config(args.config, args.overrides)
    mode = args.mode or cfg.eval_mode or default_eval_mode(cfg.dataset)
    scales = parse_scales(args.scales)
    palette = get_palette(cfg.dataset, cfg.nclass)

    model, _ = build_eval_model(args.checkpoint, args.weights, cfg, args.config)
    model.to(device).eval()

    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs, taken, written = list_inputs(Path(args.input)), set(), 0
    for path in tqdm(inputs, desc='predict', dynamic_ncols=True):
        try:
            img = load_rgb(path)
        except (UnidentifiedImageError, OSError) as err:
            tqdm.write(f'warning: skipping {path}: not a readable image ({err})', file=sys.stderr)
            continue
        with torch.inference_mode():
            probs, valid = predict(model, normalize(img)[None].to(device), mode, cfg.crop_size,
                                   cfg.nclass, args.flip, scales)
        ids = probs.argmax(dim=1)[0].masked_fill(~valid[0], IGNORE_INDEX).cpu()
        stem = output_stem(path, taken)
        save_prediction(ids, palette, out_dir / f'{stem}.png')
        overlay(img, ids, palette).save(out_dir / f'{stem}_overlay.jpg', quality=90)
        written += 1
    print(f'wrote {written} predictions to {out_dir}')
    return written


if __name__ == '__main__':
    main()
