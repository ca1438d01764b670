"""Pieces shared by the pretraining objectives: ViT token plumbing on a timm
VisionTransformer, EMA teachers, schedules, on-the-fly crops (torch ops on the batch),
patch masks and the projection heads.

Everything random draws from the global torch RNG, whose state the Trainer checkpoints,
so a resumed run makes the same crops and masks as an uninterrupted one.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from study.config import bounded


# --------------------------------------------------------------------------- schedules
def cosine_ramp(start: float, end: float, progress: float) -> float:
    """Cosine from `start` (progress 0) to `end` (progress 1), as DINO's momentum schedule."""
    progress = min(max(progress, 0.0), 1.0)
    return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2


def linear_warmup(start: float, end: float, progress: float, warmup: float) -> float:
    """Linear from `start` to `end` over the first `warmup` fraction of training, then `end`."""
    if warmup <= 0 or progress >= warmup:
        return end
    return start + (end - start) * progress / warmup


# --------------------------------------------------------------------------- ViT plumbing
def num_prefix(vit: nn.Module) -> int:
    """CLS + register tokens in front of the patch tokens."""
    return int(getattr(vit, "num_prefix_tokens", 0))


def has_cls(vit: nn.Module) -> bool:
    return getattr(vit, "cls_token", None) is not None


