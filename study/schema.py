"""The names that connect the study's stage chain, MLflow and the analysis: stage kinds, metric
keys, tags and artifact paths.  Torch-free and import-free, so that the engine, the tracking
and `analysis/` can all read it; nothing else writes these strings.

A metric reaches MLflow as `<stage kind>/<key>` (`metric(TOK_EVAL, RFD_REF)` ->
"tok_eval/rfd_ref"); a stage's training curves keep the trainer's names under the same prefix.
"""

from __future__ import annotations

# --------------------------------------------------------------------------- stage kinds
REFERENCE = "reference"
VFM = "vfm"
TOKENIZER = "tokenizer"
TOK_EVAL = "tok_eval"
GENERATOR = "generator"
GEN_EVAL = "gen_eval"
CHAIN = (REFERENCE, VFM, TOKENIZER, TOK_EVAL, GENERATOR, GEN_EVAL)

# --------------------------------------------------------------------------- metric keys
# reference
VAL_ACC = "val_acc"
# vfm: representation quality of the frozen backbone
KNN_ACC = "knn_acc"
PROBE_ACC = "probe_acc"  # also tok_eval: the linear probe on the tokenizer's latents
EFFECTIVE_RANK = "effective_rank"
UNIFORMITY = "uniformity"
NUM_PARAMS = "num_params"
# vfm and tok_eval: properties that might predict tokenizer quality (study.metrics.representation);
# alignment is measured against the reference classifier's features of the same val images
SPATIAL_STRUCTURE = "spatial_structure"
MUTUAL_KNN = "mutual_knn"
CKNNA = "cknna"
RANKME = "rankme"
# tok_eval: reconstructions; Fréchet distances in the reference classifier's space are *_ref,
# rfid / gfid only with the real TF-Inception weights
PSNR = "psnr"
PSNR_CLASS_MEAN = "psnr_class_mean"  # the same val images predicted by their class's mean train image
SSIM = "ssim"
RFD_REF = "rfd_ref"
RFID = "rfid"
CODEBOOK_USAGE = "codebook_usage"
PERPLEXITY = "perplexity"
TOKEN_ENTROPY_BITS = "token_entropy_bits"
LATENT_MEAN = "latent_mean"
LATENT_STD = "latent_std"
# generator (the convergence curve) and gen_eval
FD_REF = "fd_ref"
PRECISION_REF = "precision_ref"
RECALL_REF = "recall_ref"
CLASS_CONSISTENCY = "class_consistency"
GFID = "gfid"
GUIDED = "_guided"  # suffix of the gen_eval metrics of guided sampling
METRIC_KEYS = (VAL_ACC, KNN_ACC, PROBE_ACC, EFFECTIVE_RANK, UNIFORMITY, NUM_PARAMS, PSNR, PSNR_CLASS_MEAN, SSIM, RFD_REF, RFID,
               CODEBOOK_USAGE, PERPLEXITY, TOKEN_ENTROPY_BITS, LATENT_MEAN, LATENT_STD, FD_REF, PRECISION_REF,
               RECALL_REF, CLASS_CONSISTENCY, GFID, SPATIAL_STRUCTURE, MUTUAL_KNN, CKNNA, RANKME)

# what the measuring functions call their outputs -> the stage metric they become
BACKBONE_EVAL = {"knn_acc": KNN_ACC, "linear_acc": PROBE_ACC, "effective_rank": EFFECTIVE_RANK,
                 "uniformity": UNIFORMITY}  # tokenizer.pretrain.evaluate_backbone
REPRESENTATION = {"spatial_structure": SPATIAL_STRUCTURE, "mutual_knn": MUTUAL_KNN, "cknna": CKNNA,
                  "rankme": RANKME}  # representation.property_report
CODEBOOK = {"usage": CODEBOOK_USAGE, "perplexity": PERPLEXITY, "entropy_bits": TOKEN_ENTROPY_BITS}  # codebook_stats


def metric(stage: str, key: str) -> str:
    """The MLflow name of a stage's metric."""
    return f"{stage}/{key}"


def guided(key: str) -> str:
    return key + GUIDED


# --------------------------------------------------------------------------- tags
ROLE = "vfmstudy.role"  # "sweep" on the parent run, "cell" on a cell run
ROLE_SWEEP = "sweep"
ROLE_CELL = "cell"
CELL = "vfmstudy.cell"
CELL_ID = "cell_id"
SWEEP = "sweep"
PARENT_RUN = "mlflow.parentRunId"
SEED = "seed"
AXIS_PREFIX = "axis."
TRIAL_NUMBER = "optuna.trial_number"
OPTUNA_STUDY = "optuna.study"
# the design of a cell, set by the stages that decide it
BACKBONE = "backbone"
FAMILY = "family"
TOKENIZER_KIND = "tokenizer_kind"
NUM_QUERIES = "num_queries"
SAMPLER = "sampler"
SEMANTIC = "semantic"
GENERATOR_KIND = "generator_kind"
GUIDANCE = "guidance_kind"  # cfg | autoguidance: what the *_guided metrics used
# how gen_eval draws the class labels of its samples (equal per class, or random): published gFIDs
# move by 0.1-0.2 between the two, so every generation metric carries it
LABEL_SAMPLING = "label_sampling"
EQUAL_PER_CLASS = "equal_per_class"
RANDOM_LABELS = "random"  # as many labels, drawn uniformly at random with the eval seed
DESIGN = {BACKBONE: str, FAMILY: str, SEED: int, TOKENIZER_KIND: str, GENERATOR_KIND: str,
          NUM_QUERIES: int, SAMPLER: str, SEMANTIC: bool, LABEL_SAMPLING: str}


def stage_tag(kind: str) -> str:
    """Tag holding the id of a cell's stage of this kind."""
    return f"stage.{kind}"


def stage_job_tag(kind: str) -> str:
    return f"stage.{kind}.job_id"


STAGE_TAG_PREFIX = stage_tag("")

# --------------------------------------------------------------------------- artifacts
GRIDS = "grids"  # MLflow artifact folder of the image grids
RECONSTRUCTIONS_PNG = "reconstructions.png"
SAMPLES_PNG = "samples.png"
RECONSTRUCTIONS_GRID = f"{GRIDS}/{RECONSTRUCTIONS_PNG}"
SAMPLES_GRID = f"{GRIDS}/{SAMPLES_PNG}"
STAGE_CONFIG = "config.yaml"  # a stage's resolved config, in its folder and under stages/<kind>/ in MLflow
CLASSIFIER_FILE = "classifier.pt"
CODES_FILE = "codes.pt"
TOKENS = "tokens"  # MLflow artifact folder of tok_eval's token arrays
SAMPLING_POINTS_FILE = "sampling_points.npz"  # each query's sampling points on a few val images
SAMPLING_POINTS = f"{TOKENS}/{SAMPLING_POINTS_FILE}"
REPORT_DIR = "report"  # in the study folder
MLFLOW_SCREENSHOT = "assets/mlflow_compare.png"  # in the report folder; a `.skipped.txt` beside it says why not


def stage_config_artifact_dir(kind: str) -> str:
    return f"stages/{kind}"
ERROR = "error"  # tag of a failed cell run (or trial): "<stage kind>: <exception>"
ERRORS_DIR = "errors"  # MLflow artifact folder of a failed run's traceback
TRACEBACK_FILE = "traceback.txt"

# --------------------------------------------------------------------------- manifest
# the study's manifest (sweeps/<name>.json in the study folder): the list of runs that started
# work, each with its command, commit and host (study.provenance)
MANIFEST_PROVENANCE = "provenance"
