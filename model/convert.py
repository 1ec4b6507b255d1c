"""DINOv2 encoder weights as other libraries save them, renamed to DINOv2's own keys (this
project's encoder keys; see the key list in model/dinov2.py's docstring).

- DINOv2's release (`dinov2_vit*14_pretrain.pth`): the target; returned as it is.
- timm (`vit_*_patch14_dinov2.lvd142m`): timm's ViT, which `model/dinov2.py` builds on, already uses
  DINOv2's names; only the giant's packed SwiGLU is `mlp.fc1` / `mlp.fc2` there (DINOv2:
  `mlp.w12` / `mlp.w3`, same layout: gate rows first). timm files have no `mask_token`, which
  segmentation never uses.
- Hugging Face transformers (`facebook/dinov2-*`): `embeddings.*`, `encoder.layer.N.*`,
  `layernorm.*`, LayerScale as `layer_scaleK.lambda1`, and q, k, v as three linears that DINOv2 keeps
  as one `attn.qkv` (rows q, then k, then v). Both generations of names are read: the files on the
  Hub (`attention.attention.query`, `attention.output.dense`, SwiGLU `mlp.weights_in/out`) and
  transformers >= 5 state dicts (`attention.q_proj`, `attention.o_proj`, SwiGLU
  `mlp.gate_proj/up_proj/down_proj`).
The result is loaded strictly afterwards (`model.loading.load_checked`): anything not converted is
reported there as an unexpected key, by name.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

HF_PREFIXES = ('dinov2.',)   # Dinov2For* task models keep the encoder under `dinov2.`

# Parts that DINOv2 keeps as one tensor, concatenated along the output dimension in this order.
HF_FUSED = {
    'attn.qkv': (('attention.attention.query', 'attention.attention.key', 'attention.attention.value'),
                 ('attention.q_proj', 'attention.k_proj', 'attention.v_proj')),
    'mlp.w12': (('mlp.gate_proj', 'mlp.up_proj'),),
}

# One-to-one renames, applied in order to every remaining key.
HF_RENAMES = (
    (r'^embeddings\.cls_token$', 'cls_token'),
    (r'^embeddings\.mask_token$', 'mask_token'),
    (r'^embeddings\.position_embeddings$', 'pos_embed'),
    (r'^embeddings\.patch_embeddings\.projection\.', 'patch_embed.proj.'),
    (r'^encoder\.layer\.(\d+)\.', r'blocks.\1.'),
    (r'\.attention\.output\.dense\.', '.attn.proj.'),
    (r'\.attention\.o_proj\.', '.attn.proj.'),
    (r'\.layer_scale(\d)\.lambda1$', r'.ls\1.gamma'),
    (r'\.mlp\.(weights_in)\.', '.mlp.w12.'),
    (r'\.mlp\.(weights_out|down_proj)\.', '.mlp.w3.'),
    (r'^layernorm\.', 'norm.'),
)

_HF_LAYER_KEY = re.compile(r'^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$')
_TIMM_FC1 = re.compile(r'^blocks\.(\d+)\.mlp\.fc1\.weight$')


def detect_format(state: Mapping[str, torch.Tensor]) -> str:
    """'hf', 'timm' (only told apart from DINOv2's when the giant's packed SwiGLU is present) or
    'dinov2'."""
    if any(k.startswith(('embeddings.', 'encoder.layer.')) for k in state):
        return 'hf'
    for key in state:
        m = _TIMM_FC1.match(key)
        fc2 = state.get(f'blocks.{m.group(1)}.mlp.fc2.weight') if m else None
        if fc2 is not None and state[key].shape[0] == 2 * fc2.shape[1]:   # fc1 holds gate and value
            return 'timm'
    return 'dinov2'


def to_dinov2_keys(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """`state` under DINOv2's key names, and the format it came in ('dinov2', 'timm' or 'hf')."""
    for prefix in HF_PREFIXES:
        if any(k.startswith(prefix + 'embeddings.') for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    fmt = detect_format(state)
    if fmt == 'hf':
        return _from_hf(state), fmt
    if fmt == 'timm':
        return {re.sub(r'\.mlp\.fc1\.', '.mlp.w12.', re.sub(r'\.mlp\.fc2\.', '.mlp.w3.', k)): v
                for k, v in state.items()}, fmt
    return dict(state), fmt


def _from_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    layers = sorted({int(m.group(1)) for k in state if (m := _HF_LAYER_KEY.match(k))})
    for i in layers:
        for target, alternatives in HF_FUSED.items():
            for parts in alternatives:
                for kind in ('weight', 'bias'):
                    names = [f'encoder.layer.{i}.{p}.{kind}' for p in parts]
                    present = [n for n in names if n in state]
                    if not present:
                        continue
                    if len(present) != len(names):
                        missing = sorted(set(names) - set(present))
                        raise KeyError(f'Hugging Face DINOv2 weights: {", ".join(missing)} missing '
                                       f'({" + ".join(parts)} are merged into blocks.{i}.{target}.{kind})')
                    out[f'blocks.{i}.{target}.{kind}'] = torch.cat([state[n] for n in names], dim=0)
                    used.update(names)
    for key, value in state.items():
        if key in used:
            continue
        for pattern, repl in HF_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out
