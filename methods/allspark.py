"""AllSpark's channel-wise cross-attention bottleneck (Wang et al., CVPR'24; SEED_METHODS.md
section 4) on the deepest DPT tap, and the segmentor that carries it (docs/u2pl_allspark.md).

Tokens (B, N, C) of the last tapped block -> X = GELU(Linear_{C->D}), E = LN(X) (B, N, D), then
  labeled images   channel cross-attention: queries E_l W_q (hD channels of length N), keys and
                   values the channel maps of the in-batch unlabeled images (warm-up) or of the
                   semantic memory (each class block of D maps projected by W_k, W_v);
  unlabeled images channel self-attention, h heads of D channels;
  self mode        (eval, or no roles given) each image's own channels as keys and values through
                   the labeled weights: a prediction never depends on other images in the batch.
Scores are instance-normalised over each (channels x channels) matrix instead of scaled by
1/sqrt(d) (UCTransNet, as the official code). Out = LN([O_l; O_u] + X) -> GELU(Linear_{D->C}).
As the official code: Xavier-uniform linear weights, no bias on the attention outputs, LayerNorm
eps 1e-6.

The semantic memory is a plain attribute (no parameter, no buffer): the EMA teacher's update and
the model's state dict leave it out; the method checkpoints it on its own (`SemanticMemory`).
Every process writes the channels of every process (all-gathered in rank order), so the memories
stay equal; of those it keeps one in `world_size` per class, so a slot lives as many steps as on
one process of the official code (where each GPU writes only its own batch and memories differ):
without the thinning, 4 processes would turn a class's memory over 4x faster.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Method, register
from methods.step import StepContext
from model.dpt import DPTSegmentor
from model.presets import PATCH_SIZE, ModelPreset
from util import dist
from util.losses import cutmix

LAYER_NORM_EPS = 1e-6      # the official code's


class SemanticMemory:
    """S-Mem: per class, `slots` channel maps of length N in a ring buffer, zero until written.

    Allocated at the first update on the device of the channels (N is fixed by the crop from then
    on). Memory bound: nclass * slots * N * 4 bytes. `filled` marks written slots: classes never
    filled are left out of the attention instead of contributing noise (the official randn init).
    """

    def __init__(self, nclass: int, slots: int):
        self.nclass, self.slots = nclass, slots
        self.bank: torch.Tensor | None = None      # (K, slots, N) fp32
        self.filled: torch.Tensor | None = None    # (K, slots) bool
        self.ptr: torch.Tensor | None = None       # (K,) long

    def __deepcopy__(self, memo) -> 'SemanticMemory':
        # The EMA teacher's copy of the model starts empty: it runs in eval (self) mode only.
        return SemanticMemory(self.nclass, self.slots)

    def _allocate(self, n: int, device: torch.device) -> None:
        self.bank = torch.zeros(self.nclass, self.slots, n, device=device)
        self.filled = torch.zeros(self.nclass, self.slots, dtype=torch.bool, device=device)
        self.ptr = torch.zeros(self.nclass, dtype=torch.long, device=device)

    @torch.no_grad()
    def update(self, channels: torch.Tensor, classes: torch.Tensor) -> None:
        """channels (M, N) with their classes (M,), image by image in order. Every process's are
        gathered first (rank order), so the memories of all processes stay equal; one in
        world_size of each class's is written (module docstring)."""
        channels = dist.all_gather_cat(channels.float().contiguous())
        classes = dist.all_gather_cat(classes.contiguous())
        if self.bank is None or self.bank.shape[-1] != channels.shape[-1]:
            self._allocate(channels.shape[-1], channels.device)
        for c in classes.unique().tolist():
            items = channels[classes == c][::dist.world_size()][-self.slots:]
            idx = (self.ptr[c] + torch.arange(items.shape[0], device=items.device)) % self.slots
            self.bank[c, idx] = items
            self.filled[c, idx] = True
            self.ptr[c] = (self.ptr[c] + items.shape[0]) % self.slots

    def filled_classes(self) -> torch.Tensor | None:
        return None if self.filled is None else self.filled.any(1)

    def state_dict(self) -> dict:
        return {'bank': self.bank, 'filled': self.filled, 'ptr': self.ptr}

    def load_state_dict(self, state: dict, device: torch.device | str = 'cpu') -> None:
        if state.get('bank') is None:
            self.bank = self.filled = self.ptr = None
            return
        self.bank, self.filled, self.ptr = (state[k].to(device) for k in ('bank', 'filled', 'ptr'))


