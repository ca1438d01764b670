"""A tiny regression TrainTask for the training-loop tests (also run under torchrun)."""
import sys
from typing import Iterator

import torch
from torch import nn

from study.training import OptimConfig, StepOutput, TrainConfig, Trainer, TrainTask, ranks_leave_together

TRUE_W = torch.tensor([[1.5, -2.0, 0.5, 3.0]])


class Regression(TrainTask):
    """y = x·w + noise; the global batch of step s is drawn from a generator seeded by s."""

    def __init__(self, batch_size: int, dropout: float = 0.0):
        self.batch_size, self.dropout = batch_size, dropout

    def modules(self):
        return {"model": nn.Sequential(nn.Linear(4, 16), nn.Dropout(self.dropout), nn.Linear(16, 1))}

    def optim_config(self, name):
        return OptimConfig(name="adam", lr=1e-2, warmup_steps=3, grad_clip=1.0)

    def batches(self, start_step: int, rank: int, world: int) -> Iterator:
        step, per_rank = start_step, self.batch_size // world
        while True:
            g = torch.Generator().manual_seed(step)
            x = torch.randn(self.batch_size, 4, generator=g)
            y = x @ TRUE_W.T + 0.01 * torch.randn(self.batch_size, 1, generator=g)
            yield x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
            step += 1

    def step(self, modules, batch, step):
        x, y = batch
        loss = nn.functional.mse_loss(modules["model"](x), y)
        return StepOutput(losses={"model": loss}, metrics={"noise_draw": torch.rand(())})


if __name__ == "__main__":  # torchrun entry: python -m torch.distributed.run ... train_toy.py OUT STEPS
    out, steps = sys.argv[1], int(sys.argv[2])
    cfg = TrainConfig(steps=steps, batch_size=8, ema_decay=0.9, ckpt_every=5, log_every=1,
                      progress=False, out_dir=out, precision="fp32")
    with ranks_leave_together():
        trainer = Trainer(cfg, Regression(8))
        trainer.fit()
    if trainer.is_main:
        torch.save({n: p.detach().clone() for n, p in trainer.modules["model"].state_dict().items()},
                   f"{out}/final.pt")
