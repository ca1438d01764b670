"""The official recipe, item by item, against every preset: the source of docs/fidelity.md and of
the recipe part of each run's logged `deviations`.

    python -m study.fidelity            # rewrites docs/fidelity.md from the code and the presets
    python -m study.fidelity --check    # exit 1 when the checked-in page is stale

Each `Item` names one method item, its official value (the official VFMTok2 / RAE / LlamaGen
code) and how to read it from a loaded preset config.  A preset matches when the value read
equals the official one; otherwise the row names the deviation and its reason: the item's own
reason when it has one, else the reason its preset is scaled down (`SCALED`).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "fidelity.md"
IMAGENET_TRAIN = 1_281_167  # images in ImageNet-1k train: the official schedules are epochs of it
OFFLINE_DATA = ["data.name=shapes", "data.num_classes=10", "data.train_size=10", "data.val_size=10"]

# presets scaled down for CPU / small GPUs, and why (their other deviations are named per item)
SCALED = {
    "tiny": "CPU scale: the tiny-32 recipe sized for 2 minutes on 2 cores (header of the preset)",
    "base": "small-GPU scale: the tiny-32 recipe at 32 px (header of the preset)",
    "tiny_ae": "CPU scale: the tiny-32 VFMAE recipe",
    "tiny_gpt": "CPU scale: the tiny-32 GPT",
    "tiny_dit": "CPU scale: the tiny-32 DiT-DH",
}


def epochs_to_steps(epochs: float, batch_size: int, dataset_size: int = IMAGENET_TRAIN) -> int:
    return math.ceil(epochs * dataset_size / batch_size)


@dataclass(frozen=True)
class Item:
    part: str  # the part of the method the item belongs to
    name: str
    official: Any  # value, or callable(preset name) -> value for families with several official sizes
    read: Callable[[Any], Any]  # loaded preset config -> value comparable with `official`
    why: str = ""  # reason for a deliberate deviation in a full-scale preset (and in scaled ones)

    def official_for(self, preset: str) -> Any:
        return self.official(preset) if callable(self.official) else self.official

    def status(self, preset: str, value: Any) -> str:
        if value == self.official_for(preset):
            return "match"
        return "deviation: " + (self.why or SCALED.get(preset, "not stated (a bug: name the reason)"))


# --------------------------------------------------------------------------- values read from code
@lru_cache(maxsize=None)
def tokenizer_params(preset: str) -> str:
    from tokenizer.model import VFMTokenizer
    from tokenizer.vfm.backbone import build_vfm, describe
    cfg = load_preset(preset)
    if cfg.vfm.name.startswith(("random:", "inhouse:")):
        vfm = build_vfm(cfg.vfm) if cfg.vfm.name.startswith("random:") else None
    else:
        vfm = describe(cfg.vfm.name, cfg.vfm.input_size)
    if vfm is None:
        return "in-house VFM (built by the pretraining stage)"
    with torch.device("meta"):
        model = VFMTokenizer(cfg.model, vfm)
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.3f} M"


@lru_cache(maxsize=None)
def generator_params(preset: str) -> str:
    from generators.train import build_model
    with torch.device("meta"):
        model = build_model(load_preset(preset))
    count = model.num_params() if hasattr(model, "num_params") else sum(p.numel() for p in model.parameters())
    return f"{count / 1e6:.1f} M"


def disc_taps(_cfg) -> int:
    from tokenizer.vfm import level_indices
    return 1 + len(level_indices(12))  # patch embedding + the tapped blocks of a 12-block ViT


def steps_in_epochs(cfg) -> str:
    return f"{cfg.train.steps:,} steps ({cfg.train.steps * cfg.train.batch_size / IMAGENET_TRAIN:.4g} epochs)"


def official_steps(epochs: float, batch: int) -> str:
    steps = epochs_to_steps(epochs, batch)
    return f"{steps:,} steps ({steps * batch / IMAGENET_TRAIN:.4g} epochs)"


def vfm_text(spec) -> str:
    state = "pretrained" if spec.pretrained or spec.weights else "random init"
    if spec.name.startswith("inhouse:"):
        state = "in-house pretrained"
    return f"{spec.name} ({state}) at {spec.input_size or 'its default size'}"


def optim_text(o) -> str:
    return f"{o.name} {o.lr:g} {tuple(o.betas)} wd {o.weight_decay:g} clip {o.grad_clip:g}"


# --------------------------------------------------------------------------- the official recipes
VFMTOK = [
    Item("encoder", "frozen VFM", "dinov2_vitl14_reg (pretrained) at 336", lambda c: vfm_text(c.vfm),
         "the VFM is what a study sweeps; offline presets use random-init or in-house ViTs"),
    Item("encoder", "queries", 256, lambda c: c.model.num_queries),
    Item("encoder", "deformable encoder (depth, width, heads, points, FFN)", (6, 512, 8, 4, 1024),
         lambda c: (c.model.enc_depth, c.model.dim, c.model.enc_heads, c.model.enc_points, c.model.enc_ffn)),
    Item("encoder", "codebook (size x dim, beta)", (16384, 12, 0.25),
         lambda c: (c.model.codebook_size, c.model.code_dim, c.model.beta)),
    Item("decoder", "ViT decoder (depth, heads, attention dropout, registers)", (6, 8, 0.1, 4),
         lambda c: (c.model.dec_depth, c.model.dec_heads, c.model.attn_dropout, c.model.n_registers)),
    Item("decoder", "pixel grid", 21, lambda c: c.model.image_size // c.model.decoder_patch),
    Item("decoder", "CNN upsampler (ch, mult, ResBlocks per stage)", (128, (1, 1, 2, 2, 4), 2),
         lambda c: (c.model.cnn_ch, tuple(c.model.cnn_mult), c.model.cnn_res_blocks + 1)),
    Item("losses", "pixel loss", "2 x MSE, weight 1",
         lambda c: ("2 x MSE" if c.loss.pixel == "l2" and c.loss.always_add_mse else c.loss.pixel)
         + f", weight {c.loss.pixel_weight:g}"),
    Item("losses", "perceptual loss", "lpips, weight 1",
         lambda c: f"{c.loss.perceptual}, weight {c.loss.perceptual_weight:g}",
         "offline: no VGG16 weights; random_vgg, a fixed random-init VGG16-layout distance, the same in every "
         "cell (never the VFM under study)"),
    Item("losses", "semantic loss weight", 1.0, lambda c: c.loss.semantic_weight),
    Item("losses", "GAN (weight, start)", (0.5, 20000), lambda c: (c.loss.gan_weight, c.loss.gan_start)),
    Item("losses", "discriminator backbone", "dino_vits16 (pretrained) at 224", lambda c: vfm_text(c.disc_vfm),
         "offline: no DINO ViT-S/16 weights; a fixed random-init ViT, the same in every cell"),
    Item("losses", "discriminator taps", 5, disc_taps),
    Item("training", "optimizer", "adam 0.0001 (0.9, 0.95) wd 0 clip 1", lambda c: optim_text(c.optim)),
    Item("training", "warmup", f"{epochs_to_steps(4, 16):,} steps (4 epochs)",
         lambda c: f"{c.optim.warmup_steps:,} steps ({c.optim.warmup_steps * c.train.batch_size / IMAGENET_TRAIN:.4g} epochs)"),
    Item("training", "batch, schedule", (16, official_steps(50, 16)), lambda c: (c.train.batch_size, steps_in_epochs(c))),
    Item("training", "EMA", 0.9999, lambda c: c.train.ema_decay),
    Item("training", "precision", "bf16", lambda c: c.train.precision),
    Item("size", "trainable parameters (random-init presets: with their own VFM)", "73.287 M",
         lambda c: tokenizer_params(c._preset)),
]

VFMAE = [
    Item("VFMAE", "frozen VFM", "dinov2_vitl14_reg (pretrained) at 224", lambda c: vfm_text(c.vfm),
         "the VFM is what a study sweeps; offline presets use random-init or in-house ViTs"),
    Item("VFMAE", "queries, latent channels", (256, 32), lambda c: (c.model.num_queries, c.model.latent_channels)),
    Item("VFMAE", "ViT decoder (depth, registers, bidirectional)", (4, 0, True),
         lambda c: (c.model.dec_depth, c.model.n_registers, not c.model.causal)),
    Item("VFMAE", "CNN ResBlocks per stage", 3, lambda c: c.model.cnn_res_blocks + 1),
    Item("VFMAE", "perceptual loss", "lpips, weight 1",
         lambda c: f"{c.loss.perceptual}, weight {c.loss.perceptual_weight:g}",
         "offline: no VGG16 weights; random_vgg, the same in every cell"),
    Item("VFMAE", "GAN (weight, start)", (0.5, 20000), lambda c: (c.loss.gan_weight, c.loss.gan_start)),
    Item("VFMAE", "optimizer", "adam 0.0001 (0.9, 0.95) wd 0 clip 1", lambda c: optim_text(c.optim)),
    Item("VFMAE", "batch, schedule", (256, official_steps(50, 256)), lambda c: (c.train.batch_size, steps_in_epochs(c))),
    Item("VFMAE", "precision", "fp32", lambda c: c.train.precision),
]

GPT = [
    Item("GPT", "GPT (depth, width, heads)", lambda p: (36, 1280, 20) if p == "gpt_XL" else (12, 768, 12),
         lambda c: (c.model.depth, c.model.dim, c.model.heads)),
    Item("GPT", "parameters (vocab 16384, 16x16)", lambda p: "774.7 M" if p == "gpt_XL" else "110.9 M",
         lambda c: generator_params(c._preset)),
    Item("GPT", "dropouts (token, residual, FFN, class)", (0.1, 0.1, 0.1, 0.1),
         lambda c: (c.model.token_dropout, c.model.resid_dropout, c.model.ffn_dropout, c.model.class_dropout)),
    Item("GPT", "class token rotary entry zeroed", True, lambda c: c.model.zero_cls_rope),
    Item("GPT", "optimizer", "adamw 0.0001 (0.9, 0.95) wd 0.05 clip 1", lambda c: optim_text(c.optim)),
    Item("GPT", "batch, schedule", lambda p: (512, official_steps(200 if p == "gpt_XL" else 300, 512)),
         lambda c: (c.train.batch_size, steps_in_epochs(c))),
    Item("GPT", "EMA, precision", (0.9999, "bf16"), lambda c: (c.train.ema_decay, c.train.precision)),
    Item("GPT", "training tokens", "encoded online from random crops", lambda c: "precomputed: centre crop, mirror, seeded random crops",
         "codes are exported once per tokenizer (a stage of the study) over a fixed sample of the recipe's "
         "random resize-crop + flip views instead of re-encoding every batch"),
]

DIT = [
    Item("DiT-DH", "trunk (width, depth, heads), head (width, depth, heads)",
         lambda p: (384, 12, 6, 2048, 2, 16) if p == "ditdh_S" else (1152, 28, 16, 2048, 2, 16),
         lambda c: (c.model.dim, c.model.depth, c.model.heads, c.model.ddt_width, c.model.ddt_depth, c.model.ddt_heads)),
    Item("DiT-DH", "parameters (32 x 16 x 16 latent)", lambda p: "834.8 M" if p == "ditdh_XL" else "-",
         lambda c: generator_params(c._preset) if c._preset == "ditdh_XL" else "-"),
    Item("DiT-DH", "time embedding frequencies", 256, lambda c: c.model.fourier_freqs),
    Item("DiT-DH", "flow time shift", 4.0, lambda c: c.flow.resolve_shift(c.model.latent_dim)),
    Item("DiT-DH", "optimizer", lambda p: f"adamw 0.0002 (0.9, 0.95) wd 0 clip {1 if p == 'ditdh_S' else 0.75:g}",
         lambda c: optim_text(c.optim)),
    Item("DiT-DH", "LR schedule", "constant, then linear to 2e-5 from epoch 40", lambda c: c.optim.schedule,
         "not encoded: the shared loop has no hold-then-decay schedule; constant throughout"),
    Item("DiT-DH", "batch, schedule", lambda p: (256, official_steps(1400 if p == "ditdh_S" else 800, 256)),
         lambda c: (c.train.batch_size, steps_in_epochs(c))),
    Item("DiT-DH", "EMA, precision", (0.9995, "fp32"), lambda c: (c.train.ema_decay, c.train.precision)),
    Item("DiT-DH", "sampler (method, steps, t_min)", ("euler", 99, 0.001),
         lambda c: (c.sample.method, c.sample.steps, c.sample.t_min)),
]

MODELS = {  # model: (items, presets, where the presets live)
    "VFMTok tokenizer": (VFMTOK, ["tiny", "base", "paper"], "tokenizer/configs"),
    "VFMAE tokenizer": (VFMAE, ["tiny_ae", "paper_ae"], "tokenizer/configs"),
    "AR generator (LlamaGen GPT)": (GPT, ["tiny_gpt", "gpt_B", "gpt_XL"], "generators/configs"),
    "Diffusion generator (DiT-DH)": (DIT, ["tiny_dit", "ditdh_S", "ditdh_XL"], "generators/configs"),
}


# --------------------------------------------------------------------------- loading and deviations
def load_preset(preset: str):
    """A preset's config; ImageNet presets read the shapes data instead (no dataset offline)."""
    from study.config import load
    for items, presets, folder in MODELS.values():
        if preset in presets:
            path = ROOT / folder / f"{preset}.yaml"
            break
    else:
        raise KeyError(f"unknown preset {preset!r}")
    if folder.startswith("tokenizer"):
        from tokenizer.train import TokenizerRunConfig as cls
        cfg = load(cls, path, OFFLINE_DATA if "imagefolder" in path.read_text() else [])
    else:
        from generators.train import GeneratorRunConfig as cls
        cfg = load(cls, path)
    cfg._preset = preset  # the size items build the preset's model from it
    return cfg


