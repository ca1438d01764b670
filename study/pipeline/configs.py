"""The stage configs of the study's chain: which cell-config sections each stage reads, and
the run configs derived from them.

Derived, never set by hand (so a sweep can't contradict itself):
  - `inhouse:<objective>` backbones are pretrained here with `pretrain` and objective <objective>;
  - the generator's kind follows the tokenizer (vfmtok -> gpt, vfmae -> dit), as do its
    vocabulary / latent channels, its token grid and the number of classes;
  - the generator trains on the codes the tokenizer stage exported (with flips).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from study import schema as S
from study.config import ConfigError, nonsemantic
from study.data import DataConfig
from study.pipeline.reference import RefClassifierConfig
from generators.dit import DiTConfig
from generators.gpt import GPTConfig
from generators.train import CodesConfig, GeneratorRunConfig
from tokenizer.pretrain import PretrainConfig
from tokenizer.losses import missing_perceptual_file
from tokenizer.train import TokenizerRunConfig
from tokenizer.vfm import MissingWeightsError, VFMSpec, get_entry
from tokenizer.vfm.backbone import resolve_weights


def section(name: str, cls: type, drop: tuple[str, ...]) -> type:
    """A dataclass holding `cls`'s fields minus `drop`: the part of a run config that a sweep
    section sets (the dropped fields are filled in by the pipeline)."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if f.name in drop or not f.init:
            continue
        kwargs = {"metadata": f.metadata}
        if f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        if f.default_factory is not dataclasses.MISSING:
            kwargs["default_factory"] = f.default_factory
        fields.append((f.name, hints[f.name], dataclasses.field(**kwargs)))
    made = dataclasses.make_dataclass(name, fields)
    made.__module__ = __name__  # picklable (submitit ships stage configs): bind it as `name` here
    return made


def assemble(cls: type, part: Any, **fills: Any) -> Any:
    """`cls` built from a section instance plus the derived fields (validated on construction)."""
    values = {f.name: getattr(part, f.name) for f in dataclasses.fields(part)}
    return cls(**values, **fills)


PretrainSection = section("PretrainSection", PretrainConfig, drop=("objective", "data"))
TokenizerSection = section("TokenizerSection", TokenizerRunConfig,
                           drop=("data", "vfm", "deviations", "perceptual_network"))
GeneratorSection = section("GeneratorSection", GeneratorRunConfig, drop=("kind", "data"))


@dataclass
class EvalConfig:
    """How tokenizers and generators are measured (the `eval` section)."""
    recon_images: int = 500  # val images reconstructed for psnr / ssim / rfd_ref
    probe_train: int = 1000  # train images whose tokenizer latents fit the linear probe
    probe_val: int = 500
    samples_per_class: int = 20  # generated images per class for gen_eval
    # gen_eval's class labels: samples_per_class of each, or as many drawn uniformly at random
    label_sampling: Literal[S.EQUAL_PER_CLASS, S.RANDOM_LABELS] = S.EQUAL_PER_CLASS
    guidance_scale: float = 1.5  # CFG (gpt) / AutoGuidance weight (dit) for the *_guided metrics
    convergence_samples: int = 100  # samples drawn at each generator evaluation (fd_ref vs step)
    seed: int = 0
    inception_weights: Optional[str] = None  # real TF-Inception .pth -> rfid / gfid as well
    batch_size: int = nonsemantic(100)


# --------------------------------------------------------------------------- stage configs
@dataclass
class ReferenceStage:
    data: DataConfig
    reference: RefClassifierConfig = field(default_factory=RefClassifierConfig)


@dataclass
class VFMStage:
    data: DataConfig
    vfm: VFMSpec
    pretrain: PretrainSection = field(default_factory=PretrainSection)


@dataclass
class TokenizerStage:
    data: DataConfig
    vfm: VFMSpec
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)


@dataclass
class TokEvalStage:
    data: DataConfig
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class GeneratorStage:
    data: DataConfig
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    generator: GeneratorSection = field(default_factory=GeneratorSection)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class GenEvalStage:
    data: DataConfig
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------- validation
OBJECTIVES = typing.get_args(typing.get_type_hints(PretrainConfig)["objective"])


