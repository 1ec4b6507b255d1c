"""IPixMatch's inter-pixel relation loss (Wu, Li, Xiao, arXiv 2404.18891; no official code).

Each class channel of a logit map becomes a *spatial* distribution: a softmax over the teacher's
confident pixels Omega with temperature t. The student's per-class spatial distributions are matched
to the teacher's, with KL or with 1 - Pearson correlation (the paper's two variants):

    L_IPix = 1 / (C * log|Omega|) * sum_k phi(psi(p_k), psi(q_k)),   psi(z)_i = softmax_{j in Omega}(z_j / t)

The total is L = L_base + alpha * ramp(i) * L_IPix, ramp(i) = exp(-5 (1 - i / i_w)^2) for i < i_w.

Points the paper leaves open, decided as the spec (SEED_METHODS.md section 2.3) proposes:
  * KL direction: KL(teacher || student), the teacher's distribution as the target (as CWD).
  * Views: the loss is computed on every strong view and averaged over views.
  * CutMix: the teacher's weak-view *logits* are CutMix-ed with each view's box (the same box and
    reversed-batch partner as the pseudo-labels), so teacher and student see the same pixels.
  * Omega is per image: max softmax of the (mixed) teacher logits > tau, padding pixels excluded.
    The loss is the mean over the batch's images; an image with |Omega| < 2 (log|Omega| <= 0)
    contributes 0 (and so a batch without confident pixels gives 0, not NaN).
  * Classes: all C, present or not, as the paper's sum.
  * Resolution ('native' by default): the DPT head's own logit grid (8x the patch grid, 296^2 for a
    518 crop), cheaper and less peaky than the crop; 'crop' keeps the full crop, 'patch' uses the
    37^2 patch grid. The model returns logits upsampled to the crop, so 'native' and 'patch'
    resample them (bilinear, align_corners=True, as the DPT upsampling); this is close to, not
    exactly, the head's pre-upsampling logits. log|Omega| depends on the resolution, so alpha may
    need re-tuning if it is changed.
  * No t^2 factor (the paper mentions none).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from methods.base import LossMethod, register
from methods.step import StepContext, Term, mix_targets
from model.presets import PATCH_SIZE
from model.inference import patch_of

LOSSES = ('kl', 'cr')
RESOLUTIONS = ('native', 'crop', 'patch')
NATIVE_PER_PATCH = 8       # the DPT head's logits come out at 8x the patch grid (37 -> 296)
MASKED = -1e9              # logit given to pixels outside Omega: exp() underflows to exactly 0
RAMP_SHARPNESS = 5.0       # the paper's Gaussian warm-up exp(-5 (1 - i / i_w)^2)


@dataclass
class IPixOptions:
    """L_IPix settings for one step; `weight` is alpha times the warm-up ramp at this step."""
    weight: float = 1.0
    thresh: float = 0.8          # tau: teacher max softmax above which a pixel is in Omega
    temperature: float = 4.0     # t of the spatial softmax
    loss: str = 'kl'             # 'kl' or 'cr' (1 - Pearson correlation)
    resolution: str = 'native'   # 'native', 'crop' or 'patch' (see the module docstring)
    patch_size: int = PATCH_SIZE  # the student's (DINOv2: 14, DINOv3: 16)


def warmup_ramp(step: int, warmup_steps: int) -> float:
    """The paper's Gaussian ramp: exp(-5 (1 - step / warmup_steps)^2) before warmup_steps, then 1.
    exp(-5) ~ 0.0067 at step 0, so the loss is active (if small) from the first iteration."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return math.exp(-RAMP_SHARPNESS * (1.0 - step / warmup_steps) ** 2)


def loss_size(height: int, width: int, resolution: str, patch: int = PATCH_SIZE) -> tuple[int, int]:
    """Grid on which L_IPix is computed for logits of (height, width) (a multiple of the patch)."""
    if resolution == 'crop':
        return height, width
    per_patch = NATIVE_PER_PATCH if resolution == 'native' else 1
    return height // patch * per_patch, width // patch * per_patch


