"""Image-text contrastive with SigLIP's pairwise sigmoid loss (Zhai et al. 2023) against a
small text tower, on captions composed in-project.

Captions. The procedural classes live in the shape, never the colour, so a caption made
of the class name alone would be a relabelled class id. Each caption therefore joins two
attributes: the class name's words (e.g. "circle"; multi-word names may appear as a random
non-empty subset of their words) and, with probability `colour_prob`, the image's own
background colour word ("on a blue background"), read off the image's border pixels with
torch ops (a fixed in-project colour vocabulary, `COLOURS`). The caption vocabulary is the
templates' words + the class-name words + the colour words. A pair (caption i, image j) is
positive when caption i's attributes are a subset of image j's (class words ∪ its colour),
which SigLIP's binary loss takes directly (published SigLIP: the diagonal only — a named
deviation, `multi_positive`; false restores the diagonal).

Published recipe (open_clip SigLIP configs): learnable
temperature t init ln 10 and bias -10, loss -Σ log σ(z_ij (t x_i·y_j + b)) / B, ViT with a
MAP head, text transformer. Exported VFM: the image tower.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from study.config import bounded
from tokenizer.objectives.base import Inputs, Objective
from tokenizer.objectives.common import pool, random_resized_crop, vit_tokens


# The published recipe's parts this objective changes, one a line (logged with every run).
DEVIATIONS = """
SigLIP MAP head -> mean of patch tokens + linear projection
text transformer -> image_text.text_depth x text_dim over a word vocabulary built from class names + colours
captions composed in-project (class-name words + background colour word), not web alt-text
multi-positive sigmoid targets (caption attributes subset of image attributes) instead of the diagonal
batch 32k -> the study batch
"""


TEMPLATES = ("{}", "a {}", "a photo of a {}", "an image of a {}", "a picture of a {} shape")
COLOUR_CLAUSE = "on a {} background"
# hue sectors (degrees, upper bound) -> word; low-chroma colours get a lightness word instead
HUES = ((15, "red"), (45, "orange"), (70, "yellow"), (160, "green"), (200, "cyan"), (260, "blue"),
        (300, "purple"), (340, "pink"), (360, "red"))
COLOURS = ("black", "grey", "white") + tuple(dict.fromkeys(w for _, w in HUES))


@dataclass
class ImageTextConfig:
    embed_dim: int = bounded(64, ge=1)
    text_dim: int = bounded(64, ge=1)
    text_depth: int = bounded(1, ge=1)
    text_heads: int = bounded(2, ge=1)
    colour_prob: float = bounded(0.5, ge=0, le=1)  # captions that also name the background colour
    full_name_prob: float = bounded(0.5, ge=0, le=1)  # multi-word class names: whole name, else a random subset
    multi_positive: bool = True
    init_logit_scale: float = math.log(10.0)
    init_logit_bias: float = -10.0
    crop_scale: tuple[float, float] = bounded((0.5, 1.0), gt=0, le=1)


def colour_words(images: torch.Tensor, border: int = 2) -> list[str]:
    """Name of each image's mean border colour (the background of the centred shapes)."""
    x = (images.detach().float().clamp(-1, 1) + 1) / 2                   # (B, 3, H, W) in [0, 1]
    ring = torch.ones(x.shape[-2:], dtype=torch.bool, device=x.device)
    ring[border:-border, border:-border] = False
    rgb = x[:, :, ring].mean(-1).cpu()                                  # (B, 3)
    hi, lo = rgb.max(1).values, rgb.min(1).values
    chroma, light = hi - lo, rgb.mean(1)
    r, g, b = rgb.unbind(1)
    hue = torch.rad2deg(torch.atan2(math.sqrt(3) * (g - b), 2 * r - g - b)) % 360
    names = []
    for c, l, h in zip(chroma.tolist(), light.tolist(), hue.tolist()):
        if c < 0.12:
            names.append("black" if l < 0.25 else "white" if l > 0.75 else "grey")
        else:
            names.append(next(w for bound, w in HUES if h < bound))
    return names


