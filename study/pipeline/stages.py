"""The study's stage chain, registered with the engine (study.stages):

    reference ──────────────┬───────────────┬──────────────┐
    vfm ──> tokenizer ──> tok_eval          │              │
                 └──────────────────> generator ──> gen_eval

A cell config has the sections `data`, `vfm`, `pretrain`, `reference`, `tokenizer`,
`generator` and `eval`.  Each stage reads only the sections it declares (study.pipeline.configs),
so its id (and its cache folder) changes only when they do: one backbone's VFM stage is shared
by every cell that uses it, one tokenizer by every generator trained on it.

Metric names are honest: Fréchet distances in the project's reference-classifier space are
`rfd_ref` (reconstructions) and `fd_ref` (samples); `rfid` / `gfid` appear only when
`eval.inception_weights` points at the real TF-Inception file.  Every name is in study.schema.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from study import schema as S
from study.config import from_dict, to_dict
from study.fidelity import generator_deviations
from study.data import DataConfig, build_dataset, to_tensor_images, to_uint8
from study.metrics.codebook import codebook_stats
from study.metrics.features import RefSpace, distribution_metrics
from study.metrics.grids import class_grid, reconstruction_grid
from study.metrics.image import class_mean_psnr, psnr, ssim
from study.metrics.probes import linear_probe
from study.metrics.reference import ReferenceClassifier, class_consistency
from study.metrics.representation import property_report
from study.pipeline.reference import train_reference_classifier
from study.pipeline.configs import (EvalConfig, GenEvalStage, GeneratorStage, ReferenceStage, TokEvalStage,
                                    TokenizerStage, VFMStage, assemble, check_backbone, check_generator,
                                    check_tokenizer, generator_config, inhouse_objective, missing_data,
                                    missing_tokenizer_inputs, spec_missing, tokenizer_config)
from study.stages import StageContext, StageResult, register_stage
from study.training import init_distributed, sharded
from generators.train import label_chunks, load_generator, train as train_generator
from tokenizer.pretrain import PretrainConfig, evaluate_backbone, pretrain
from tokenizer.export import merge_code_shards, write_code_shards
from tokenizer.sampling_points import sampling_points
from tokenizer.train import load_tokenizer, train as train_tokenizer
from tokenizer.vfm import VFMSpec, build_vfm

SPEC = "spec"  # vfm output: the backbone spec with the weights it was built from
_GUIDANCE_ARG = "guidance"  # LoadedGenerator.sample's keyword choosing the DiT's guidance
PROPERTY_IMAGES = 256  # val images the representation properties are measured on: bounds their N x N kernels
PROPERTY_K = 10  # neighbours of mutual kNN / CKNNA
PROPERTY_FAR = 6  # spatial structure's far pairs: this many grid steps apart (or the grid's largest distance)
POINT_IMAGES = 4  # val images whose sampling points tok_eval saves for the figure
# what a rank other than 0 returns from a stage whose evaluation it shares: the worker writes nothing
# of it (rank 0 computes the metrics from every rank's part)
FOLLOWER = StageResult()


# --------------------------------------------------------------------------- helpers
def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _reference(ctx: StageContext) -> ReferenceClassifier:
    return ReferenceClassifier.load(ctx.inputs[S.REFERENCE].dir / S.CLASSIFIER_FILE)


def _val_images(data: DataConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    val = build_dataset(data, "val")
    return val.images[:n], val.labels[:n]


@torch.no_grad()
def _batched(fn, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    device = _device()
    return torch.cat([fn(x[i:i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])


def _decode(tokenizer, codes: torch.Tensor, batch_size: int) -> np.ndarray:
    return to_uint8(_batched(tokenizer.decode, codes, batch_size))


def _properties(patches: torch.Tensor, reference: np.ndarray) -> dict[str, float]:
    """Spatial structure and RankMe of patch features (N, h, w, C), and their mutual kNN / CKNNA
    alignment with `reference` (N, E): the reference classifier's features of the same images.
    That space is trained once per dataset, the same for every cell, so it adds no confound to a
    comparison of backbones."""
    n, h, w = patches.shape[:3]
    found = property_report(patches, reference, k=min(PROPERTY_K, n - 1), far=min(PROPERTY_FAR, h + w - 2))
    return {S.REPRESENTATION[k]: v for k, v in found.items()}


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """A trainer's final numbers as stage metrics (`loss/model` -> `loss_model`)."""
    return {k.replace("/", "_"): float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


# --------------------------------------------------------------------------- stages
@register_stage(S.REFERENCE, ReferenceStage, missing=missing_data)
def run_reference(ctx: StageContext) -> StageResult:
    """The classifier whose feature space defines fd_ref (trained once per dataset)."""
    cfg: ReferenceStage = ctx.config
    ref_cfg = dataclasses.replace(cfg.reference, image_size=cfg.data.resolution, cache_dir=str(ctx.dir))
    clf = train_reference_classifier(build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val"), ref_cfg)
    clf.save(ctx.dir / S.CLASSIFIER_FILE)
    return StageResult(metrics={S.VAL_ACC: clf.val_acc})


@register_stage(S.VFM, VFMStage, needs=(S.REFERENCE,), validate=check_backbone,
                missing=lambda cfg: spec_missing(cfg.vfm))
def run_vfm(ctx: StageContext) -> StageResult:
    """Pretrain an in-house backbone (or load a published one), then probe its features and
    measure their representation properties on val images."""
    cfg: VFMStage = ctx.config
    spec = cfg.vfm
    objective = inhouse_objective(spec)
    found: dict[str, Any] = {}
    if objective is not None and not spec.weights:
        pre = assemble(PretrainConfig, cfg.pretrain, objective=objective, data=cfg.data)
        pre.train = dataclasses.replace(pre.train, out_dir=str(ctx.dir / "pretrain"))
        path, found = pretrain(pre, ctx.callbacks)
        spec = dataclasses.replace(spec, weights=str(Path(path).resolve()))
    vfm = build_vfm(spec).to(_device())
    clf = _reference(ctx)
    images, _ = _val_images(cfg.data, min(cfg.pretrain.eval.val_samples, PROPERTY_IMAGES))
    features = sharded(lambda part: (_batched(vfm.final_tokens, to_tensor_images(images[part]),
                                              cfg.pretrain.eval.batch_size), clf.features(images[part])), len(images))
    if features is None:
        return FOLLOWER
    patches, reference = features
    if not set(S.BACKBONE_EVAL) <= set(found):  # the probes: rank 0 alone
        found = {**found, **evaluate_backbone(vfm, cfg.data, cfg.pretrain.eval)}
    metrics = {new: found[old] for old, new in S.BACKBONE_EVAL.items() if old in found}
    metrics[S.NUM_PARAMS] = vfm.num_params
    metrics.update(_properties(patches.unflatten(1, vfm.grid), reference))
    return StageResult(metrics=metrics, outputs={SPEC: to_dict(spec)},
                       tags={S.BACKBONE: cfg.vfm.name, S.FAMILY: vfm.family})


@register_stage(S.TOKENIZER, TokenizerStage, needs=(S.VFM,), validate=check_tokenizer,
                missing=missing_tokenizer_inputs)
def run_tokenizer(ctx: StageContext) -> StageResult:
    """Train VFMTok / VFMAE on the frozen backbone; export the train split's codes (centre crop, its
    mirror and `export_views` augmented views)."""
    cfg: TokenizerStage = ctx.config
    spec = from_dict(VFMSpec, ctx.inputs[S.VFM].result.outputs[SPEC])
    run = tokenizer_config(cfg.data, spec, cfg.tokenizer, ctx.dir)
    model, metrics = train_tokenizer(run, ctx.callbacks)
    model.to(_device())
    _export_sharded(model, build_dataset(cfg.data, "train"), ctx.dir / S.CODES_FILE, run.export_views, run.train.seed)
    m = run.model
    return StageResult(metrics=_numbers(metrics),
                       outputs={"deviations": run.deviations, "perceptual_network": run.perceptual_network},
                       tags={S.TOKENIZER_KIND: m.kind, S.NUM_QUERIES: m.num_queries, S.SAMPLER: m.sampler,
                             S.SEMANTIC: str(run.semantic_on).lower()})


def _export_sharded(model, dataset, path: Path, views: int, seed: int) -> None:
    """Every rank of the stage encodes its own shards of the train split; rank 0 merges them once
    all are on disk (a single-rank stage does both)."""
    rank, world, _ = init_distributed()
    plan = write_code_shards(model, dataset, path, rank=rank, world=world, views=views, seed=seed)
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        merge_code_shards(model, plan, path)


@register_stage(S.TOK_EVAL, TokEvalStage, needs=(S.TOKENIZER, S.REFERENCE))
def run_tok_eval(ctx: StageContext) -> StageResult:
    """Reconstruction quality (psnr, ssim, rfd_ref [, rfid]), codebook use, a linear probe on the
    tokenizer's latents and their representation properties, a reconstruction grid, and the
    queries' sampling points on a few val images (region sampler only). The ranks of the stage share
    out the encoding, decoding and feature passes; rank 0 computes the metrics."""
    cfg: TokEvalStage = ctx.config
    ev = cfg.eval
    tokenizer = load_tokenizer(ctx.inputs[S.TOKENIZER].dir, map_location=_device())
    clf = _reference(ctx)
    images, labels = _val_images(cfg.data, ev.recon_images)

    def reconstruct(part: slice):
        codes = _batched(tokenizer.encode, to_tensor_images(images[part]), ev.batch_size)
        recon = _decode(tokenizer, codes, ev.batch_size)
        return codes, recon, clf.features(images[part]), clf.features(recon)

    recons = sharded(reconstruct, len(images))
    probe = [_probe_features(tokenizer, cfg.data, split, n, ev.batch_size)
             for split, n in (("train", ev.probe_train), ("val", ev.probe_val))]
    if recons is None:
        return FOLLOWER
    codes, recon, ref_images, ref_recon = recons
    train = build_dataset(cfg.data, "train")
    out = {S.PSNR: psnr(images, recon), S.PSNR_CLASS_MEAN: class_mean_psnr(train.images, train.labels, images, labels),
           S.SSIM: ssim(images, recon), S.PROBE_ACC: linear_probe(*probe[0], *probe[1])["linear_acc"],
           S.RFD_REF: distribution_metrics(RefSpace(clf), ref_recon, ref_images, gen_is_features=True,
                                           ref_is_features=True)[S.FD_REF]}
    if ev.inception_weights:  # the real rFID (reconstructions vs originals), only with the real weights
        from study.metrics.fid import InceptionConfig, rfid
        out.update(rfid(recon, images, InceptionConfig(weights_path=ev.inception_weights)))
    if tokenizer.cfg.kind == "vfmtok":
        stats = codebook_stats(codes.numpy(), tokenizer.cfg.codebook_size)
        out.update({new: stats[old] for old, new in S.CODEBOOK.items()})
    else:
        out.update({S.LATENT_MEAN: float(codes.mean()), S.LATENT_STD: float(codes.std())})
    few = slice(PROPERTY_IMAGES)
    out.update(_properties(_latent_map(tokenizer, codes[few]), ref_images[few]))
    reconstruction_grid(images[:8], recon[:8], ctx.dir / S.RECONSTRUCTIONS_PNG)
    artifacts = {S.GRIDS: [S.RECONSTRUCTIONS_PNG]}
    if tokenizer.cfg.sampler == "region":
        points = sampling_points(tokenizer, to_tensor_images(images[:POINT_IMAGES]).to(_device()))
        np.savez_compressed(ctx.dir / S.SAMPLING_POINTS_FILE, images=images[:POINT_IMAGES], **points)
        artifacts[S.TOKENS] = [S.SAMPLING_POINTS_FILE]
    return StageResult(metrics=out, artifacts=artifacts)


@torch.no_grad()
def _latent_map(tokenizer, codes: torch.Tensor) -> torch.Tensor:
    """The tokenizer's latents as a map (B, h, w, C) over its anchor grid: the code vectors of
    VFMTok's ids, VFMAE's continuous latents."""
    if tokenizer.cfg.kind == "vfmtok":
        vectors = tokenizer.quantizer.lookup(codes.to(_device())).cpu()  # (B, N, d), raster order
        return vectors.unflatten(1, tokenizer.grid)
    return codes.permute(0, 2, 3, 1)


def _probe_features(tokenizer, data: DataConfig, split: str, n: int,
                    batch_size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The flattened tokenizer latents (code vectors for VFMTok) of the first n images of `split` and
    their labels, for the linear probe; the ranks share the images out (None on ranks other than 0)."""
    ds = build_dataset(data, split)
    n = min(n, len(ds.labels))
    features = sharded(lambda part: _latent_map(tokenizer, _batched(tokenizer.encode, to_tensor_images(ds.images[part]),
                                                                    batch_size)).flatten(1).float().numpy(), n)
    return None if features is None else (features, ds.labels[:n])


def _fd_ref_hook(tokenizer, clf: ReferenceClassifier, reference: np.ndarray, batch_size: int):
    """sample_fn for the generator: fd_ref of decoded samples vs val images at each evaluation
    (the convergence curve: generation quality vs training step). Every rank calls it with every
    sample; the ranks share out the decoding and the feature passes, rank 0 returns the metric."""
    space = RefSpace(clf)
    ref_features = sharded(lambda part: space.features(reference[part]), len(reference))

    def hook(samples: torch.Tensor, labels: torch.Tensor, step: int) -> dict:
        features = sharded(lambda part: space.features(_decode(tokenizer, samples[part], batch_size)), len(samples))
        if features is None:
            return {}
        return {S.FD_REF: distribution_metrics(space, features, ref_features, gen_is_features=True,
                                               ref_is_features=True)[S.FD_REF]}
    return hook


@register_stage(S.GENERATOR, GeneratorStage, needs=(S.TOKENIZER, S.REFERENCE), validate=check_generator)
def run_generator(ctx: StageContext) -> StageResult:
    """Train the AR GPT (VFMTok) or the flow-matching DiT (VFMAE) on the tokenizer's codes."""
    cfg: GeneratorStage = ctx.config
    tok_dir = ctx.inputs[S.TOKENIZER].dir
    run = generator_config(cfg, tok_dir / S.CODES_FILE, ctx.dir)
    tokenizer = load_tokenizer(tok_dir, map_location=_device())
    reference, _ = _val_images(cfg.data, cfg.eval.recon_images)
    hook = _fd_ref_hook(tokenizer, _reference(ctx), reference, cfg.eval.batch_size)
    _, metrics = train_generator(run, ctx.callbacks, sample_fn=hook)
    return StageResult(metrics=_numbers(metrics), outputs={"deviations": generator_deviations(run)},
                       tags={S.GENERATOR_KIND: run.kind})


def eval_labels(ev: EvalConfig, num_classes: int) -> torch.Tensor:
    """gen_eval's class labels: `samples_per_class` of each class in order, or (random) as many
    drawn uniformly at random with the eval seed."""
    n = num_classes * ev.samples_per_class
    if ev.label_sampling == S.RANDOM_LABELS:
        return torch.randint(num_classes, (n,), generator=torch.Generator().manual_seed(ev.seed))
    return torch.arange(num_classes).repeat_interleave(ev.samples_per_class)


@register_stage(S.GEN_EVAL, GenEvalStage, needs=(S.GENERATOR, S.TOKENIZER, S.REFERENCE))
def run_gen_eval(ctx: StageContext) -> StageResult:
    """Samples per class without and with guidance (CFG for GPT, AutoGuidance for DiT):
    fd_ref, precision/recall and class consistency in the reference space [, gfid]; a grid.
    The labels follow `eval.label_sampling` (`eval_labels`), recorded as the cell's label_sampling tag
    next to every generation metric. The ranks of the stage share out the label chunks (each drawn with
    its own seed, so the samples do not depend on the number of ranks) and the feature passes; rank 0
    computes the metrics."""
    cfg: GenEvalStage = ctx.config
    ev = cfg.eval
    gen = load_generator(ctx.inputs[S.GENERATOR].dir, device=_device())
    tokenizer = load_tokenizer(ctx.inputs[S.TOKENIZER].dir, map_location=_device())
    clf = _reference(ctx)
    space = RefSpace(clf)
    val = build_dataset(cfg.data, "val")
    ref_features = sharded(lambda part: space.features(val.images[part]), len(val.labels))
    labels = eval_labels(ev, cfg.data.num_classes)
    chunks = label_chunks(labels, ev.seed)
    guided: dict[str, Any] = {"cfg_scale": ev.guidance_scale}
    if gen.cfg.kind == "dit" and gen.guide is not None:
        guided[_GUIDANCE_ARG] = "autoguidance"

    def draw(overrides: dict, part: slice) -> tuple[np.ndarray, np.ndarray]:
        images = np.concatenate([_decode(tokenizer, gen.sample(y.to(_device()), seed=seed, **overrides).cpu(),
                                         ev.batch_size) for y, seed in chunks[part]])
        return images, space.features(images)

    drawn = {guide: sharded(lambda part: draw(overrides, part), len(chunks))
             for guide, overrides in ((False, {"cfg_scale": 1.0}), (True, guided))}
    if ref_features is None:
        return FOLLOWER
    out: dict[str, float] = {}
    for guide, (images, features) in drawn.items():
        metrics = distribution_metrics(space, features, ref_features, gen_is_features=True, ref_is_features=True)
        metrics[S.CLASS_CONSISTENCY] = class_consistency(clf, images, labels.numpy())
        if ev.inception_weights:
            from study.metrics.fid import InceptionConfig, gfid
            metrics.update(gfid(images, val.images, InceptionConfig(weights_path=ev.inception_weights)))
        out.update({S.guided(k) if guide else k: v for k, v in metrics.items()})
        if not guide:
            class_grid(images, labels.numpy(), ctx.dir / S.SAMPLES_PNG, num_classes=cfg.data.num_classes)
    tags = {S.GUIDANCE: guided.get(_GUIDANCE_ARG, "cfg"), S.LABEL_SAMPLING: ev.label_sampling}
    return StageResult(metrics=out, tags=tags,
                       artifacts={S.GRIDS: [S.SAMPLES_PNG]})
