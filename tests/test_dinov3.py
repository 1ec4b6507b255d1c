"""DINOv3 encoders (`backbone=dinov3_<size>`, model/encoders.py `DinoV3Encoder`).

    python -m pytest tests/test_dinov3.py -q

- The sizes: every full-size preset builds exactly timm's registered `vit_*_patch16_dinov3` (names
  and shapes, on the meta device, the 7B too), with Meta's FFN widths, DINOv2's tap fractions and
  decoders, and parameter counts near Meta's published ones.
- The weights: random tiny models built by timm (its DINOv3 `Eva`) and by transformers
  (`DINOv3ViTModel`), and Meta's release format (a timm state dict renamed to the key names of
  facebookresearch/dinov3 `models/vision_transformer.py` and `layers/`), load strictly through the
  normal loader and give the library's own tokens at every tap; a wrong file (missing key, another
  RoPE, a key bias) is refused by name, and a wrong conversion would show in the tokens.
- The model: patch-16 crops, complementary dropout, one training step of every registered method
  and of change detection, a whole toy run, the crop check, evaluation at multiples of 16, and
  `pretrained: auto` (never fetched: licence-gated, found on disk or explained).
"""
from __future__ import annotations

import math
import re
import types
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import methods
from methods.step import SemiOptions, semi_step
from model import build_model, load_pretrained_encoder, load_weights
from model.change_dpt import ChangeDPT
from model.convert import dinov3_format
from model.encoders import DinoV3Encoder
from model.loading import WeightsMismatchError
from model.params import count, meta_model
from model.presets import DINOV3_PRESETS, META_PARAMS_M, PRESETS, DinoV3Preset, preset
from tests.test_convert import randomise
from tests.test_steps import make_batch
import engine.build
import engine.state
from util.config import ConfigError
from engine.config import load_config
from util.ema import EMATeacher
from util.losses import CrossEntropy

transformers = pytest.importorskip('transformers')

ROOT = Path(__file__).resolve().parents[1]
DIM, DEPTH, HEADS = 64, 4, 2       # head width 32: 8 RoPE periods
TAPS = tuple(range(DEPTH))
H, W = 80, 48                      # a 5 x 3 patch grid: not square, so a swapped RoPE axis shows
REGISTERS = 4
# Same library code on the same weights: the tokens agree exactly. Hugging Face computes q, k and v
# as three products, RoPE angles through 1 / period and attention in its own order: fp32 rounding
# (~1e-7 relative per operation) over four blocks of O(1) activations stays far below 1e-4, while a
# wrong conversion moves the tokens by O(1) (see test_a_wrong_conversion_would_show).
HF_TOL = 1e-4


def tiny_spec(timm_name: str = 'vit_small_patch16_dinov3_qkvb', ffn: str = 'mlp', mlp_ratio: float = 4.0
              ) -> DinoV3Preset:
    return DinoV3Preset(DIM, DEPTH, HEADS, TAPS, 16, (8, 16, 32, 32), ffn=ffn, mlp_ratio=mlp_ratio,
                        timm_name=timm_name)


# the three architectures a tiny model is built in: (timm model, ffn, Meta's ffn_ratio)
MLP = ('vit_small_patch16_dinov3_qkvb', 'mlp', 4.0)
SWIGLU = ('vit_small_plus_patch16_dinov3_qkvb', 'swiglu', 6.0)      # S+ and H+
NO_BIAS = ('vit_7b_patch16_dinov3', 'swiglu', 3.0)                  # the 7B: no qkv bias


class Holder(nn.Module):
    """What load_pretrained_encoder expects: a module with a `.backbone`."""

    def __init__(self, spec: DinoV3Preset):
        super().__init__()
        self.backbone = DinoV3Encoder(spec).eval()


def image(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(seed))


def timm_model(arch=MLP) -> nn.Module:
    name, ffn, ratio = arch
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                              mlp_ratio=ratio * 2 / 3 if ffn == 'swiglu' else ratio).eval()
    randomise(model)
    return model