def vit_embed(vit: nn.Module, images: torch.Tensor, mask: torch.Tensor | None = None,
              mask_token: torch.Tensor | None = None) -> torch.Tensor:
    """Patch + position embedding with prefix tokens, like timm's forward_features up to
    the blocks, but for any input size that is a multiple of the patch (local crops get a
    resampled position table) and with masked patches replaced by `mask_token` *before* the
    position embedding is added (iBOT / data2vec / BEiT practice).  -> (B, P + N, D)."""
    x = vit.patch_embed.proj(images)                               # (B, D, h, w)
    grid = tuple(x.shape[-2:])
    x = vit.patch_embed.norm(x.flatten(2).transpose(1, 2))         # (B, N, D)
    if mask is not None:
        x = torch.where(mask.unsqueeze(-1), mask_token.to(x.dtype).expand_as(x), x)
    pos = vit.pos_embed
    pos_prefix = 0 if vit.no_embed_class else num_prefix(vit)
    if grid != tuple(vit.patch_embed.grid_size):
        pos = resample_abs_pos_embed(pos, new_size=list(grid), old_size=list(vit.patch_embed.grid_size),
                                     num_prefix_tokens=pos_prefix)
    prefix = [t.expand(x.shape[0], -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
    if vit.no_embed_class:
        x = torch.cat(prefix + [x + pos], dim=1)
    else:
        x = torch.cat(prefix + [x], dim=1) + pos
    return vit.norm_pre(vit.pos_drop(x))


def vit_blocks(vit: nn.Module, x: torch.Tensor, keep_layers: bool = False):
    """Run the blocks and the final norm. With keep_layers, also return every block's
    (un-normed) output, for data2vec targets."""
    layers = []
    for blk in vit.blocks:
        x = blk(x)
        if keep_layers:
            layers.append(x)
    x = vit.norm(x)
    return (x, layers) if keep_layers else x


def vit_tokens(vit: nn.Module, images: torch.Tensor, mask=None, mask_token=None) -> torch.Tensor:
    """Final (normed) tokens, prefix included: (B, P + N, D)."""
    return vit_blocks(vit, vit_embed(vit, images, mask, mask_token))


def pool(vit: nn.Module, tokens: torch.Tensor, kind: str) -> torch.Tensor:
    """'cls' -> the CLS token; 'avg' -> mean of the patch tokens (registers excluded)."""
    if kind == "cls":
        if not has_cls(vit):
            raise ValueError("pool='cls' needs a ViT with a class token")
        return tokens[:, 0]
    return tokens[:, num_prefix(vit):].mean(1)


# --------------------------------------------------------------------------- EMA teachers
def make_teacher(module: nn.Module) -> nn.Module:
    """A frozen copy: its parameters never get gradients and are in no optimiser
    (build_optimizer only takes requires_grad parameters)."""
    return copy.deepcopy(module).requires_grad_(False)


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, parameter by parameter; buffers copied."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)


# --------------------------------------------------------------------------- distributed
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (identity when not distributed): DINO centres on the global batch."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor over ranks without gradient (MoCo v3 keys)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# --------------------------------------------------------------------------- views
def random_resized_crop(images: torch.Tensor, size: int, scale: tuple[float, float],
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True) -> torch.Tensor:
    """Per-image random resized crop (+ horizontal flip) of a (B, 3, H, W) batch to
    (B, 3, size, size), by an affine grid_sample, so it runs on the batch's device.
    Box: area fraction ~ U(scale), log aspect ~ U(log ratio), placed uniformly inside."""
    b = images.shape[0]
    area = torch.empty(b).uniform_(*scale)
    log_r = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    w = (area * log_r.exp()).sqrt().clamp(max=1.0)          # fraction of the full width
    h = (area / log_r.exp()).sqrt().clamp(max=1.0)
    cx = (torch.rand(b) * 2 - 1) * (1 - w)                  # normalised centre, box stays inside
    cy = (torch.rand(b) * 2 - 1) * (1 - h)
    sign = torch.where(torch.rand(b) < 0.5, -1.0, 1.0) if flip else torch.ones(b)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    theta = theta.to(images.device, images.dtype)
    grid = F.affine_grid(theta, [b, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


@dataclass
class ColorAugConfig:
    """Colour distortion of the two-view objectives (DINO / MoCo v3 / SimCLR recipe: jitter
    0.4 brightness/contrast/saturation + hue 0.1 with p 0.8, grayscale p 0.2).  On the procedural
    shapes the fill and background colours are drawn independently of the class, so colour is a
    pure nuisance there: without hue changes, two views of one image match on colour alone."""
    jitter: float = bounded(0.4, ge=0, le=1)  # brightness / contrast / saturation factors ~ U(1 +- jitter)
    hue: float = bounded(0.1, ge=0, le=0.5)  # hue rotation ~ U(+-hue) turns (0.5 = any hue)
    grayscale: float = bounded(0.2, ge=0, le=1)  # probability of a grey view
    prob: float = bounded(0.8, ge=0, le=1)  # probability that the jitter (incl. hue) applies to a view


# RGB <-> YIQ: hue is the angle in the (I, Q) chroma plane
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_INV = torch.linalg.inv(_YIQ)


def color_augment(images: torch.Tensor, cfg: ColorAugConfig) -> torch.Tensor:
    """Per-image colour distortion of [-1, 1] images (B, 3, H, W): brightness, contrast,
    saturation, hue rotation (all applied to a `prob` fraction), then grayscale."""
    b = images.shape[0]
    dev, dt = images.device, images.dtype
    on = (torch.rand(b, 1, 1, 1) < cfg.prob).float()

    def factor():
        return (on * (1 + (torch.rand(b, 1, 1, 1) * 2 - 1) * cfg.jitter) + (1 - on)).to(dev, dt)

    x = (images + 1) / 2
    if cfg.jitter > 0:
        x = x * factor()                                                      # brightness
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * factor() + mean                                      # contrast
        grey = 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
        x = (x - grey) * factor() + grey                                      # saturation
    if cfg.hue > 0:
        theta = (torch.rand(b) * 2 - 1) * cfg.hue * 2 * math.pi * on.view(b)
        cos, sin = torch.cos(theta), torch.sin(theta)
        rot = torch.zeros(b, 3, 3)
        rot[:, 0, 0], rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = 1, cos, -sin, sin, cos
        mix = (_YIQ_INV @ rot @ _YIQ).to(dev, dt)              # (B, 3, 3)
        x = torch.einsum("bij,bjhw->bihw", mix, x)
    if cfg.grayscale > 0:
        grey = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)
        x = torch.where((torch.rand(b, 1, 1, 1) < cfg.grayscale).to(dev), grey, x)
    return x.clamp(0, 1) * 2 - 1


# --------------------------------------------------------------------------- masks
def random_mask(batch: int, num_patches: int, num_masked: int, device=None) -> torch.Tensor:
    """Exactly `num_masked` uniformly random patches per image. -> bool (B, N), True = masked."""
    order = torch.rand(batch, num_patches).argsort(dim=1)
    mask = torch.zeros(batch, num_patches, dtype=torch.bool)
    mask.scatter_(1, order[:, :num_masked], True)
    return mask.to(device)


def block_mask_one(grid: tuple[int, int], num_masked: int, min_block: int = 2,
                   aspect: tuple[float, float] = (0.3, 1 / 0.3), tries: int = 10) -> torch.Tensor:
    """BEiT-style block masking of one image: rectangles of random area and aspect until
    `num_masked` patches are covered; any shortfall (rectangles that no longer fit) is filled
    with random patches so the ratio is exact. -> bool (h * w,)."""
    gh, gw = grid
    mask = torch.zeros(gh, gw, dtype=torch.bool)
    count = 0
    for _ in range(tries * max(1, num_masked)):
        left = num_masked - count
        if left <= 0:
            break
        area = float(torch.empty(1).uniform_(min(min_block, left), left))
        r = math.exp(float(torch.empty(1).uniform_(math.log(aspect[0]), math.log(aspect[1]))))
        h, w = round(math.sqrt(area * r)), round(math.sqrt(area / r))
        if not (1 <= h <= gh and 1 <= w <= gw):
            continue
        top, lft = int(torch.randint(0, gh - h + 1, ())), int(torch.randint(0, gw - w + 1, ()))
        patch = mask[top:top + h, lft:lft + w]
        new = int((~patch).sum())
        if 0 < new <= left:
            patch.fill_(True)
            count += new
    flat = mask.flatten()
    if count < num_masked:  # top up at random for an exact ratio
        free = (~flat).nonzero().squeeze(1)
        flat[free[torch.randperm(len(free))[: num_masked - count]]] = True
    return flat


def block_mask(batch: int, grid: tuple[int, int], num_masked: list[int], device=None) -> torch.Tensor:
    """Block masks for a batch; `num_masked[i]` patches in image i. -> bool (B, h * w)."""
    return torch.stack([block_mask_one(grid, n) for n in num_masked[:batch]]).to(device)


# --------------------------------------------------------------------------- heads
def mlp(dims: list[int], batch_norm: bool = False, last_norm: bool = False) -> nn.Sequential:
    """Linear layers with GELU between; BatchNorm after hidden layers when `batch_norm`
    (MoCo v3 heads); a final affine-free BatchNorm when `last_norm` (MoCo v3 projector)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(a, b, bias=not (batch_norm and (not last or last_norm))))
        if not last:
            if batch_norm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.GELU())
        elif last_norm:
            layers.append(nn.BatchNorm1d(b, affine=False))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """DINO projection head: MLP -> l2-normalised bottleneck -> cosine against weight-
    normalised prototypes (weight norm with the gain fixed at 1, i.e. DINO's
    norm_last_layer=True, written as an explicit row normalisation)."""

    def __init__(self, dim: int, hidden: int, bottleneck: int, out_dim: int, layers: int = 3):
        super().__init__()
        self.mlp = mlp([dim] + [hidden] * (layers - 1) + [bottleneck])
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck))
        nn.init.trunc_normal_(self.prototypes, std=0.02)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, freeze_prototypes: bool = False) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1)
        protos = self.prototypes.detach() if freeze_prototypes else self.prototypes
        return z @ F.normalize(protos, dim=-1).t()  # (..., out_dim)
