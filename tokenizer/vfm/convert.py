"""Checkpoint converters: a local file in its original layout -> the weights of a timm backbone.

Two steps. First our own unwrapping, which knows the training-code layouts timm does not
(DINO/iBOT teacher, MoCo v3 base encoder, DeiT/MAE `model` key). Then timm's own
`checkpoint_filter_fn` of the model's module, which converts original DINOv2 hub keys and
OpenAI/open_clip CLIP keys and resamples `pos_embed` to the model's grid. The result is loaded
strictly, minus the heads, so a wrong file fails loudly instead of half-loading.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    containers: tuple[str, ...] = ()   # dict keys that may wrap the state dict, tried in order
    prefix: str = ""                   # keys keep only this prefix (stripped); other keys are other nets


FORMATS: dict[str, WeightFormat] = {
    "timm": WeightFormat(containers=("state_dict", "model")),
    "dinov2-hub": WeightFormat(),                              # timm's filter renames register_tokens, w12/w3
    "dino-teacher": WeightFormat(containers=("teacher", "state_dict"), prefix="backbone."),
    "mocov3": WeightFormat(containers=("state_dict",), prefix="module.base_encoder."),
    "fb-model": WeightFormat(containers=("model",)),          # DeiT and MAE training scripts: {"model": ...}
    "openai-clip": WeightFormat(containers=("state_dict",)),  # timm's filter maps visual.* names
    "open_clip": WeightFormat(containers=("state_dict",)),    # visual.trunk.* (timm trunk) or visual.*
}

# Keys of heads a frozen feature extractor never uses (classifier, projector, pooling, masks).
HEAD_PREFIXES = ("head.", "head_dist.", "attn_pool.", "fc_norm.", "masked_embed", "mask_token", "pre_logits.")


def read_checkpoint(path: str | Path) -> dict:
    """Load a .pth/.pt/.tar/.safetensors file; OpenAI's CLIP .pt files are TorchScript archives."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except RuntimeError as err:
        if "TorchScript" not in str(err) and "jit" not in str(err).lower():
            raise
        return torch.jit.load(str(path), map_location="cpu").state_dict()


def unwrap(obj: dict, fmt: str) -> dict[str, torch.Tensor]:
    """Apply a format's container and prefix rules; a plain backbone state dict passes unchanged."""
    spec = FORMATS[fmt]
    for key in spec.containers:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if all(k.startswith("module.") for k in obj) and not spec.prefix.startswith("module."):
        obj = {k[len("module."):]: v for k, v in obj.items()}  # saved from DistributedDataParallel
    if spec.prefix and any(k.startswith(spec.prefix) for k in obj):
        obj = {k[len(spec.prefix):]: v for k, v in obj.items() if k.startswith(spec.prefix)}
    return dict(obj)


def to_model_keys(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's per-architecture filter (key renames, pos-embed resampling), then drop unused heads."""
    timm_filter = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if timm_filter is not None:
        state_dict = timm_filter(state_dict, model)
    wanted = model.state_dict().keys()
    return {k: v for k, v in state_dict.items() if k in wanted or not k.startswith(HEAD_PREFIXES)}


def load_weights(model: nn.Module, path: str | Path, fmt: str) -> None:
    """Load a local file of layout `fmt` into `model`, strictly (missing or extra keys raise)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format '{fmt}' (known: {', '.join(FORMATS)})")
    state_dict = to_model_keys(unwrap(read_checkpoint(path), fmt), model)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise RuntimeError(f"{path}: does not match the backbone as format '{fmt}': {err}") from None
