"""Tests for `model/` (DINOv2 encoder on timm + DPT decoder) and the checkpoint loaders.

    python -m pytest tests/test_model.py -q

All run on CPU in seconds: tiny random-init models (`dinov2_tiny` or the reference fixture's even
smaller config); the small/base/large presets are only built on the meta device (no memory, no init).
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import pathlib
import pickle
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from model import PRESETS, DPTSegmentor, ModelPreset, WeightsMismatchError, build_model
from model.dinov2 import DinoV2Encoder
from model.dpt import complementary_masks
from model.loading import CLASSIFIER_KEY, load_pretrained_encoder, load_weights
from model.presets import NATIVE_IMG_SIZE, PATCH_SIZE
from util.checkpoint import UnsafeCheckpointError, safe_load

REFERENCE_DIR = Path(__file__).resolve().parent / 'fixtures'   # outputs and key lists of the original release
REFERENCE_FIXTURE = REFERENCE_DIR / 'tiny_dpt_dinov2_reference.pt'
# The fixture holds the original implementation's fp32 outputs (its own code, another CPU): agreement
# to fp32 rounding of the original's different arithmetic. |logits| <= 0.42 and |features| <= 3.7,
# whose fp32 ulps are 3e-8 and 2.4e-7: 1e-5 is ~40 ulps of the features; measured on an AMD EPYC
# 1.5e-7 (logits) and 7.2e-7 (features). Changes of 1e-7 in the arithmetic are the float64 step
# record's to catch (tests/test_methods.py, the same DPT model).
ORIGINAL_ATOL = 1e-5
NATIVE_GRID = NATIVE_IMG_SIZE // PATCH_SIZE          # 37
TINY_NCLASS = 5
# Smaller still than the `tiny` preset (the reference fixture's size): for tests that build many models.
MICRO = ModelPreset(embed_dim=32, depth=4, num_heads=2, taps=(0, 1, 2, 3), features=16, out_channels=(8, 16, 32, 32))


def tiny_model(nclass: int = TINY_NCLASS, seed: int = 0) -> DPTSegmentor:
    torch.manual_seed(seed)
    return DPTSegmentor(MICRO, nclass)


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every tensor of the state dict to fresh random values (LayerScale, norms and mask_token too),
    so a load that silently skips any tensor is caught."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.state_dict().values():
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return module


def images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope='module', autouse=True)
def single_thread():
    """One intra-op thread: these tensors are too small to gain from more, and on a busy 2-core
    machine OpenMP threads waiting for each other made every forward ~50x slower (2 s vs 0.03 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def model() -> DPTSegmentor:
    """Shared `dinov2_tiny` model in eval mode; tests that change weights or modes build their own."""
    torch.manual_seed(0)
    return build_model('dinov2_tiny', TINY_NCLASS).eval()


# --- 1. parity with the original implementation -------------------------------------------------

@pytest.fixture(scope='module')
def reference() -> dict:
    assert REFERENCE_FIXTURE.is_file(), f'reference fixture {REFERENCE_FIXTURE} is missing from the repository'
    return torch.load(REFERENCE_FIXTURE, weights_only=True)


def reference_model(ref: dict) -> DPTSegmentor:
    cfg = ref['config']
    # Fixed by the architecture, not by ModelPreset: the fixture must agree with our constants.
    assert cfg['patch_size'] == PATCH_SIZE and cfg['img_size'] == NATIVE_IMG_SIZE, cfg
    spec = ModelPreset(embed_dim=cfg['embed_dim'], depth=cfg['depth'], num_heads=cfg['num_heads'],
                       taps=tuple(cfg['intermediate_layers']), features=cfg['features'],
                       out_channels=tuple(cfg['out_channels']), mlp_ratio=cfg['mlp_ratio'])
    model = DPTSegmentor(spec, cfg['nclass'])
    model.load_state_dict(ref['state_dict'], strict=True)
    return model.eval()


def test_logits_match_the_original_implementation(reference):
    model = reference_model(reference)
    with torch.no_grad():
        for i, (x, expected) in enumerate(zip(reference['inputs'], reference['logits']), start=1):
            logits = model(x)
            assert logits.shape == expected.shape, (i, logits.shape, expected.shape)
            diff = max_abs_diff(logits, expected)
            assert diff <= ORIGINAL_ATOL, f'input {i} {tuple(x.shape)}: max abs diff {diff:.3g} of the logits'


def test_backbone_features_match_the_original_implementation(reference):
    model = reference_model(reference)
    with torch.no_grad():
        features = model.encode(reference['inputs'][2])
    expected = reference['backbone_features_input3']
    assert len(features) == len(expected) == 4
    for i, (f, e) in enumerate(zip(features, expected)):
        assert f.shape == e.shape, (i, f.shape, e.shape)
        diff = max_abs_diff(f, e)
        assert diff <= ORIGINAL_ATOL, f'tap {i}: max abs diff {diff:.3g} of the backbone features'


# --- 2. shapes ----------------------------------------------------------------------------------

@pytest.mark.parametrize('shape', [(1, 3, 56, 56), (2, 3, 70, 98), (1, 3, 75, 100), (3, 3, 42, 28)],
                         ids=['square', 'non-square', 'not-multiple-of-14', 'batch-3'])
def test_output_shape_is_input_cropped_to_the_patch_grid(model, shape):
    b, _, h, w = shape
    with torch.no_grad():
        logits = model(images(*shape))
    assert logits.shape == (b, TINY_NCLASS, h // PATCH_SIZE * PATCH_SIZE, w // PATCH_SIZE * PATCH_SIZE)
    assert torch.isfinite(logits).all()


def test_input_beyond_the_patch_grid_is_ignored(model):
    """75 x 100 sees the same 5 x 7 patches as its 70 x 98 top-left crop, as a stride-14 conv would."""
    x = images(1, 3, 75, 100)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x[..., :70, :98]), rtol=0, atol=1e-6)


