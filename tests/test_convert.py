"""DINOv2 weights in timm's and Hugging Face transformers' formats: each library builds a random
model of a small DINOv2 (nothing is downloaded), its state dict is saved, loaded into this
project's encoder through the normal loader, and both encoders must give the same tokens."""
import re

import pytest
import timm
import torch

from model.convert import detect_format
from model.dinov2 import DinoV2Encoder
from model.loading import WeightsMismatchError, load_pretrained_encoder

transformers = pytest.importorskip('transformers')

DIM, DEPTH, HEADS = 96, 2, 4      # 96: timm's giant MLP ratio (5.33) gives DINOv2's SwiGLU width here
SIDE = 518                        # DINOv2's native grid: no position-embedding resize in any library


class Holder(torch.nn.Module):
    """What load_pretrained_encoder expects: a module with a `.backbone`."""

    def __init__(self, dim: int = DIM, ffn: str = 'mlp'):
        super().__init__()
        self.backbone = DinoV2Encoder(dim, DEPTH, HEADS, ffn=ffn).eval()


def randomise(module: torch.nn.Module) -> None:
    """Every parameter random at a scale that keeps activations near 1: matrices ~ 1/sqrt(fan-in),
    vectors (norm scales, biases, LayerScale, which starts at 1 and would hide ls1/ls2 mix-ups)
    1 + N(0, 0.5). Attention is then far from uniform, so q/k mix-ups show."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise * p.shape[-1] ** -0.5 if p.ndim > 1 else 1 + 0.5 * noise)


def image() -> torch.Tensor:
    return torch.randn(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))


def load_via_file(state: dict, tmp_path, ffn: str = 'mlp', dim: int = DIM) -> DinoV2Encoder:
    path = tmp_path / 'weights.pth'
    torch.save(state, path)
    holder = Holder(dim, ffn)
    load_pretrained_encoder(holder, path)
    return holder.backbone


def our_tokens(encoder: DinoV2Encoder) -> list[torch.Tensor]:
    with torch.no_grad():
        return encoder.get_intermediate_layers(image(), tuple(range(DEPTH)))


@pytest.mark.parametrize('name,ffn', [('vit_small_patch14_dinov2', 'mlp'), ('vit_giant_patch14_dinov2', 'swiglu')],
                         ids=['timm-mlp', 'timm-giant-swiglu'])
def test_timm_dinov2_weights_load_and_match(tmp_path, name, ffn):
    ref = timm.create_model(name, pretrained=False, embed_dim=DIM, depth=DEPTH, num_heads=HEADS).eval()
    randomise(ref)
    state = ref.state_dict()
    assert detect_format(state) == ('timm' if ffn == 'swiglu' else 'dinov2')
    ours = our_tokens(load_via_file(state, tmp_path, ffn))
    with torch.no_grad():
        expected = ref.forward_features(image())[:, ref.num_prefix_tokens:]
    torch.testing.assert_close(ours[-1], expected, rtol=1e-4, atol=1e-4)


def hf_model(swiglu: bool) -> 'transformers.Dinov2Model':
    # The SwiGLU width is rounded the same way by both at 128 (344), not at 96.
    config = transformers.Dinov2Config(hidden_size=128 if swiglu else DIM, num_hidden_layers=DEPTH,
                                       num_attention_heads=HEADS, image_size=SIDE, patch_size=14,
                                       use_swiglu_ffn=swiglu)
    model = transformers.Dinov2Model(config).eval()
    randomise(model)
    return model


# The names of the files on the Hugging Face Hub (`facebook/dinov2-*`), which transformers >= 5
# renames on load: q/k/v and the output projection, and the packed SwiGLU.
HUB_NAMES = ((r'\.attention\.([qkv])_proj\.', lambda m: '.attention.attention.'
              + {'q': 'query', 'k': 'key', 'v': 'value'}[m.group(1)] + '.'),
             (r'\.attention\.o_proj\.', '.attention.output.dense.'),
             (r'\.mlp\.down_proj\.', '.mlp.weights_out.'))


def as_hub_file(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        if '.mlp.gate_proj.' in key:      # packed: gate rows, then value rows
            up = state[key.replace('gate_proj', 'up_proj')]
            out[key.replace('gate_proj', 'weights_in')] = torch.cat([value, up])
            continue
        if '.mlp.up_proj.' in key:
            continue
        for pattern, repl in HUB_NAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


@pytest.mark.parametrize('swiglu', [False, True], ids=['mlp', 'swiglu'])
@pytest.mark.parametrize('names', ['transformers', 'hub-file'])
def test_hf_dinov2_weights_load_and_match(tmp_path, swiglu, names):
    ref = hf_model(swiglu)
    state = ref.state_dict()
    if names == 'hub-file':
        state = as_hub_file(state)
        assert any('attention.attention.query' in k for k in state)
    ours = our_tokens(load_via_file(state, tmp_path, 'swiglu' if swiglu else 'mlp', ref.config.hidden_size))
    with torch.no_grad():
        hidden = ref(pixel_values=image(), output_hidden_states=True).hidden_states
        expected = [ref.layernorm(h)[:, 1:] for h in hidden[1:]]
    for i, (a, b) in enumerate(zip(ours, expected)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f'block {i}')


def test_hf_weights_with_a_missing_part_name_it(tmp_path):
    state = hf_model(False).state_dict()
    del state['encoder.layer.1.attention.k_proj.weight']
    with pytest.raises(WeightsMismatchError, match=r'encoder\.layer\.1\.attention\.k_proj\.weight missing'):
        load_via_file(state, tmp_path)


def test_hf_weights_of_another_model_are_refused_by_key(tmp_path):
    """A key the conversion does not know (registers) is named, nothing is loaded."""
    state = hf_model(False).state_dict()
    state['embeddings.register_tokens'] = torch.zeros(1, 4, DIM)
    with pytest.raises(WeightsMismatchError, match='unexpected keys: 1 .*embeddings.register_tokens'):
        load_via_file(state, tmp_path)


def test_hf_weights_load_from_safetensors(tmp_path):
    """transformers' own file format (`model.safetensors`) goes through the same conversion."""
    from safetensors.torch import save_file
    ref = hf_model(False)
    path = tmp_path / 'model.safetensors'
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    holder = Holder()
    load_pretrained_encoder(holder, path)
    torch.testing.assert_close(holder.backbone.blocks[1].attn.qkv.weight,
                               torch.cat([ref.state_dict()[f'encoder.layer.1.attention.{p}_proj.weight']
                                          for p in 'qkv']), rtol=0, atol=0)
