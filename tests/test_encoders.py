"""Encoders other than DINOv2 (model/encoders.py) feeding the same DPT head.

    python -m pytest tests/test_encoders.py -q

Each of the paper's other encoders (ResNet-152, BEiT-B/L, SAM-B/L from timm, MiT-B5 from
transformers) is built here at a reduced size (same library class, fewer and narrower blocks) and
runs forward and backward through `DPTSegmentor` with complementary dropout; its library's own
state dict loads strictly; the full sizes are built on the meta device only, to count parameters
against the paper's (FACTS §8).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import DPTSegmentor, WeightsMismatchError, build_model, load_pretrained_encoder, load_weights
from model.dpt import complementary_masks, resize_scales
from model.encoders import SegformerEncoder, TimmEncoder, spread_taps
from model.params import count, meta_model
from model.presets import ENCODERS, PAPER_PARAMS_M, LibraryPreset, preset

NCLASS = 5
SMALL_DECODER = dict(features=16, out_channels=(8, 16, 32, 32))
VIT_KWARGS = (('img_size', 64), ('embed_dim', 32), ('depth', 4), ('num_heads', 2))

# The paper's encoders at a size a 2-core CPU runs in a fraction of a second: the preset's library
# class with fewer and narrower blocks (ResNet keeps its widths, one bottleneck per stage).
SMALL = {
    'resnet152': dataclasses.replace(ENCODERS['resnet152'], kwargs=(('layers', (1, 1, 1, 1)),), **SMALL_DECODER),
    'beit_base': dataclasses.replace(ENCODERS['beit_base'], taps=(0, 1, 2, 3), kwargs=VIT_KWARGS, **SMALL_DECODER),
    'beit_large': dataclasses.replace(ENCODERS['beit_large'], taps=(0, 1, 2, 3), kwargs=VIT_KWARGS, **SMALL_DECODER),
    'sam_base': dataclasses.replace(ENCODERS['sam_base'], taps=(0, 1, 2, 3), **SMALL_DECODER,
                                    kwargs=VIT_KWARGS + (('global_attn_indexes', (1, 3)), ('window_size', 3))),
    'sam_large': dataclasses.replace(ENCODERS['sam_large'], taps=(0, 1, 2, 3), **SMALL_DECODER,
                                     kwargs=VIT_KWARGS + (('global_attn_indexes', (1, 3)), ('window_size', 3))),
    'mit_b5': dataclasses.replace(ENCODERS['mit_b5'], **SMALL_DECODER, kwargs=(
        ('depths', (1, 1, 2, 1)), ('hidden_sizes', (8, 16, 24, 32)), ('num_attention_heads', (1, 1, 1, 2)))),
    'timm:resnet10t': LibraryPreset('timm', 'resnet10t', None, **SMALL_DECODER),
}
SIDE = 64    # the reduced BEiTs are built for 64 x 64 inputs
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module', autouse=True)
def single_thread():
    """One intra-op thread: these tensors are too small to gain from more (see tests/test_model.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(name: str, seed: int = 0) -> DPTSegmentor:
    torch.manual_seed(seed)
    return DPTSegmentor(SMALL[name], NCLASS)


def images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def library_model(spec: LibraryPreset) -> nn.Module:
    """The model as its library builds it (classifier included), random weights."""
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in spec.kwargs}
    if spec.library == 'timm':
        import timm
        return timm.create_model(spec.name, pretrained=False, **kwargs)
    from transformers import SegformerConfig, SegformerForImageClassification
    return SegformerForImageClassification(SegformerConfig(**kwargs, num_labels=7))


def library_taps(library: nn.Module, spec: LibraryPreset, taps: tuple[int, ...], x: torch.Tensor) -> list[torch.Tensor]:
    """The tapped maps as the library itself computes them."""
    if spec.library == 'timm':
        return library.forward_intermediates(x, indices=list(taps), intermediates_only=True)
    return list(library.segformer(pixel_values=x, output_hidden_states=True).hidden_states)


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Every tensor to fresh values (norms and biases too), so a load that skips one is caught."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, t in module.state_dict().items():
            if k.endswith('running_var'):     # a variance stays positive
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return module