def test_features_are_tokens_of_the_patch_grid(model):
    with torch.no_grad():
        features = model.encode(images(2, 3, 75, 100))
    spec = PRESETS['tiny']
    assert [f.shape for f in features] == [(2, 5 * 7, spec.embed_dim)] * len(spec.taps)


# --- 3. position embeddings ---------------------------------------------------------------------

def dinov2_pos_resize(pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """DINOv2's `interpolate_pos_encoding`, written out independently of model/dinov2.py."""
    cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
    patch_pos = patch_pos.reshape(1, NATIVE_GRID, NATIVE_GRID, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, scale_factor=((h + 0.1) / NATIVE_GRID, (w + 0.1) / NATIVE_GRID),
                              mode='bicubic', antialias=False)
    return torch.cat((cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, -1)), dim=1)


GRIDS = [(5, 7), (19, 25), (40, 30), (74, 74)]   # down- and upsampling, square and not


@pytest.fixture(scope='module')
def encoder() -> DinoV2Encoder:
    enc = DinoV2Encoder.from_preset(MICRO)
    with torch.no_grad():   # unit-scale values, so resize differences are not hidden by the 0.02 init
        enc.pos_embed.copy_(torch.randn(enc.pos_embed.shape, generator=torch.Generator().manual_seed(0)))
    return enc


def test_pos_embed_is_unchanged_at_the_native_grid(encoder):
    with torch.no_grad():
        assert torch.equal(encoder.interpolate_pos_encoding(NATIVE_GRID, NATIVE_GRID, torch.float32),
                           encoder.pos_embed)
        half = encoder.interpolate_pos_encoding(NATIVE_GRID, NATIVE_GRID, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, encoder.pos_embed.to(torch.bfloat16))


@pytest.mark.parametrize('grid', GRIDS, ids=[f'{h}x{w}' for h, w in GRIDS])
def test_pos_embed_is_resized_as_dinov2_does_it(encoder, grid):
    h, w = grid
    with torch.no_grad():
        ours = encoder.interpolate_pos_encoding(h, w, torch.float32)
        expected = dinov2_pos_resize(encoder.pos_embed, h, w)
    assert ours.shape == (1, 1 + h * w, encoder.embed_dim)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize('grid', GRIDS, ids=[f'{h}x{w}' for h, w in GRIDS])
def test_timm_pos_embed_resize_differs_from_dinov2(encoder, grid):
    """Why dinov2.py does not use timm's resize: timm interpolates to `size=` (with antialias by
    default), DINOv2 by `scale_factor=(n + 0.1) / 37`, which maps sample positions differently, so
    pretrained weights would see other position embeddings at every non-native size."""
    h, w = grid
    with torch.no_grad():
        ours = encoder.interpolate_pos_encoding(h, w, torch.float32)
        for antialias in (True, False):
            timm_pos = resample_abs_pos_embed(encoder.pos_embed, [h, w], [NATIVE_GRID, NATIVE_GRID],
                                              num_prefix_tokens=1, antialias=antialias)
            assert timm_pos.shape == ours.shape
            assert max_abs_diff(timm_pos, ours) > 0.1, (grid, antialias)


