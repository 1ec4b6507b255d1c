"""DINOv2 ViT encoder on top of timm's `VisionTransformer`.

timm supplies the blocks (fused scaled-dot-product attention, LayerScale, drop path) and uses the
same parameter names as DINOv2 (`blocks.N.attn.qkv`, `ls1.gamma`, ...), so the public DINOv2 files
load as they are. Two things are DINOv2's own and are done here:
- position embeddings at other grid sizes are resized exactly as DINOv2 does it (bicubic, no
  antialias, scale factor (n + 0.1) / 37 per axis); timm's own resize differs by up to 0.1 in the
  features at non-native sizes;
- `get_intermediate_layers` returns the patch tokens of the tapped blocks after the final LayerNorm.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.presets import NATIVE_IMG_SIZE, PATCH_SIZE, ModelPreset

INTERPOLATE_OFFSET = 0.1     # DINOv2's `interpolate_offset`: avoids floating-point rounding of the size


class SwiGLUFFN(nn.Module):
    """DINOv2-giant's feed-forward with its parameter names (`w12`, `w3`)."""

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True, **_: object):
        super().__init__()
        hidden = (int(hidden_features * 2 / 3) + 7) // 8 * 8   # DINOv2's fused SwiGLU width
        self.w12 = nn.Linear(in_features, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, in_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


def scaled_linear(x: torch.Tensor, linear: nn.Linear, gamma: torch.Tensor | None) -> torch.Tensor:
    """gamma * linear(x), with gamma (LayerScale) folded into the weight and bias: one elementwise
    pass over the activations fewer, forward and backward."""
    if gamma is None:
        return linear(x)
    bias = None if linear.bias is None else linear.bias * gamma
    return F.linear(x, linear.weight * gamma[:, None], bias)


class DinoV2Block(Block):
    """timm's pre-norm block (same modules and parameter names) computing the same function with
    fewer passes over the activations: LayerScale is folded into the projection before it
    (`fold_layer_scale`; False runs timm's forward, the original's order of operations).
    DINOv2 blocks have no q/k norm, attention-output norm, dropout or gate; they are not applied."""
    fold_layer_scale = True

    def forward(self, x: torch.Tensor, attn_mask: None = None, is_causal: bool = False) -> torch.Tensor:
        if not self.fold_layer_scale:
            return super().forward(x)
        x = x + self.drop_path1(self.attention(self.norm1(x)))
        mlp = self.mlp
        if isinstance(mlp, SwiGLUFFN):
            x1, x2 = mlp.w12(self.norm2(x)).chunk(2, dim=-1)
            h, out = F.silu(x1) * x2, mlp.w3
        else:
            h, out = mlp.act(mlp.fc1(self.norm2(x))), mlp.fc2
        return x + self.drop_path2(scaled_linear(h, out, getattr(self.ls2, 'gamma', None)))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn
        b, n, c = x.shape
        q, k, v = a.qkv(x).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if a.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:       # the original's arithmetic
            x = ((q * a.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return scaled_linear(x.transpose(1, 2).reshape(b, n, c), a.proj, getattr(self.ls1, 'gamma', None))


class DinoV2Encoder(VisionTransformer):
    """DINOv2 ViT/14 with a class token, LayerScale and a 37 x 37 native position grid."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0,
                 ffn: str = 'mlp', drop_path: float = 0.0, layer_scale_init: float = 1.0):
        super().__init__(
            img_size=NATIVE_IMG_SIZE, patch_size=PATCH_SIZE, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, init_values=layer_scale_init, num_classes=0,
            global_pool='', dynamic_img_size=True, drop_path_rate=drop_path,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            mlp_layer=SwiGLUFFN if ffn == 'swiglu' else Mlp, block_fn=DinoV2Block,
        )
        # Kept only so DINOv2 files load strictly; never used, so never trained.
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim), requires_grad=False)
        self.grad_checkpointing = False

    @classmethod
    def from_preset(cls, spec: ModelPreset, drop_path: float = 0.0) -> 'DinoV2Encoder':
        return cls(spec.embed_dim, spec.depth, spec.num_heads, spec.mlp_ratio, spec.ffn, drop_path)

    def interpolate_pos_encoding(self, grid_h: int, grid_w: int, dtype: torch.dtype) -> torch.Tensor:
        """Position embeddings (1, 1 + grid_h * grid_w, C) for a grid_h x grid_w patch grid."""
        pos = self.pos_embed
        side = int(math.sqrt(pos.shape[1] - 1))
        if grid_h == side and grid_w == side:
            return pos.to(dtype)
        pos = pos.float()
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        scale = ((grid_h + INTERPOLATE_OFFSET) / side, (grid_w + INTERPOLATE_OFFSET) / side)
        patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode='bicubic', antialias=False)
        assert patch_pos.shape[-2:] == (grid_h, grid_w), patch_pos.shape
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat((cls_pos, patch_pos), dim=1).to(dtype)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, h, w, C) patch tokens, as timm's dynamic-size patch embedding returns them.
        b, h, w, c = x.shape
        x = torch.cat((self.cls_token.expand(b, -1, -1).to(x.dtype), x.reshape(b, h * w, c)), dim=1)
        return x + self.interpolate_pos_encoding(h, w, x.dtype)

    def get_intermediate_layers(self, x: torch.Tensor, taps: tuple[int, ...]) -> list[torch.Tensor]:
        """Patch tokens (B, h*w, C) of each tapped block, through the final LayerNorm, class token dropped."""
        # timm's patch embedding asserts H, W % 14 == 0; crop to the patch grid instead (the rows and
        # columns a stride-14 conv would never reach), so any input size gives a (H // 14, W // 14) grid.
        x = x[..., :x.shape[-2] // PATCH_SIZE * PATCH_SIZE, :x.shape[-1] // PATCH_SIZE * PATCH_SIZE]
        x = self._pos_embed(self.patch_embed(x))
        x = self.norm_pre(x)
        outputs = []
        for i, block in enumerate(self.blocks[:max(taps) + 1]):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if i in taps:
                outputs.append(self.norm(x)[:, self.num_prefix_tokens:])
        return outputs

