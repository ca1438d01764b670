"""The study's stage chain, registered with the engine (study.stages):

    reference ─────────────────────────────┬──────────────┬──────────────┐
    vfm ──> tokenizer ──> tok_eval          │              │              │
                 └──────> generator ──> gen_eval  (reference feeds tok_eval, generator, gen_eval)

A cell config has the sections `data`, `vfm`, `pretrain`, `reference`, `tokenizer`,
`generator` and `eval`.  Each stage reads only the sections it declares, so its id (and its
cache folder) changes only when they do: one backbone's VFM stage is shared by every cell that
uses it, one tokenizer by every generator trained on it.

Derived, never set by hand (so a sweep can't contradict itself):
  - `inhouse:<objective>` backbones are pretrained here with `pretrain` and objective <objective>;
  - the generator's kind follows the tokenizer (vfmtok -> gpt, vfmae -> dit), as do its
    vocabulary / latent channels, its token grid and the number of classes;
  - the generator trains on the codes the tokenizer stage exported (with flips).

Metric names are honest: Fréchet distances in the project's reference-classifier space are
`rfd_ref` (reconstructions) and `fd_ref` (samples); `rfid` / `gfid` appear only when
`eval.inception_weights` points at the real TF-Inception file.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from study import ledger
from study.config import ConfigError, from_dict, nonsemantic, to_dict
from study.data import DataConfig, build_dataset, to_tensor_images, to_uint8
from study.metrics.codebook import codebook_stats
from study.metrics.features import RefSpace, distribution_metrics
from study.metrics.grids import class_grid, reconstruction_grid
from study.metrics.image import reconstruction_metrics
from study.metrics.probes import linear_probe
from study.metrics.reference import ReferenceClassifier, RefClassifierConfig, class_consistency, \
    train_reference_classifier
from study.stages import StageContext, register_stage
from generators.dit import DiTConfig
from generators.gpt import GPTConfig
from generators.train import DataConfig as CodesConfig, GeneratorRunConfig, load_generator, train as train_generator
from tokenizer.pretrain import PretrainConfig, evaluate_backbone, pretrain
from tokenizer.train import TokenizerRunConfig, export_codes, load_tokenizer, train as train_tokenizer
from tokenizer.vfm import MissingWeightsError, VFMSpec, build_vfm, get_entry
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
TokenizerSection = section("TokenizerSection", TokenizerRunConfig, drop=("data", "vfm", "deviations"))
GeneratorSection = section("GeneratorSection", GeneratorRunConfig, drop=("kind", "data"))


@dataclass
class EvalConfig:
    """How tokenizers and generators are measured (the `eval` section)."""
    recon_images: int = 500  # val images reconstructed for psnr / ssim / rfd_ref
    probe_train: int = 1000  # train images whose tokenizer latents fit the linear probe
    probe_val: int = 500
    samples_per_class: int = 20  # generated images per class for gen_eval
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
    return spec_missing(part.disc_vfm) if part.loss.gan_weight > 0 else None


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
    kind = "gpt" if tok.kind == "vfmtok" else "dit"
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
        generator_config(cfg, Path("codes.pt"), Path("."))
    except ConfigError as err:
        raise ConfigError(err.detail, key=f"generator.{err.key}" if err.key else "generator") from None


# --------------------------------------------------------------------------- helpers
def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _reference(ctx: StageContext) -> ReferenceClassifier:
    return ReferenceClassifier.load(ctx.inputs["reference"].dir / "classifier.pt")


def _val_images(data: DataConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    val = build_dataset(data, "val")
    return val.images[:n], val.labels[:n]


@torch.no_grad()
def _batched(fn, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    device = _device()
    return torch.cat([fn(x[i:i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])


def _decode(tokenizer, codes: torch.Tensor, batch_size: int) -> np.ndarray:
    return to_uint8(_batched(tokenizer.decode, codes, batch_size))


# --------------------------------------------------------------------------- stages
@register_stage("reference", ReferenceStage, missing=missing_data)
def run_reference(ctx: StageContext) -> dict:
    """The classifier whose feature space defines fd_ref (trained once per dataset)."""
    cfg: ReferenceStage = ctx.config
    ref_cfg = dataclasses.replace(cfg.reference, image_size=cfg.data.resolution, cache_dir=str(ctx.dir))
    clf = train_reference_classifier(build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val"), ref_cfg)
    path = clf.save(ctx.dir / "classifier.pt")
    return {"val_acc": float(clf.meta["val_acc"]), "classifier": str(path.relative_to(ctx.dir))}


@register_stage("vfm", VFMStage, validate=check_backbone, missing=lambda cfg: spec_missing(cfg.vfm))
def run_vfm(ctx: StageContext) -> dict:
    """Pretrain an in-house backbone (or load a published one), then probe its features."""
    cfg: VFMStage = ctx.config
    spec = cfg.vfm
    objective = inhouse_objective(spec)
    metrics: dict[str, Any] = {}
    if objective is not None and not spec.weights:
        pre = assemble(PretrainConfig, cfg.pretrain, objective=objective, data=cfg.data)
        pre.train = dataclasses.replace(pre.train, out_dir=str(ctx.dir / "pretrain"))
        path, metrics = pretrain(pre, ctx.callbacks)
        spec = dataclasses.replace(spec, weights=str(Path(path).resolve()))
    vfm = build_vfm(spec)
    if not metrics or "knn_acc" not in metrics:
        metrics = {**metrics, **evaluate_backbone(vfm, cfg.data, cfg.pretrain.eval)}
    keep = {"knn_acc": "knn_acc", "linear_acc": "probe_acc", "effective_rank": "effective_rank",
            "uniformity": "uniformity"}
    out = {new: float(metrics[old]) for old, new in keep.items() if old in metrics}
    out.update(spec=to_dict(spec), family=vfm.family, num_params=int(vfm.num_params),
               tags={"backbone": cfg.vfm.name, "family": vfm.family})
    return out


@register_stage("tokenizer", TokenizerStage, needs=("vfm",), validate=check_tokenizer,
                missing=missing_tokenizer_inputs)
def run_tokenizer(ctx: StageContext) -> dict:
    """Train VFMTok / VFMAE on the frozen backbone; export the train split's codes (+ flips)."""
    cfg: TokenizerStage = ctx.config
    spec = from_dict(VFMSpec, ctx.inputs["vfm"].result["spec"])
    run = tokenizer_config(cfg.data, spec, cfg.tokenizer, ctx.dir)
    model, metrics = train_tokenizer(run, ctx.callbacks)
    model.to(_device())
    export_codes(model, build_dataset(cfg.data, "train"), ctx.dir / "codes.pt")
    m = run.model
    out = {k.replace("/", "_"): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    out.update(codes="codes.pt", deviations=run.deviations,
               tags={"tokenizer_kind": m.kind, "num_queries": str(m.num_queries), "sampler": m.sampler,
                     "semantic": str(run.semantic_on).lower()})
    return out


@register_stage("tok_eval", TokEvalStage, needs=("tokenizer", "reference"))
def run_tok_eval(ctx: StageContext) -> dict:
    """Reconstruction quality (psnr, ssim, rfd_ref [, rfid]), codebook use, a linear probe on the
    tokenizer's latents, and a reconstruction grid."""
    cfg: TokEvalStage = ctx.config
    ev = cfg.eval
    tokenizer = load_tokenizer(ctx.inputs["tokenizer"].dir, map_location=_device())
    images, _ = _val_images(cfg.data, ev.recon_images)
    x = to_tensor_images(images)
    codes = _batched(tokenizer.encode, x, ev.batch_size)
    recon = _decode(tokenizer, codes, ev.batch_size)
    out = reconstruction_metrics(images, recon)
    out["rfd_ref"] = distribution_metrics(RefSpace(_reference(ctx)), recon, images)["fd_ref"]
    if ev.inception_weights:  # the real rFID (reconstructions vs originals), only with the real weights
        from study.metrics.fid import InceptionConfig, rfid
        out.update(rfid(recon, images, InceptionConfig(weights_path=ev.inception_weights)))
    if tokenizer.cfg.kind == "vfmtok":
        stats = codebook_stats(codes.numpy(), tokenizer.cfg.codebook_size)
        out.update(codebook_usage=stats["usage"], perplexity=stats["perplexity"], token_entropy_bits=stats["entropy_bits"])
    else:
        out.update(latent_mean=float(codes.mean()), latent_std=float(codes.std()))
    out.update(_latent_probe(tokenizer, cfg.data, ev))
    reconstruction_grid(images[:8], recon[:8], ctx.dir / "reconstructions.png")
    out["artifacts"] = {"grids": ["reconstructions.png"]}
    return out


@torch.no_grad()
def _latent_probe(tokenizer, data: DataConfig, ev: EvalConfig) -> dict:
    """Linear probe on the flattened tokenizer latents (code vectors for VFMTok)."""
    def features(split: str, n: int):
        ds = build_dataset(data, split)
        codes = _batched(tokenizer.encode, to_tensor_images(ds.images[:n]), ev.batch_size)
        if tokenizer.cfg.kind == "vfmtok":
            codes = tokenizer.quantizer.lookup(codes.to(_device())).cpu()
        return codes.flatten(1).float().numpy(), ds.labels[:n]

    (xtr, ytr), (xva, yva) = features("train", ev.probe_train), features("val", ev.probe_val)
    return {"probe_acc": linear_probe(xtr, ytr, xva, yva)["linear_acc"]}


def _fd_ref_hook(tokenizer, clf: ReferenceClassifier, reference: np.ndarray, batch_size: int):
    """sample_fn for the generator: fd_ref of decoded samples vs val images at each evaluation
    (the convergence curve: generation quality vs training step)."""
    space = RefSpace(clf)
    ref_features = space.features(reference)

    def hook(samples: torch.Tensor, labels: torch.Tensor, step: int) -> dict:
        images = _decode(tokenizer, samples, batch_size)
        return {"fd_ref": distribution_metrics(space, images, ref_features, ref_is_features=True)["fd_ref"]}
    return hook


@register_stage("generator", GeneratorStage, needs=("tokenizer", "reference"), validate=check_generator)
def run_generator(ctx: StageContext) -> dict:
    """Train the AR GPT (VFMTok) or the flow-matching DiT (VFMAE) on the tokenizer's codes."""
    cfg: GeneratorStage = ctx.config
    tok_dir = ctx.inputs["tokenizer"].dir
    run = generator_config(cfg, ledger.result_path(tok_dir, ctx.inputs["tokenizer"].result["codes"]), ctx.dir)
    tokenizer = load_tokenizer(tok_dir, map_location=_device())
    reference, _ = _val_images(cfg.data, cfg.eval.recon_images)
    hook = _fd_ref_hook(tokenizer, _reference(ctx), reference, cfg.eval.batch_size)
    _, metrics = train_generator(run, ctx.callbacks, sample_fn=hook)
    out = {k.replace("/", "_"): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    out["tags"] = {"generator_kind": run.kind}
    return out


@register_stage("gen_eval", GenEvalStage, needs=("generator", "tokenizer", "reference"))
def run_gen_eval(ctx: StageContext) -> dict:
    """Samples per class without and with guidance (CFG for GPT, AutoGuidance for DiT):
    fd_ref, precision/recall and class consistency in the reference space [, gfid]; a grid."""
    cfg: GenEvalStage = ctx.config
    ev = cfg.eval
    gen = load_generator(ctx.inputs["generator"].dir, device=_device())
    tokenizer = load_tokenizer(ctx.inputs["tokenizer"].dir, map_location=_device())
    clf = _reference(ctx)
    space = RefSpace(clf)
    val = build_dataset(cfg.data, "val")
    ref_features = space.features(val.images)
    labels = torch.arange(cfg.data.num_classes).repeat_interleave(ev.samples_per_class)
    guided = {"cfg_scale": ev.guidance_scale}
    if gen.cfg.kind == "dit" and gen.guide is not None:
        guided["guidance"] = "autoguidance"
    out: dict[str, Any] = {}
    for suffix, overrides in (("", {"cfg_scale": 1.0}), ("_guided", guided)):
        codes = gen.sample(labels.to(_device()), seed=ev.seed, **overrides).cpu()
        images = _decode(tokenizer, codes, ev.batch_size)
        metrics = distribution_metrics(space, images, ref_features, ref_is_features=True)
        metrics["class_consistency"] = class_consistency(clf, images, labels.numpy())
        if ev.inception_weights:
            from study.metrics.fid import InceptionConfig, gfid
            metrics.update(gfid(images, val.images, InceptionConfig(weights_path=ev.inception_weights)))
        out.update({f"{k}{suffix}": v for k, v in metrics.items()})
        if not suffix:
            class_grid(images, labels.numpy(), ctx.dir / "samples.png", num_classes=cfg.data.num_classes)
    out["guidance"] = guided.get("guidance", "cfg")
    out["artifacts"] = {"grids": ["samples.png"]}
    return out