# --- 4. parameter names, shapes and counts of the real sizes ------------------------------------

def reference_keys(size: str) -> dict[str, tuple[int, ...]]:
    path = REFERENCE_DIR / f'dpt_dinov2_{size}_nclass21.keys.tsv'
    assert path.is_file(), f'reference key listing {path} is missing from the repository'
    rows = [line.split('\t') for line in path.read_text().splitlines()[1:] if line.strip()]
    return {key: tuple(ast.literal_eval(shape)) for key, shape in rows}


@functools.lru_cache(maxsize=None)
def meta_model(size: str) -> DPTSegmentor:
    """The real size with 21 classes on the meta device: shapes only, no memory, no init cost."""
    with torch.device('meta'):
        return build_model(f'dinov2_{size}', 21)


@pytest.mark.parametrize('size', ['small', 'base', 'large'])
def test_state_dict_keys_and_shapes_equal_the_original(size):
    model = meta_model(size)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = reference_keys(size)
    missing, extra = sorted(expected.keys() - ours.keys()), sorted(ours.keys() - expected.keys())
    assert not missing and not extra, f'missing {missing[:5]}, extra {extra[:5]}'
    wrong = {k: (ours[k], expected[k]) for k in expected if ours[k] != expected[k]}
    assert not wrong, f'shape (ours, original): {wrong}'


@pytest.mark.parametrize('size, millions', [('small', 24.8), ('base', 97.5), ('large', 335.6)])
def test_parameter_counts_equal_the_original(size, millions):
    n = sum(p.numel() for p in meta_model(size).parameters())
    assert round(n / 1e6, 1) == millions, n


# --- 5-8. loading files -------------------------------------------------------------------------

def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    unequal = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not unequal, f'differ: {unequal[:5]}'


@pytest.fixture
def dinov2_file(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A file shaped like the public `dinov2_vits14_pretrain.pth`: the encoder's plain state dict."""
    state = randomize_(DinoV2Encoder.from_preset(MICRO), seed=1).state_dict()
    assert 'mask_token' in state and not any(k.startswith(('head', 'backbone')) for k in state)
    path = tmp_path / 'dinov2_tiny.pth'
    torch.save(state, path)
    return path, state


def test_dinov2_encoder_file_loads_strictly(dinov2_file):
    path, state = dinov2_file
    model = tiny_model()
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    load_pretrained_encoder(model, path)
    loaded = model.backbone.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert all(torch.equal(v, head_before[k]) for k, v in model.head.state_dict().items())


def test_dinov2_encoder_file_through_load_weights(dinov2_file):
    path, state = dinov2_file
    model = tiny_model()
    assert load_weights(model, path) == 'encoder'
    assert all(torch.equal(model.backbone.state_dict()[k], state[k]) for k in state)


@pytest.mark.parametrize('change, key', [('drop', 'blocks.0.attn.qkv.weight'), ('add', 'register_tokens')])
def test_dinov2_file_with_missing_or_extra_key_is_refused(dinov2_file, tmp_path, change, key):
    path, state = dinov2_file
    state = dict(state)
    if change == 'drop':
        del state[key]
    else:
        state[key] = torch.zeros(1, 4, MICRO.embed_dim)
    bad = tmp_path / 'bad.pth'
    torch.save(state, bad)
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsMismatchError, match=re.escape(f'backbone.{key}')):
        load_pretrained_encoder(model, bad)
    # Nothing is loaded when anything is wrong.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def unimatch_v2_checkpoint(student: DPTSegmentor, ema: DPTSegmentor | None) -> dict:
    """The layout of the released `latest.pth`: DDP-prefixed model states, optimizer, counters."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    student(images(1, 3, 28, 28)).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    ckpt = {'model': {'module.' + k: v for k, v in student.state_dict().items()},
            'optimizer': optimizer.state_dict(), 'epoch': 3, 'previous_best': 1.0}
    if ema is not None:
        ckpt.update(model_ema={'module.' + k: v for k, v in ema.state_dict().items()},
                    previous_best_ema=1.5, best_epoch=2, best_epoch_ema=3)
    return ckpt


def test_unimatch_v2_checkpoint_round_trips(tmp_path):
    student, ema = randomize_(tiny_model(), seed=1), randomize_(tiny_model(), seed=2)
    path = tmp_path / 'latest.pth'
    torch.save(unimatch_v2_checkpoint(student, ema), path)
    x = images(2, 3, 42, 56, seed=3)
    with torch.no_grad():
        want_student, want_ema = student.eval()(x), ema.eval()(x)
    assert max_abs_diff(want_student, want_ema) > 1e-3     # the two weight sets are told apart

    model = tiny_model(seed=4).eval()
    assert load_weights(model, path) == 'ema'
    assert_same_state(model, ema)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want_ema)

    assert load_weights(model, path, weights='student') == 'student'
    assert_same_state(model, student)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want_student)


def test_checkpoint_without_ema_loads_the_student(tmp_path):
    student = randomize_(tiny_model(), seed=1)
    path = tmp_path / 'supervised.pth'
    torch.save(unimatch_v2_checkpoint(student, ema=None), path)
    model = tiny_model(seed=4)
    assert load_weights(model, path) == 'student'
    assert_same_state(model, student)
    with pytest.raises(WeightsMismatchError, match='model_ema'):
        load_weights(model, path, weights='ema')


def test_plain_state_dict_loads(tmp_path):
    source = randomize_(tiny_model(), seed=1).eval()
    path = tmp_path / 'plain.pth'
    torch.save(source.state_dict(), path)
    model = tiny_model(seed=4).eval()
    assert load_weights(model, path) == 'plain'
    assert_same_state(model, source)
    x = images(1, 3, 56, 42)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))


def test_wrong_class_count_names_the_classifier_and_both_counts(tmp_path):
    path = tmp_path / 'seven_classes.pth'
    torch.save({'model': tiny_model(nclass=7).state_dict()}, path)
    model = tiny_model(nclass=13)
    with pytest.raises(WeightsMismatchError) as err:
        load_weights(model, path)
    msg = str(err.value)
    assert CLASSIFIER_KEY == 'head.scratch.output_conv.2.weight'
    assert CLASSIFIER_KEY in msg, msg
    assert re.search(r'\b7\b', msg) and re.search(r'\b13\b', msg), msg
    assert model.nclass == 13


class TouchOnUnpickle:
    """A pickle that calls a function when loaded; harmless (touches a file in tmp_path)."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return pathlib.Path.touch, (self.target,)