def timm_taps(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """timm's own tapped tokens: every block after the final norm, class and register tokens dropped."""
    with torch.no_grad():
        taps = model.forward_intermediates(x, indices=list(TAPS), norm=True, output_fmt='NLC',
                                           intermediates_only=True)
        last = model.forward_features(x)[:, model.num_prefix_tokens:]     # the plain forward, as a check
    torch.testing.assert_close(taps[-1], last, rtol=0, atol=0)
    return taps


def loaded(state: dict, tmp_path: Path, arch=MLP, name: str = 'weights.pth') -> DinoV3Encoder:
    path = tmp_path / name
    if name.endswith('.safetensors'):
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    holder = Holder(tiny_spec(*arch))
    load_pretrained_encoder(holder, path)
    return holder.backbone


def our_taps(encoder: DinoV3Encoder, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return encoder(x)


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# ---- Meta's key names (facebookresearch/dinov3 models/vision_transformer.py, layers/) -----------------

def meta_periods(head_dim: int, base: float = 100.0) -> torch.Tensor:
    """`RopePositionEmbedding._init_weights` with `base`: base ** (2 i / (D / 2)), i < D / 4."""
    return base ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))


def as_meta_file(state: dict, periods: torch.Tensor, seed: int = 3) -> dict:
    """A timm DINOv3 state dict as Meta's DinoVisionTransformer names it: `storage_tokens`, `ls1.gamma`,
    SwiGLU `w1` (gate) / `w2` / `w3`, one `qkv.bias` with its `bias_mask` (key part 0, and here
    random key biases behind it, which the mask must cancel), `mask_token`, `rope_embed.periods`."""
    g = torch.Generator().manual_seed(seed)
    renames = ((r'^reg_token$', 'storage_tokens'), (r'\.gamma_([12])$', r'.ls\1.gamma'),
               (r'\.mlp\.fc1_g\.', '.mlp.w1.'), (r'\.mlp\.fc1_x\.', '.mlp.w2.'), (r'\.mlp\.fc2\.', '.mlp.w3.'))
    swiglu = any('.fc1_g.' in k for k in state)
    out = {}
    for key, value in state.items():
        if key.endswith('.attn.q_bias'):
            v = state[key.replace('q_bias', 'v_bias')]
            out[key.replace('q_bias', 'qkv.bias')] = torch.cat([value, torch.randn(value.shape, generator=g), v])
            out[key.replace('q_bias', 'qkv.bias_mask')] = torch.cat([torch.ones_like(value), torch.zeros_like(value),
                                                                      torch.ones_like(v)])
            continue
        if key.endswith('.attn.v_bias'):
            continue
        for pattern, repl in renames if swiglu else renames[:2]:
            key = re.sub(pattern, repl, key)
        out[key] = value
    out['mask_token'] = torch.randn(1, state['cls_token'].shape[-1], generator=g)
    out['rope_embed.periods'] = periods
    return out


# ---- the sizes ----------------------------------------------------------------------------------------

FULL = [s for s in DINOV3_PRESETS if s != 'tiny']


def test_every_size_and_name():
    assert FULL == ['small', 'small_plus', 'base', 'large', 'huge_plus', '7b'] == list(META_PARAMS_M)
    name, spec = preset('dinov3_base')
    assert name == 'dinov3_base' and spec is DINOV3_PRESETS['base']
    assert spec.meta_file == 'dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth'
    assert spec.hf_repo == 'facebook/dinov3-vitb16-pretrain-lvd1689m'
    with pytest.raises(ValueError, match='dinov3_small_plus'):
        preset('dinov3_giant')


@pytest.mark.parametrize('size', FULL)
def test_each_size_is_timms_registered_model(size):
    """Same parameter names and shapes as `timm.create_model(<timm_name>)` (nothing cut: the last tap is
    the last block; the final norm kept), and the FFN width Meta's rule gives for the preset."""
    spec = DINOV3_PRESETS[size]
    with torch.device('meta'):
        ours = DinoV3Encoder(spec)
        ref = timm.create_model(spec.timm_name, pretrained=False)
    shapes = lambda sd: {k: tuple(v.shape) for k, v in sd.items()}      # noqa: E731
    assert shapes(ours.state_dict()) == {f'model.{k}': v for k, v in shapes(ref.state_dict()).items()}
    assert not ours.unused_keys and spec.taps[-1] == spec.depth - 1
    hidden = int(spec.embed_dim * spec.mlp_ratio)
    if spec.ffn == 'swiglu':          # Meta's SwiGLUFFN: int(hidden * 2 / 3), rounded up to 8 (64 for the 7B)
        hidden = math.ceil(int(hidden * 2 / 3) / 8) * 8
    assert ours.model.blocks[0].mlp.fc2.in_features == hidden
    assert (ours.model.blocks[0].attn.q_bias is None) == (size == '7b')      # Meta: qkv_bias=False for the 7B
    assert ours.model.num_prefix_tokens == 1 + REGISTERS and ours.patch_size == 16