def inhouse_objective(spec: VFMSpec) -> Optional[str]:
    return spec.name.split(":", 1)[1] if spec.name.startswith("inhouse:") else None


def check_backbone(cfg: VFMStage) -> None:
    """Names are checked by VFMSpec itself; an in-house backbone must name an objective we can
    pretrain (or bring its own checkpoint)."""
    objective = inhouse_objective(cfg.vfm)
    if objective is not None and objective not in OBJECTIVES and not cfg.vfm.weights:
        raise ConfigError(f"unknown in-house objective '{objective}' (one of {', '.join(OBJECTIVES)}, "
                          "or give vfm.weights for a checkpoint trained elsewhere)", key="vfm.name")


def spec_missing(spec: Optional[VFMSpec]) -> Optional[str]:
    """The error building `spec` would raise for want of a weight file, or None."""
    if spec is None or spec.name.startswith(("inhouse:", "random:")):
        return None
    try:
        resolve_weights(get_entry(spec.name), spec)
    except MissingWeightsError as err:
        return str(err)
    return None


def missing_data(cfg: ReferenceStage) -> Optional[str]:
    """Real datasets are read from local files only: name the folder a run would not find."""
    data = cfg.data
    if data.name == "shapes" or (data.root and Path(data.root).expanduser().is_dir()):
        return None
    return f"data: {data.name} folder {data.root!r} not found (set data.root to the local copy; nothing is downloaded)"


def missing_tokenizer_inputs(cfg: TokenizerStage) -> Optional[str]:
    part = cfg.tokenizer
    missing = [missing_perceptual_file(part.loss), spec_missing(part.disc_vfm) if part.loss.gan_weight > 0 else None]
    return "; ".join(m for m in missing if m) or None


def tokenizer_config(data: DataConfig, vfm: VFMSpec, part: Any, out_dir: Path) -> TokenizerRunConfig:
    cfg = assemble(TokenizerRunConfig, part, data=data, vfm=vfm)
    cfg.train = dataclasses.replace(cfg.train, out_dir=str(out_dir))
    return cfg


def check_tokenizer(cfg: TokenizerStage) -> None:
    """The run config's cross-field checks (e.g. image size vs data resolution) at load time."""
    try:
        tokenizer_config(cfg.data, cfg.vfm, cfg.tokenizer, Path("."))
    except ConfigError as err:
        raise ConfigError(err.detail, key=f"tokenizer.{err.key}" if err.key else "tokenizer") from None


def generator_config(cfg: GeneratorStage, codes: Path, out_dir: Path) -> GeneratorRunConfig:
    """The generator's run config with what the tokenizer and the data decide filled in."""
    tok = cfg.tokenizer.model
    side = math.isqrt(tok.num_queries)
    kind = generator_kind(tok.kind)
    part = cfg.generator
    derived = {"grid": (side, side), "num_classes": cfg.data.num_classes}
    gpt, dit = part.gpt, part.dit
    if kind == "gpt":
        gpt = dataclasses.replace(gpt or GPTConfig(), vocab_size=tok.codebook_size, **derived)
    else:
        dit = dataclasses.replace(dit or DiTConfig(), in_channels=tok.latent_channels, **derived)
    run = assemble(GeneratorRunConfig, part, kind=kind, data=CodesConfig(source="cache", path=str(codes)))
    run.gpt, run.dit = gpt, dit
    run.sample = dataclasses.replace(run.sample, num_samples=cfg.eval.convergence_samples, seed=cfg.eval.seed)
    run.train = dataclasses.replace(run.train, out_dir=str(out_dir))
    return run


def check_generator(cfg: GeneratorStage) -> None:
    try:
        generator_config(cfg, Path(S.CODES_FILE), Path("."))
    except ConfigError as err:
        raise ConfigError(err.detail, key=f"generator.{err.key}" if err.key else "generator") from None


def generator_kind(tokenizer_kind: str) -> str:
    """Discrete codes feed the AR GPT, continuous latents the flow-matching DiT."""
    return "gpt" if tokenizer_kind == "vfmtok" else "dit"