class CaptionVocab:
    """Word vocabulary and caption sampler built from class names and COLOURS only."""

    PAD = 0

    def __init__(self, class_names: list[str], templates: tuple[str, ...] = TEMPLATES):
        self.templates = templates
        self.attributes = [self.words(name) for name in class_names]
        fixed = " ".join(t.replace("{}", "") for t in templates) + " " + COLOUR_CLAUSE.replace("{}", "")
        words = sorted(set(self.words(fixed)) | set(COLOURS) | {w for a in self.attributes for w in a})
        self.index = {w: i + 1 for i, w in enumerate(words)}
        longest = max(len(self.words(t.replace("{}", ""))) for t in templates)
        self.max_len = longest + max(len(a) for a in self.attributes) + len(self.words(COLOUR_CLAUSE)) + 1

    @staticmethod
    def words(text: str) -> list[str]:
        return [w for w in re.split(r"[\s_\-/,{}]+", text.lower()) if w]

    def __len__(self) -> int:
        return len(self.index) + 1

    def encode(self, text: str) -> list[int]:
        ids = [self.index[w] for w in self.words(text)]
        return ids + [self.PAD] * (self.max_len - len(ids))

    def name_words(self, label: int, full_prob: float) -> list[str]:
        words = self.attributes[label]
        if len(words) == 1 or float(torch.rand(())) < full_prob:
            return words
        keep = [False]
        while not any(keep):
            keep = [bool(torch.rand(()) < 0.5) for _ in words]
        return [w for w, k in zip(words, keep) if k]

    def sample(self, labels: list[int], colours: list[str], colour_prob: float, full_prob: float
               ) -> tuple[torch.Tensor, list[frozenset]]:
        """One caption per image -> token ids (B, L) and each caption's attribute set."""
        ids, attrs = [], []
        for y, colour in zip(labels, colours):
            chosen = self.name_words(y, full_prob)
            template = self.templates[int(torch.randint(len(self.templates), ()))]
            text, attr = template.format(" ".join(chosen)), set(chosen)
            if float(torch.rand(())) < colour_prob:
                text, attr = f"{text} {COLOUR_CLAUSE.format(colour)}", attr | {f"bg:{colour}"}
            ids.append(self.encode(text))
            attrs.append(frozenset(attr))
        return torch.tensor(ids), attrs

    def positives(self, caption_attrs: list[frozenset], labels: list[int], colours: list[str]) -> torch.Tensor:
        """(B captions, B images) bool: caption i describes image j."""
        images = [frozenset(self.attributes[y]) | {f"bg:{c}"} for y, c in zip(labels, colours)]
        return torch.tensor([[a <= im for im in images] for a in caption_attrs])


class TextTower(nn.Module):
    """Word embedding + learned positions + a tiny transformer + masked mean pool + projection."""

    def __init__(self, vocab_size: int, max_len: int, dim: int, depth: int, heads: int, out_dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(1, max_len, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio=4.0) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        keep = ids != CaptionVocab.PAD                                      # (B, L)
        x = self.embed(ids) + self.pos[:, : ids.shape[1]]
        # additive mask: padding is never attended to (float works on timm's fused and eager paths)
        attn = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, float("-inf"))
        for blk in self.blocks:
            x = blk(x, attn_mask=attn[:, None, None, :])
        x = self.norm(x)
        w = keep.unsqueeze(-1).to(x.dtype)
        return self.proj((x * w).sum(1) / w.sum(1).clamp(min=1))


def siglip_loss(img: torch.Tensor, txt: torch.Tensor, positive: torch.Tensor,
                scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """-Σ_ij log σ(z_ij (t x_i·y_j + b)) / B with z = +1 on positives, -1 elsewhere."""
    logits = F.normalize(txt.float(), dim=-1) @ F.normalize(img.float(), dim=-1).t() * scale.exp() + bias
    z = positive.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(z * logits).sum() / img.shape[0]


class ImageText(Objective, name="image_text", family="image-text-contrastive", exports="online",
                config=ImageTextConfig, deviations=DEVIATIONS):
    def __init__(self, backbone, cfg: ImageTextConfig, inputs: Inputs):
        super().__init__(backbone, cfg, inputs)
        self.vocab = CaptionVocab(list(inputs.class_names))
        self.image_proj = nn.Linear(backbone.embed_dim, cfg.embed_dim)
        self.text = TextTower(len(self.vocab), self.vocab.max_len, cfg.text_dim, cfg.text_depth,
                              cfg.text_heads, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(cfg.init_logit_scale))
        self.logit_bias = nn.Parameter(torch.tensor(cfg.init_logit_bias))

    def forward(self, images, labels, progress):
        c = self.cfg
        view = random_resized_crop(images, self.image_size, c.crop_scale)
        img = self.image_proj(pool(self.backbone, vit_tokens(self.backbone, view), "avg"))
        ys, colours = labels.tolist(), colour_words(images)  # the whole image: its border is background
        ids, attrs = self.vocab.sample(ys, colours, c.colour_prob, c.full_name_prob)
        txt = self.text(ids.to(images.device))
        if c.multi_positive:
            positive = self.vocab.positives(attrs, ys, colours)
        else:
            positive = torch.eye(len(ys), dtype=torch.bool)
        loss = siglip_loss(img, txt, positive.to(images.device), self.logit_scale, self.logit_bias)
        return loss, {"logit_scale": self.logit_scale.exp().detach(),
                      "positives_per_caption": positive.float().sum(1).mean()}