@pytest.mark.parametrize('size', FULL)
def test_taps_and_decoder_as_dinov2s(size):
    """Taps at DINOv2's depth fractions; the decoder of the DINOv2 of the same width (giant's above L)."""
    spec = DINOV3_PRESETS[size]
    same_depth = {p.depth: p.taps for p in PRESETS.values() if p.embed_dim > 128}
    taps = same_depth.get(spec.depth, tuple(round((i + 1) * spec.depth / 4) - 1 for i in range(4)))
    assert spec.taps == taps
    same_width = {p.embed_dim: p for p in PRESETS.values()}.get(spec.embed_dim, PRESETS['giant'])
    assert (spec.features, spec.out_channels) == (same_width.features, same_width.out_channels)


@pytest.mark.parametrize('size', FULL)
def test_parameter_counts_beside_metas(size):
    """Meta's model card rounds (ViT-S "21M": ours 21.60M; L "300M": 303.1M): within 3%; the decoder
    of an encoder as wide as a DINOv2 is that DINOv2's, parameter for parameter."""
    model = meta_model(f'dinov3_{size}', 21)
    encoder = count(model.backbone) / 1e6
    assert abs(encoder - META_PARAMS_M[size]) / META_PARAMS_M[size] < 0.03, encoder
    dinov2 = {'small': 'small', 'small_plus': 'small', 'base': 'base', 'large': 'large'}.get(size)
    if dinov2:
        assert count(model.head) == count(meta_model(f'dinov2_{dinov2}', 21).head)


# ---- the weights: each format, token for token ---------------------------------------------------------

@pytest.mark.parametrize('arch', [MLP, SWIGLU, NO_BIAS], ids=['mlp', 'swiglu', '7b-no-qkv-bias'])
def test_timm_weights_load_and_match(tmp_path, arch):
    ref = timm_model(arch)
    state = ref.state_dict()
    assert dinov3_format(state) == 'timm'
    ours = our_taps(loaded(state, tmp_path, arch), image())
    assert max_diff(ours, timm_taps(ref, image())) == 0


def test_timm_weights_without_qkv_bias_load_as_zero_biases(tmp_path):
    """timm's `vit_*_patch16_dinov3` without `_qkvb` (no q/v bias) into the encoder that has them."""
    ref = timm_model(('vit_small_patch16_dinov3', 'mlp', 4.0))
    encoder = loaded(ref.state_dict(), tmp_path)
    assert encoder.model.blocks[1].attn.q_bias.abs().max() == 0
    assert max_diff(our_taps(encoder, image()), timm_taps(ref, image())) == 0