def recipe_deviations(items: list[Item], cfg, preset: Optional[str] = None) -> list[str]:
    """One line per item where `cfg` differs from the official recipe, with the reason."""
    out = []
    for item in items:
        if "parameters" in item.name:
            continue  # sizes follow from the other items; counting needs the preset's name
        value, official = item.read(cfg), item.official_for(preset or "")
        if value != official:
            reason = item.why or SCALED.get(preset or "", "scaled-down recipe")
            out.append(f"{item.name}: {value} (official: {official}): {reason}")
    return out


def generator_deviations(cfg) -> list[str]:
    """The recipe deviations of a generator run (GPT or DiT-DH) against the official large model."""
    import dataclasses

    from generators.train import default_optim

    cfg = dataclasses.replace(cfg, optim=cfg.optim or default_optim(cfg.kind))  # what the run trains with
    items = GPT if cfg.kind == "gpt" else DIT
    return recipe_deviations(items, cfg, "gpt_B" if cfg.kind == "gpt" else "ditdh_XL")


# --------------------------------------------------------------------------- the page
def _cell(value: Any) -> str:
    text = ", ".join(map(str, value)) if isinstance(value, tuple) else str(value)
    return text.replace("|", "/")


def render() -> str:
    lines = ["# Fidelity to the official recipe", "",
             "Generated by `python -m study.fidelity` from the code and the presets; do not edit by hand",
             "(`tests/test_fidelity.py` fails when it is stale). Official values: the official VFMTok2 code",
             "(tokenizers, DiT-DH recipe), RAE's DiT-DH, LlamaGen's GPT.",
             f"Schedules count epochs of ImageNet train ({IMAGENET_TRAIN:,} images).", ""]
    for model, (items, presets, folder) in MODELS.items():
        configs = {p: load_preset(p) for p in presets}
        lines += [f"## {model}", "", "Presets: " + ", ".join(f"`{folder}/{p}.yaml`" for p in presets), "",
                  "| part | item | official | " + " | ".join(presets) + " |",
                  "|---|---|---|" + "---|" * len(presets)]
        notes: dict[tuple[str, str], list[str]] = {}  # (item, reason) -> presets
        for item in items:
            cells = []
            for p in presets:
                value = item.read(configs[p])
                status = item.status(p, value)
                cells.append(f"{_cell(value)} ({'match' if status == 'match' else 'deviation'})")
                if status != "match":
                    notes.setdefault((item.name, status.removeprefix("deviation: ")), []).append(p)
            official = item.official if not callable(item.official) else \
                " / ".join(f"{p}: {_cell(item.official_for(p))}" for p in presets if p not in SCALED)
            lines.append(f"| {item.part} | {item.name} | {_cell(official)} | " + " | ".join(cells) + " |")
        lines += ["", "Deviations, and why:", ""]
        lines += [f"- {name} ({', '.join(ps)}): {reason}" for (name, reason), ps in notes.items()]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study.fidelity", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/fidelity.md is stale")
    args = parser.parse_args(argv)
    page = render()
    if args.check:
        stale = not PAGE.is_file() or PAGE.read_text() != page
        print(f"{PAGE}: {'stale: run python -m study.fidelity' if stale else 'up to date'}")
        return int(stale)
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(page)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
