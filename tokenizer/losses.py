"""Tokenizer losses (method §1.4): pixel, perceptual, semantic, VQ and GAN terms.

- pixel: `rec(x, x_hat)` with rec = l2 or l1, plus the official code's always-added MSE when
  `always_add_mse` (so the default l2 is 2 x MSE; l1 gives L1 + L2).
- perceptual: never computed by the VFM under study, so that it is the same function in every
  cell of a backbone sweep.
  - "lpips": LPIPS-VGG from the `lpips` package, its VGG16 trunk and linear heads read from local
    files (`MissingWeightsError` naming the file when one is absent; nothing is downloaded);
  - "random_vgg": the offline stand-in, `RandomVGGDistance`; it is not LPIPS and is never called so;
  - "none".
- semantic: mean over tokens of 1 - cos(pred, target); target = the VFM's final (LN'ed) tokens.
- GAN: hinge for D (0.5 * [relu(1 - D(x)) + relu(1 + D(x_hat))]), non-saturating softplus(-D(x_hat))
  for G; both scaled by `gan_weight` (0.5) and zero before `gan_start`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from study.config import bounded
from study.metrics.common import MissingWeightsError


@dataclass
class LossConfig:
    pixel: Literal["l2", "l1"] = "l2"
    always_add_mse: bool = True  # official-code quirk: l2 -> 2 x MSE
    pixel_weight: float = bounded(1.0, ge=0)
    perceptual: Literal["lpips", "random_vgg", "none"] = "random_vgg"
    perceptual_weight: float = bounded(1.0, ge=0)
    lpips_vgg: Optional[str] = None  # torchvision VGG16 state_dict; None: $VFMSTUDY_WEIGHTS_DIR/vgg16-397923af.pth
    lpips_linear: Optional[str] = None  # LPIPS v0.1 linear heads; None: the copy the lpips package ships
    semantic_weight: float = bounded(1.0, ge=0)  # 0 disables the semantic objective (with model.semantic: false)
    vq_weight: float = bounded(1.0, ge=0)  # weight of (codebook + beta * commit)
    gan_weight: float = bounded(0.5, ge=0)  # 0 disables the discriminator entirely
    gan_start: float = bounded(0.4, ge=0)  # < 1: fraction of train.steps; >= 1: absolute step

    def gan_start_step(self, total_steps: int) -> int:
        return int(self.gan_start * total_steps) if self.gan_start < 1 else int(self.gan_start)


def pixel_loss(x: torch.Tensor, x_hat: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    x, x_hat = x.float(), x_hat.float()
    rec = F.mse_loss(x_hat, x) if cfg.pixel == "l2" else F.l1_loss(x_hat, x)
    return rec + F.mse_loss(x_hat, x) if cfg.always_add_mse else rec


def semantic_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean(1 - cos) over tokens; pred and target (B, T, C)."""
    if pred.shape != target.shape:
        raise ValueError(f"semantic prediction {tuple(pred.shape)} != target {tuple(target.shape)}")
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).mean()


# --------------------------------------------------------------------------- perceptual
VGG16_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))  # (channels, 3x3 convs) per stage
VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16, the trunk LPIPS-VGG uses
STANDIN_WIDTH, STANDIN_SEED = 8, 0  # fixed constants: the stand-in must not vary between runs


def random_vgg_description(width: int, seed: int) -> str:
    return f"random_vgg: VGG16 layout at {width}/64 of its channels, random init seed {seed} (stand-in, not LPIPS)"


