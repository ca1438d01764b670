"""VFMTok / VFMAE tokenizer: the behaviours the method depends on (method §7 "must-have tests")."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from study.config import load
from study.training import Callback, Trainer
from tokenizer.deform_attn import MSDeformAttn, initial_offsets, ms_deform_attn_core
from tokenizer.decoder import CNNUpsampler, ViTDecoder
from study.metrics.codebook import codebook_stats
from tokenizer.quantizer import CosineVQ
from tokenizer.sampler import RegionSampler
from tokenizer.vfm import VFMSpec, build_vfm



TINY = Path(__file__).resolve().parents[1] / "tokenizer" / "configs" / "tiny.yaml"


def small_overrides(out_dir) -> list[str]:
    """The tiny preset shrunk to test size (same code paths, GAN on from step 2)."""
    return ["data.train_size=40", "data.val_size=10", "vfm.name=random:vit_micro_p4", "model.dim=32",
            "model.num_queries=16", "model.enc_depth=1", "model.enc_heads=2", "model.enc_ffn=64",
            "model.codebook_size=32", "model.code_dim=4", "model.usage_buffer=256", "model.dec_depth=1",
            "model.dec_heads=2", "model.cnn_ch=8", "model.cnn_groups=4", "model.bottleneck_groups=8",
            "model.latent_channels=4", "train.batch_size=4", "train.steps=4", "train.progress=false",
            "train.log_every=1", "train.ckpt_every=2", "train.device=cpu", "loss.gan_start=2", "eval_images=10",
            "optim.warmup_steps=2", f"train.out_dir={out_dir}"]


def small_cfg(out_dir, *extra):
    from tokenizer.train import TokenizerRunConfig
    return load(TokenizerRunConfig, TINY, small_overrides(out_dir) + list(extra))


# --------------------------------------------------------------------------- deformable attention
def naive_deform_attn(value, shapes, loc, weights):
    """Per-point bilinear sampling with zero padding, pixel centres at (i + .5) / size."""
    B, S, H, D = value.shape
    _, Q, _, L, P, _ = loc.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(B, Q, H, D, dtype=value.dtype)
    for b in range(B):
        for q in range(Q):
            for h in range(H):
                for lv, (hh, ww) in enumerate(shapes):
                    fmap = value[b, starts[lv]:starts[lv + 1], h].view(hh, ww, D)
                    for p in range(P):
                        x = float(loc[b, q, h, lv, p, 0]) * ww - 0.5
                        y = float(loc[b, q, h, lv, p, 1]) * hh - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        acc = torch.zeros(D, dtype=value.dtype)
                        for yi, wy in ((y0, y0 + 1 - y), (y0 + 1, y - y0)):
                            for xi, wx in ((x0, x0 + 1 - x), (x0 + 1, x - x0)):
                                if 0 <= yi < hh and 0 <= xi < ww:
                                    acc = acc + wy * wx * fmap[yi, xi]
                        out[b, q, h] += weights[b, q, h, lv, p] * acc
    return out.view(B, Q, H * D)


def _random_case(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (2, 2)]
    B, Q, H, D, P = 2, 3, 2, 3, 2
    S = sum(h * w for h, w in shapes)
    value = torch.randn(B, S, H, D, generator=g, dtype=dtype)
    loc = torch.rand(B, Q, H, len(shapes), P, 2, generator=g, dtype=dtype) * 1.4 - 0.2  # some outside [0, 1]
    weights = torch.rand(B, Q, H, len(shapes), P, generator=g, dtype=dtype)
    return value, shapes, loc, weights


def test_deform_attn_core_equals_naive_bilinear_loop():
    value, shapes, loc, weights = _random_case()
    fast = ms_deform_attn_core(value, shapes, loc, weights)
    slow = naive_deform_attn(value, shapes, loc, weights)
    assert fast.shape == (2, 3, 6)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_deform_attn_core_gradcheck_float64():
    value, shapes, loc, weights = _random_case(torch.float64, seed=1)
    loc = loc.clamp(0.05, 0.95)  # away from the padding border
    inputs = [t.clone().requires_grad_() for t in (value, loc, weights)]
    assert torch.autograd.gradcheck(lambda v, l, w: ms_deform_attn_core(v, shapes, l, w), inputs, atol=1e-6)


def test_initial_offsets_follow_direction_times_point_index():
    attn = MSDeformAttn(dim=32, n_levels=4, n_heads=8, n_points=4)
    bias = attn.sampling_offsets.bias.detach().view(8, 4, 4, 2)
    compass = torch.tensor([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]], dtype=torch.float32)
    for h in range(8):
        for lv in range(4):
            for p in range(4):
                torch.testing.assert_close(bias[h, lv, p], compass[h] * (p + 1), atol=1e-6, rtol=0)
    assert attn.sampling_offsets.weight.abs().sum() == 0 and attn.attention_weights.weight.abs().sum() == 0
    # 4 heads (the tiny preset): 4 evenly spaced directions, same rule
    torch.testing.assert_close(initial_offsets(4, 1, 2)[:, 0, 1], 2 * compass[::2], atol=1e-6, rtol=0)


def test_deform_attn_module_samples_at_reference_plus_offset_in_pixels():
    """With zero-init weights the module samples ref + bias / (W, H): check against the core."""
    torch.manual_seed(0)
    attn = MSDeformAttn(dim=8, n_levels=2, n_heads=2, n_points=2)
    shapes = [(4, 4), (2, 2)]
    query, value_in = torch.randn(1, 3, 8), torch.randn(1, 20, 8)
    ref = torch.rand(1, 3, 2, 2)
    out = attn(query, ref, value_in, shapes)
    bias = initial_offsets(2, 2, 2)  # (H, L, P, 2)
    norm = torch.tensor([[4.0, 4.0], [2.0, 2.0]])
    loc = ref[:, :, None, :, None, :] + (bias / norm[None, :, None, :])[None, None]
    value = attn.value_proj(value_in).view(1, 20, 2, 4)
    expected = attn.output_proj(ms_deform_attn_core(value, shapes, loc, torch.full((1, 3, 2, 2, 2), 0.25)))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- causality
def _levels(B=2, C=16, h=4):
    return [torch.randn(B, C, h, h) for _ in range(4)]


@pytest.mark.parametrize("causal", [True, False])
def test_encoder_token_k_ignores_queries_after_k(causal):
    torch.manual_seed(0)
    enc = RegionSampler(16, 16, 9, depth=2, n_heads=2, n_levels=4, n_points=2, ffn_dim=32, causal=causal).eval()
    levels = _levels()
    before = enc(levels)
    j = 5
    with torch.no_grad():
        enc.queries[j] += 1.0
        enc.query_pos[j] += 1.0
    after = enc(levels)
    assert not torch.allclose(before[:, j], after[:, j])
    if causal:
        torch.testing.assert_close(before[:, :j], after[:, :j], atol=1e-6, rtol=0)
    else:  # the bidirectional (VFMAE) encoder does mix: the check above can fail
        assert not torch.allclose(before[:, :j], after[:, :j])


def _decoder(causal: bool):
    cnn = CNNUpsampler(16, 4, (1, 2), 0, 4)
    return ViTDecoder(dim=16, depth=2, n_heads=2, attn_dropout=0.0, causal=causal, num_tokens=9, n_registers=2,
                      vfm_grid=(4, 4), pixel_grid=(3, 3), semantic="shared" if causal else "separate",
                      vfm_width=8, cnn=cnn).eval()


def test_shared_semantic_branch_from_one_memory_prefix_equals_two_full_passes():
    """Training continues the causal memory prefix with both query sets; it must equal running the
    transformer over [memory | pixel queries] and [memory | semantic queries] separately."""
    torch.manual_seed(0)
    dec = _decoder(causal=True)
    tokens = torch.randn(3, 9, 16, requires_grad=True)
    images, semantic = dec.forward_train(tokens)
    full = dec.transformer(torch.cat([dec.memory(tokens), dec.semantic_queries().expand(3, -1, -1)], 1))
    semantic_ref = dec.semantic_head(full[:, 9 + 1:9 + 1 + 16])
    images_ref = dec(tokens)  # inference: one full pass over [memory | pixel queries]
    torch.testing.assert_close(images, images_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(semantic, semantic_ref, atol=1e-5, rtol=1e-5)
    g_img, g_sem = torch.randn_like(images), torch.randn_like(semantic)
    params = [tokens] + [p for p in dec.parameters() if p.requires_grad]
    grads = torch.autograd.grad((images * g_img).sum() + (semantic * g_sem).sum(), params, allow_unused=True)
    grads_ref = torch.autograd.grad((images_ref * g_img).sum() + (semantic_ref * g_sem).sum(), params,
                                    allow_unused=True)
    for g, g_ref in zip(grads, grads_ref):
        assert (g is None) == (g_ref is None)
        if g is not None:
            torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="separate"):
        ViTDecoder(dim=16, depth=1, n_heads=2, attn_dropout=0.0, causal=False, num_tokens=9, n_registers=0,
                   vfm_grid=(4, 4), pixel_grid=(3, 3), semantic="shared", vfm_width=8, cnn=dec.cnn)


@pytest.mark.parametrize("causal", [True, False])
def test_decoder_position_k_ignores_tokens_after_k(causal):
    torch.manual_seed(0)
    dec = _decoder(causal)
    tokens = torch.randn(2, 9, 16)
    j = 4
    changed = tokens.clone()
    changed[:, j:] += torch.randn(2, 5, 16)
    a, b = dec.sequence(tokens), dec.sequence(changed)
    assert dec(tokens).shape == (2, 3, 6, 6)
    if causal:
        torch.testing.assert_close(a[:, :j], b[:, :j], atol=1e-6, rtol=0)
    else:
        assert not torch.allclose(a[:, :j], b[:, :j])
    assert not torch.allclose(a[:, j:], b[:, j:])


# --------------------------------------------------------------------------- quantizer
def test_vq_picks_argmax_cosine_and_is_straight_through():
    torch.manual_seed(0)
    vq = CosineVQ(codebook_size=16, code_dim=4)
    z = (torch.randn(2, 5, 4) * 3).requires_grad_()
    zq, ids, losses = vq(z)
    cos = torch.nn.functional.cosine_similarity(z.detach()[:, :, None], vq.codebook.weight[None, None], dim=-1)
    assert torch.equal(ids, cos.argmax(-1))
    torch.testing.assert_close(zq.detach(), torch.nn.functional.normalize(vq.codebook.weight, dim=-1)[ids])
    # straight through: d(sum(g * zq))/dz equals the gradient of sum(g * normalize(z))
    g = torch.randn_like(zq)
    (gz,) = torch.autograd.grad((zq * g).sum(), z)
    z2 = z.detach().clone().requires_grad_()
    (gref,) = torch.autograd.grad((torch.nn.functional.normalize(z2, dim=-1) * g).sum(), z2)
    torch.testing.assert_close(gz, gref)
    assert losses["commit"] > 0 and torch.isclose(losses["commit"], 0.25 * losses["codebook"])
    # init: U(-1/n, 1/n) then l2-normalised
    torch.testing.assert_close(CosineVQ(16, 4).codebook.weight.norm(dim=-1), torch.ones(16))


def test_usage_and_perplexity_bounds():
    n = 8
    all_codes = codebook_stats(torch.arange(n).repeat(5), n)
    assert all_codes["usage"] == 1.0 and abs(all_codes["perplexity"] - n) < 1e-9
    one_code = codebook_stats(torch.full((50,), 3), n)
    assert one_code["usage"] == 1 / n and abs(one_code["perplexity"] - 1) < 1e-9
    ids = torch.randint(0, n, (37,), generator=torch.Generator().manual_seed(0))
    s = codebook_stats(ids, n)
    distinct = len(ids.unique())
    assert s["usage"] == distinct / n and 1 <= s["perplexity"] <= distinct + 1e-9
    # the rolling buffer keeps the most recent `usage_buffer` indices
    vq = CosineVQ(n, 4, usage_buffer=10).train()
    vq._record(torch.zeros(7, dtype=torch.long))
    vq._record(torch.ones(7, dtype=torch.long))
    assert (vq.recent >= 0).all() and int((vq.recent == 1).sum()) == 7 and int((vq.recent == 0).sum()) == 3
    assert vq.usage_stats()["usage"] == 2 / n


# --------------------------------------------------------------------------- semantic target shapes
@pytest.mark.parametrize("vfm_name,input_size", [("random:vit_tiny_p4", None),
                                                  ("random:vit_small_patch14_reg4_dinov2", 56)])
@pytest.mark.parametrize("kind", ["vfmtok", "vfmae"])
def test_semantic_target_matches_prediction(vfm_name, input_size, kind, tmp_path):
    from tokenizer.model import VFMTokenizer
    cfg = small_cfg(tmp_path, f"model.kind={kind}", "model.n_registers=0" if kind == "vfmae" else "model.n_registers=4")
    vfm = build_vfm(VFMSpec(name=vfm_name, input_size=input_size))
    assert vfm.num_prefix_tokens == 5  # CLS + 4 registers, which the target must exclude
    model = VFMTokenizer(cfg.model, vfm).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(x)
    G = vfm.grid[0] * vfm.grid[1]
    expected = (2, G, vfm.width) if kind == "vfmtok" else (2, 1 + G, vfm.width)
    assert out["sem_target"].shape == expected and out["sem_pred"].shape == expected
    final = vfm.final_tokens(x, with_cls=True)  # (B, 1 + G, C): CLS first, registers dropped
    reference = final[:, 1:] if kind == "vfmtok" else final
    torch.testing.assert_close(out["sem_target"], reference, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- training: resume, API
class Recorder(Callback):
    def __init__(self, stop_at: int | None = None):
        self.losses, self.stop_at = {}, stop_at

    def on_step(self, step, metrics):
        self.losses[step] = (metrics["loss/model"], metrics.get("loss/disc"))

    def on_checkpoint(self, step, path):
        if self.stop_at is not None and step == self.stop_at:
            raise KeyboardInterrupt("simulated kill right after the checkpoint")


def test_kill_and_resume_reproduces_the_loss_curve(tmp_path):
    from tokenizer.train import TokenizerTask
    full = Recorder()
    cfg = small_cfg(tmp_path / "a")
    Trainer(cfg.train, TokenizerTask(cfg), [full]).fit()
    assert full.losses[4][1] is not None  # the GAN (and D's loss) was active after gan_start

    cfg_b = small_cfg(tmp_path / "b")
    killed = Recorder(stop_at=2)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg_b.train, TokenizerTask(cfg_b), [killed]).fit()
    resumed = Recorder()
    Trainer(cfg_b.train, TokenizerTask(cfg_b), [resumed]).fit()
    assert sorted(resumed.losses) == [3, 4]
    assert full.losses[1][1] is None  # D does not run before gan_start
    for step, run in ((1, killed), (2, killed), (3, resumed), (4, resumed)):
        g, d = run.losses[step]
        assert g == pytest.approx(full.losses[step][0], rel=1e-5)
        assert (d is None) == (full.losses[step][1] is None)
        assert d is None or d == pytest.approx(full.losses[step][1], rel=1e-5)


@pytest.mark.parametrize("kind", ["vfmtok", "vfmae"])
def test_train_load_encode_decode_export(kind, tmp_path):
    from tokenizer.export import export_codes
    from tokenizer.train import load_tokenizer, train
    extra = [f"model.kind={kind}", "train.steps=2"] + (["model.n_registers=0"] if kind == "vfmae" else [])
    cfg = small_cfg(tmp_path / "run", *extra)
    model, metrics = train(cfg)
    assert "val/psnr" in metrics and any("semantic" in d or "perceptual" in d for d in cfg.deviations)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert not any("vfm" in k or "backbone" in k for k in state["ema"])  # frozen VFM stripped
    assert not any("backbone" in k for k in state["modules"]["disc"])
    loaded = load_tokenizer(tmp_path / "run")
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        codes = loaded.encode(x)
        torch.testing.assert_close(codes.float(), model.encode(x).float())
        recon = loaded.decode(codes)
    assert recon.shape == x.shape and recon.abs().max() <= 1
    if kind == "vfmtok":
        assert codes.dtype == torch.long and codes.shape == (3, 16)
    else:
        assert codes.shape == (3, 4, 4, 4)
    from study.data import build_dataset
    val = build_dataset(cfg.data, "val")
    payload = export_codes(loaded, val, tmp_path / "codes.pt")
    key = "tokens" if kind == "vfmtok" else "latents"
    saved = torch.load(tmp_path / "codes.pt", weights_only=True)
    assert saved[key].shape[0] == len(val) and saved[f"{key}_flip"].shape == saved[key].shape
    assert saved["labels"].shape == (len(val),) and saved["grid"] == (4, 4) and isinstance(saved["tokenizer_id"], str)
    assert not torch.equal(saved[key], saved[f"{key}_flip"])
    if kind == "vfmae":
        assert saved["mean"].shape == (4, 4, 4) and saved["std"].shape == (4, 4, 4) and (saved["std"] > 0).all()
    assert payload[key].shape == saved[key].shape


def test_grid_sampler_and_semantic_off_build_and_train_one_step(tmp_path):
    from tokenizer.train import TokenizerTask
    cfg = small_cfg(tmp_path, "model.sampler=grid", "model.semantic=false", "loss.semantic_weight=0",
                    "train.steps=1", "loss.gan_weight=0")
    task = TokenizerTask(cfg)
    assert not hasattr(task.model.decoder, "semantic_head")
    assert not any(n.startswith("sampler.layers.0.cross") for n, _ in task.model.named_parameters())
    Trainer(cfg.train, task).fit()
    assert "ablation: grid sampler" in " ".join(cfg.deviations)


def test_generator_gradient_reaches_images_through_frozen_disc_backbone():
    from tokenizer.discriminator import DinoDiscriminator
    disc = DinoDiscriminator(build_vfm("random:vit_micro_p4"))
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    disc(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in disc.backbone.parameters())


def test_tiny_training_beats_class_mean_baseline(tmp_path):
    """A short run (no GAN, pixel loss only) already beats predicting the class-mean image."""
    from tokenizer.bench import class_mean_psnr
    from tokenizer.train import train
    cfg = small_cfg(tmp_path, "data.train_size=200", "data.val_size=50", "train.steps=60", "train.batch_size=8",
                    "loss.gan_weight=0", "loss.perceptual=none", "loss.semantic_weight=0", "optim.lr=1e-3",
                    "optim.warmup_steps=5", "train.ema_decay=0.9", "train.ckpt_every=1000", "eval_images=50")
    _, metrics = train(cfg)
    baseline = class_mean_psnr(cfg.data)
    assert metrics["val/psnr"] > baseline, (metrics["val/psnr"], baseline)


@pytest.mark.parametrize("preset", ["tiny", "tiny_ae", "base", "paper"])
def test_presets_load_and_name_their_deviations(preset):
    from tokenizer.train import TokenizerRunConfig
    extra = ["data.name=shapes", "data.num_classes=10", "data.train_size=10", "data.val_size=10"] \
        if preset == "paper" else []
    cfg = load(TokenizerRunConfig, TINY.parent / f"{preset}.yaml", extra)
    assert cfg.deviations and cfg.model.image_size == cfg.data.resolution
    if preset == "paper":
        assert (cfg.model.num_queries, cfg.model.codebook_size, cfg.model.code_dim) == (256, 16384, 12)
        assert cfg.vfm.name == "dinov2_vitl14_reg" and cfg.vfm.input_size == 336