@pytest.mark.parametrize('arch', [MLP, SWIGLU, NO_BIAS], ids=['mlp', 'swiglu', '7b-no-qkv-bias'])
@pytest.mark.parametrize('periods', ['fp32', 'bf16'])
def test_meta_weights_load_and_match(tmp_path, arch, periods):
    """Meta's names; its key biases (random here) are masked away by `bias_mask`. The file's RoPE
    periods may be rounded to bf16 (timm computes its own in fp32, and so do we)."""
    ref = timm_model(arch)
    p = meta_periods(DIM // HEADS)
    state = as_meta_file(ref.state_dict(), p.bfloat16().float() if periods == 'bf16' else p)
    if arch is NO_BIAS:      # the 7B: its untied norm of the local crops' class / register tokens
        state.update({'local_cls_norm.weight': torch.ones(DIM), 'local_cls_norm.bias': torch.zeros(DIM)})
    assert dinov3_format(state) == 'meta' and ('blocks.0.attn.qkv.bias' in state) == (arch is not NO_BIAS)
    ours = our_taps(loaded(state, tmp_path, arch), image())
    assert max_diff(ours, timm_taps(ref, image())) == 0


def hf_model(gated: bool) -> nn.Module:
    """A tiny DINOv3ViTModel; gated: the SwiGLU of S+ and H+ (their configs say hidden_act 'silu')."""
    config = transformers.DINOv3ViTConfig(hidden_size=DIM, intermediate_size=4 * DIM, num_hidden_layers=DEPTH,
                                          num_attention_heads=HEADS, num_register_tokens=REGISTERS,
                                          use_gated_mlp=gated, hidden_act='silu' if gated else 'gelu',
                                          image_size=H, patch_size=16)
    torch.manual_seed(0)
    model = transformers.DINOv3ViTModel(config).eval()
    randomise(model)
    return model


def hf_taps(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        hidden = model(pixel_values=x, output_hidden_states=True).hidden_states[1:]     # [0]: the embeddings
        return [model.norm(h)[:, 1 + REGISTERS:] for h in hidden]


def as_hub_file(state: dict) -> dict:
    """The names of the files on the Hub (transformers 4.56+ `layer.N.`; transformers 5 says `model.layer.N.`)."""
    return {k.removeprefix('model.'): v for k, v in state.items()}


@pytest.mark.parametrize('gated', [False, True], ids=['mlp', 'swiglu'])
@pytest.mark.parametrize('names', ['transformers', 'hub-file'])
def test_hf_weights_load_and_match(tmp_path, gated, names):
    ref = hf_model(gated)
    state = ref.state_dict() if names == 'transformers' else as_hub_file(ref.state_dict())
    assert any(k.startswith('model.layer.') for k in state) == (names == 'transformers')
    ours = our_taps(loaded(state, tmp_path, SWIGLU if gated else MLP), image())
    expected = hf_taps(ref, image())
    assert 0 < max_diff(ours, expected) < HF_TOL, max_diff(ours, expected)


def test_hf_safetensors_file_loads(tmp_path):
    """`model.safetensors` as the Hub serves it goes through the same conversion."""
    ref = hf_model(False)
    encoder = loaded(as_hub_file(ref.state_dict()), tmp_path, name='model.safetensors')
    assert max_diff(our_taps(encoder, image()), hf_taps(ref, image())) < HF_TOL


def test_a_wrong_conversion_would_show(tmp_path):
    """The token comparison is sharp: q and k rows swapped in one qkv, or RoPE at another base, move
    the tokens by far more than any tolerance above."""
    ref = timm_model()
    expected = timm_taps(ref, image())
    state = ref.state_dict()
    qkv = state['blocks.1.attn.qkv.weight']
    swapped = dict(state, **{'blocks.1.attn.qkv.weight': torch.cat([qkv[DIM:2 * DIM], qkv[:DIM], qkv[2 * DIM:]])})
    assert max_diff(our_taps(loaded(swapped, tmp_path), image()), expected) > 0.1
    encoder = loaded(state, tmp_path)
    encoder.model.rope.periods.copy_(meta_periods(DIM // HEADS, base=10000.0))
    assert max_diff(our_taps(encoder, image()), expected) > 0.1


# ---- the weights: what is refused, by name --------------------------------------------------------------

@pytest.fixture
def meta_state() -> dict:
    return as_meta_file(timm_model(SWIGLU).state_dict(), meta_periods(DIM // HEADS))


def test_meta_file_with_a_missing_key_is_refused(tmp_path, meta_state):
    del meta_state['blocks.1.ls1.gamma']
    with pytest.raises(WeightsMismatchError, match=r'missing keys: 1 \(backbone\.model\.blocks\.1\.gamma_1\)'):
        loaded(meta_state, tmp_path, SWIGLU)


def test_meta_file_with_an_unknown_key_is_refused(tmp_path, meta_state):
    meta_state['blocks.0.attn.k_norm.weight'] = torch.ones(DIM // HEADS)
    with pytest.raises(WeightsMismatchError, match=r'unexpected keys: 1 \(backbone\.model\.blocks\.0\.attn\.k_norm'):
        loaded(meta_state, tmp_path, SWIGLU)


@pytest.mark.parametrize('periods, message', [
    (meta_periods(DIM // HEADS, base=10000.0), 'differs from the encoder.s by up to'),
    (meta_periods(DIM // HEADS) * 1.02, 'differs from the encoder.s by up to 2.00%'),     # bf16 rounds by <= 0.4%
    (meta_periods(2 * DIM // HEADS), 'has 16 values, the encoder 8'),
], ids=['base-10000', 'off-by-2-percent', 'other-head-width'])
def test_meta_file_of_another_rope_is_refused(tmp_path, meta_state, periods, message):
    meta_state['rope_embed.periods'] = periods
    with pytest.raises(WeightsMismatchError, match=f'rope_embed.periods {message}'):
        loaded(meta_state, tmp_path, SWIGLU)


def test_meta_file_with_a_key_bias_is_refused(tmp_path, meta_state):
    """A key bias that its mask lets through (timm's DINOv3, as Meta's masked one, has none)."""
    meta_state['blocks.2.attn.qkv.bias_mask'] = torch.ones(3 * DIM)
    with pytest.raises(WeightsMismatchError, match=r'blocks\.2\.attn\.qkv\.bias: its key part is not zero'):
        loaded(meta_state, tmp_path, SWIGLU)


def test_hf_file_with_a_missing_part_names_it(tmp_path):
    state = hf_model(False).state_dict()
    del state['model.layer.1.attention.v_proj.weight']
    with pytest.raises(WeightsMismatchError, match=r'model\.layer\.1\.attention\.v_proj\.weight missing'):
        loaded(state, tmp_path)


def test_dinov2_weights_are_not_dinov3s(tmp_path):
    from model.dinov2 import DinoV2Encoder
    state = DinoV2Encoder(DIM, DEPTH, HEADS).state_dict()
    with pytest.raises(WeightsMismatchError, match='not DINOv3 encoder weights'):
        loaded(state, tmp_path)


# ---- the segmentation model ------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return build_model('dinov3_tiny', 3).eval()


def test_logits_at_the_patch_grid_and_the_crop(tiny):
    """75 x 70 sees the 4 x 4 patches of its 64 x 64 top-left crop, as a stride-16 conv would."""
    x = torch.randn(2, 3, 75, 70, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = tiny(x)
        assert logits.shape == (2, 3, 64, 64)
        torch.testing.assert_close(logits, tiny(x[..., :64, :64]), rtol=0, atol=0)
        taps = tiny.encode(x)
    assert tiny.patch_size == 16 and tiny.taps == (1, 3, 4, 5)
    assert [tuple(t.shape) for t in taps] == [(2, 16, 128)] * 4            # (B, h*w, C) tokens, as DINOv2's


def test_fused_attention_and_grad_checkpointing_agree():
    """timm's F.scaled_dot_product_attention and its matmul-softmax path agree to rounding; gradient
    checkpointing reruns blocks in backward and gives the same gradients."""
    x = torch.randn(2, 3, 48, 32, generator=torch.Generator().manual_seed(0))
    outs, grads = [], []
    for fused, ckpt in ((True, False), (False, False), (True, True)):
        torch.manual_seed(0)
        model = build_model('dinov3_tiny', 3).train()
        model.set_fused_attention(fused)
        model.set_grad_checkpointing(ckpt)
        assert all(a.fused_attn == fused for a in (b.attn for b in model.backbone.model.blocks))
        out = model(x)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    for out, grad in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-5)
        assert grad.keys() == grads[0].keys()
        for n in grad:
            torch.testing.assert_close(grad[n], grads[0][n], rtol=1e-4, atol=1e-6)


def test_semi_step_with_complementary_dropout_reaches_every_parameter():
    torch.manual_seed(0)
    student = build_model('dinov3_tiny', 3).train()
    batch_l, batch_u = make_batch(size=32)
    out = semi_step(student, EMATeacher(student), batch_l, batch_u, CrossEntropy(), SemiOptions(conf_thresh=0.0))
    assert out['loss_s1'] > 0 and all(torch.isfinite(v) for v in out.values())
    out['loss'].backward()
    missing = [n for n, p in student.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing, missing
    # The strong pairs' encoder tokens are dropped complementarily: the same draw as DINOv2's rule.
    feats = [torch.ones(6, 4, 128) for _ in range(4)]
    torch.manual_seed(5)
    dropped = student.perturb(feats, True, 2, False)
    assert all(torch.equal(f, dropped[0]) for f in dropped)
    assert torch.equal(dropped[0][2:4] + dropped[0][4:6], torch.full((2, 4, 128), 2.0))


# ---- every method, change detection and a whole run --------------------------------------------------------

METHOD_CROP = 112     # 7 x 7 patches of 16, 8 x 8 of 14: a grid computed with DINOv2's patch would not fit


def method_step(method_overrides: list[str]) -> dict:
    """One step of the loop's step function (`engine.build.make_step`) with a tiny DINOv3 at crop 112, on
    tests/test_methods.py's base settings; its outputs and the sum of |gradient| of the encoder."""
    from tests.step_record import FP32_FIXTURE
    base = [o for o in torch.load(FP32_FIXTURE, weights_only=True)['base'] if not o.startswith('crop_size=')]
    cfg = load_config(ROOT / 'configs/toy.yaml', base + [f'crop_size={METHOD_CROP}', 'backbone=dinov3_tiny']
                      + method_overrides)
    torch.manual_seed(0)
    student = engine.build.build_model(cfg).train()
    teacher = EMATeacher(student, cfg.ema_decay)
    run = types.SimpleNamespace(cfg=cfg, device=torch.device('cpu'))
    run_methods = methods.create(cfg, student, run.device)
    for m in run_methods:
        if m.state_key == 'prev_bank':
            m.bank.add(student)
            m.bank.add(teacher.model)
    tr = types.SimpleNamespace(run=run, ddp=student, teacher=teacher, state=engine.state.TrainState(), methods=run_methods)
    tr.state.epoch, tr.state.iteration = 0, 0          # epoch 1 to the methods: past the base's warm-ups
    options = methods.get(cfg.method).options
    step = engine.build.make_step(tr, options, 10)
    batch_l, batch_u = make_batch(size=METHOD_CROP)
    out = step(batch_u, batch_l) if options is not None else step(batch_l)
    out['loss'].backward()
    out = {k: v.detach() for k, v in out.items()}
    out['grad_encoder'] = sum(p.grad.abs().sum() for n, p in student.named_parameters()
                              if n.startswith('backbone.') and p.grad is not None)
    return out


@pytest.mark.parametrize('method', list(methods.names()))
def test_every_registered_method_steps_on_dinov3(method):
    out = method_step([f'method={method}'])
    assert all(torch.isfinite(v).all() for v in out.values()), out
    assert out['loss'] > 0 and out['grad_encoder'] > 0


def test_ipix_and_allspark_use_the_16_pixel_grid():
    """Their patch-grid arithmetic reads the student's patch (7 x 7 patches of 16 at crop 112)."""
    from methods.allspark import AllSpark, grouping_probabilities
    from methods.ipixmatch import IPixMatch, loss_size
    for method, cls in (('ipixmatch', IPixMatch), ('allspark', AllSpark)):
        cfg = load_config(ROOT / 'configs/toy.yaml', ['backbone=dinov3_tiny', f'method={method}'])
        m = cls(cfg, engine.build.build_model(cfg), torch.device('cpu'))
        assert (m.ipix.patch_size if method == 'ipixmatch' else m.patch_size) == 16
    assert loss_size(512, 512, 'patch', 16) == (32, 32) and loss_size(518, 518, 'patch') == (37, 37)
    batch_u = {'boxes': torch.zeros(2, 2, 112, 112, dtype=torch.bool)}
    assert grouping_probabilities(torch.randn(2, 3, 112, 112), batch_u, 2, 16).shape == (4, 3, 7, 7)


def test_change_detection_steps_on_dinov3():
    """Pairs through the shared step (CutMix, complementary dropout on |f_A - f_B|): every trainable
    parameter gets a gradient; swapping A and B changes nothing."""
    torch.manual_seed(0)
    model = ChangeDPT(DINOV3_PRESETS['tiny'], 2)
    s, b = METHOD_CROP, 2
    batch_l = {'image': torch.randn(b, 6, s, s), 'mask': torch.randint(0, 2, (b, s, s))}
    boxes = torch.zeros(b, 2, s, s, dtype=torch.bool)
    boxes[:, :, 5:15, 5:15] = True
    batch_u = {'image': torch.randn(b, 6, s, s), 'strong': torch.randn(b, 2, 6, s, s), 'boxes': boxes,
               'valid': torch.ones(b, s, s, dtype=torch.bool)}
    out = semi_step(model, EMATeacher(model), batch_l, batch_u, CrossEntropy(), SemiOptions(conf_thresh=0.0))
    out['loss'].backward()
    assert torch.isfinite(out['loss'])
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    x = batch_l['image']
    with torch.no_grad():
        model.eval()
        assert model(x).shape == (b, 2, s, s)
        torch.testing.assert_close(model(x), model(torch.cat((x[:, 3:], x[:, :3]), 1)), rtol=0, atol=1e-5)
    cfg = load_config(ROOT / 'configs/toy_cd.yaml', ['backbone=dinov3_tiny', 'crop_size=96'])
    assert cfg.backbone == 'dinov3_tiny'


def test_unimatch_v2_trains_evaluates_and_reloads_with_dinov3(toy, tmp_path):
    import unimatch_v2
    run_dir = tmp_path / 'run'
    unimatch_v2.main(['--config', str(ROOT / 'configs/toy.yaml'), '--split', '1_16', '--save-path', str(run_dir)]
                     + toy + ['epochs=1', 'backbone=dinov3_tiny', 'crop_size=48'])
    ckpt = torch.load(run_dir / 'latest.pth', weights_only=True)
    assert ckpt['config']['backbone'] == 'dinov3_tiny'
    assert any(k.startswith('backbone.model.blocks.5.') for k in ckpt['model_ema'])
    model = build_model('dinov3_tiny', ckpt['config']['nclass'])
    assert load_weights(model, run_dir / 'latest.pth') == 'ema'
    torch.testing.assert_close(model.state_dict()['backbone.model.reg_token'], ckpt['model_ema']['backbone.model.reg_token'])


# ---- the config, evaluation and `pretrained: auto` ---------------------------------------------------------

def test_crop_must_be_a_multiple_of_16():
    with pytest.raises(ConfigError, match=r"'crop_size' must be a multiple of 16.*dinov3_base, got 518; nearest: 512 or 528"):
        load_config(ROOT / 'configs/pascal.yaml', ['backbone=dinov3_base'])
    assert load_config(ROOT / 'configs/pascal.yaml', ['backbone=dinov3_base', 'crop_size=512']).crop_size == 512
    assert load_config(ROOT / 'configs/pascal.yaml').crop_size == 518                 # DINOv2's, unchanged


class SizeRecorder(nn.Module):
    """A 'segmentor' that records the sizes it is given."""

    def __init__(self, patch_size: int | None):
        super().__init__()
        if patch_size is not None:
            self.patch_size = patch_size
        self.sizes = []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return torch.zeros(x.shape[0], 2, *x.shape[-2:])


@pytest.mark.parametrize('patch, size', [(16, (48, 64)), (None, (42, 56)), (1, (42, 56))],
                         ids=['dinov3', 'no-patch-size', 'no-patch-grid'])
def test_evaluation_resizes_to_the_models_patch(patch, size):
    """DINOv3 at multiples of 16; a model without a patch grid (ResNet, MiT) or without `patch_size`
    at DINOv2's 14, as before."""
    from model.inference import predict
    model = SizeRecorder(patch)
    predict(model, torch.zeros(1, 3, 40, 56), 'original', 32, 2)
    assert model.sizes == [size]


def test_pretrained_auto_explains_the_licence(tmp_path, monkeypatch):
    from model import hub
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / 'cache'))
    with pytest.raises(hub.WeightsUnavailableError) as err:
        hub.load_pretrained(nn.Module(), 'auto', 'dinov3_small_plus')
    text = str(err.value)
    for part in ('DINOv3 License', 'dinov3-downloads', 'dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth',
                 'huggingface.co/facebook/dinov3-vits16plus-pretrain-lvd1689m', 'pretrained/', 'never downloaded',
                 'dinov3_small_plus.pth', 'pretrained=null'):
        assert part in text, part
    with pytest.raises(hub.WeightsUnavailableError, match='no weights exist for dinov3_tiny'):
        hub.load_pretrained(nn.Module(), 'auto', 'dinov3_tiny')


def test_pretrained_auto_finds_metas_file_in_the_cache(tmp_path, monkeypatch):
    """Meta's file under Meta's name where torch.hub leaves it: found and loaded strictly."""
    from model import hub
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / 'cache'))
    spec = DINOV3_PRESETS['small']
    torch.manual_seed(1)
    source = DinoV3Encoder(spec)
    state = {k.removeprefix('model.'): v for k, v in source.state_dict().items()}
    (tmp_path / 'cache').mkdir()
    torch.save(as_meta_file(state, meta_periods(spec.embed_dim // spec.num_heads).bfloat16()),
               tmp_path / 'cache' / spec.meta_file)
    model = build_model('dinov3_small', 3)
    assert hub.load_pretrained(model, 'auto', 'dinov3_small') == tmp_path / 'cache' / spec.meta_file
    torch.testing.assert_close(model.backbone.state_dict(), source.state_dict(), rtol=0, atol=0)
