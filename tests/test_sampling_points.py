"""Each query's sampling points, as returned for the figure, are the ones the encoder samples."""

import pytest
import torch
from torch import nn

import tokenizer.deform_attn as deform_attn
from tokenizer.model import TokenizerConfig, VFMTokenizer
from tokenizer.sampling_points import sampling_points
from tokenizer.vfm import build_vfm

SMALL = dict(num_queries=16, dim=32, enc_depth=2, enc_heads=2, enc_points=3, enc_ffn=64, codebook_size=32,
             code_dim=4, dec_depth=1, dec_heads=2, cnn_ch=8, cnn_groups=4, attn_dropout=0.0)


def _model(sampler: str = "region") -> VFMTokenizer:
    torch.manual_seed(0)
    model = VFMTokenizer(TokenizerConfig(sampler=sampler, **SMALL), build_vfm("random:vit_micro_p4")).eval()
    if sampler == "region":
        # at init the offset and weight projections are zero (points independent of the image):
        # random weights make the points depend on each image, as after training
        for layer in model.sampler.layers:
            nn.init.normal_(layer.cross.sampling_offsets.weight, std=0.5)
            nn.init.normal_(layer.cross.attention_weights.weight, std=0.5)
    return model


def test_sampling_points_are_the_locations_and_weights_the_encoder_samples(monkeypatch):
    model = _model()
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    seen = []
    core = deform_attn.ms_deform_attn_core

    def spy(value, shapes, locations, weights):
        seen.append((locations.detach().clone(), weights.detach().clone()))
        return core(value, shapes, locations, weights)

    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(deform_attn, "ms_deform_attn_core", spy)
        model.encode(images)
    assert len(seen) == 2  # one cross-attention call per encoder layer

    points = sampling_points(model, images)
    B, depth, Q, H, L, P = 3, 2, 16, 2, 4, 3
    assert points["locations"].shape == (B, depth, Q, H, L, P, 2)
    assert points["weights"].shape == (B, depth, Q, H, L, P) and points["reference"].shape == (Q, 2)
    for layer, (locations, weights) in enumerate(seen):
        torch.testing.assert_close(torch.from_numpy(points["locations"][:, layer]), locations, atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.from_numpy(points["weights"][:, layer]), weights, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.from_numpy(points["weights"]).sum((-2, -1)), torch.ones(B, depth, Q, H))
    # the points depend on the image, and the hooks are gone afterwards
    assert (points["locations"][0] != points["locations"][1]).any()
    assert all(not layer.cross._forward_hooks for layer in model.sampler.layers)


def test_reference_points_are_the_anchor_grid_cell_centres():
    reference = sampling_points(_model(), torch.zeros(1, 3, 32, 32))["reference"]
    centres = (torch.arange(4) + 0.5) / 4
    yy, xx = torch.meshgrid(centres, centres, indexing="ij")
    torch.testing.assert_close(torch.from_numpy(reference), torch.stack([xx.flatten(), yy.flatten()], -1))


def test_grid_sampler_has_no_sampling_points():
    with pytest.raises(ValueError, match="sampler: region"):
        sampling_points(_model("grid"), torch.zeros(1, 3, 32, 32))