def instance_norm(scores: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Zero mean, unit variance over each score matrix (the last two dims): InstanceNorm2d without
    affine, as the official code applies it."""
    mean = scores.mean((-2, -1), keepdim=True)
    var = scores.var((-2, -1), unbiased=False, keepdim=True)
    return (scores - mean) / torch.sqrt(var + eps)


class AllSparkBottleneck(nn.Module):
    def __init__(self, embed_dim: int, nclass: int, dim: int = 0, heads: int = 2, dropout: float = 0.1):
        super().__init__()
        d = dim or embed_dim
        self.dim, self.heads = d, heads
        self.map_in = nn.Sequential(nn.Linear(embed_dim, d), nn.GELU())
        self.norm_in = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        # unlabeled self-attention (u) and labeled-to-unlabeled cross-attention (l)
        self.u_q, self.u_k, self.u_v = (nn.Linear(d, heads * d, bias=False) for _ in range(3))
        self.u_out = nn.Linear(heads * d, d, bias=False)
        self.l_q, self.l_k, self.l_v = (nn.Linear(d, heads * d, bias=False) for _ in range(3))
        self.l_out = nn.Linear(heads * d, d, bias=False)
        self.attn_drop, self.proj_drop = nn.Dropout(dropout), nn.Dropout(dropout)
        self.norm_out = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.map_out = nn.Sequential(nn.Linear(d, embed_dim), nn.GELU())
        self.memory = SemanticMemory(nclass, d)       # slots per class = D, as the official C
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ---- attention ---------------------------------------------------------------------------------

    def self_attention(self, e: torch.Tensor) -> torch.Tensor:
        """Unlabeled stream: (B, N, D) -> (B, N, D), h heads of D x D channel attention."""
        b, n, d = e.shape
        q, k, v = (f(e).reshape(b, n, self.heads, d).permute(0, 2, 3, 1) for f in (self.u_q, self.u_k, self.u_v))
        attn = self.attn_drop(instance_norm(q @ k.transpose(-2, -1)).softmax(-1))      # (B, h, D, D)
        out = (attn @ v).permute(0, 3, 1, 2).reshape(b, n, self.heads * d)
        return self.proj_drop(self.u_out(out))

    def cross_attention(self, e: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Labeled stream: queries (B, N, D); keys/values from `source` (J, N, D) channel blocks
        shared by every query image, or (B, 1, N, D) one block per image (self mode)."""
        b, n, _ = e.shape
        q = self.l_q(e).transpose(1, 2)                                 # (B, hD, N)
        k, v = self.l_k(source), self.l_v(source)                      # (..., J, N, hD)
        # (..., N, J * hD): the J blocks' channels side by side
        k = k.transpose(-3, -2).flatten(-2)
        v = v.transpose(-3, -2).flatten(-2)
        attn = self.attn_drop(instance_norm(q @ k).softmax(-1))        # (B, hD, J * hD)
        out = (attn @ v.transpose(-2, -1)).transpose(1, 2)             # (B, N, hD)
        return self.proj_drop(self.l_out(out))

    # ---- forward -----------------------------------------------------------------------------------

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], n_labeled: int | None = None,
                group_prob: torch.Tensor | None = None, use_memory: bool = False) -> torch.Tensor:
        """tokens (B, N, C) -> (B, N, C).

        n_labeled: training roles, tokens[:n_labeled] labeled and the rest unlabeled; None = self
            mode for every image (inference, the EMA teacher).
        group_prob: (B - n_labeled, K, h', w') class probabilities of the unlabeled images for
            Channel Semantic Grouping; their channels are written to the memory (training only).
        use_memory: labeled keys/values from the memory (after the warm-up) instead of the batch.
        """
        x = self.map_in(tokens)
        e = self.norm_in(x)
        if n_labeled is None or not self.training:
            out = self.cross_attention(e, e[:, None])
        else:
            e_l, e_u = e[:n_labeled], e[n_labeled:]
            if group_prob is not None and len(e_u):
                self.group_and_store(e_u, group_prob, grid)
            source = e_u
            filled = self.memory.filled_classes()
            if use_memory and filled is not None and bool(filled.any()):
                source = self.memory.bank[filled].transpose(1, 2).to(e.dtype)   # (K', N, D)
            out_l = self.cross_attention(e_l, source) if n_labeled else e_l
            out_u = self.self_attention(e_u) if len(e_u) else e_u
            out = torch.cat((out_l, out_u))
        return self.map_out(self.norm_out(out + x))

    @torch.no_grad()
    def group_and_store(self, e_u: torch.Tensor, prob: torch.Tensor, grid: tuple[int, int]) -> None:
        """Channel Semantic Grouping: channel c of image b goes to argmax_k cos(P_bk, E_b[:, c])
        (cosine over the N positions), then into that class's memory slots."""
        b, n, d = e_u.shape
        p = F.interpolate(prob.float(), size=grid, mode='bilinear', align_corners=False).flatten(2)
        sim = F.normalize(p, dim=2) @ F.normalize(e_u.float(), dim=1)              # (B, K, D)
        classes = sim.argmax(1)                                                      # (B, D)
        self.memory.update(e_u.float().transpose(1, 2).reshape(b * d, n), classes.flatten())