def resample(teacher: torch.Tensor, student: torch.Tensor, valid: torch.Tensor, resolution: str,
             patch: int = PATCH_SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher and student logits (B, C, H, W) and valid (B, H, W) bool at the loss grid. A resampled
    pixel is valid only when every crop pixel it is interpolated from is."""
    size = loss_size(*teacher.shape[-2:], resolution, patch)
    if size == tuple(teacher.shape[-2:]):
        return teacher, student, valid
    resize = lambda x: F.interpolate(x, size=size, mode='bilinear', align_corners=True)  # noqa: E731
    valid = resize(valid[:, None].float())[:, 0] > 1 - 1e-6
    return resize(teacher), resize(student), valid


def confident_pixels(teacher: torch.Tensor, valid: torch.Tensor, thresh: float) -> torch.Tensor:
    """Omega as a mask (B, H, W) bool: max softmax of the teacher's logits (B, C, H, W) > thresh,
    on valid pixels only."""
    return (teacher.float().softmax(1).amax(1) > thresh) & valid


def spatial_log_softmax(logits: torch.Tensor, omega: torch.Tensor, temperature: float) -> torch.Tensor:
    """log psi: per image and class, log-softmax over the pixels of Omega of logits / t.

    logits (B, C, N); omega (B, N) bool. Entries outside Omega are very negative (their psi is 0);
    callers mask them out. A row with an empty Omega is finite (uniform), never NaN.
    """
    z = (logits.float() / temperature).masked_fill(~omega[:, None], MASKED)
    return z.log_softmax(-1)


def kl_per_class(log_p: torch.Tensor, log_q: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """KL(psi_p || psi_q) over Omega: (B, C, N) log-distributions -> (B, C)."""
    terms = log_p.exp() * (log_p - log_q)
    return torch.where(omega[:, None], terms, 0.0).sum(-1)


def one_minus_pearson(log_p: torch.Tensor, log_q: torch.Tensor, omega: torch.Tensor,
                      eps: float = 1e-8) -> torch.Tensor:
    """1 - Pearson correlation of psi_p and psi_q over Omega: (B, C, N) -> (B, C).

    Computed on n * psi (mean 1 over Omega; correlation is scale-free) so that eps stays negligible
    for large Omega. A constant distribution has no correlation: the term is then 1."""
    m = omega[:, None].float()
    n = m.sum(-1, keepdim=True).clamp(min=1)
    a, b = log_p.exp() * n * m, log_q.exp() * n * m
    a = (a - a.sum(-1, keepdim=True) / n) * m
    b = (b - b.sum(-1, keepdim=True) / n) * m
    rho = (a * b).sum(-1) / ((a.square().sum(-1) * b.square().sum(-1)).sqrt() + eps)
    return 1.0 - rho


def ipix_loss(teacher: torch.Tensor, student: torch.Tensor, valid: torch.Tensor, thresh: float = 0.8,
              temperature: float = 4.0, loss: str = 'kl') -> torch.Tensor:
    """L_IPix for one strong view, a scalar.

    teacher (B, C, H, W): the teacher's logits for the student's view (already CutMix-mixed), no
        gradient is taken through them; student (B, C, H, W): the student's logits; valid (B, H, W)
        bool, False on padding. Per image b: sum_k phi_k / (C log|Omega_b|), 0 if |Omega_b| < 2;
        then the mean over the B images.
    """
    if loss not in LOSSES:
        raise ValueError(f'ipix loss must be one of {LOSSES}, got {loss!r}')
    b, c = teacher.shape[:2]
    teacher = teacher.detach().float()
    omega = confident_pixels(teacher, valid, thresh).flatten(1)                    # (B, N)
    log_p = spatial_log_softmax(teacher.flatten(2), omega, temperature)           # (B, C, N)
    log_q = spatial_log_softmax(student.flatten(2), omega, temperature)
    phi = (kl_per_class if loss == 'kl' else one_minus_pearson)(log_p, log_q, omega)   # (B, C)
    size = omega.sum(-1).float()                                                  # |Omega_b|
    scale = torch.where(size >= 2, 1.0 / (c * size.clamp(min=2).log()), 0.0)      # (B,)
    return (phi.sum(-1) * scale).sum() / b


def ipix_view_loss(teacher: torch.Tensor, student: torch.Tensor, valid: torch.Tensor,
                   opt: IPixOptions) -> torch.Tensor:
    """`ipix_loss` at the options' resolution, threshold, temperature and variant (in fp32, also the
    resampling: bf16 logits under autocast would be rounded to ~3 digits)."""
    teacher, student, valid = resample(teacher.float(), student.float(), valid, opt.resolution, opt.patch_size)
    return ipix_loss(teacher, student, valid, opt.thresh, opt.temperature, opt.loss)


def ipix_term(logits_w: torch.Tensor, pred_s: list[torch.Tensor], batch_u: dict, ipix: IPixOptions
              ) -> torch.Tensor:
    """L_IPix averaged over the strong views; the teacher's weak-view logits (B, K, H, W) and the
    valid mask are CutMix-ed with each view's box, like the pseudo-labels."""
    mixed = mix_targets(batch_u, (logits_w, batch_u['valid']), len(pred_s))
    return sum(ipix_view_loss(t, pred, valid, ipix) for pred, (t, valid) in zip(pred_s, mixed)) / len(pred_s)


