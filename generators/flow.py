"""Flow matching on a linear path (RAE / SiT convention) with ODE samplers and guidance.

Path x_t = (1 - t) x + t eps, t = 0 data, t = 1 noise; the network predicts v = eps - x with an
unweighted MSE.  Training times t ~ U(0, 1) are shifted, t' = s t / (1 + (s - 1) t), s >= 1,
which moves mass towards the noise end.  Default s = max(1, sqrt(latent_dim / 4096)) (the RAE
rule with the real latent dimension).  Deviation note: the original VFMTok code hard-codes
time_dist_shift_dim = 65536, i.e. s = 4 for every latent; set `FlowConfig.shift = 4` to match.

Sampling integrates dx/dt = v from t = 1 to t_min (Euler or Heun) on a uniform grid that is
shifted by the same s.  Guidance (in the interval t_lo <= t <= t_hi, checked per step):
  CFG:          v = v_null + w (v_cond - v_null)          (batch doubled with the null class)
  AutoGuidance: v = v_guide + w (v_main - v_guide)        (guide = an early EMA checkpoint)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F

from study.config import bounded

VelocityModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t, y) -> v


@dataclass
class FlowConfig:
    shift: Optional[float] = bounded(None, ge=1)  # None: max(1, sqrt(latent_dim / shift_base)); the original uses 4
    shift_base: int = bounded(4096, ge=1)

    def resolve_shift(self, latent_dim: int) -> float:
        s = default_shift(latent_dim, self.shift_base) if self.shift is None else float(self.shift)
        if s < 1.0:
            raise ValueError(f"time shift must be >= 1, got {s}")
        return s


def default_shift(latent_dim: int, base: int = 4096) -> float:
    return max(1.0, math.sqrt(latent_dim / base))


def shift_time(t: torch.Tensor, s: float) -> torch.Tensor:
    return s * t / (1 + (s - 1) * t)


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (x.ndim - 1)))  # (B,) -> (B, 1, ..., 1)


def interpolate(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = _bcast(t, x)
    return (1 - t) * x + t * eps


def velocity_target(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return eps - x


def sample_time(n: int, shift: float, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    return shift_time(torch.rand(n, device=device, generator=generator), shift)


def flow_loss(model: VelocityModel, x: torch.Tensor, y: torch.Tensor, shift: float,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Unweighted MSE between model(x_t, t, y) and eps - x; draws t and eps (global RNG unless `generator`)."""
    t = sample_time(x.shape[0], shift, x.device, generator)
    eps = torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)
    v = model(interpolate(x, eps, t), t, y)
    return F.mse_loss(v.float(), velocity_target(x, eps).float())


def time_grid(steps: int, shift: float, t_min: float = 0.001, device=None) -> torch.Tensor:
    """(steps + 1,) times from 1 down to shift_time(t_min): a uniform grid, then shifted."""
    return shift_time(torch.linspace(1.0, t_min, steps + 1, device=device, dtype=torch.float64), shift)


def guided_velocity(model: VelocityModel, x: torch.Tensor, t: float, y: torch.Tensor, *, null_class: int,
                    scale: float = 1.0, interval: tuple[float, float] = (0.0, 1.0),
                    guide: Optional[VelocityModel] = None, cfg_batch: Optional[bool] = None) -> torch.Tensor:
    """Velocity at scalar time t for batch x, with CFG (guide None) or AutoGuidance (guide given).
    cfg_batch: force the doubled [cond; null] batch (None: only when scale != 1)."""
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
    active = interval[0] <= t <= interval[1]
    if guide is not None:
        v_main = model(x, tt, y)
        if not active:
            return v_main
        v_guide = guide(x, tt, y)
        return v_guide + scale * (v_main - v_guide)
    doubled = (scale != 1.0) if cfg_batch is None else cfg_batch
    if not (doubled and active):
        return model(x, tt, y)
    v = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, null_class)]))
    v_cond, v_null = v.chunk(2)
    return v_null + scale * (v_cond - v_null)


@torch.no_grad()
def sample_ode(model: VelocityModel, noise: torch.Tensor, labels: torch.Tensor, *, null_class: int,
               steps: int = 50, method: Literal["euler", "heun"] = "euler", shift: float = 1.0, t_min: float = 0.001,
               scale: float = 1.0, interval: tuple[float, float] = (0.0, 1.0), guide: Optional[VelocityModel] = None,
               cfg_batch: Optional[bool] = None) -> torch.Tensor:
    """Integrate the probability-flow ODE from noise (t = 1) to t_min; returns x at the last grid time."""
    grid = time_grid(steps, shift, t_min).tolist()
    def vel(x, t):
        return guided_velocity(model, x, t, labels, null_class=null_class, scale=scale, interval=interval,
                               guide=guide, cfg_batch=cfg_batch).to(x.dtype)
    x = noise
    for t, t_next in zip(grid[:-1], grid[1:]):
        dt = t_next - t  # negative: integrating towards the data
        v = vel(x, t)
        if method == "euler":
            x = x + dt * v
        else:  # Heun: average the slopes at both ends
            x_pred = x + dt * v
            x = x + dt * 0.5 * (v + vel(x_pred, t_next))
    return x
