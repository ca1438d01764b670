"""The VFM registry: one name -> one entry, everything about a backbone kept as data.

Every entry is built with timm (CLIP and SigLIP2 included: timm's vision towers are the ones
open_clip wraps, and timm converts OpenAI/open_clip state dicts). Input sizes keep a 16x16
grid, except DINOv2 which keeps VFMTok's 336 px -> 24x24.
"""

from __future__ import annotations

import dataclasses
import difflib

from .inhouse import FAMILIES

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@dataclasses.dataclass(frozen=True)
class VFMEntry:
    name: str
    family: str
    arch: str                      # timm model name (with pretrained tag when timm has one)
    input_size: int                # default square resolution fed to the backbone
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weight_format: str             # key of convert.FORMATS: how a local file is laid out
    weight_file: str               # expected local file name (in $VFMSTUDY_WEIGHTS_DIR or via `weights:`)
    hub: str | None = None         # HF hub repo for `pretrained: true` (None: local file only)
    url: str | None = None         # where the original file is published, for the error message
    arch_kwargs: dict = dataclasses.field(default_factory=dict)  # where the original differs from timm's

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"{self.name}: family '{self.family}' is not one of {FAMILIES}")


ENTRIES: dict[str, VFMEntry] = {}


def register(entry: VFMEntry) -> None:
    if entry.name in ENTRIES:
        raise ValueError(f"VFM '{entry.name}' registered twice")
    ENTRIES[entry.name] = entry


def get_entry(name: str) -> VFMEntry:
    if name not in ENTRIES:
        raise KeyError(unknown_name_message(name, list(ENTRIES)))
    return ENTRIES[name]


def unknown_name_message(name: str, known: list[str]) -> str:
    hint = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    fix = f"did you mean '{hint[0]}'?" if hint else "see `python -m tokenizer.vfm list`"
    return f"unknown VFM '{name}' ({fix}; also inhouse:NAME and random:ARCH)"