def test_pickle_that_runs_code_is_refused(tmp_path):
    # Control: the payload really does run when unpickled without restrictions.
    control = tmp_path / 'control'
    pickle.loads(pickle.dumps(TouchOnUnpickle(control)))
    assert control.exists()

    target = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'model': {'w': torch.zeros(1)}, 'payload': TouchOnUnpickle(target)}, path)
    with pytest.raises(UnsafeCheckpointError):
        safe_load(path)
    assert not target.exists()
    with pytest.raises(UnsafeCheckpointError):
        load_weights(tiny_model(), path)
    assert not target.exists()


# --- 9. complementary dropout -------------------------------------------------------------------

@pytest.mark.parametrize('pairs', [1, 2, 3, 4, 7])
def test_complementary_masks_invariants(pairs):
    torch.manual_seed(pairs)
    channels = 64
    masks = complementary_masks(pairs, channels, torch.empty(0))
    assert masks.shape == (2 * pairs, channels)
    m1, m2 = masks[:pairs], masks[pairs:]
    assert torch.equal(m1 + m2, torch.full_like(m1, 2))
    assert set(masks.unique().tolist()) <= {0.0, 1.0, 2.0}
    kept = (m1 == 1).all(dim=1) & (m2 == 1).all(dim=1)
    assert kept.sum().item() == pairs // 2
    dropped = masks[torch.cat((~kept, ~kept))]
    assert ((dropped == 0) | (dropped == 2)).all()
    # Per (image, channel): both 0 and 2 occur within a dropped image (64 channels: a miss is ~2^-63).
    for row in dropped:
        assert (row == 0).any() and (row == 2).any()


