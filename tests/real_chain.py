"""The study's real stage chain (study.pipeline) at micro scale: three cells through all six
stages on the debug backend, tracked in a sqlite MLflow store.  Two in-house backbones through
VFMTok + AR GPT, and for one of them VFMAE + flow-matching DiT: the analysis tests read this
study back instead of a hand-built store."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from study import schema as S

BACKBONES = ("inhouse:supervised", "inhouse:mae")
_TRAIN = {"ema_decay": 0.0, "precision": "fp32", "progress": False, "device": "cpu"}

MICRO = {
    "name": "micro",
    "stages": list(S.CHAIN),
    "base": {
        "data": {"name": "shapes", "resolution": 32, "num_classes": 4, "train_size": 64, "val_size": 32, "seed": 0},
        "reference": {"width": 8, "steps": 8, "batch_size": 32, "warmup_steps": 2, "min_val_acc": 0.0},
        "vfm": {"name": BACKBONES[0]},
        "pretrain": {"arch": "vit_micro_p4", "train": {"steps": 2, "batch_size": 16, "ckpt_every": 2, "log_every": 2,
                                                       **_TRAIN},
                     "eval": {"train_samples": 64, "val_samples": 32}},
        "tokenizer": {
            "model": {"kind": "vfmtok", "num_queries": 16, "dim": 32, "enc_depth": 1, "enc_heads": 2, "enc_ffn": 64,
                      "codebook_size": 64, "dec_depth": 1, "dec_heads": 2, "cnn_ch": 8, "cnn_mult": [1, 1, 1],
                      "attn_dropout": 0.0},
            "loss": {"perceptual_weight": 0.0, "gan_weight": 0.0},
            "train": {"steps": 2, "batch_size": 8, "ckpt_every": 2, "log_every": 2, **_TRAIN},
            "eval_images": 8, "stats_batches": 1},
        "generator": {
            "gpt": {"dim": 32, "depth": 1, "heads": 2},
            "dit": {"dim": 32, "depth": 1, "heads": 2, "ddt_width": 32, "ddt_depth": 1},
            "train": {"steps": 4, "batch_size": 8, "eval_every": 2, "ckpt_every": 4, "log_every": 2, **_TRAIN},
            "sample": {"steps": 2, "val_samples": 8}},
        "eval": {"recon_images": 16, "probe_train": 24, "probe_val": 12, "samples_per_class": 2,
                 "convergence_samples": 8, "batch_size": 16},
    },
    "axes": {"grid": {"vfm.name": list(BACKBONES)},
             "lists": [{"tokenizer.model.kind": "vfmtok"},
                       {"tokenizer.model.kind": "vfmae", "tokenizer.model.n_registers": 0}]},
    "include": [{"tokenizer.model.kind": "vfmtok"}, {"vfm.name": BACKBONES[0]}],
    "seeds": [0],
    "seed_keys": ["pretrain.train.seed", "tokenizer.train.seed", "generator.train.seed"],
    "launcher": {"backend": "debug", "poll_s": 0.1},
    "report": False,
}


def run_micro_study(root: Path) -> dict:
    """Write the spec under `root`, run it with the sweep CLI; return paths, exit code, and the
    wall and CPU seconds it took (the debug backend runs every stage in this process, so its
    CPU time is the chain's cost whatever else the machine is running)."""
    from study.sweep import main

    root.mkdir(parents=True, exist_ok=True)
    spec = root / "micro.yaml"
    spec.write_text(yaml.safe_dump({**MICRO, "study_dir": str(root / "study")}))
    wall, cpu = time.perf_counter(), time.process_time()
    code = main([str(spec), "--quiet"])
    return {"spec": spec, "root": root / "study", "code": code, "seconds": time.perf_counter() - wall,
            "cpu_seconds": time.process_time() - cpu}


@pytest.fixture(scope="session")
def micro_study(tmp_path_factory) -> dict:
    """The micro study, run once per test session (shared by the engine and analysis tests)."""
    return run_micro_study(tmp_path_factory.mktemp("micro"))


@pytest.fixture(scope="session")
def mlflow_server(micro_study):
    """The session's one MLflow server (study.cluster.mlflow_server), serving the micro study's
    store; it must stop cleanly when the session ends."""
    from study.cluster.mlflow_server import MlflowServer, health_ok

    server = MlflowServer(micro_study["root"])
    server.start()
    yield server
    server.stop()
    assert not health_ok(server.url) and not server.state_file.exists()
