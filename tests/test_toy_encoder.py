"""The toy's pretrained encoder: the pretext task it comes from and the shipped weights file."""
import importlib.util
from pathlib import Path

import numpy as np
import torch

from model import build_model, load_pretrained_encoder
from engine.config import load_config

REPO = Path(__file__).resolve().parents[1]


def pretrain_tool():
    spec = importlib.util.spec_from_file_location('pretrain_toy_encoder', REPO / 'tools/pretrain_toy_encoder.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pretext_stream_gives_patch_class_shares():
    tool = pretrain_tool()
    stream = iter(tool.PretextStream(seed=0))
    seen = torch.zeros(len(tool.PRETEXT_CLASSES))
    for _ in range(12):
        img, shares = next(stream)
        assert img.shape == (3, tool.CROP, tool.CROP)
        assert shares.shape == (len(tool.PRETEXT_CLASSES), tool.CROP // 14, tool.CROP // 14)
        torch.testing.assert_close(shares.sum(0), torch.ones(shares.shape[1:]))
        seen += shares.sum((1, 2))
    assert (seen > 0).all()  # every pretext class shows up


def test_pretext_orientations_are_uniform_not_the_toy_classes():
    tool = pretrain_tool()
    rng = np.random.default_rng(0)
    angles = np.array([tool.pretext_texture(rng, 1)[1] for _ in range(2000)])
    # Stripes at every orientation: the toy's horizontal / vertical / diagonal split is not taught.
    hist, _ = np.histogram(angles, bins=12, range=(0, 180))
    assert hist.min() > 0.6 * hist.mean()
    assert [tool.pretext_texture(rng, c)[0] for c in (1, 2, 3)] == ['stripes', 'checker', 'dots']


def test_pretrain_a_few_steps_writes_a_loadable_dinov2_file(tmp_path, monkeypatch):
    tool = pretrain_tool()
    out = tmp_path / 'enc.pth'
    monkeypatch.setattr('sys.argv', ['pretrain', '--out', str(out), '--steps', '2', '--batch-size', '2',
                                     '--workers', '0'])
    tool.main()
    model = build_model('dinov2_tiny', 6)
    load_pretrained_encoder(model, out)          # strict DINOv2-format load
    state = torch.load(out, weights_only=True)
    torch.testing.assert_close(model.backbone.state_dict()['pos_embed'], state['pos_embed'])


def test_shipped_toy_encoder_loads_and_is_the_config_default():
    cfg = load_config(REPO / 'configs/toy.yaml')
    path = REPO / cfg.pretrained
    assert path.is_file(), f'{path} is missing: run tools/pretrain_toy_encoder.py'
    model = build_model(cfg.backbone, cfg.nclass)
    before = model.backbone.blocks[0].attn.qkv.weight.clone()
    load_pretrained_encoder(model, path)
    assert not torch.equal(before, model.backbone.blocks[0].attn.qkv.weight)
