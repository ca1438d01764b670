"""In-house VFM pretraining objectives: one module per objective, each declaring one
`Objective` subclass (its name, family, exported encoder and config), found by importing
every module of this package (tokenizer.objectives.base: how one declares itself).

| name        | class       | family (registry)            | exported backbone |
|-------------|-------------|------------------------------|-------------------|
| supervised  | Supervised  | supervised                   | trained backbone  |
| dino        | DINO        | self-distillation            | EMA teacher       |
| ibot        | IBOT        | self-distillation+latent-mim | EMA teacher       |
| mae         | MAE         | pixel-mim                    | encoder           |
| latent_mim  | LatentMIM   | latent-mim                   | EMA teacher       |
| contrastive | MoCoV3      | contrastive                  | query encoder     |
| image_text  | ImageText   | image-text-contrastive       | image tower       |
| random      | RandomInit  | none                         | the seeded init   |
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil

from torch import nn

from tokenizer.objectives.base import REGISTRY, Inputs, Objective

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

OBJECTIVES = tuple(REGISTRY)


def get_objective(name: str) -> type[Objective]:
    if name not in REGISTRY:
        hint = difflib.get_close_matches(name, OBJECTIVES, n=1)
        fix = f"did you mean '{hint[0]}'?" if hint else f"one of {', '.join(OBJECTIVES)}"
        raise ValueError(f"unknown objective {name!r} ({fix})")
    return REGISTRY[name]


def build_objective(name: str, backbone: nn.Module, cfg, *, image_size: int, patch_size: int,
                    class_names: list[str]) -> Objective:
    """`cfg` holds one section per objective (attributes named like the objectives)."""
    return get_objective(name).build(backbone, cfg, Inputs(image_size, patch_size, tuple(class_names)))


__all__ = ["OBJECTIVES", "REGISTRY", "Inputs", "Objective", "build_objective", "get_objective"]
