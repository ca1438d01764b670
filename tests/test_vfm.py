"""Frozen VFM registry: real timm architectures, documented shapes, frozenness, checkpoint formats,
fast missing-weights errors, the in-house format, and the CLI."""

import time

import pytest
import timm
import torch
from open_clip.transformer import QuickGELU
from open_clip.transformer import VisionTransformer as OpenClipViT
from safetensors.torch import save_file

from study.config import ConfigError, load
from tokenizer.vfm import (ENTRIES, FAMILIES, INHOUSE_ARCHS, MissingWeightsError, VFMSpec, build_inhouse_arch,
                           build_vfm, level_indices, load_inhouse, save_inhouse)
from tokenizer.vfm.__main__ import main
from tokenizer.vfm.backbone import describe


def images(n=1, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def assert_same_outputs(vfm, ref, x, tol=None):
    kw = dict(rtol=tol, atol=tol) if tol else {}
    for a, b in zip(vfm.levels(x), ref.levels(x)):
        torch.testing.assert_close(a, b, **kw)
    torch.testing.assert_close(vfm.final_tokens(x, with_cls=vfm.has_cls), ref.final_tokens(x, with_cls=ref.has_cls),
                               **kw)


# --------------------------------------------------------------------------- registry and shapes
def test_registry_spans_families_and_hub_names_match_timm():
    assert len(ENTRIES) >= 15
    families = {e.family for e in ENTRIES.values()}
    assert len(families) >= 6 and families <= set(FAMILIES) - {"none"}
    for entry in ENTRIES.values():
        assert timm.is_model(entry.arch), entry.arch
        if entry.hub:  # the hub repo is the one timm itself would download for that tag
            assert timm.get_pretrained_cfg(entry.arch).hf_hub_id == entry.hub, entry.name


@pytest.mark.parametrize("name", list(ENTRIES))
def test_entry_default_size_shapes_on_meta(name):
    """The real architecture at its default size, on the meta device (no memory, no init)."""
    vfm = describe(name)
    entry = ENTRIES[name]
    assert (vfm.input_size, vfm.family, vfm.mean, vfm.std) == (entry.input_size, entry.family, entry.mean, entry.std)
    h = entry.input_size // vfm.patch_size
    assert vfm.grid == (h, h) and 16 <= h <= 24
    assert vfm.level_indices == level_indices(vfm.depth)
    x = torch.zeros(2, 3, 40, 40, device="meta")  # any size: the wrapper resizes
    assert [tuple(t.shape) for t in vfm.levels(x)] == [(2, vfm.width, h, h)] * 4
    assert vfm.num_prefix_tokens == (5 if "_reg" in name or "dinov3" in name else 0 if "siglip" in name else 1)


def test_default_size_metadata_of_the_vfmtok_backbone():
    vfm = describe("dinov2_vitl14_reg")
    assert (vfm.input_size, vfm.patch_size, vfm.grid, vfm.width, vfm.depth) == (336, 14, (24, 24), 1024, 24)
    assert vfm.level_indices == [5, 11, 17, 23] and vfm.num_prefix_tokens == 5
    assert 300e6 < vfm.num_params < 310e6


def test_mocov3_vit_small_keeps_its_twelve_heads():
    assert describe("mocov3_vits16").model.blocks[0].attn.num_heads == 12
    assert describe("dino_vits16").model.blocks[0].attn.num_heads == 6


def test_level_depths_are_evenly_spaced():
    assert level_indices(24) == [5, 11, 17, 23]
    assert level_indices(12) == [2, 5, 8, 11]
    assert level_indices(40) == [9, 19, 29, 39]
    with pytest.raises(ValueError):
        level_indices(3)


# Real random-init forwards: one per wrapper code path (timm ViT with registers, Eva/RoPE, no prefix
# token, the in-house preset). ViT-L/g are covered on meta: their CPU init alone takes about a minute.
@pytest.mark.parametrize("name,size", [("random:vit_micro_p4", None), ("dinov2_vits14_reg", 28),
                                       ("dinov3_vits16", 32), ("siglip2_vitb16_256", 32)])
def test_random_init_forward_is_frozen_with_documented_shapes(name, size):
    vfm = build_vfm(VFMSpec(name, input_size=size))
    assert vfm.family == "none" and vfm.weight_source.startswith("random-init")
    assert not any(p.requires_grad for p in vfm.parameters())
    x = images(1, 24)
    levels = vfm.levels(x)
    h, w = vfm.grid
    assert [tuple(t.shape) for t in levels] == [(1, vfm.width, h, w)] * 4
    assert all(t.dtype == torch.float32 and not t.requires_grad for t in levels)
    tokens = vfm.final_tokens(x)
    assert tokens.shape == (1, h * w, vfm.width)
    torch.testing.assert_close(levels[-1].flatten(2).transpose(1, 2), tokens)
    if vfm.has_cls:
        assert vfm.final_tokens(x, with_cls=True).shape == (1, h * w + 1, vfm.width)
    else:
        with pytest.raises(ValueError, match="no CLS"):
            vfm.final_tokens(x, with_cls=True)
    vfm.train()  # a parent's .train() must not reach the frozen backbone
    assert not vfm.training and not any(m.training for m in vfm.modules())
    for a, b in zip(vfm.levels(x), levels):
        assert torch.equal(a, b)


def test_levels_are_the_residual_stream_after_the_named_blocks():
    """Independent check of the depths: run the blocks by hand and compare."""
    vfm = build_vfm("random:vit_tiny_p4")
    assert vfm.level_indices == [1, 3, 5, 7]
    m, x = vfm.model, images(2, 32)
    t = m.norm_pre(m._pos_embed(m.patch_embed(vfm.preprocess(x))))
    stream = []
    for blk in m.blocks:
        t = blk(t)
        stream.append(t)
    expected = [stream[i] for i in (1, 3, 5)] + [m.norm(stream[7])]
    for got, ref in zip(vfm.levels(x), expected):
        torch.testing.assert_close(got, ref[:, 5:].transpose(1, 2).reshape(2, 128, 8, 8))
    assert not torch.allclose(vfm.levels(x)[-1], stream[7][:, 5:].transpose(1, 2).reshape(2, 128, 8, 8))


def test_preprocess_resizes_and_normalises_minus_one_one_images():
    vfm = build_vfm(VFMSpec("random:vit_micro_p4", input_size=48))
    assert vfm.grid == (12, 12)
    x = torch.full((1, 3, 20, 20), 0.2)  # constant image: resizing keeps it, then (0.6 - 0.5) / 0.5
    out = vfm.preprocess(x)
    assert out.shape == (1, 3, 48, 48)
    torch.testing.assert_close(out, torch.full_like(out, 0.2))
    clip = describe("clip_vitb16")
    assert clip.mean[0] == pytest.approx(0.48145466)  # OpenAI CLIP statistics, not ImageNet's


def test_bf16_autocast_returns_float32_close_to_fp32():
    vfm = build_vfm("random:vit_tiny_p4")
    x = images(2, 32)
    ref = vfm.final_tokens(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        levels, tokens = vfm.levels(x), vfm.final_tokens(x)
    assert all(t.dtype == torch.float32 for t in levels) and tokens.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(tokens, ref, dim=-1).min() > 0.99


def test_random_controls_are_seeded():
    a, b = build_vfm("random:vit_micro_p4"), build_vfm("random:vit_micro_p4")
    c = build_vfm(VFMSpec("random:vit_micro_p4", seed=1))
    x = images()
    assert torch.equal(a.final_tokens(x), b.final_tokens(x))
    assert not torch.allclose(a.final_tokens(x), c.final_tokens(x))


def test_unknown_names_suggest_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'dinov2_vitl14_reg'"):
        VFMSpec("dinov2_vitl14_regg")
    with pytest.raises(ConfigError, match="did you mean 'vit_tiny_p4'"):
        build_vfm("random:vit_tiny_p5")
    with pytest.raises(ConfigError, match="vfm.name: unknown VFM"):
        _load_nested({"vfm": {"name": "mea_vitb16"}})


def _load_nested(data):
    import dataclasses

    @dataclasses.dataclass
    class Holder:
        vfm: VFMSpec

    return load(Holder, data=data)


# --------------------------------------------------------------------------- checkpoint formats
def _roundtrip(tmp_path, name, size, write, filename="ckpt.pth", tol=None):
    """Random source backbone -> file in the original layout -> `weights:` -> same outputs."""
    src = build_vfm(VFMSpec(f"random:{name}", input_size=size, seed=1))
    path = tmp_path / filename
    write({k: v.clone() for k, v in src.model.state_dict().items()}, path)
    vfm = build_vfm(VFMSpec(name, weights=str(path), input_size=size))
    assert vfm.family == ENTRIES[name].family and vfm.weight_source == f"file:{path}"
    assert_same_outputs(vfm, src, images(1, size), tol)


def test_timm_safetensors_roundtrip(tmp_path):
    _roundtrip(tmp_path, "dinov3_vits16", 32, lambda sd, p: save_file(sd, str(p)), "w.safetensors")


def test_original_dinov2_hub_format_roundtrip(tmp_path):
    def write_fb(sd, path):
        # FB layout: CLS position inside pos_embed, `register_tokens`, a `mask_token`.
        cls_pos = torch.randn(1, 1, sd["pos_embed"].shape[-1])
        fb = {k: v for k, v in sd.items() if k not in ("cls_token", "reg_token", "pos_embed")}
        fb.update(cls_token=sd["cls_token"] - cls_pos, pos_embed=torch.cat([cls_pos, sd["pos_embed"]], 1),
                  register_tokens=sd["reg_token"], mask_token=torch.zeros(1, sd["cls_token"].shape[-1]))
        torch.save(fb, path)
    # timm folds the CLS position back into cls_token: (c - p) + p is exact only up to rounding
    _roundtrip(tmp_path, "dinov2_vits14_reg", 28, write_fb, tol=1e-3)


def test_dino_teacher_checkpoint_roundtrip(tmp_path):
    def write_dino(sd, path):
        teacher = {f"backbone.{k}": v for k, v in sd.items()}
        teacher.update({"head.mlp.0.weight": torch.randn(8, 384), "head.last_layer.weight_g": torch.ones(8, 1)})
        torch.save({"teacher": teacher, "student": {f"module.{k}": v for k, v in teacher.items()}, "epoch": 3}, path)
    _roundtrip(tmp_path, "dino_vits16", 32, write_dino)


@pytest.fixture(scope="module")
def vits_source():
    """One random 6-head ViT-S/16 at 32 px shared by the DeiT and iBOT formats."""
    return build_vfm(VFMSpec("random:ibot_vits16", input_size=32, seed=1))


def _write_mocov3(sd, path):
    wrapped = {f"module.base_encoder.{k}": v for k, v in sd.items()}
    wrapped.update({f"module.momentum_encoder.{k}": v + 1 for k, v in sd.items()})
    wrapped.update({"module.base_encoder.head.0.weight": torch.randn(16, 384),
                    "module.predictor.0.weight": torch.randn(16, 16)})
    torch.save({"epoch": 300, "arch": "vit_base", "state_dict": wrapped, "optimizer": {}}, path)


def test_mocov3_checkpoint_roundtrip(tmp_path):
    _roundtrip(tmp_path, "mocov3_vits16", 32, _write_mocov3)


@pytest.mark.parametrize("name,write", [
    ("deit_vits16", lambda sd, p: torch.save({"model": {**sd, "head.weight": torch.randn(1000, 384),
                                                        "head.bias": torch.zeros(1000)}, "epoch": 299}, p)),
    ("ibot_vits16", lambda sd, p: torch.save({"state_dict": {**{f"backbone.{k}": v for k, v in sd.items()},
                                                             "backbone.masked_embed": torch.zeros(384),
                                                             "head.last_layer2.weight_g": torch.ones(4, 1)}}, p)),
])
def test_fb_model_and_ibot_checkpoints_roundtrip(tmp_path, vits_source, name, write):
    path = tmp_path / "ckpt.pth"
    write({k: v.clone() for k, v in vits_source.model.state_dict().items()}, path)
    vfm = build_vfm(VFMSpec(name, weights=str(path), input_size=32))
    assert vfm.family == ENTRIES[name].family
    assert_same_outputs(vfm, vits_source, images(1, 32))


def test_openai_clip_state_dict_matches_open_clip_tower(tmp_path):
    torch.manual_seed(2)
    tower = OpenClipViT(image_size=32, patch_size=16, width=768, layers=12, heads=12, mlp_ratio=4.0,
                        output_dim=512, act_layer=QuickGELU).eval()
    torch.save({f"visual.{k}": v for k, v in tower.state_dict().items()} | {"logit_scale": torch.tensor(4.6)},
               tmp_path / "ViT-B-16.pt")
    vfm = build_vfm(VFMSpec("clip_vitb16", weights=str(tmp_path / "ViT-B-16.pt"), input_size=32))
    x = images(1, 32)
    with torch.no_grad():
        raw = tower.forward_intermediates(vfm.preprocess(x), indices=[2, 5, 8, 11], intermediates_only=True)
        normed = tower.forward_intermediates(vfm.preprocess(x), indices=[11], intermediates_only=True,
                                             normalize_intermediates=True)
    ours = vfm.levels(x)
    for a, b in zip(ours[:3], raw["image_intermediates"][:3]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours[3], normed["image_intermediates"][0], rtol=1e-4, atol=1e-4)


def test_open_clip_timm_trunk_state_dict_roundtrip(tmp_path):
    def write_open_clip(sd, path):
        # open_clip's SigLIP2 visual is a timm trunk; its pooling head and the text tower are ignored.
        out = {f"visual.trunk.{k}": v for k, v in sd.items()}
        out.update({"visual.trunk.attn_pool.latent": torch.randn(1, 1, 768),
                    "text.token_embedding.weight": torch.randn(10, 768), "logit_bias": torch.tensor(-10.0)})
        torch.save(out, path)
    _roundtrip(tmp_path, "siglip2_vitb16_256", 32, write_open_clip)


def test_a_file_of_another_backbone_fails_loudly(tmp_path):
    src = build_vfm(VFMSpec("random:dinov3_vits16", input_size=32))
    torch.save(src.model.state_dict(), tmp_path / "dinov3.pth")
    with pytest.raises(RuntimeError, match="does not match the backbone"):
        build_vfm(VFMSpec("dino_vits16", weights=str(tmp_path / "dinov3.pth"), input_size=32))


# --------------------------------------------------------------------------- missing weights
@pytest.mark.parametrize("name", ["dinov2_vitg14_reg", "mocov3_vitb16"])
def test_missing_pretrained_weights_fail_fast_and_say_how_to_fix(tmp_path, monkeypatch, name):
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VFMSTUDY_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.perf_counter()
    with pytest.raises(MissingWeightsError) as err:
        build_vfm(VFMSpec(name, pretrained=True))
    assert time.perf_counter() - start < 2.0
    msg = str(err.value)
    assert name in msg and ENTRIES[name].weight_file.split(" ")[0] in msg
    assert "weights: /path/" in msg and ("pretrained: true" in msg or "no hub copy" in msg)


def test_missing_local_files_raise_missing_weights(tmp_path, monkeypatch):
    with pytest.raises(MissingWeightsError, match="does not exist"):
        build_vfm(VFMSpec("mae_vitb16", weights=str(tmp_path / "nope.pth")))
    monkeypatch.setenv("VFMSTUDY_INHOUSE_DIR", str(tmp_path))
    with pytest.raises(MissingWeightsError, match=r"absent\.pt"):
        build_vfm("inhouse:absent")


def test_pretrained_file_in_weights_dir_is_found(tmp_path, monkeypatch):
    src = build_vfm(VFMSpec("random:dino_vits16", input_size=32, seed=3))
    torch.save(src.model.state_dict(), tmp_path / "dino_deitsmall16_pretrain.pth")
    monkeypatch.setenv("VFMSTUDY_WEIGHTS_DIR", str(tmp_path))
    vfm = build_vfm(VFMSpec("dino_vits16", pretrained=True, input_size=32))
    assert vfm.family == "self-distillation"
    assert_same_outputs(vfm, src, images(1, 32))


# --------------------------------------------------------------------------- in-house format
def test_inhouse_save_load_roundtrip(tmp_path, monkeypatch):
    torch.manual_seed(4)
    model = build_inhouse_arch("vit_micro_p4")
    arch = INHOUSE_ARCHS["vit_micro_p4"]
    prov = {"objective": "ibot", "steps": 10, "seed": 4, "data": "shapes-32:abc", "created": "now"}
    save_inhouse(tmp_path / "mini.pt", model, arch, "self-distillation+latent-mim", prov)
    payload = torch.load(tmp_path / "mini.pt", weights_only=True)
    assert set(payload) == {"format", "arch", "family", "provenance", "state_dict"}
    assert payload["format"] == "vfmstudy-inhouse-v1" and payload["provenance"] == prov
    assert not any(k.startswith("head.") for k in payload["state_dict"])
    assert list(tmp_path.iterdir()) == [tmp_path / "mini.pt"]  # no temp file left behind

    loaded, meta = load_inhouse(tmp_path / "mini.pt")
    assert meta["family"] == "self-distillation+latent-mim" and meta["arch"] == arch
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)

    monkeypatch.setenv("VFMSTUDY_INHOUSE_DIR", str(tmp_path))
    vfm = build_vfm("inhouse:mini")
    assert (vfm.family, vfm.grid, vfm.input_size) == ("self-distillation+latent-mim", (8, 8), 32)
    x = images(2, 32)
    with torch.no_grad():
        ref = model.eval().forward_features(x)  # default stats 0.5/0.5: the model sees [-1, 1] as is
    torch.testing.assert_close(vfm.final_tokens(x, with_cls=True), torch.cat([ref[:, :1], ref[:, 5:]], 1))
    bigger = build_vfm(VFMSpec("inhouse:other", weights=str(tmp_path / "mini.pt"), input_size=48))
    assert bigger.levels(x)[0].shape == (2, 64, 12, 12)

    torch.save({"format": "something-else"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="vfmstudy-inhouse-v1"):
        load_inhouse(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="family"):
        save_inhouse(tmp_path / "x.pt", model, arch, "magic", prov)


# --------------------------------------------------------------------------- CLI
def test_cli_list_and_check(capsys):
    assert main(["list"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()[1:]
    assert len(rows) >= 15
    assert len({row.split()[1] for row in rows}) >= 6
    assert any(row.startswith("dinov2_vitl14_reg ") and "24x24" in row and "303.6M" in row for row in rows)

    assert main(["check", "random:vit_micro_p4", "--input-size", "48"]) == 0
    out = capsys.readouterr().out
    assert "(1, 64, 12, 12)" in out and "final_tokens: (1, 144, 64)" in out
    assert main(["check", "ibot_vitb16", "--pretrained"]) == 2
    assert "checkpoint_teacher.pth" in capsys.readouterr().err