# ---- the method ------------------------------------------------------------------------------------

@dataclass
class Keys:
    ipix_weight: float | None = None     # alpha; null = 1 for method ipixmatch, 0 (off) otherwise
    ipix_thresh: float = 0.8             # tau: teacher confidence defining the pixel set Omega
    ipix_temperature: float = 4.0        # t of the per-class spatial softmax
    ipix_loss: str = 'kl'                # 'kl' (KL(teacher || student)) or 'cr' (1 - Pearson)
    ipix_resolution: str = 'native'      # 'native' (DPT logit grid), 'crop' or 'patch'
    ipix_warmup_epochs: float = 0.0      # Gaussian ramp of alpha over this many epochs (0: none)


@register
class IPixMatch(LossMethod):
    """UniMatch V2 + L_IPix: L = L_base + alpha * ramp * L_IPix. Also on any other semi-supervised
    method with `ipix_weight` > 0 (the teacher's logits are the weak-view ones the step has)."""
    name = 'ipixmatch'
    summary = 'UniMatch V2 + inter-pixel relation loss (or ipix_weight=1 on any method)'
    Keys = Keys
    benchmark_recipe = True
    weight_key = 'ipix_weight'      # alpha

    @classmethod
    def check(cls, cfg, need) -> None:
        super().check(cfg, need)
        need(cfg.ipix_loss in LOSSES, 'ipix_loss', f'must be one of {LOSSES}, got {cfg.ipix_loss!r}')
        need(cfg.ipix_resolution in RESOLUTIONS, 'ipix_resolution',
             f'must be one of {RESOLUTIONS}, got {cfg.ipix_resolution!r}')
        need(0.0 <= cfg.ipix_thresh < 1.0, 'ipix_thresh', f'must be in [0, 1), got {cfg.ipix_thresh}')
        need(cfg.ipix_temperature > 0, 'ipix_temperature', f'must be > 0, got {cfg.ipix_temperature}')
        need(cfg.ipix_warmup_epochs >= 0, 'ipix_warmup_epochs', f'must be >= 0, got {cfg.ipix_warmup_epochs}')

    def __init__(self, cfg, student, device):
        super().__init__(cfg, student, device)
        self.ipix = IPixOptions(self.weight(cfg), cfg.ipix_thresh, cfg.ipix_temperature, cfg.ipix_loss,
                                cfg.ipix_resolution, patch_of(student))
        self.alpha_peak = self.ipix.weight

    @classmethod
    def for_benchmark(cls, cfg, student, device) -> 'IPixMatch':
        return cls(replace(cfg, ipix_weight=1.0, ipix_warmup_epochs=0.0), student, device)

    def begin_step(self, epoch: int, iteration: int, iters_per_epoch: int) -> None:
        warmup = round(self.cfg.ipix_warmup_epochs * iters_per_epoch)
        self.ipix.weight = self.alpha_peak * warmup_ramp(epoch * iters_per_epoch + iteration, warmup)

    def terms(self, s: StepContext, out: dict) -> dict[str, Term]:
        loss = ipix_term(s.logits_w, s.pred_s, s.batch_u, self.ipix)
        out['ipix_weight'] = loss.new_tensor(self.ipix.weight)
        return {'loss_ipix': Term(loss, self.ipix.weight)}
