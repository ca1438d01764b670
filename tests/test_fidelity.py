"""Fidelity to the official recipe: the parts that must not vary with the VFM under study, the
numerics that must agree between training and export, and the official architecture sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from study.config import load
from study.metrics.common import MissingWeightsError
from tokenizer.losses import LossConfig, LPIPSLoss, RandomVGGDistance, build_perceptual, missing_perceptual_file

CONFIGS = Path(__file__).resolve().parents[1] / "tokenizer" / "configs"
OFFLINE_DATA = ["data.name=shapes", "data.num_classes=10", "data.train_size=10", "data.val_size=10"]


def load_preset(name: str):
    """A tokenizer preset; the ImageNet ones read the shapes data instead (no dataset offline)."""
    from tokenizer.train import TokenizerRunConfig
    path = CONFIGS / f"{name}.yaml"
    return load(TokenizerRunConfig, path, OFFLINE_DATA if "imagefolder" in path.read_text() else [])


def tiny_task(tmp_path, *extra):
    from tests.test_tokenizer import small_cfg
    from tokenizer.train import TokenizerTask
    return TokenizerTask(small_cfg(tmp_path, *extra))


# --------------------------------------------------------------------------- perceptual loss
def test_perceptual_loss_is_the_same_whatever_the_vfm(tmp_path):
    """Two tokenizer runs whose VFMs (and training seeds) differ compute the same perceptual loss
    for the same (x, x_hat), and it still tells different reconstructions apart."""
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    x_hat = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    task_a = tiny_task(tmp_path / "a", "vfm.name=random:vit_micro_p4")
    torch.manual_seed(123)  # the global RNG must not reach the perceptual network
    task_b = tiny_task(tmp_path / "b", "vfm.name=random:vit_tiny_p4", "train.seed=7")
    assert task_a.vfm.name != task_b.vfm.name
    loss_a, loss_b = task_a.perceptual(x, x_hat), task_b.perceptual(x, x_hat)
    assert torch.equal(loss_a, loss_b)
    assert float(task_a.perceptual(x, x)) == 0.0 and float(loss_a) > 0
    assert task_a.cfg.perceptual_network == task_b.cfg.perceptual_network
    assert "not LPIPS" in task_a.cfg.perceptual_network and "random_vgg" in task_a.cfg.perceptual_network


def test_perceptual_gradient_reaches_the_reconstruction_only():
    net = build_perceptual(LossConfig())
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    x_hat = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    net(x, x_hat).backward()
    assert x_hat.grad.abs().sum() > 0 and x.grad is None
    assert not any(p.requires_grad for p in net.parameters())


def _lpips_files(tmp_path) -> tuple[Path, Path]:
    """A random-init torchvision VGG16 state_dict and random LPIPS linear heads, as local files."""
    import lpips
    import torchvision
    torch.manual_seed(0)
    vgg = tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth"
    vgg.parent.mkdir(parents=True)
    torch.save(torchvision.models.vgg16().state_dict(), vgg)
    heads = {k: v.abs() + 0.1 * torch.rand_like(v) for k, v in
             torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth", map_location="cpu",
                        weights_only=True).items()}
    linear = tmp_path / "lpips_vgg_heads.pth"
    torch.save(heads, linear)
    return vgg, linear


def test_lpips_from_local_files_matches_the_lpips_package(tmp_path, monkeypatch):
    import lpips
    vgg, linear = _lpips_files(tmp_path)
    ours = build_perceptual(LossConfig(perceptual="lpips", lpips_vgg=str(vgg), lpips_linear=str(linear)))
    assert isinstance(ours, LPIPSLoss)
    # the package's own loading path: torchvision's VGG16 from the torch hub cache, heads from model_path
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.warns(UserWarning):
        reference = lpips.LPIPS(net="vgg", model_path=str(linear), verbose=False).eval()
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    x_hat = (x + 0.2 * torch.randn_like(x)).clamp(-1, 1)
    with torch.no_grad():
        expected = reference(x_hat, x).mean()
        got = ours(x, x_hat)
    assert float(expected) > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_lpips_missing_file_fails_fast_naming_it(tmp_path):
    cfg = LossConfig(perceptual="lpips", lpips_vgg=str(tmp_path / "absent_vgg16.pth"))
    with pytest.raises(MissingWeightsError, match="absent_vgg16.pth"):
        build_perceptual(cfg)
    assert "absent_vgg16.pth" in missing_perceptual_file(cfg)
    assert missing_perceptual_file(LossConfig()) is None  # the stand-in needs no file


def test_random_vgg_standin_ignores_the_global_rng():
    x, x_hat = torch.zeros(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    torch.manual_seed(1)
    first = RandomVGGDistance()(x, x_hat)
    torch.manual_seed(2)
    assert torch.equal(first, RandomVGGDistance()(x, x_hat))


@pytest.mark.parametrize("preset, perceptual", [("paper", "lpips"), ("tiny", "random_vgg"), ("base", "random_vgg"),
                                                ("tiny_ae", "random_vgg")])
def test_presets_pick_a_perceptual_network_independent_of_the_vfm(preset, perceptual):
    cfg = load_preset(preset)
    assert cfg.loss.perceptual == perceptual and cfg.perceptual_network.startswith(perceptual)


# --------------------------------------------------------------------------- VQ precision
def test_vq_ids_under_bf16_autocast_equal_fp32_ids():
    from tokenizer.quantizer import CosineVQ
    torch.manual_seed(0)
    vq = CosineVQ(16384, 12)  # the paper's codebook: many near-tied cosines
    z = torch.randn(8, 256, 12)
    ids_fp32 = vq(z)[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ids_bf16 = vq(z)[1]
    assert torch.equal(ids_bf16, ids_fp32)
    # the same search done in bf16 does flip ids on this data, so the equality above is not free
    zn, codes = torch.nn.functional.normalize(z, dim=-1), vq.codes()
    naive = (zn.bfloat16() @ codes.bfloat16().t()).argmax(-1)
    assert (naive != ids_fp32).float().mean() > 0.001


def test_training_ids_equal_exported_ids(tmp_path):
    from study.data import to_tensor_images
    from tokenizer.export import export_codes
    task = tiny_task(tmp_path)
    model = task.model.train()
    x = to_tensor_images(task.val_set.images)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # as the Trainer runs a bf16 step
        train_ids = model(x)["ids"]
    exported = export_codes(model, task.val_set, tmp_path / "codes.pt", views=0)
    assert torch.equal(train_ids, exported["tokens"])


# --------------------------------------------------------------------------- discriminator
def _disc():
    from tokenizer.discriminator import DinoDiscriminator
    from tokenizer.vfm import build_vfm
    torch.manual_seed(0)
    return DinoDiscriminator(build_vfm("random:vit_micro_p4")).eval()  # eval: spectral norm stops iterating


def test_discriminator_real_logits_ignore_the_fake_half_at_batch_2():
    disc = _disc()
    real = torch.rand(2, 3, 32, 32) * 2 - 1
    fake_a, fake_b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.zeros(2, 3, 32, 32)
    with torch.no_grad():
        real_a, logits_fake_a = disc(torch.cat([real, fake_a]), sets=2).chunk(2)  # as the training step calls it
        real_b, logits_fake_b = disc(torch.cat([real, fake_b]), sets=2).chunk(2)
        assert torch.equal(real_a, real_b) and not torch.equal(logits_fake_a, logits_fake_b)
        torch.testing.assert_close(real_a, disc(real), rtol=1e-5, atol=1e-5)  # as if D saw the real set alone
        mixed_a, mixed_b = disc(torch.cat([real, fake_a]))[:2], disc(torch.cat([real, fake_b]))[:2]
    assert (mixed_a - mixed_b).abs().max() > 1e-3  # one shared normalisation would couple them


def test_discriminator_has_five_cls_read_taps_and_no_final_norm():
    disc = _disc()
    vfm = disc.backbone
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        taps = disc.taps(x)
        final = vfm.model.forward_features(vfm.preprocess(x))  # (B, P + T, C) after the final norm
    T, P = vfm.grid[0] * vfm.grid[1], vfm.num_prefix_tokens
    assert len(disc.heads) == 5 and len(taps) == 5 and disc.tap_blocks == [vfm.depth * k // 4 - 1 for k in (1, 2, 3, 4)]
    assert all(t.shape == (2, vfm.width, T) for t in taps)
    # vit_micro has 4 blocks, so the last tap is the last block: its tokens normed give the final tokens
    with torch.no_grad():
        x_tok = vfm.model.norm_pre(vfm.model._pos_embed(vfm.model.patch_embed(vfm.preprocess(x))))
        for block in vfm.model.blocks:
            x_tok = block(x_tok)
    torch.testing.assert_close(vfm.model.norm(x_tok), final)
    torch.testing.assert_close(taps[-1], (x_tok[:, P:] + x_tok[:, :1]).transpose(1, 2))  # raw, CLS added
    assert disc(x).shape == (2, 5 * T)


def test_discriminator_crops_or_resizes_large_inputs_to_its_input_size():
    disc = _disc()
    with torch.no_grad():
        shapes = {disc(torch.rand(2, 3, 48, 48) * 2 - 1).shape for _ in range(6)}
    assert shapes == {(2, 5 * 64)}


# --------------------------------------------------------------------------- official sizes
def _on_meta(build):
    with torch.device("meta"):  # shapes only: the XL models are built without allocating memory
        return build()


def test_ditdh_xl_parameter_count_is_the_official_834_8m():
    from generators.dit import DiT, DiTDH_XL
    model = _on_meta(lambda: DiT(DiTDH_XL(in_channels=32, grid=(16, 16), num_classes=1000)))
    assert round(model.num_params() / 1e6, 1) == 834.8


@pytest.mark.parametrize("preset, millions", [("B", 110.9), ("XL", 774.7)])
def test_gpt_parameter_counts_are_the_official_ones(preset, millions):
    from generators.gpt import GPT, GPT_PRESETS
    model = _on_meta(lambda: GPT(GPT_PRESETS[preset](vocab_size=16384, grid=(16, 16), num_classes=1000)))
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions


def test_ditdh_conditioning_matches_the_official_block():
    """AdaLN reads SiLU(c) (a second SiLU on the trunk's SiLU(t + y)), RMSNorm has a gain, and the
    time embedding has 256 frequencies (512 features)."""
    from generators.dit import DiT, DiTConfig
    torch.manual_seed(0)
    model = DiT(DiTConfig(in_channels=4, grid=(4, 4), num_classes=3, dim=32, depth=1, heads=2, ddt_width=64,
                          ddt_depth=1, ddt_heads=2))
    block = model.trunk[0]
    assert block.norm1.weight is not None and model.final.norm.weight is not None
    assert model.t_embedder.freqs.numel() == 256 and model.t_embedder.mlp[0].in_features == 512
    torch.nn.init.normal_(block.ada.weight)
    c = torch.randn(2, 32)
    shift = block.ada(torch.nn.functional.silu(c))[:, :32]
    x = torch.zeros(2, 16, 32)
    # with x = 0 the attention branch sees only the shift: the block output depends on c through silu(c)
    out = block(x, c, model.rope_trunk)
    gate1 = block.ada(torch.nn.functional.silu(c))[:, 64:96]
    expected_attn = block.attn(shift[:, None].expand(2, 16, 32), model.rope_trunk)
    h = gate1[:, None] * expected_attn
    shift2, scale2, gate2 = block.ada(torch.nn.functional.silu(c))[:, 96:].chunk(3, -1)
    expected = h + gate2[:, None] * block.mlp(block.norm2(h) * (1 + scale2[:, None]) + shift2[:, None])
    torch.testing.assert_close(out, expected)


GEN_CONFIGS = Path(__file__).resolve().parents[1] / "generators" / "configs"
OFFICIAL_SHIFT = 4.0  # the official code: sqrt(time_dist_shift_dim / 4096), time_dist_shift_dim hard-coded to 65536


@pytest.mark.parametrize("preset", ["ditdh_XL", "ditdh_S", "tiny_dit"])
def test_dit_preset_time_shift_is_the_official_value(preset):
    from generators.train import GeneratorRunConfig
    cfg = load(GeneratorRunConfig, GEN_CONFIGS / f"{preset}.yaml")
    assert cfg.flow.resolve_shift(cfg.model.latent_dim) == OFFICIAL_SHIFT


def test_paper_tokenizer_parameter_count_is_the_official_73_287m():
    from types import SimpleNamespace
    from tokenizer.model import VFMTokenizer
    cfg = load_preset("paper")
    dinov2_l = SimpleNamespace(width=1024, grid=(24, 24))  # all the tokenizer reads of its frozen VFM
    model = _on_meta(lambda: VFMTokenizer(cfg.model, dinov2_l))
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 3) == 73.287


# --------------------------------------------------------------------------- decoder
def test_decoder_positions_are_scaled_by_the_official_factor_and_no_final_norm():
    from tokenizer.decoder import CNNUpsampler, ViTDecoder
    torch.manual_seed(0)
    dec = ViTDecoder(dim=16, depth=1, n_heads=2, attn_dropout=0.0, causal=True, num_tokens=4, n_registers=1,
                     vfm_grid=(24, 24), pixel_grid=(21, 21), semantic="none", vfm_width=8,
                     cnn=CNNUpsampler(16, 8, (1, 2), 0, 4))
    table = dec.pos[1:].t().reshape(1, 16, 24, 24)
    by_factor = torch.nn.functional.interpolate(table, scale_factor=(21.1 / 24, 21.1 / 24), mode="bicubic")
    by_size = torch.nn.functional.interpolate(table, size=(21, 21), mode="bicubic")
    assert (by_factor - by_size).abs().max() > 1e-3  # the two really differ
    torch.testing.assert_close(dec.grid_pos((21, 21)), by_factor.flatten(2)[0].t())
    x = torch.randn(2, 7, 16)
    block = dec.transformer.blocks[0]
    h = x + block.attn(block.norm1(x), causal=True)[0]
    torch.testing.assert_close(dec.transformer(x), h + block.ffn(block.norm2(h)))  # the last block's output as is


# --------------------------------------------------------------------------- the generated page
def test_fidelity_page_is_up_to_date():
    from study import fidelity
    assert fidelity.PAGE.read_text() == fidelity.render(), "docs/fidelity.md is stale: run python -m study.fidelity"


def test_every_deviation_names_its_reason_and_full_presets_follow_the_official_schedules():
    from study import fidelity
    for items, presets, _ in fidelity.MODELS.values():
        for preset in presets:
            cfg = fidelity.load_preset(preset)
            for item in items:
                assert "not stated" not in item.status(preset, item.read(cfg)), (preset, item.name)
    for preset, epochs in (("gpt_B", 300), ("gpt_XL", 200), ("ditdh_XL", 800), ("ditdh_S", 1400), ("paper", 50),
                           ("paper_ae", 50)):
        train = fidelity.load_preset(preset).train
        assert train.steps == fidelity.epochs_to_steps(epochs, train.batch_size), preset


def test_runs_carry_their_recipe_deviations():
    from study import fidelity
    tiny = fidelity.load_preset("tiny")
    assert any(d.startswith("perceptual loss: random_vgg") and "never the VFM" in d for d in tiny.deviations)
    assert not any("perceptual loss" in d for d in fidelity.load_preset("paper").deviations)
    xl = fidelity.load_preset("ditdh_XL")
    assert [d.split(":")[0] for d in fidelity.generator_deviations(xl)] == ["LR schedule"]
    assert any(d.startswith("EMA, precision") for d in fidelity.generator_deviations(fidelity.load_preset("tiny_dit")))


def test_tiny_autoguidance_guide_is_mostly_trained_weights():
    """The guide is the EMA model at guide_fraction of the steps; the share of the initial (largely
    zero) weights left in an EMA after k steps is decay^k, which must be small by then."""
    from generators.train import GeneratorRunConfig
    cfg = load(GeneratorRunConfig, GEN_CONFIGS / "tiny_dit.yaml")
    guide_step = round(cfg.sample.guide_fraction * cfg.train.steps)
    assert cfg.sample.guidance == "autoguidance" and cfg.train.ema_decay ** guide_step < 0.1