# --- builds, forward and backward at a small size ------------------------------------------------

@pytest.mark.parametrize('name', list(SMALL))
def test_forward_backward_with_complementary_dropout(name):
    model = small_model(name).train()
    with torch.no_grad():   # timm zero-inits each ResNet branch's last BN: no gradient flows there at init
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
    x = images(6, 3, SIDE, SIDE, seed=1)      # 2 clean images + 2 pairs of strong views
    logits = model(x, comp_drop=True, n_clean=2)
    assert logits.shape == (6, NCLASS, SIDE, SIDE) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    target = torch.randint(0, NCLASS, (6, SIDE, SIDE), generator=torch.Generator().manual_seed(2))
    F.cross_entropy(logits, target).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith('backbone.') for n in trainable) and any(n.startswith('head.') for n in trainable)
    no_grad = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f'no or all-zero gradient: {no_grad[:8]}'


@pytest.mark.parametrize('name', list(SMALL))
def test_comp_drop_leaves_clean_images_alone_and_perturbs_strong_ones(name):
    model = small_model(name).eval()
    x = images(6, 3, SIDE, SIDE, seed=1)
    torch.manual_seed(3)
    with torch.no_grad():
        plain = model(x)
        dropped = model(x, comp_drop=True, n_clean=2)
    torch.testing.assert_close(dropped[:2], plain[:2], rtol=0, atol=1e-5)
    change = (dropped[2:] - plain[2:]).flatten(1).abs().amax(1).view(2, 2)    # (view, pair)
    # One of the two pairs stays undropped in both views; the other changes in both.
    assert ((change <= 1e-5).all(0)).sum().item() == 1, change
    assert (change[:, ~(change <= 1e-5).all(0)] > 1e-4).all(), change


@pytest.mark.parametrize('name', ['resnet152', 'sam_base', 'mit_b5'])
def test_need_fp_returns_clean_and_perturbed_logits(name):
    model = small_model(name).eval()
    x = images(2, 3, SIDE, SIDE)
    torch.manual_seed(0)
    with torch.no_grad():
        clean, perturbed = model(x, need_fp=True)
        plain = model(x)
    torch.testing.assert_close(clean, plain, rtol=0, atol=1e-5)
    assert (perturbed - clean).abs().max() > 1e-4


# --- the head adapts to the taps' widths and strides ---------------------------------------------

