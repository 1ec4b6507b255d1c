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

DINOv3 encoder weights, renamed to timm's keys (`timm.models.eva.Eva`, which `DinoV3Encoder` is):
- Meta's release (`dinov3_vit*16_pretrain_lvd1689m-*.pth`; facebookresearch/dinov3
  `models/vision_transformer.py`): registers as `storage_tokens`, LayerScale as `ls1/ls2.gamma`,
  SwiGLU as `mlp.w1` (gate) / `w2` / `w3`, and one `attn.qkv.bias` with a `bias_mask` buffer that
  zeroes its key part; kept are `bias * bias_mask` of q and v, and the masked key bias must be 0 (timm
  has none). The persistent `rope_embed.periods` must be the encoder's (timm computes them; a file's
  may be rounded to bf16). Dropped: `mask_token` (masked-image pretraining) and the extra norms of
  the untied class / register tokens (`cls_norm`, and `local_cls_norm` of the 7B), which the patch
  tokens never pass through.
- Hugging Face transformers (`facebook/dinov3-vit*16-pretrain-lvd1689m`, `DINOv3ViTModel`):
  `embeddings.*`, blocks as `layer.N.*` (the Hub files) or `model.layer.N.*` (transformers >= 5),
  q, k, v as three linears (k without bias) that timm keeps as one `attn.qkv`, `o_proj`,
  `layer_scaleK.lambda1`, MLP `up_proj` / `down_proj` and SwiGLU `gate_proj` / `up_proj` / `down_proj`.
- timm (`vit_*_patch16_dinov3[_qkvb].lvd1689m`): the target. The variants without `_qkvb` have no q/v
  biases; a file with no qkv bias at all gets zero ones (the same function) when the encoder has them.
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


# ---- DINOv3 -----------------------------------------------------------------------------------------

class ConversionError(ValueError):
    """A DINOv3 state dict that no supported format turns into the encoder's (the message names the key)."""


PERIODS_RTOL = 2 ** -7        # a file's RoPE periods may be rounded to bf16: within one bf16 step (8 bits)

META_RENAMES = (
    (r'^storage_tokens$', 'reg_token'),
    (r'\.ls([12])\.gamma$', r'.gamma_\1'),
    (r'\.mlp\.w1\.', '.mlp.fc1_g.'),
    (r'\.mlp\.w2\.', '.mlp.fc1_x.'),
    (r'\.mlp\.w3\.', '.mlp.fc2.'),
)
META_DROPPED = re.compile(r'^(mask_token$|rope_embed\.periods$|cls_norm\.|local_cls_norm\.)|\.qkv\.bias_mask$')

HF_DINOV3_RENAMES = (
    (r'^embeddings\.cls_token$', 'cls_token'),
    (r'^embeddings\.register_tokens$', 'reg_token'),
    (r'^embeddings\.patch_embeddings\.', 'patch_embed.proj.'),
    (r'^(model\.)?layer\.(\d+)\.', r'blocks.\2.'),
    (r'\.attention\.o_proj\.', '.attn.proj.'),
    (r'\.attention\.q_proj\.bias$', '.attn.q_bias'),
    (r'\.attention\.v_proj\.bias$', '.attn.v_bias'),
    (r'\.layer_scale([12])\.lambda1$', r'.gamma_\1'),
    (r'\.mlp\.gate_proj\.', '.mlp.fc1_g.'),
    (r'\.mlp\.down_proj\.', '.mlp.fc2.'),
)
_HF_DINOV3_LAYER = re.compile(r'^(?:model\.)?layer\.(\d+)\.')


def dinov3_format(state: Mapping[str, torch.Tensor]) -> str:
    """'meta', 'hf' or 'timm'."""
    if 'storage_tokens' in state:
        return 'meta'
    if any(k.startswith('embeddings.') for k in state):
        return 'hf'
    if 'reg_token' in state:
        return 'timm'
    raise ConversionError('not DINOv3 encoder weights: no storage_tokens (Meta\'s release), embeddings.* '
                          '(Hugging Face) or reg_token (timm)')


