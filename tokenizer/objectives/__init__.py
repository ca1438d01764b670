"""In-house VFM pretraining objectives, one class per objective, chosen by name.

| name        | class       | family (registry)            | exported backbone |
|-------------|-------------|------------------------------|-------------------|
| supervised  | Supervised  | supervised                   | trained backbone  |
| dino        | DINO        | self-distillation            | EMA teacher       |
| ibot        | IBOT        | self-distillation+latent-mim | EMA teacher       |
| mae         | MAE         | pixel-mim                    | encoder           |
| latent_mim  | LatentMIM   | latent-mim                   | EMA teacher       |
| contrastive | MoCoV3      | contrastive                  | query encoder     |
| image_text  | ImageText   | image-text-contrastive       | image tower       |
| random      | (none)      | none                         | the seeded init   |
"""

from __future__ import annotations

from torch import nn

from tokenizer.objectives.base import Objective
from tokenizer.objectives.contrastive import ContrastiveConfig, MoCoV3
from tokenizer.objectives.dino import DINO, DinoConfig
from tokenizer.objectives.ibot import IBOT, IbotConfig
from tokenizer.objectives.image_text import ImageText, ImageTextConfig
from tokenizer.objectives.latent_mim import LatentMIM, LatentMimConfig
from tokenizer.objectives.mae import MAE, MaeConfig
from tokenizer.objectives.supervised import Supervised, SupervisedConfig

OBJECTIVES = ("supervised", "dino", "ibot", "mae", "latent_mim", "contrastive", "image_text", "random")
FAMILIES = {
    "supervised": "supervised",
    "dino": "self-distillation",
    "ibot": "self-distillation+latent-mim",
    "mae": "pixel-mim",
    "latent_mim": "latent-mim",
    "contrastive": "contrastive",
    "image_text": "image-text-contrastive",
    "random": "none",
}
EXPORTS = {"supervised": "online", "dino": "teacher", "ibot": "teacher", "mae": "online",
           "latent_mim": "teacher", "contrastive": "online", "image_text": "online", "random": "init"}


def build_objective(name: str, backbone: nn.Module, cfg, *, image_size: int, patch_size: int,
                    class_names: list[str]) -> Objective:
    """`cfg` holds one sub-block per objective (attributes named like the objectives)."""
    if name == "supervised":
        return Supervised(backbone, cfg.supervised, image_size, len(class_names))
    if name == "dino":
        return DINO(backbone, cfg.dino, image_size, patch_size)
    if name == "ibot":
        return IBOT(backbone, cfg.dino, cfg.ibot, image_size, patch_size)
    if name == "mae":
        return MAE(backbone, cfg.mae, image_size, patch_size)
    if name == "latent_mim":
        return LatentMIM(backbone, cfg.latent_mim, image_size, patch_size)
    if name == "contrastive":
        return MoCoV3(backbone, cfg.contrastive, image_size, patch_size)
    if name == "image_text":
        return ImageText(backbone, cfg.image_text, image_size, class_names)
    raise ValueError(f"unknown or untrainable objective {name!r} (one of {', '.join(OBJECTIVES[:-1])})")


__all__ = ["OBJECTIVES", "FAMILIES", "EXPORTS", "Objective", "build_objective", "DinoConfig", "IbotConfig",
           "MaeConfig", "LatentMimConfig", "ContrastiveConfig", "ImageTextConfig", "SupervisedConfig",
           "DINO", "IBOT", "MAE", "LatentMIM", "MoCoV3", "ImageText", "Supervised"]