# --------------------------------------------------------------------------- DINOv2 (+ registers)
_DINOV2_SIZES = {"s": "small", "b": "base", "l": "large", "g": "giant"}
for _k, _size in _DINOV2_SIZES.items():
    for _reg in (False, True):
        _tag = "_reg4" if _reg else ""
        _fb = f"dinov2_vit{_k}14{_tag}_pretrain.pth"
        register(VFMEntry(
            name=f"dinov2_vit{_k}14{'_reg' if _reg else ''}", family="self-distillation+latent-mim",
            arch=f"vit_{_size}_patch14{_tag}_dinov2.lvd142m", input_size=336, mean=IMAGENET[0],
            std=IMAGENET[1], weight_format="dinov2-hub", weight_file=_fb,
            hub=f"timm/vit_{_size}_patch14{_tag}_dinov2.lvd142m",
            url=f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{_k}14/{_fb}"))

# --------------------------------------------------------------------------- DINOv3 (timm Eva)
for _k, _size in (("s", "small"), ("b", "base"), ("l", "large")):
    register(VFMEntry(
        name=f"dinov3_vit{_k}16", family="self-distillation+latent-mim",
        arch=f"vit_{_size}_patch16_dinov3.lvd1689m", input_size=256, mean=IMAGENET[0], std=IMAGENET[1],
        weight_format="timm", weight_file=f"vit_{_size}_patch16_dinov3.lvd1689m.safetensors",
        hub=f"timm/vit_{_size}_patch16_dinov3.lvd1689m"))

# --------------------------------------------------------------------------- image-text
register(VFMEntry(
    name="siglip2_vitb16_256", family="image-text-contrastive", arch="vit_base_patch16_siglip_256.v2_webli",
    input_size=256, mean=HALF[0], std=HALF[1], weight_format="open_clip",
    weight_file="open_clip_model.safetensors (ViT-B-16-SigLIP2-256, webli)",
    hub="timm/vit_base_patch16_siglip_256.v2_webli"))
# QuickGELU variants: OpenAI weights were trained with QuickGELU, plain GELU changes the outputs.
for _name, _arch, _size in (("clip_vitb16", "vit_base_patch16_clip_quickgelu_224.openai", 256),
                            ("clip_vitl14", "vit_large_patch14_clip_quickgelu_224.openai", 224)):
    register(VFMEntry(
        name=_name, family="image-text-contrastive", arch=_arch, input_size=_size, mean=OPENAI_CLIP[0],
        std=OPENAI_CLIP[1], weight_format="openai-clip",
        weight_file=f"{'ViT-B-16' if 'b16' in _name else 'ViT-L-14'}.pt (OpenAI) or open_clip state dict",
        hub=f"timm/{_arch.replace('_quickgelu', '')}"))

# --------------------------------------------------------------------------- masked image modelling
for _k, _size in (("b", "base"), ("l", "large")):
    register(VFMEntry(
        name=f"mae_vit{_k}16", family="pixel-mim", arch=f"vit_{_size}_patch16_224.mae", input_size=256,
        mean=IMAGENET[0], std=IMAGENET[1], weight_format="fb-model", weight_file=f"mae_pretrain_vit_{_size}.pth",
        hub=f"timm/vit_{_size}_patch16_224.mae",
        url=f"https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_{_size}.pth"))
# EVA-02 regresses EVA-CLIP features of masked patches: MIM with a latent target.
register(VFMEntry(
    name="eva02_vitb14", family="latent-mim", arch="eva02_base_patch14_224.mim_in22k", input_size=224,
    mean=OPENAI_CLIP[0], std=OPENAI_CLIP[1], weight_format="timm",
    weight_file="eva02_base_patch14_224.mim_in22k.safetensors", hub="timm/eva02_base_patch14_224.mim_in22k"))

# --------------------------------------------------------------------------- self-distillation / contrastive
for _k, _size, _fb in (("s", "small", "dino_deitsmall16_pretrain"), ("b", "base", "dino_vitbase16_pretrain")):
    register(VFMEntry(
        name=f"dino_vit{_k}16", family="self-distillation", arch=f"vit_{_size}_patch16_224.dino",
        input_size=256, mean=IMAGENET[0], std=IMAGENET[1], weight_format="dino-teacher",
        weight_file=f"{_fb}.pth (or the full checkpoint.pth, key 'teacher')",
        hub=f"timm/vit_{_size}_patch16_224.dino",
        url=f"https://dl.fbaipublicfiles.com/dino/{_fb}/{_fb}.pth"))
for _k, _size in (("s", "small"), ("b", "base")):
    register(VFMEntry(
        name=f"ibot_vit{_k}16", family="self-distillation+latent-mim", arch=f"vit_{_size}_patch16_224",
        input_size=256, mean=IMAGENET[0], std=IMAGENET[1], weight_format="dino-teacher",
        weight_file="checkpoint_teacher.pth", url="https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/"
                                                  f"archive/2022/ibot/vit{_k}_16/checkpoint_teacher.pth"))
    register(VFMEntry(
        name=f"mocov3_vit{_k}16", family="contrastive", arch=f"vit_{_size}_patch16_224", input_size=256,
        mean=IMAGENET[0], std=IMAGENET[1], weight_format="mocov3", weight_file=f"vit-{_k}-300ep.pth.tar",
        url=f"https://dl.fbaipublicfiles.com/moco-v3/vit-{_k}-300ep/vit-{_k}-300ep.pth.tar",
        # MoCo v3's ViT-S uses 12 heads (timm's 6): same weight shapes, different attention.
        arch_kwargs={"num_heads": 12}))

# --------------------------------------------------------------------------- supervised
for _k, _size, _file in (("s", "small", "deit_small_patch16_224-cd65a155.pth"),
                        ("b", "base", "deit_base_patch16_224-b5f2ef4d.pth")):
    register(VFMEntry(
        name=f"deit_vit{_k}16", family="supervised", arch=f"deit_{_size}_patch16_224.fb_in1k", input_size=256,
        mean=IMAGENET[0], std=IMAGENET[1], weight_format="fb-model", weight_file=_file,
        hub=f"timm/deit_{_size}_patch16_224.fb_in1k", url=f"https://dl.fbaipublicfiles.com/deit/{_file}"))