def to_timm_dinov3(state: Mapping[str, torch.Tensor], periods: torch.Tensor, qkv_bias: bool
                   ) -> tuple[dict[str, torch.Tensor], str]:
    """`state` (Meta's, Hugging Face's or timm's DINOv3 ViT) under timm's keys, and its format.

    periods: the RoPE periods (head_dim / 4,) of the encoder it is for, which a Meta file's must be;
    qkv_bias: whether that encoder has q and v biases."""
    fmt = dinov3_format(state)
    out = {'meta': _from_meta, 'hf': _from_hf_dinov3, 'timm': dict}[fmt](state)
    if fmt == 'meta' and 'rope_embed.periods' in state:
        check_periods(state['rope_embed.periods'], periods)
    if qkv_bias and not any(k.endswith('.attn.q_bias') for k in out):
        for key in [k for k in out if k.endswith('.attn.qkv.weight')]:
            zeros = out[key].new_zeros(out[key].shape[0] // 3)
            out[key.replace('qkv.weight', 'q_bias')], out[key.replace('qkv.weight', 'v_bias')] = zeros, zeros.clone()
    return out, fmt


def check_periods(file: torch.Tensor, model: torch.Tensor) -> None:
    if file.shape == model.shape and torch.allclose(file.float(), model.float(), rtol=PERIODS_RTOL, atol=0):
        return
    if file.shape != model.shape:
        found = f'has {file.numel()} values, the encoder {model.numel()} (head width / 4)'
    else:
        found = f'differs from the encoder\'s by up to {((file.float() - model) / model).abs().max():.2%}'
    raise ConversionError(f'rope_embed.periods {found}: the file is of another architecture or size '
                          f'(RoPE base 100, head width {4 * model.numel()})')


def _from_meta(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if META_DROPPED.search(key):
            continue
        if key.endswith('.attn.qkv.bias'):
            mask = state.get(f'{key}_mask')
            bias = value if mask is None else value * mask.to(value.dtype)
            q, k, v = bias.chunk(3)
            if k.abs().max() > 0:
                raise ConversionError(f'{key}: its key part is not zero{"" if mask is None else " after bias_mask"}; '
                                      f'DINOv3 has no key bias (timm\'s has none)')
            out[key.replace('qkv.bias', 'q_bias')], out[key.replace('qkv.bias', 'v_bias')] = q, v
            continue
        for pattern, repl in META_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _from_hf_dinov3(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    used = {'embeddings.mask_token'}
    blocks = {m.group(0): int(m.group(1)) for k in state if (m := _HF_DINOV3_LAYER.match(k))}
    for prefix, i in blocks.items():
        names = [f'{prefix}attention.{p}_proj.weight' for p in 'qkv']
        present = [n for n in names if n in state]
        if len(present) not in (0, 3):
            raise ConversionError(f'Hugging Face DINOv3 weights: {", ".join(sorted(set(names) - set(present)))} '
                                  f'missing (q, k and v are merged into blocks.{i}.attn.qkv)')
        if present:
            out[f'blocks.{i}.attn.qkv.weight'] = torch.cat([state[n] for n in names])
        k_bias = f'{prefix}attention.k_proj.bias'       # only with key_bias=True
        if k_bias in state and state[k_bias].abs().max() > 0:
            raise ConversionError(f'{k_bias} is not zero; DINOv3 has no key bias (timm\'s has none)')
        # up_proj: a SwiGLU's value half (beside gate_proj), else the MLP's first linear.
        fc1 = 'fc1_x' if f'{prefix}mlp.gate_proj.weight' in state else 'fc1'
        ups = {f'{prefix}mlp.up_proj.{kind}': f'blocks.{i}.mlp.{fc1}.{kind}' for kind in ('weight', 'bias')}
        out.update({new: state[old] for old, new in ups.items() if old in state})
        used.update(present, [k_bias], ups)
    for key, value in state.items():
        if key in used:
            continue
        for pattern, repl in HF_DINOV3_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out
