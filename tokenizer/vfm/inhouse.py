"""In-house VFM checkpoints: the file format written by the project's own pretraining and read
by `build_vfm("inhouse:NAME")`.

A file is `torch.save` of a plain dict (no pickled classes, so `weights_only=True` loads it):

    {"format": "vfmstudy-inhouse-v1",
     "arch": kwargs for timm VisionTransformer (img_size, patch_size, embed_dim, depth, ...),
     "family": one of FAMILIES (the pretraining objective's family),
     "provenance": {objective, steps, seed, data identity, created, ...; optional "mean"/"std",
                    the per-channel normalisation the model was trained with, default 0.5/0.5,
                    i.e. the model sees the project's [-1, 1] images unchanged},
     "state_dict": backbone weights, heads excluded}
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

from study.fsio import atomic_write

FORMAT = "vfmstudy-inhouse-v1"

FAMILIES = ("self-distillation", "contrastive", "pixel-mim", "latent-mim",
            "self-distillation+latent-mim", "image-text-contrastive", "supervised", "none")

# Tiny presets for CPU/GPU-minutes pretraining at 32 px: patch 4 -> an 8x8 grid.
# Registers keep the token layout of DINOv2-reg (CLS + 4 registers + patches).
INHOUSE_ARCHS: dict[str, dict] = {
    "vit_tiny_p4": dict(img_size=32, patch_size=4, embed_dim=128, depth=8, num_heads=4, mlp_ratio=4.0,
                        reg_tokens=4, num_classes=0, dynamic_img_size=True),
    "vit_micro_p4": dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2, mlp_ratio=4.0,
                         reg_tokens=4, num_classes=0, dynamic_img_size=True),
}


def build_inhouse_arch(name: str) -> VisionTransformer:
    """A named preset at (the caller's) random init."""
    if name not in INHOUSE_ARCHS:
        raise KeyError(f"unknown in-house arch '{name}' (known: {', '.join(INHOUSE_ARCHS)})")
    return VisionTransformer(**INHOUSE_ARCHS[name])


def inhouse_dir() -> Path:
    return Path(os.environ.get("VFMSTUDY_INHOUSE_DIR", "~/.cache/vfmstudy/inhouse")).expanduser()


def inhouse_path(name: str) -> Path:
    """Where `inhouse:NAME` is looked up when the spec gives no explicit `weights`."""
    return inhouse_dir() / f"{name}.pt"


def backbone_state_dict(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """The state dict without the classifier head (objective heads live outside the ViT)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.startswith("head.")}


def save_inhouse(path: str | Path, model: VisionTransformer, arch: dict, family: str,
                 provenance: dict) -> None:
    """Write an in-house checkpoint atomically (temp file + rename: a crash never leaves half a file)."""
    if family not in FAMILIES:
        raise ValueError(f"family '{family}' is not one of {FAMILIES}")
    payload = {"format": FORMAT, "arch": dict(arch), "family": family, "provenance": dict(provenance),
               "state_dict": backbone_state_dict(model)}
    atomic_write(path, lambda handle: torch.save(payload, handle))


def load_inhouse(path: str | Path) -> tuple[VisionTransformer, dict]:
    """(model with the saved weights, meta = the file's dict without state_dict)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path}: not a {FORMAT} checkpoint (format={found!r})")
    # Built without heads whatever the file says: the frozen VFM only uses the trunk.
    model = VisionTransformer(**{**payload["arch"], "num_classes": 0})
    model.load_state_dict(payload["state_dict"], strict=True)
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return model, meta