class AllSparkSegmentor(DPTSegmentor):
    """DPT segmentor whose deepest tap passes through `allspark` (parameters `allspark.*`) before
    the decoder; complementary dropout comes after it, so the memory holds undropped channels."""

    def __init__(self, spec: ModelPreset, nclass: int, drop_path: float = 0.0, dim: int = 0, heads: int = 2,
                 dropout: float = 0.1):
        super().__init__(spec, nclass, drop_path)
        self.allspark = AllSparkBottleneck(spec.embed_dim, nclass, dim, heads, dropout)

    def forward(self, x: torch.Tensor, comp_drop: bool = False, n_clean: int = 0, need_fp: bool = False,
                n_labeled: int | None = None, group_prob: torch.Tensor | None = None, use_memory: bool = False):
        grid, out_size = self.patch_grid(x)
        features = self.encode(x)
        features = [*features[:-1], self.allspark(features[-1], grid, n_labeled, group_prob, use_memory)]
        features = self.perturb(features, comp_drop, n_clean, need_fp)
        logits = self.decode(features, grid, out_size)
        return logits.chunk(2) if need_fp else logits


# ---- the method ------------------------------------------------------------------------------------

@dataclass
class Keys:
    allspark_warmup_epochs: int = 4      # labeled keys from the batch before, from the memory after
    allspark_dim: int = 0                # channels D inside the bottleneck (0 = encoder width)
    allspark_heads: int = 2
    allspark_dropout: float = 0.1


@torch.no_grad()
def grouping_probabilities(logits_w: torch.Tensor, batch_u: dict, views: int, patch: int = PATCH_SIZE
                           ) -> torch.Tensor:
    """The teacher's weak-view softmax CutMix-ed to each strong view like the pseudo-labels,
    area-resized to the patch grid: (B * views, K, h, w), for Channel Semantic Grouping."""
    grid = (logits_w.shape[-2] // patch, logits_w.shape[-1] // patch)
    prob = logits_w.softmax(1)
    return torch.cat([F.interpolate(cutmix(prob, batch_u['boxes'][:, v]), size=grid, mode='area')
                      for v in range(views)])


@register
class AllSpark(Method):
    """UniMatch V2 on AllSpark's model: the student gets its roles (labeled / unlabeled) and the
    teacher's probabilities for grouping; labeled keys come from the memory after the warm-up."""
    name = 'allspark'
    summary = 'UniMatch V2 + channel-wise cross-attention bottleneck with a class memory'
    Keys = Keys
    benchmark_recipe = True
    state_key = 'allspark_memory'

    @classmethod
    def check(cls, cfg, need) -> None:
        need(cfg.allspark_heads >= 1, 'allspark_heads', f'must be >= 1, got {cfg.allspark_heads}')
        for key in ('allspark_warmup_epochs', 'allspark_dim'):
            need(getattr(cfg, key) >= 0, key, f'must be >= 0, got {getattr(cfg, key)}')
        need(0.0 <= cfg.allspark_dropout < 1.0, 'allspark_dropout', f'must be in [0, 1), got {cfg.allspark_dropout}')

    @classmethod
    def build_model(cls, spec, nclass, drop_path, cfg) -> AllSparkSegmentor:
        return AllSparkSegmentor(spec, nclass, drop_path, cfg.allspark_dim, cfg.allspark_heads, cfg.allspark_dropout)

    def __init__(self, cfg, student, device):
        super().__init__(cfg, student, device)
        self.memory = self.state = student.allspark.memory
        self.patch_size = student.patch_size
        self.use_memory = False

    @classmethod
    def for_benchmark(cls, cfg, student, device) -> 'AllSpark':
        m = cls(cfg, student, device)
        m.use_memory = True
        return m

    def begin_step(self, epoch: int, iteration: int, iters_per_epoch: int) -> None:
        self.use_memory = epoch >= self.cfg.allspark_warmup_epochs

    def student_kwargs(self, s: StepContext) -> dict:
        return {'n_labeled': len(s.batch_l['image']), 'use_memory': self.use_memory,
                'group_prob': grouping_probabilities(s.logits_w, s.batch_u, s.opt.views, self.patch_size)}