@pytest.mark.parametrize('pairs', [2, 5])
def test_complementary_masks_preserve_the_expectation(pairs):
    torch.manual_seed(0)
    draws = torch.stack([complementary_masks(pairs, 16, torch.empty(0)) for _ in range(4000)])
    # Each entry has mean 1 and variance <= 1: 4000 draws -> std <= 0.016; 0.1 is > 6 std.
    mean = draws.mean(dim=0)
    assert (mean - 1).abs().max().item() < 0.1, mean
    assert abs(draws.mean().item() - 1) < 0.01
    # Which pairs stay undropped is random: each pair is kept floor(P/2)/P of the time.
    kept = (draws[:, :pairs] == 1).all(dim=2).float().mean(dim=0)
    expected = (pairs // 2) / pairs
    assert (kept - expected).abs().max().item() < 0.05, kept


@pytest.mark.parametrize('like', [torch.empty(2, dtype=torch.float64), torch.empty(2, dtype=torch.bfloat16),
                                  torch.empty(2, device='meta', dtype=torch.float16)],
                         ids=['float64', 'bfloat16', 'meta-float16'])
def test_complementary_masks_follow_the_features_device_and_dtype(like):
    masks = complementary_masks(3, 8, like)
    assert masks.device == like.device and masks.dtype == like.dtype
    if like.device.type != 'meta':
        assert torch.equal(masks[:3] + masks[3:], torch.full((3, 8), 2, dtype=like.dtype))


@pytest.mark.parametrize('n_clean, pairs', [(0, 2), (2, 3), (1, 1)])
def test_comp_drop_leaves_clean_images_alone_and_perturbs_strong_ones(model, n_clean, pairs):
    torch.manual_seed(0)
    x = images(n_clean + 2 * pairs, 3, 42, 56, seed=1)
    with torch.no_grad():
        plain = model(x)
        dropped = model(x, comp_drop=True, n_clean=n_clean)
        if n_clean:
            alone = model(x[:n_clean])
    assert dropped.shape == plain.shape
    if n_clean:
        diff = max_abs_diff(dropped[:n_clean], alone)
        assert diff <= 1e-5, f'labeled logits changed by {diff:.3g}'
    s1, s2 = dropped[n_clean:].chunk(2)
    p1, p2 = plain[n_clean:].chunk(2)
    change = torch.stack([(s1 - p1).flatten(1).abs().amax(1), (s2 - p2).flatten(1).abs().amax(1)])  # (2, pairs)
    # floor(pairs / 2) pairs are undropped (both views unchanged); the others change in both views.
    unchanged = (change <= 1e-5).all(dim=0)
    assert unchanged.sum().item() == pairs // 2, change
    assert (change[:, ~unchanged] > 1e-3).all(), change


def test_comp_drop_needs_an_even_number_of_strong_images(model):
    with pytest.raises((AssertionError, ValueError)), torch.no_grad():
        model(images(4, 3, 28, 28), comp_drop=True, n_clean=1)


# --- 10. feature-perturbation stream ------------------------------------------------------------

def test_need_fp_returns_clean_and_perturbed_logits(model):
    torch.manual_seed(0)
    x = images(2, 3, 42, 56)
    with torch.no_grad():
        out = model(x, need_fp=True)
        plain = model(x)
    assert isinstance(out, (tuple, list)) and len(out) == 2
    clean, perturbed = out
    assert clean.shape == perturbed.shape == plain.shape
    diff = max_abs_diff(clean, plain)
    assert diff <= 1e-5, f'clean stream differs from a plain forward by {diff:.3g}'
    assert max_abs_diff(perturbed, clean) > 1e-3


# --- 11-12. gradients ---------------------------------------------------------------------------

def segmentation_loss(model: DPTSegmentor, seed: int = 0) -> torch.Tensor:
    """Cross-entropy of 2 labeled images + 2 pairs of strong views in one comp_drop forward."""
    torch.manual_seed(seed)
    x = images(6, 3, 42, 56, seed=seed)
    logits = model(x, comp_drop=True, n_clean=2)
    target = torch.randint(0, model.nclass, (logits.shape[0], *logits.shape[-2:]),
                           generator=torch.Generator().manual_seed(seed))
    return F.cross_entropy(logits, target)


def test_unused_parameters_are_frozen():
    model = tiny_model()
    assert not model.backbone.mask_token.requires_grad
    unit = model.head.scratch.refinenet4.resConfUnit1
    assert all(not p.requires_grad for p in unit.parameters())
    assert all(p.requires_grad for p in model.head.scratch.refinenet3.resConfUnit1.parameters())


def test_every_trainable_parameter_gets_a_gradient():
    model = tiny_model().train()
    segmentation_loss(model).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(list(model.parameters())) - 5   # mask_token + resConfUnit1's 4 tensors
    no_grad = [n for n, p in trainable.items() if p.grad is None]
    assert not no_grad, f'no gradient: {no_grad}'
    zero = [n for n, p in trainable.items() if not p.grad.abs().sum() > 0]
    assert not zero, f'all-zero gradient: {zero}'
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen_with_grad


def test_lock_backbone_freezes_only_the_backbone():
    model = tiny_model().train()
    model.lock_backbone()
    assert all(not p.requires_grad for p in model.backbone.parameters())
    segmentation_loss(model).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    head = [(n, p) for n, p in model.head.named_parameters() if not n.startswith('scratch.refinenet4.resConfUnit1.')]
    assert all(p.requires_grad and p.grad is not None for _, p in head), [n for n, p in head if p.grad is None]


def test_grad_checkpointing_gives_the_same_loss_and_grads():
    results = []
    for enable in (False, True):
        model = tiny_model(seed=0).train()
        model.set_grad_checkpointing(enable)
        calls = []   # runs of block 0 (forward hooks do not fire on checkpoint recomputation)
        block, block_forward = model.backbone.blocks[0], model.backbone.blocks[0].forward
        block.forward = lambda *args, **kwargs: (calls.append(1), block_forward(*args, **kwargs))[1]
        loss = segmentation_loss(model, seed=1)
        loss.backward()
        # With checkpointing each block runs again during backward.
        assert len(calls) == (2 if enable else 1), (enable, len(calls))
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f'{n}: {m}')


