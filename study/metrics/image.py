"""Per-image reconstruction metrics: PSNR, SSIM (correct data range), LPIPS (local weights only).

Images are compared in [0, 1] (uint8 / 255, or [-1, 1] mapped by (x + 1) / 2, clamped), so
`data_range = 1.0`. (VFMTok's test scripts call skimage's SSIM with data_range=2.0 on [0, 1]
data, which inflates SSIM; we do not copy that.)

SSIM defaults reproduce `skimage.metrics.structural_similarity(..., channel_axis=-1,
data_range=1.0)`: 7×7 uniform window, sample covariance, K1 = 0.01, K2 = 0.03, mean over the
valid (uncropped) region and the channels; `gaussian=True` gives the Wang et al. variant
(11×11 Gaussian window, sigma 1.5, population covariance) = skimage's `gaussian_weights=True`.
Each value is a mean over images of the per-image metric.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from study.metrics.common import MissingWeightsError, to_float_nchw, to_unit_range


def _pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = to_unit_range(a), to_unit_range(b)
    if x.shape != y.shape:
        raise ValueError(f"image batches differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    return x, y


def psnr_per_image(a, b, data_range: float = 1.0) -> torch.Tensor:
    """PSNR (dB) of each image pair, images in [0, 1] (any accepted layout/range)."""
    x, y = _pair(a, b)
    mse = (x - y).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse.clamp_min(1e-20))


def psnr(a, b, data_range: float = 1.0) -> float:
    return float(psnr_per_image(a, b, data_range).mean())


def class_mean_psnr(train_images, train_labels, val_images, val_labels) -> float:
    """PSNR of predicting each val image by the mean train image of its class: the floor a
    class-conditional reconstruction must clear to show more than the class it belongs to."""
    x, y = to_float_nchw(train_images), torch.as_tensor(train_labels).long()
    xv, yv = to_float_nchw(val_images), torch.as_tensor(val_labels).long()
    means = torch.zeros(int(max(y.max(), yv.max())) + 1, *x.shape[1:], dtype=x.dtype).index_add_(0, y, x)
    means /= torch.bincount(y, minlength=len(means)).clamp_min(1).view(-1, 1, 1, 1)
    return psnr(xv, means[yv])


def _gaussian_kernel(sigma: float = 1.5, truncate: float = 3.5) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)
    g = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float64) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_per_image(a, b, *, data_range: float = 1.0, gaussian: bool = False, win_size: int = 7,
                   k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """SSIM of each image pair (float64), see the module docstring for the conventions."""
    x, y = _pair(a, b)
    c = x.shape[1]
    if gaussian:
        kernel = _gaussian_kernel()
        cov_norm = 1.0
    else:
        kernel = torch.full((win_size, win_size), 1.0 / win_size ** 2, dtype=torch.float64)
        n = win_size ** 2
        cov_norm = n / (n - 1)
    if min(x.shape[-2:]) < kernel.shape[0]:
        raise ValueError(f"images {tuple(x.shape[-2:])} are smaller than the {kernel.shape[0]}-px SSIM window")
    weight = kernel.to(x.device).expand(c, 1, *kernel.shape).contiguous()

    def filt(t):  # valid region only == skimage's crop of (win - 1) // 2 pixels
        return F.conv2d(t, weight, groups=c)

    ux, uy = filt(x), filt(y)
    vx = cov_norm * (filt(x * x) - ux * ux)
    vy = cov_norm * (filt(y * y) - uy * uy)
    vxy = cov_norm * (filt(x * y) - ux * uy)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def ssim(a, b, **kwargs) -> float:
    return float(ssim_per_image(a, b, **kwargs).mean())


# --------------------------------------------------------------------------- LPIPS
_LPIPS_BACKBONES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth",
                    "squeeze": "squeezenet1_1-b8a52dc0.pth"}
_TORCHVISION_NAMES = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}
_LPIPS_CACHE: dict[str, torch.nn.Module] = {}


def _torch_hub_checkpoints() -> Path:
    home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")).expanduser()
    return home / "hub" / "checkpoints"


def lpips_model(net: str = "alex", device: str = "cpu") -> torch.nn.Module:
    """The `lpips` package's LPIPS (linear heads ship inside the package; the ImageNet backbone
    must already be in torch's hub cache). Raises MissingWeightsError instead of downloading."""
    if net not in _LPIPS_BACKBONES:
        raise ValueError(f"net must be one of {sorted(_LPIPS_BACKBONES)}, got {net!r}")
    try:
        import lpips  # noqa: F401
    except ImportError:
        raise MissingWeightsError("LPIPS needs the `lpips` package (pip install lpips: it ships the linear "
                                  "heads) and the torchvision backbone weights; neither is installed") from None
    backbone = _torch_hub_checkpoints() / _LPIPS_BACKBONES[net]
    if not backbone.is_file():
        raise MissingWeightsError(
            f"LPIPS-{net} backbone weights {backbone.name} not found at {backbone}: on an online machine run "
            f"torchvision.models.{_TORCHVISION_NAMES[net]}(weights='IMAGENET1K_V1') once (or copy the file "
            f"there, or set $TORCH_HOME)")
    heads = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    if not heads.is_file():
        raise MissingWeightsError(f"LPIPS linear heads {heads} missing from the lpips package")
    key = f"{net}:{device}"
    if key not in _LPIPS_CACHE:
        _LPIPS_CACHE[key] = lpips.LPIPS(net=net, verbose=False).to(device).eval().requires_grad_(False)
    return _LPIPS_CACHE[key]


@torch.no_grad()
def lpips_distance(a, b, net: str = "alex", device: str = "cpu", batch_size: int = 64) -> float:
    """Mean LPIPS between image pairs (inputs mapped to [-1, 1] as the package expects)."""
    model = lpips_model(net, device)
    x, y = to_float_nchw(a), to_float_nchw(b)
    vals = [model(x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)).flatten().cpu()
            for i in range(0, len(x), batch_size)]
    return float(torch.cat(vals).mean())


def reconstruction_metrics(originals, reconstructions, *, with_lpips: bool = False) -> dict[str, float]:
    """{"psnr", "ssim"} (+ "lpips" if asked; that raises MissingWeightsError without weights)."""
    out = {"psnr": psnr(originals, reconstructions), "ssim": ssim(originals, reconstructions)}
    if with_lpips:
        out["lpips"] = lpips_distance(originals, reconstructions)
    return out


__all__ = ["psnr", "psnr_per_image", "ssim", "ssim_per_image", "lpips_model", "lpips_distance",
           "reconstruction_metrics"]
