"""`build_vfm(spec) -> FrozenVFM`: every backbone behind one frozen interface.

`levels(images)` gives 4 patch-token maps (B, C, h, w) at evenly spaced depths (the last after
the final norm, as VFMTok takes DINOv2's blocks 5, 11, 17, 23); `final_tokens(images)` gives the
final-norm tokens, the semantic target. Images come in [-1, 1] at any size; the wrapper resizes
and normalises them as its backbone expects.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import timm
import torch
import torch.nn.functional as F
from torch import nn

from study.config import ConfigError
from study.metrics.common import MissingWeightsError  # one class for every missing weight file

from . import convert, inhouse
from .registry import ENTRIES, HALF, VFMEntry, get_entry, unknown_name_message


@dataclasses.dataclass
class VFMSpec:
    """Which frozen backbone to use and which weights to put in it.

    `name`: a registry name, `inhouse:NAME` (file from `weights`, else $VFMSTUDY_INHOUSE_DIR/NAME.pt)
    or `random:ARCH` (random-init control; ARCH a registry name, an in-house preset or a timm ViT).
    Weights: `weights: PATH` wins; else `pretrained: true` looks in $VFMSTUDY_WEIGHTS_DIR, the HF
    cache, then the hub; else the backbone keeps a seeded random init and reports family "none".
    """

    name: str
    pretrained: bool = False
    weights: Optional[str] = None
    input_size: Optional[int] = None   # override of the default resolution (pos-embed resampled)
    seed: int = 0                      # random init (random:ARCH or no weights); a control per seed

    def __post_init__(self):
        if self.input_size is not None and self.input_size <= 0:
            raise ConfigError(f"input_size must be positive, got {self.input_size}", key="input_size")
        kind, _, rest = self.name.partition(":")
        if kind == "inhouse" and rest:
            return
        if kind == "random" and rest:
            if not _is_known_arch(rest):
                raise ConfigError(unknown_name_message(rest, [*ENTRIES, *inhouse.INHOUSE_ARCHS]), key="name")
            return
        if self.name not in ENTRIES:
            raise ConfigError(unknown_name_message(self.name, list(ENTRIES)), key="name")


def _is_known_arch(arch: str) -> bool:
    return arch in ENTRIES or arch in inhouse.INHOUSE_ARCHS or timm.is_model(arch)


# --------------------------------------------------------------------------- the frozen wrapper
class FrozenVFM(nn.Module):
    """A frozen timm ViT with its preprocessing; always in eval mode, never tracks gradients."""

    def __init__(self, model: nn.Module, *, name: str, family: str, input_size: int,
                 mean: tuple, std: tuple, weight_source: str):
        super().__init__()
        self.model = model
        self.name, self.family, self.weight_source = name, family, weight_source
        self.input_size = input_size
        self.mean, self.std = tuple(mean), tuple(std)
        device = next(model.parameters()).device  # "meta" for shape-only descriptions
        self.register_buffer("_mean", torch.tensor(mean, device=device).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(std, device=device).view(1, 3, 1, 1), persistent=False)
        self.patch_size = model.patch_embed.patch_size[0]
        if input_size % self.patch_size:
            raise ConfigError(f"{name}: input_size {input_size} is not a multiple of the patch size "
                              f"{self.patch_size} (use {round(input_size / self.patch_size) * self.patch_size})",
                              key="input_size")
        self.grid = (input_size // self.patch_size, input_size // self.patch_size)
        self.width = model.embed_dim
        self.depth = len(model.blocks)
        self.num_prefix_tokens = model.num_prefix_tokens
        self.has_cls = model.cls_token is not None
        self.num_params = sum(p.numel() for p in model.parameters())
        self.level_indices = level_indices(self.depth)
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenVFM":
        # Frozen means frozen: a parent's .train() must not switch on dropout/drop-path here.
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images of any size -> the backbone's input size and normalisation (float32)."""
        x = images.float()
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size,) * 2, mode="bicubic", antialias=True, align_corners=False)
            x = x.clamp(-1, 1)  # bicubic overshoots; the reference clamps before normalising
        return ((x + 1) / 2 - self._mean) / self._std

    @torch.no_grad()
    def levels(self, images: torch.Tensor) -> list[torch.Tensor]:
        """4 maps (B, C, h, w) after blocks `level_indices`; the last after the final norm."""
        final, inter = self.model.forward_intermediates(
            self.preprocess(images), indices=self.level_indices[:3], norm=False, output_fmt="NCHW",
            intermediates_only=False)
        last = self._to_map(final[:, self.num_prefix_tokens:])
        return [t.float() for t in inter] + [last.float()]

    @torch.no_grad()
    def final_tokens(self, images: torch.Tensor, with_cls: bool = False) -> torch.Tensor:
        """(B, N, C) final-norm patch tokens, with the CLS token first when `with_cls`."""
        if with_cls and not self.has_cls:
            raise ValueError(f"{self.name} has no CLS token (num_prefix_tokens={self.num_prefix_tokens})")
        tokens = self.model.forward_features(self.preprocess(images)).float()
        patches = tokens[:, self.num_prefix_tokens:]
        return torch.cat([tokens[:, :1], patches], dim=1) if with_cls else patches

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.levels(images)

    def _to_map(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, c = tokens.shape
        return tokens.transpose(1, 2).reshape(b, c, *self.grid)

    def extra_repr(self) -> str:
        return (f"name={self.name}, family={self.family}, input_size={self.input_size}, grid={self.grid}, "
                f"width={self.width}, depth={self.depth}, weights={self.weight_source}")


def level_indices(depth: int) -> list[int]:
    """0-based blocks at depth*k/4 - 1, k = 1..4: [5, 11, 17, 23] for 24 blocks."""
    if depth < 4:
        raise ValueError(f"a backbone needs at least 4 blocks for 4 levels, got {depth}")
    return [depth * k // 4 - 1 for k in range(1, 5)]


# --------------------------------------------------------------------------- building
def create_timm(entry: VFMEntry, input_size: int, device: str | torch.device = "cpu") -> nn.Module:
    """The entry's architecture at random init, sized for `input_size`, without any head."""
    with torch.device(device):
        model = timm.create_model(entry.arch, pretrained=False, num_classes=0, img_size=input_size,
                                  **entry.arch_kwargs)
    if getattr(model, "attn_pool", None) is not None:
        model.reset_classifier(0, "")  # SigLIP's MAP pooling head: not part of the token features
    return model


def create_uninitialised(entry: VFMEntry, input_size: int) -> nn.Module:
    """The architecture for weights about to be loaded strictly: skips timm's random init (10x the
    cost of loading) unless some buffer is computed at init rather than stored (e.g. RoPE tables)."""
    model = create_timm(entry, input_size, device="meta")
    if any(module._non_persistent_buffers_set for module in model.modules()):
        return create_timm(entry, input_size)
    return model.to_empty(device="cpu")


def build_vfm(spec: VFMSpec | str) -> FrozenVFM:
    """A frozen backbone described by `spec` (or just its name)."""
    spec = VFMSpec(spec) if isinstance(spec, str) else spec
    kind, _, rest = spec.name.partition(":")
    if kind == "inhouse" and rest:
        return _build_inhouse(spec, rest)
    if kind == "random" and rest:
        return _build_random(spec, rest)
    entry = get_entry(spec.name)
    size = spec.input_size or entry.input_size
    path, source = resolve_weights(entry, spec)  # first: a missing file must fail fast, before building
    if path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = create_timm(entry, size)
        return FrozenVFM(model, name=entry.name, family="none", input_size=size, mean=entry.mean,
                         std=entry.std, weight_source=f"random-init (seed {spec.seed})")
    model = create_uninitialised(entry, size)
    convert.load_weights(model, path, "timm" if source.startswith("hub") else entry.weight_format)
    return FrozenVFM(model, name=entry.name, family=entry.family, input_size=size, mean=entry.mean,
                     std=entry.std, weight_source=source)


@functools.lru_cache(maxsize=None)
def describe(name: str, input_size: int | None = None) -> FrozenVFM:
    """A registry entry on the meta device: metadata and output shapes without memory or init time.
    Cached: a meta model holds no data, so one description per (name, size) serves every caller."""
    entry = get_entry(name)
    size = input_size or entry.input_size
    return FrozenVFM(create_timm(entry, size, device="meta"), name=entry.name, family=entry.family,
                     input_size=size, mean=entry.mean, std=entry.std,
                     weight_source=f"hub:{entry.hub}" if entry.hub else f"file:{entry.weight_file}")


def _build_random(spec: VFMSpec, arch: str) -> FrozenVFM:
    """Random-init control: same architecture, no training, family 'none'."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        if arch in ENTRIES:
            entry = ENTRIES[arch]
            size, mean, std = spec.input_size or entry.input_size, entry.mean, entry.std
            model = create_timm(entry, size)
        elif arch in inhouse.INHOUSE_ARCHS:
            model = inhouse.build_inhouse_arch(arch)
            size, (mean, std) = spec.input_size or model.patch_embed.img_size[0], HALF
        else:
            cfg = timm.get_pretrained_cfg(arch) or timm.models.PretrainedCfg()
            size, mean, std = spec.input_size or cfg.input_size[-1], cfg.mean, cfg.std
            model = create_timm(VFMEntry(arch, "none", arch, size, mean, std, "timm", "-"), size)
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "blocks"):
        raise ConfigError(f"random:{arch}: not a ViT with blocks/forward_intermediates", key="name")
    return FrozenVFM(model, name=spec.name, family="none", input_size=size, mean=mean, std=std,
                     weight_source=f"random-init (seed {spec.seed})")


def _build_inhouse(spec: VFMSpec, name: str) -> FrozenVFM:
    path = Path(spec.weights).expanduser() if spec.weights else inhouse.inhouse_path(name)
    if not path.is_file():
        raise MissingWeightsError(
            f"VFM 'inhouse:{name}': checkpoint {path} not found. Provide it with `weights: /path/{name}.pt` "
            f"in the VFM spec, or put {name}.pt in $VFMSTUDY_INHOUSE_DIR (now {inhouse.inhouse_dir()}); "
            f"the pretraining stage writes it.")
    model, meta = inhouse.load_inhouse(path)
    prov = meta.get("provenance", {})
    mean, std = tuple(prov.get("mean", HALF[0])), tuple(prov.get("std", HALF[1]))
    if spec.input_size:
        model.set_input_size(img_size=spec.input_size)  # resamples pos_embed to the new grid
    size = spec.input_size or model.patch_embed.img_size[0]
    return FrozenVFM(model, name=spec.name, family=meta["family"], input_size=size, mean=mean, std=std,
                     weight_source=f"inhouse:{path}")


# --------------------------------------------------------------------------- weights
def weights_dir() -> Path:
    return Path(os.environ.get("VFMSTUDY_WEIGHTS_DIR", "~/.cache/vfmstudy/weights")).expanduser()


def resolve_weights(entry: VFMEntry, spec: VFMSpec) -> tuple[Path | None, str]:
    """(file, source description); (None, '') for random init. Never waits on an unreachable hub."""
    if spec.weights:
        path = Path(spec.weights).expanduser()
        if not path.is_file():
            raise MissingWeightsError(f"VFM '{entry.name}': weights file {path} does not exist "
                                      f"(expected {entry.weight_file}, format {entry.weight_format})")
        return path, f"file:{path}"
    if not spec.pretrained:
        return None, ""
    local = weights_dir() / entry.weight_file.split(" ")[0]
    if local.is_file():
        return local, f"file:{local}"
    if entry.hub:
        cached = _hub_cached_file(entry.hub)
        if cached is not None:
            return cached, f"hub-cache:{entry.hub}"
        if _hub_reachable():
            from huggingface_hub import hf_hub_download
            return Path(hf_hub_download(entry.hub, "model.safetensors")), f"hub:{entry.hub}"
    raise MissingWeightsError(missing_weights_message(entry))


def missing_weights_message(entry: VFMEntry) -> str:
    where = f" (original: {entry.url})" if entry.url else ""
    hub = (f" or populate the HF cache (HF_HUB_CACHE) with '{entry.hub}' by running once online with "
           f"`pretrained: true`" if entry.hub else " (no hub copy exists for this backbone)")
    return (f"VFM '{entry.name}': no pretrained weights available offline. Expected file "
            f"{entry.weight_file}{where}, format '{entry.weight_format}'. Provide it with "
            f"`weights: /path/{entry.weight_file.split(' ')[0]}` in the VFM spec, or put it in "
            f"$VFMSTUDY_WEIGHTS_DIR (now {weights_dir()}),{hub}.")


def _hub_cached_file(repo: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def _hub_reachable(timeout: float = 1.0) -> bool:
    """Offline mode or no TCP connection within `timeout`: do not let the hub client retry for minutes."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True