@pytest.mark.parametrize('ffn', ['mlp', 'swiglu'])
@pytest.mark.parametrize('fused_attn', [True, False], ids=['sdpa', 'math'])
def test_layer_scale_folding_gives_the_same_loss_and_grads(ffn, fused_attn):
    """The blocks' default forward folds LayerScale into the projections; timm's forward (the
    original's order of operations) gives the same loss and gradients, gamma included."""
    results = []
    for fold in (True, False):
        torch.manual_seed(0)
        model = DPTSegmentor(dataclasses.replace(MICRO, ffn=ffn), TINY_NCLASS).train()
        with torch.no_grad():
            for name, p in model.backbone.named_parameters():
                if name.endswith('.gamma'):
                    p.uniform_(0.5, 1.5)
        model.set_fused_attention(fused_attn)
        model.set_layer_scale_folding(fold)
        loss = segmentation_loss(model, seed=1)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-6)
    assert any(n.endswith('ls1.gamma') for n in grads_a)
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f'{n}: {m}')


def test_logits_are_fp32_nchw_under_autocast_on_a_channels_last_model():
    """The losses' layout whatever the model's: bf16 autocast and channels-last weights still give
    contiguous fp32 logits, close to the fp32 model's."""
    model = tiny_model().eval()
    x = images(2, 3, 42, 56, seed=0)
    with torch.no_grad():
        expected = model(x)
        model.to(memory_format=torch.channels_last)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            logits = model(x)
    assert logits.dtype == torch.float32 and logits.is_contiguous()
    assert max_abs_diff(logits, expected) < 0.05 * expected.abs().max()


def test_safetensors_export_round_trips(tmp_path):
    """tools/export_weights.py writes EMA weights as safetensors; they load into an equal model."""
    from tools.export_weights import export
    student, ema = build_model('dinov2_tiny', 4), build_model('dinov2_tiny', 4)
    torch.save({'model': {'module.' + k: v for k, v in student.state_dict().items()},
                'model_ema': {'module.' + k: v for k, v in ema.state_dict().items()}}, tmp_path / 'ckpt.pth')
    assert export(tmp_path / 'ckpt.pth', tmp_path / 'w.safetensors') == 'ema'
    loaded = build_model('dinov2_tiny', 4)
    load_weights(loaded, tmp_path / 'w.safetensors')
    for k, v in ema.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_math_attention_also_matches_the_original_implementation(reference):
    model = reference_model(reference)
    model.set_fused_attention(False)    # the path `attention: auto` takes for bf16 on the CPU
    assert not any(b.attn.fused_attn for b in model.backbone.blocks)
    with torch.no_grad():
        for x, expected in zip(reference['inputs'], reference['logits']):
            assert max_abs_diff(model(x), expected) <= ORIGINAL_ATOL


@pytest.mark.parametrize('attention, device, precision, fused', [
    ('auto', 'cpu', 'bf16', False), ('auto', 'cpu', 'fp16', False), ('auto', 'cpu', 'fp32', True),
    ('auto', 'cuda', 'bf16', True), ('sdpa', 'cpu', 'bf16', True), ('math', 'cuda', 'fp32', False)])
def test_attention_choice(attention, device, precision, fused):
    from engine.config import Config, fused_attention
    assert fused_attention(Config(attention=attention, precision=precision), device) is fused
