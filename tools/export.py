"""Export a trained checkpoint as ONNX: a model any ONNX runtime runs, without this codebase.

    python tools/export.py --checkpoint exp/pascal/unimatch_v2/dinov2_small/92/best.pth --output pascal.onnx
    python tools/export.py --checkpoint best.pth --weights student --size 518 518 --output model.onnx
    python tools/export.py --checkpoint released:levir_cd_unimatch_v2_5%labels_dinov2_base --output levir.onnx

The graph takes 8-bit RGB values as float32 [B, 3, H, W] (0..255, not normalised: the ImageNet
normalisation of training is inside the graph) -- one input `image` for segmentation, two
(`image_a`, `image_b`, the two dates) for change detection -- and returns `logits` float32
[B, nclass, H, W]; the class map is their argmax over dimension 1. The batch is dynamic.
Image size: DINOv2's position-embedding interpolation (a bicubic resize by a scale factor, kept
for parity with DINOv2) does not trace for a symbolic size, so DINOv2 models are exported at one
size, `--size H W` (default: the config's crop, square; sides rounded down to the patch, 14); a
DINOv3 encoder (rotary position embeddings) traces for any size, so its graph takes any H and W
(multiples of its patch, 16, unless `--size` fixes them). Resize images to the exported size
yourself (the evaluation's `original` mode resizes to the nearest patch multiple, predicts, and
resizes the logits back); sliding windows are a loop outside the graph.

Exporter: torch.onnx.export with dynamo=True (torch.export; TorchScript's exporter fails on the
bicubic position-embedding resize), opset OPSET. The config, task and preprocessing are
`segmenter.Segmenter`'s; the file's metadata records the checkpoint, weights, classes and inputs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as a script from anywhere

import torch                                                     # noqa: E402
from torch import nn                                             # noqa: E402

from dataset.transforms import IMAGENET_MEAN, IMAGENET_STD       # noqa: E402
from segmenter import Segmenter                                  # noqa: E402
from engine.failures import guarded                              # noqa: E402
from util.checkpoint import atomic_path                          # noqa: E402

OPSET = 18                # onnxruntime >= 1.14 runs it; the opset the tests check
MAX_SIDE = 8192           # upper bound of the dynamic sizes (torch.export needs one)


class PixelsToLogits(nn.Module):
    """`model` behind the training normalisation: float [B, 3, H, W] RGB values 0..255 per image
    (`images` of them) -> logits [B, nclass, H, W]."""

    def __init__(self, model: nn.Module, images: int = 1):
        super().__init__()
        self.model, self.images = model, images
        self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer('std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255)

    def forward(self, *images: torch.Tensor) -> torch.Tensor:
        return self.model(torch.cat([(im - self.mean) / self.std for im in images], dim=1))


def dynamic_size(backbone: str) -> bool:
    """Whether the encoder's graph traces for any image size (DINOv3's rotary embeddings do,
    DINOv2's scale-factor interpolation of its position table does not)."""
    return backbone.startswith('dinov3_')


def export(segmenter: Segmenter, output: Path, size: tuple[int, int] | None = None,
           checkpoint: str = '') -> dict:
    """Write `segmenter`'s model as ONNX to `output`; returns the metadata stored in the file."""
    cfg, task, patch = segmenter.cfg, segmenter.task, segmenter.model.patch_size
    n = task.images_per_input
    dynamic = size is None and dynamic_size(cfg.backbone)
    h, w = size or (cfg.crop_size, cfg.crop_size)
    h, w = max(h // patch, 1) * patch, max(w // patch, 1) * patch
    names = ['image'] if n == 1 else [f'image_{d}' for d in 'ab'[:n]]
    wrapped = PixelsToLogits(segmenter.model, n).eval().cpu()
    # Example batch 2: torch.export specialises dimensions of size 0 and 1.
    example = tuple(torch.rand(2, 3, h, w) * 255 for _ in names)
    batch = torch.export.Dim('batch', min=1, max=1024)
    dims = {0: batch}
    if dynamic:
        # sides that are multiples of the patch: the model crops to its patch grid
        dims.update({2: patch * torch.export.Dim('rows', min=1, max=MAX_SIDE // patch),
                     3: patch * torch.export.Dim('cols', min=1, max=MAX_SIDE // patch)})
    output.parent.mkdir(parents=True, exist_ok=True)
    program = torch.onnx.export(wrapped, example, dynamo=True, opset_version=OPSET, input_names=names,
                                output_names=['logits'], dynamic_shapes=(tuple(dims for _ in names),),  # *images: one tuple
                                verbose=False)
    meta = {'checkpoint': checkpoint, 'weights': segmenter.weights, 'task': task.name,
            'dataset': cfg.dataset, 'backbone': cfg.backbone, 'nclass': cfg.nclass, 'patch': patch,
            'inputs': names, 'input': 'float32 [B, 3, H, W] RGB 0..255', 'output': 'logits [B, nclass, H, W]',
            'size': 'dynamic (multiples of the patch)' if dynamic else [h, w], 'opset': OPSET,
            'mean': IMAGENET_MEAN, 'std': IMAGENET_STD}
    program.model.metadata_props.update({'semiseg': json.dumps(meta)})
    with atomic_path(output) as tmp:
        program.save(str(tmp))
    return meta


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', required=True, help='a file (best.pth, latest.pth, ...) or released:<name>')
    p.add_argument('--output', required=True, help='the .onnx file to write')
    p.add_argument('--weights', choices=('ema', 'student'), default=None,
                   help='which weights of a checkpoint holding both (default: those the task reports)')
    p.add_argument('--size', type=int, nargs=2, metavar=('H', 'W'), default=None,
                   help="fixed input size (default: the config's crop for DINOv2; any size for DINOv3)")
    p.add_argument('--config', default=None, help="default: the checkpoint's own (or the released name's)")
    p.add_argument('overrides', nargs='*', help='config overrides, key=value')
    return p.parse_args(argv)


@guarded
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    segmenter = Segmenter.from_checkpoint(args.checkpoint, args.config, weights=args.weights, device='cpu',
                                          overrides=args.overrides)
    output = Path(args.output)
    meta = export(segmenter, output, tuple(args.size) if args.size else None, str(args.checkpoint))
    print(f'wrote {output} ({output.stat().st_size / 2**20:.1f} MiB): {meta["task"]}, {meta["weights"]} weights, '
          f'inputs {", ".join(meta["inputs"])} size {meta["size"]}, opset {OPSET}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