def unit_channels(h: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Each position's feature vector scaled to unit length (LPIPS's `normalize_tensor`)."""
    return h / (h.pow(2).sum(1, keepdim=True).sqrt() + eps)


class RandomVGGDistance(nn.Module):
    """Offline stand-in for LPIPS: VGG16's layout at `width / 64` of its channels, random init
    from a fixed seed, and LPIPS's distance without its learned heads (unit-length channels,
    squared difference, mean over positions, summed over the 5 stage outputs).

    Built from its own generator, so it is the same network in every run, whatever the VFM, the
    training seed or the global RNG.  Unrelated to the reference classifier behind `fd_ref`, so
    training does not optimise the evaluation metric."""

    def __init__(self, width: int = STANDIN_WIDTH, seed: int = STANDIN_SEED):
        super().__init__()
        self.width, self.seed = width, seed
        generator = torch.Generator().manual_seed(seed)
        stages, cin = [], 3
        for channels, n_convs in VGG16_STAGES:
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if stages else []
            cout = max(1, channels * width // 64)
            for _ in range(n_convs):
                conv = nn.Conv2d(cin, cout, 3, padding=1)
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu", generator=generator)
                nn.init.zeros_(conv.bias)
                layers += [conv, nn.ReLU()]
                cin = cout
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "RandomVGGDistance":
        return super().train(False)

    @property
    def description(self) -> str:
        return random_vgg_description(self.width, self.seed)

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            real = [x.float()]
            for stage in self.stages:
                real.append(stage(real[-1]))
        h, total = x_hat.float(), x_hat.new_zeros((), dtype=torch.float32)
        for stage, r in zip(self.stages, real[1:]):
            h = stage(h)
            total = total + (unit_channels(h) - unit_channels(r)).pow(2).sum(1).mean()
        return total


class LPIPSLoss(nn.Module):
    """LPIPS-VGG (the `lpips` package's network and distance) with the VGG16 trunk read from
    `vgg_path` (a torchvision state_dict) and the linear heads from `linear_path`."""

    def __init__(self, vgg_path: str | Path, linear_path: str | Path):
        super().__init__()
        self.vgg_path, self.linear_path = Path(vgg_path), Path(linear_path)
        require_lpips_files(self.vgg_path, self.linear_path)
        import lpips
        import torchvision
        with warnings.catch_warnings():  # lpips builds torchvision's VGG16 with the deprecated `pretrained=`
            warnings.simplefilter("ignore", UserWarning)
            self.net = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
        vgg = torchvision.models.vgg16()
        vgg.load_state_dict(torch.load(self.vgg_path, map_location="cpu", weights_only=True))
        trunk = self.net.net
        for stage in (trunk.slice1, trunk.slice2, trunk.slice3, trunk.slice4, trunk.slice5):
            for index, layer in stage.named_children():  # lpips names each layer by its index in vgg.features
                layer.load_state_dict(vgg.features[int(index)].state_dict())
        heads = torch.load(self.linear_path, map_location="cpu", weights_only=True)
        for i, lin in enumerate(self.net.lins):
            lin.load_state_dict({k.split(".", 1)[1]: v for k, v in heads.items() if k.startswith(f"lin{i}.")})
        self.net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "LPIPSLoss":
        return super().train(False)  # the heads' dropout stays off

    @property
    def description(self) -> str:
        return f"lpips: LPIPS-VGG v0.1, trunk {self.vgg_path}, heads {self.linear_path}"

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        return self.net(x_hat.float(), x.float()).mean()


def require_lpips_files(vgg_path: Path, linear_path: Path) -> None:
    """MissingWeightsError naming the first absent file, the key that sets it and where to get it."""
    if not vgg_path.is_file():
        raise MissingWeightsError(
            f"perceptual 'lpips': VGG16 weights {vgg_path} not found. Set loss.lpips_vgg: /path/{VGG16_FILE} "
            f"or put {VGG16_FILE} in $VFMSTUDY_WEIGHTS_DIR (on an online machine: "
            f"torchvision.models.vgg16(weights='IMAGENET1K_V1') saves it to ~/.cache/torch/hub/checkpoints), "
            f"or use loss.perceptual: random_vgg")
    if not linear_path.is_file():
        raise MissingWeightsError(f"perceptual 'lpips': linear heads {linear_path} not found "
                                  f"(loss.lpips_linear; the lpips package ships weights/v0.1/vgg.pth)")


def missing_perceptual_file(cfg: LossConfig) -> Optional[str]:
    """What a run of `cfg` would not find for its perceptual term (None: nothing missing), for
    dry runs that list every missing file before anything starts."""
    if cfg.perceptual != "lpips" or cfg.perceptual_weight == 0:
        return None
    try:
        require_lpips_files(*lpips_files(cfg))
    except MissingWeightsError as err:
        return str(err)
    return None


def lpips_files(cfg: LossConfig) -> tuple[Path, Path]:
    """The VGG16 trunk and linear-head files `perceptual: lpips` reads."""
    from tokenizer.vfm.backbone import weights_dir
    vgg = Path(cfg.lpips_vgg).expanduser() if cfg.lpips_vgg else weights_dir() / VGG16_FILE
    if cfg.lpips_linear:
        return vgg, Path(cfg.lpips_linear).expanduser()
    try:
        import lpips
    except ImportError as err:
        raise MissingWeightsError("perceptual 'lpips' needs the lpips package (pip install lpips)") from err
    return vgg, Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"


def build_perceptual(cfg: LossConfig) -> Optional[nn.Module]:
    """The perceptual network of `cfg`, or None when the term is off.  Depends on `cfg` only."""
    if cfg.perceptual == "none" or cfg.perceptual_weight == 0:
        return None
    if cfg.perceptual == "lpips":
        return LPIPSLoss(*lpips_files(cfg))
    return RandomVGGDistance()


def perceptual_description(cfg: LossConfig) -> str:
    """What the run's perceptual term is computed with, without building it (logged with the config)."""
    if cfg.perceptual == "none" or cfg.perceptual_weight == 0:
        return "none"
    if cfg.perceptual == "lpips":
        return "lpips: LPIPS-VGG v0.1 from local files (loss.lpips_vgg, loss.lpips_linear)"
    return random_vgg_description(STANDIN_WIDTH, STANDIN_SEED)


def d_hinge_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - logits_real.float()).mean() + F.relu(1 + logits_fake.float()).mean())


def g_nonsat_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-logits_fake.float()).mean()
