"""The control: no objective at all. `python -m tokenizer.pretrain ... --set objective=random`
exports the seeded initial backbone that every trained objective starts from."""

from __future__ import annotations

from tokenizer.objectives.base import Objective


class RandomInit(Objective, name="random", family="none", exports="init"):
    @classmethod
    def build(cls, backbone, cfg, inputs):
        raise ValueError("objective 'random' trains nothing: tokenizer.pretrain saves the seeded init")

    def forward(self, images, labels, progress):
        raise NotImplementedError("objective 'random' has no loss")