@pytest.mark.parametrize('name, widths, reductions, resize', [
    ('resnet152', (256, 512, 1024, 2048), (4, 8, 16, 32), (nn.Identity,) * 4),
    ('mit_b5', (8, 16, 24, 32), (4, 8, 16, 32), (nn.Identity,) * 4),
    ('sam_base', (32,) * 4, (16,) * 4, (nn.ConvTranspose2d, nn.ConvTranspose2d, nn.Identity, nn.Conv2d)),
    ('beit_base', (32,) * 4, (16,) * 4, (nn.ConvTranspose2d, nn.ConvTranspose2d, nn.Identity, nn.Conv2d)),
])
def test_head_gets_each_taps_width_and_resize(name, widths, reductions, resize):
    model = small_model(name)
    assert model.backbone.widths == widths and model.backbone.reductions == reductions
    assert [p.in_channels for p in model.head.projects] == list(widths)
    assert [type(m) for m in model.head.resize_layers] == list(resize)
    with torch.no_grad():
        taps = model.encode(images(1, 3, SIDE, SIDE))
    assert [tuple(t.shape[1:]) for t in taps] == [(w, SIDE // r, SIDE // r) for w, r in zip(widths, reductions)]


def test_resize_scales():
    assert resize_scales((14, 14, 14, 14)) == (4, 2, 1, 0.5)
    assert resize_scales((4, 8, 16, 32)) == (1, 1, 1, 1)
    assert resize_scales((8, 16, 32, 32)) == (1, 1, 1, 0.5)
    with pytest.raises(ValueError, match='strides'):
        resize_scales((4, 8, 16, 48))


# --- complementary dropout with per-tap widths ---------------------------------------------------

def test_comp_drop_masks_each_taps_channels_with_shared_undropped_pairs():
    """Ones in, masks out: each tap gets its width's mask, m1 + m2 = 2 per pair, the clean images
    none, equal widths the same mask, and the same pairs stay undropped at every tap."""
    widths = (8, 16, 24, 24)
    n_clean, pairs = 1, 6
    b = n_clean + 2 * pairs
    torch.manual_seed(0)
    out = DPTSegmentor.perturb([torch.ones(b, c, 3, 2) for c in widths], True, n_clean, False)
    masks = [f[:, :, 0, 0] for f in out]                     # (B, C) per tap
    assert [m.shape[1] for m in masks] == list(widths)
    assert all(torch.equal(f, f[:, :, :1, :1].expand_as(f)) for f in out)    # one value per (image, channel)
    kept = []
    for m in masks:
        assert torch.equal(m[:n_clean], torch.ones_like(m[:n_clean]))
        m1, m2 = m[n_clean:n_clean + pairs], m[n_clean + pairs:]
        assert torch.equal(m1 + m2, torch.full_like(m1, 2))
        kept.append((m1 == 1).all(1))
        assert ((m1[~kept[-1]] == 0) | (m1[~kept[-1]] == 2)).all()
    assert all(torch.equal(k, kept[0]) for k in kept) and kept[0].sum().item() == pairs // 2
    assert torch.equal(masks[2], masks[3])
    assert not torch.equal(masks[1][:, :8], masks[0])        # distinct widths: independent draws


def test_comp_drop_of_one_width_is_the_original_draw():
    """Four taps of one width (a ViT): one mask of that width for all four, the original's draw."""
    torch.manual_seed(5)
    out = DPTSegmentor.perturb([torch.ones(6, 4, 12) for _ in range(4)], True, 2, False)
    torch.manual_seed(5)
    expected = torch.cat((torch.ones(2, 12), complementary_masks(2, 12, torch.empty(0))))
    for f in out:
        assert torch.equal(f, expected[:, None, :].expand_as(f))


# --- the library's weight format ----------------------------------------------------------------

@pytest.mark.parametrize('name', list(SMALL))
def test_library_state_dict_loads_strictly(name, tmp_path):
    spec = SMALL[name]
    torch.manual_seed(1)
    library = randomize_(library_model(spec), seed=1).eval()
    path = tmp_path / 'library.pth'
    torch.save(library.state_dict(), path)
    model = small_model(name).eval()
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    load_pretrained_encoder(model, path)
    # Every encoder tensor came from the file, the head is untouched, and the taps are the library's.
    lib_state = library.state_dict()
    ours = model.backbone.from_library(lib_state)
    assert ours.keys() == model.backbone.state_dict().keys()
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in ours.items())
    assert all(torch.equal(v, head_before[k]) for k, v in model.head.state_dict().items())
    x = images(2, 3, SIDE, SIDE, seed=4)
    with torch.no_grad():
        mine, theirs = model.encode(x), library_taps(library, spec, model.taps, x)
    assert len(mine) == len(theirs) == 4
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The same file through load_weights (what `pretrained=<path>` and evaluate.py use).
    other = small_model(name, seed=9)
    assert load_weights(other, path) == 'encoder'
    assert all(torch.equal(other.backbone.state_dict()[k], v) for k, v in ours.items())


def test_segformer_model_state_dict_loads_too(tmp_path):
    """transformers' SegformerModel (the encoder alone, no `segformer.` prefix) loads as well."""
    spec = SMALL['mit_b5']
    library = randomize_(library_model(spec).segformer, seed=2)
    torch.save(library.state_dict(), tmp_path / 'mit.pth')
    model = small_model('mit_b5')
    load_pretrained_encoder(model, tmp_path / 'mit.pth')
    assert all(torch.equal(model.backbone.model.state_dict()[k], v) for k, v in library.state_dict().items())


@pytest.mark.parametrize('name', ['resnet152', 'sam_base', 'mit_b5'])
def test_library_state_dict_with_a_missing_or_extra_key_is_refused(name, tmp_path):
    state = library_model(SMALL[name]).state_dict()
    dropped = next(k for k in state if k.endswith('.weight') and 'classifier' not in k and not k.startswith(('fc.', 'head.')))
    model = small_model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for change, key in (('drop', dropped), ('add', 'extra.weight')):
        bad = dict(state)
        if change == 'drop':
            del bad[key]
        else:
            bad[key] = torch.zeros(3)
        torch.save(bad, tmp_path / 'bad.pth')
        with pytest.raises(WeightsMismatchError, match=re.escape(key.removeprefix('segformer.'))):
            load_pretrained_encoder(model, tmp_path / 'bad.pth')
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_whole_model_state_dict_round_trips(tmp_path):
    source = randomize_(small_model('resnet152'), seed=3).eval()
    torch.save({'model': source.state_dict()}, tmp_path / 'ckpt.pth')
    model = small_model('resnet152', seed=4).eval()
    assert load_weights(model, tmp_path / 'ckpt.pth') == 'student'
    x = images(1, 3, SIDE, SIDE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


# --- input sizes --------------------------------------------------------------------------------

@pytest.mark.parametrize('name, shape, out', [
    ('sam_base', (1, 3, 80, 112), (80, 112)),        # other than its built size: positions resized
    ('sam_base', (1, 3, 70, 90), (64, 80)),          # cropped to multiples of 16
    ('resnet152', (1, 3, 70, 90), (70, 90)),         # hierarchical: any size, logits at the input size
    ('mit_b5', (2, 3, 45, 61), (45, 61)),
    ('beit_base', (1, 3, 70, 75), (64, 64)),         # BEiT: its built size, after the crop to 16
])
def test_logits_size(name, shape, out):
    with torch.no_grad():
        logits = small_model(name).eval()(images(*shape))
    assert logits.shape == (shape[0], NCLASS, *out) and torch.isfinite(logits).all()


def test_beit_runs_only_at_its_built_size():
    """timm's BEiT sizes its relative-position tables by the input (docs/encoders.md: crop 512 for beit_*)."""
    with pytest.raises(AssertionError, match='64'), torch.no_grad():
        small_model('beit_base')(images(1, 3, 80, 80))


# --- any timm model by name ---------------------------------------------------------------------

def test_any_timm_model_by_name():
    name, spec = preset('timm:resnet10t')
    assert name == 'timm:resnet10t' and spec.library == 'timm' and spec.name == 'resnet10t'
    model = build_model('timm:resnet10t', NCLASS)
    assert model.backbone.taps == (1, 2, 3, 4) and model.backbone.reductions == (4, 8, 16, 32)
    assert model.head.scratch.layer1_rn.out_channels == 256     # DINOv2-L's decoder, as the paper's hierarchical ones
    with torch.device('meta'):
        vit = build_model('timm:vit_small_patch16_224', NCLASS)
    assert vit.backbone.taps == (2, 5, 8, 11) and vit.patch_size == 16
    assert [type(m) for m in vit.head.resize_layers][2] is nn.Identity
    assert vit.head.scratch.layer1_rn.out_channels == 64        # DINOv2-S's decoder for a 384-wide ViT
    assert spread_taps(24) == (5, 11, 17, 23)


def test_unknown_backbone_names_the_choices():
    with pytest.raises(ValueError, match='resnet152.*mit_b5.*timm:'):
        preset('resnet153')
    with pytest.raises(RuntimeError, match='no_such_model|Unknown model'):
        build_model('timm:no_such_model', NCLASS)


def test_grad_checkpointing_gives_the_same_grads():
    grads = []
    for enable in (False, True):
        model = small_model('sam_base').train()
        model.set_grad_checkpointing(enable)
        calls = []    # runs of block 0: with checkpointing it runs again during backward
        block = model.backbone.model.blocks[0]
        block_forward = block.forward
        block.forward = lambda *args, **kwargs: (calls.append(1), block_forward(*args, **kwargs))[1]
        model(images(2, 3, SIDE, SIDE)).square().mean().backward()
        assert len(calls) == (2 if enable else 1), (enable, len(calls))
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6)


# --- the paper's sizes --------------------------------------------------------------------------

OTHER = [n for n in PAPER_PARAMS_M if n in ENCODERS]


def test_every_paper_encoder_has_a_preset_and_a_count():
    assert sorted(OTHER) == sorted(ENCODERS) == sorted(
        ['resnet152', 'beit_base', 'beit_large', 'mit_b5', 'sam_base', 'sam_large'])


@pytest.mark.parametrize('name', OTHER)
def test_parameter_counts_match_the_paper(name):
    """FACTS §8 (the paper's counts, one decimal). Its Table 9 runs were on ADE20K (150 classes): our
    count rounds to the paper's there; with 21 classes (Pascal) it is within 0.1% of it."""
    paper = PAPER_PARAMS_M[name]
    assert round(count(meta_model(name, 150)) / 1e6, 1) == paper
    n21 = count(meta_model(name, 21)) / 1e6
    assert abs(n21 - paper) / paper < 1e-3, (n21, paper)


@pytest.mark.parametrize('name, encoder_m, decoder_m', [
    ('beit_base', 86.2, 11.0), ('mit_b5', 81.4, 17.8), ('resnet152', 58.3, 20.3), ('sam_base', 88.9, 11.0)])
def test_encoder_and_decoder_split_as_the_paper(name, encoder_m, decoder_m):
    model = meta_model(name, 150)
    assert (round(count(model.backbone) / 1e6, 1), round(count(model.head) / 1e6, 1)) == (encoder_m, decoder_m)


@pytest.mark.parametrize('name, cls', [('resnet152', TimmEncoder), ('mit_b5', SegformerEncoder)])
def test_full_size_taps(name, cls):
    model = meta_model(name, 21)
    assert isinstance(model.backbone, cls)
    assert model.backbone.widths == {'resnet152': (256, 512, 1024, 2048), 'mit_b5': (64, 128, 320, 512)}[name]
    assert model.backbone.reductions == (4, 8, 16, 32)


# --- the training step and loop ------------------------------------------------------------------

def test_unimatch_v2_trains_and_evaluates_with_a_timm_encoder(toy, tmp_path):
    """A whole run (UniMatch V2 step with complementary dropout on the ResNet's four taps, EMA
    teacher, evaluation, checkpoint) with `backbone=timm:<name>`; the checkpoint loads back."""
    import unimatch_v2
    run_dir = tmp_path / 'run'
    unimatch_v2.main(['--config', str(ROOT / 'configs/toy.yaml'), '--split', '1_16', '--save-path', str(run_dir)]
                     + toy + ['epochs=1', 'backbone=timm:resnet10t'])
    ckpt = torch.load(run_dir / 'latest.pth', weights_only=True)
    assert ckpt['config']['backbone'] == 'timm:resnet10t'
    model = build_model('timm:resnet10t', ckpt['config']['nclass'])
    assert load_weights(model, run_dir / 'latest.pth') == 'ema'
    assert any(k.startswith('backbone.model.layer4.') for k in ckpt['model_ema'])


@pytest.mark.parametrize('method', ['unimatch_v2', 'fixmatch', 'unimatch_v1', 'prevmatch'])
def test_method_steps_run_with_a_library_encoder(method):
    """Three steps of each method that builds the plain model (as tests/test_methods.py records
    them for DINOv2): finite losses, and gradients reaching the encoder."""
    from tests.step_record import FP32_FIXTURE, run_case
    base = torch.load(FP32_FIXTURE, weights_only=True)['base']
    outs = run_case([f'method={method}', 'backbone=timm:resnet10t'], base)
    assert len(outs) == 3
    for out in outs:
        assert all(torch.isfinite(v).all() for v in out.values()), out
        assert out['grad_abs_sum'] > 0
