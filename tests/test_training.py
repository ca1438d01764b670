"""The shared training loop: learning, EMA, checkpoints, exact resume, DDP (gloo, 2 procs)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from study.cluster.mlflow_server import free_port
from study.training import Callback, EMA, OptimConfig, TrainConfig, Trainer, lr_factor
from tests.train_toy import Regression


class Recorder(Callback):
    def __init__(self, stop_at=None):
        self.losses, self.stop_at = {}, stop_at

    def on_step(self, step, metrics):
        self.losses[step] = (metrics["loss/model"], metrics["noise_draw"])
        if self.stop_at == step:
            raise KeyboardInterrupt("simulated kill")


def config(tmp_path, **kw):
    base = dict(steps=20, batch_size=8, ema_decay=0.9, ckpt_every=5, log_every=1, progress=False,
                out_dir=str(tmp_path), precision="fp32", seed=3)
    return TrainConfig(**{**base, **kw})


def test_loss_decreases_and_checkpoints_rotate(tmp_path):
    rec = Recorder()
    Trainer(config(tmp_path, steps=60), Regression(8), [rec]).fit()
    assert rec.losses[60][0] < 0.1 * rec.losses[1][0]
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*.pt"))
    assert kept == ["step_00000055.pt", "step_00000060.pt"]


def test_kill_and_resume_gives_the_same_curve(tmp_path):
    straight = Recorder()
    Trainer(config(tmp_path / "a"), Regression(8, dropout=0.3), [straight]).fit()
    killed = Recorder(stop_at=13)  # last checkpoint at step 10: steps 11-13 are redone
    with pytest.raises(KeyboardInterrupt):
        Trainer(config(tmp_path / "b"), Regression(8, dropout=0.3), [killed]).fit()
    resumed = Recorder()
    trainer = Trainer(config(tmp_path / "b"), Regression(8, dropout=0.3), [resumed])
    assert trainer.step == 10
    trainer.fit()
    assert sorted(resumed.losses) == list(range(11, 21))
    for step, (loss, draw) in resumed.losses.items():  # dropout + RNG draws replay exactly
        assert loss == pytest.approx(straight.losses[step][0], rel=1e-6, abs=1e-9)
        assert draw == straight.losses[step][1]


def test_finished_run_does_not_train_again(tmp_path):
    Trainer(config(tmp_path, steps=5), Regression(8)).fit()
    rec = Recorder()
    trainer = Trainer(config(tmp_path, steps=5), Regression(8), [rec])
    trainer.fit()
    assert trainer.step == 5 and rec.losses == {}


def test_ema_follows_its_formula():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.75)
    before = ema.module.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.module.weight, 0.75 * before + 0.25 * model.weight)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_lr_schedule_warmup_then_decay():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(cfg, 0, 100) == pytest.approx(0.1)
    assert lr_factor(cfg, 9, 100) == pytest.approx(1.0)
    assert lr_factor(cfg, 100, 100) == pytest.approx(0.1)
    const = OptimConfig(warmup_steps=0)
    assert lr_factor(const, 50, 100) == 1.0


def test_ddp_two_processes_match_single_process(tmp_path):
    """torchrun + gloo: 2 ranks with half batches each end where one process with the full batch
    ends (DDP averages gradients), so the multi-GPU path is exercised on CPU."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    script = str(root / "tests" / "train_toy.py")
    for cmd in ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                 str(free_port()), script, str(tmp_path / "ddp"), "12"],
                [sys.executable, script, str(tmp_path / "single"), "12"]):
        done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    ddp = torch.load(tmp_path / "ddp" / "final.pt")
    single = torch.load(tmp_path / "single" / "final.pt")
    for name in single:
        assert torch.allclose(ddp[name], single[name], atol=1e-5), name
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 12 and len(ckpt["rng"]) == 2
