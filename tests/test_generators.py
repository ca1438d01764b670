"""Generators: LlamaGen GPT + KV-cache sampler, DiT-DH + flow matching, and their trainer."""

import math

import pytest
import torch
from torch import nn

from generators.dit import DiT, DiTConfig
from generators.flow import (FlowConfig, default_shift, flow_loss, guided_velocity, interpolate, sample_ode,
                             shift_time, time_grid, velocity_target)
from generators.gpt import GPT, GPTConfig
from generators.sampling import cfg_scale_at, generate, sample_token, top_k_filter, top_p_filter
from generators.train import (CodesConfig, GeneratorRunConfig, GeneratorTask, SampleConfig, load_generator, main,
                              train)
from study.config import ConfigError, load
from study.training import Callback, OptimConfig, TrainConfig




def small_gpt(**kw) -> GPT:
    """Random tiny GPT with a *non-zero* head (the real zero-init head would make every logit 0)."""
    torch.manual_seed(0)
    cfg = GPTConfig(**{"vocab_size": 64, "grid": (4, 4), "num_classes": 5, "dim": 32, "depth": 2, "heads": 2, **kw})
    model = GPT(cfg)
    nn.init.normal_(model.head.weight, std=0.5)
    return model.eval()


def small_dit(seed=0, **kw) -> DiT:
    """Random tiny DiT-DH with its zero-initialised AdaLN/final layers perturbed, so outputs are non-trivial."""
    torch.manual_seed(seed)
    cfg = DiTConfig(**{"in_channels": 4, "grid": (4, 4), "num_classes": 5, "dim": 32, "depth": 2, "heads": 2,
                       "ddt_width": 64, "ddt_depth": 1, "ddt_heads": 2, **kw})
    model = DiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


class Killed(RuntimeError):
    pass


class Recorder(Callback):
    def __init__(self, kill_at: int | None = None):
        self.losses, self.kill_at = {}, kill_at

    def on_step(self, step, metrics):
        self.losses[step] = next(v for k, v in metrics.items() if k.startswith("loss/"))
        if step == self.kill_at:
            raise Killed(f"simulated kill at step {step}")


def train_cfg(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(**{"precision": "fp32", "device": "cpu", "progress": False, "ckpt_every": 10**6,
                          "out_dir": str(tmp_path), "log_every": 1, **kw})


# --------------------------------------------------------------------------- GPT
@pytest.mark.parametrize("zero_cls_rope", [True, False])
def test_kv_cache_logits_equal_full_recompute(zero_cls_rope):
    model = small_gpt(zero_cls_rope=zero_cls_rope)
    tokens = torch.randint(0, 64, (3, 16))
    labels = torch.tensor([0, 3, 5])  # 5 = null class
    with torch.no_grad():
        full = model(tokens[:, :-1], labels)  # (3, 16, V)
        model.setup_caches(3, torch.float32, torch.device("cpu"))
        steps = [model.forward_embeddings(model.embed_class(labels), torch.tensor([0]))]
        for i in range(15):
            steps.append(model.forward_embeddings(model.tok_emb(tokens[:, i:i + 1]), torch.tensor([i + 1])))
        model.clear_caches()
    cached = torch.cat(steps, dim=1)
    assert full.abs().max() > 1.0  # the logits are not trivially constant
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    greedy_cached = generate(model, labels, temperature=0, use_cache=True)
    greedy_full = generate(model, labels, temperature=0, use_cache=False)
    assert torch.equal(greedy_cached, greedy_full)
    assert model.blocks[0].attn.kv_cache is None  # caches are dropped after generation


def test_gpt_is_causal():
    model = small_gpt()
    tokens = torch.randint(0, 64, (2, 16))
    labels = torch.tensor([1, 2])
    j = 7
    changed = tokens.clone()
    changed[:, j] = (changed[:, j] + 1) % 64
    with torch.no_grad():
        a, b = model(tokens[:, :-1], labels), model(changed[:, :-1], labels)
    # output i predicts token i from tokens < i: outputs 0..j must not see token j
    torch.testing.assert_close(a[:, : j + 1], b[:, : j + 1], atol=0, rtol=0)
    assert (a[:, j + 1:] - b[:, j + 1:]).abs().amax(-1).min() > 1e-4  # every later output does see it


def test_zero_cls_rope_zeroes_class_query_and_key():
    on, off = small_gpt(zero_cls_rope=True), small_gpt(zero_cls_rope=False)
    assert on.rope[0].abs().sum() == 0 and torch.equal(off.rope[0, :, 0], torch.ones(off.cfg.head_dim // 2))
    assert torch.equal(on.rope[1:], off.rope[1:])
    with torch.no_grad():  # the quirk changes the model's function
        assert not torch.allclose(on(torch.zeros(1, 3, dtype=torch.long), torch.tensor([1])),
                                  off(torch.zeros(1, 3, dtype=torch.long), torch.tensor([1])))


def test_gpt_presets_match_method_table():
    from generators.gpt import GPT_B, GPT_L, GPT_XL, GPT_XXL
    assert [c.hidden for c in (GPT_B(), GPT_L(), GPT_XL(), GPT_XXL())] == [2048, 2816, 3584, 4096]
    with torch.device("meta"):  # count without allocating
        n = GPT(GPT_B(vocab_size=16384, grid=(16, 16), num_classes=1000)).num_params()
    assert 105e6 < n < 115e6  # LlamaGen GPT-B: 111M


def test_cfg_scale_one_equals_conditional_sampling():
    model = small_gpt()
    labels = torch.tensor([0, 1, 2, 3])
    cond = generate(model, labels, seed=3, cfg_batch=False)
    doubled = generate(model, labels, seed=3, cfg_scale=1.0, cfg_batch=True)  # runs the null branch too
    assert torch.equal(cond, doubled)
    assert not torch.equal(cond, generate(model, labels, seed=3, cfg_scale=4.0))
    assert not torch.equal(cond, generate(model, labels, seed=4, cfg_batch=False))  # the seed matters
    # a guided run with guidance switched off after token 0 differs from full guidance only after token 0
    off_early = generate(model, labels, seed=3, cfg_scale=4.0, cfg_interval=0)
    assert torch.equal(off_early[:, 0], generate(model, labels, seed=3, cfg_scale=4.0)[:, 0])


def test_cfg_linear_schedule_ramps_to_full_scale():
    assert cfg_scale_at(0, 4, 3.0, "constant") == 3.0
    assert [cfg_scale_at(i, 4, 3.0, "linear") for i in range(4)] == [1.5, 2.0, 2.5, 3.0]


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert kept(top_k_filter(logits, 2)) == [True, True, False, False]
    assert kept(top_k_filter(logits, 0)) == [True] * 4
    assert kept(top_p_filter(logits, 0.7)) == [True, True, False, False]
    assert kept(top_p_filter(logits, 0.81)) == [True, True, True, False]
    assert kept(top_p_filter(logits, 0.01)) == [True, False, False, False]
    assert kept(top_p_filter(logits[:, [3, 1, 0, 2]], 0.7)) == [False, True, True, False]  # order-independent
    many = torch.randn(64, 10)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_token(many, top_k=1, generator=g), many.argmax(-1, keepdim=True))
    assert torch.equal(sample_token(many, temperature=0), many.argmax(-1, keepdim=True))


# --------------------------------------------------------------------------- flow matching
def test_time_shift_is_monotone_and_velocity_target_is_eps_minus_x():
    torch.manual_seed(0)  # the sampled checks below are statistical: pin them
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for s in (1.0, 1.5, 4.0):
        ts = shift_time(t, s)
        assert (ts.diff() > 0).all() and ts[0] == 0 and ts[-1] == 1 and (ts >= t - 1e-12).all()
    assert torch.equal(shift_time(t, 1.0), t)
    assert default_shift(8 * 8 * 8) == 1.0 and default_shift(65536) == 4.0 and default_shift(8192) == math.sqrt(2)
    assert FlowConfig(shift=4).resolve_shift(512) == 4.0
    with pytest.raises(ValueError):
        FlowConfig(shift=0.5).resolve_shift(512)
    grid = time_grid(10, 4.0, t_min=0.0)
    assert grid[0] == 1 and grid[-1] == 0 and (grid.diff() < 0).all()
    # d x_t / dt along the path is the target
    x, eps, tt = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    h = 1e-6
    torch.testing.assert_close((interpolate(x, eps, tt + h) - interpolate(x, eps, tt - h)) / (2 * h),
                               velocity_target(x, eps))
    # flow_loss of the oracle velocity (x_t - x) / t is ~0, of a zero velocity ~E|eps - x|^2 = 2
    data = torch.randn(4096, 2, dtype=torch.float64)
    oracle = lambda xt, t, y: (xt - data) / t[:, None]  # noqa: E731
    assert flow_loss(oracle, data, None, 3.0) < 1e-12
    assert abs(float(flow_loss(lambda xt, t, y: torch.zeros_like(xt), data, None, 3.0)) - 2.0) < 0.1


def test_flow_matching_recovers_gaussian_mixture():
    torch.manual_seed(0)

    def mixture(n):  # two modes at (+-2, 0), std 0.5: mean 0, cov diag(4.25, 0.25)
        centre = torch.where(torch.rand(n) < 0.5, -2.0, 2.0)
        return torch.stack([centre, torch.zeros(n)], 1) + 0.5 * torch.randn(n, 2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 2))

        def forward(self, x, t, y):
            return self.net(torch.cat([x, t[:, None]], 1))

    net = Net()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(600):
        loss = flow_loss(net, mixture(256), None, shift=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        x = sample_ode(net, torch.randn(4000, 2), torch.zeros(4000, dtype=torch.long), null_class=0,
                       steps=50, method="heun", t_min=0.0)
    mean, cov = x.mean(0), torch.cov(x.T)
    assert mean.abs().max() < 0.15, mean
    assert abs(cov[0, 0] / 4.25 - 1) < 0.15 and abs(cov[1, 1] / 0.25 - 1) < 0.15 and cov[0, 1].abs() < 0.15, cov
    assert (x[:, 0].abs() < 1.0).float().mean() < 0.1  # bimodal, not a single blob in the middle


def test_dit_cfg_scale_one_equals_conditional_velocity():
    model = small_dit()
    x, y = torch.randn(3, 4, 4, 4), torch.tensor([0, 2, 4])
    with torch.no_grad():
        cond = guided_velocity(model, x, 0.7, y, null_class=5, scale=1.0, cfg_batch=False)
        doubled = guided_velocity(model, x, 0.7, y, null_class=5, scale=1.0, cfg_batch=True)
        guided = guided_velocity(model, x, 0.7, y, null_class=5, scale=2.0)
        outside = guided_velocity(model, x, 0.7, y, null_class=5, scale=2.0, interval=(0.0, 0.5))
    torch.testing.assert_close(doubled, cond, atol=1e-6, rtol=1e-5)
    assert (guided - cond).abs().max() > 1e-3
    torch.testing.assert_close(outside, cond, atol=0, rtol=0)  # outside the interval: unguided


def test_autoguidance_with_itself_as_guide_is_unguided():
    model, other = small_dit(0), small_dit(1)
    noise, y = torch.randn(3, 4, 4, 4), torch.tensor([0, 2, 4])
    kw = dict(null_class=5, steps=8, method="heun", shift=2.0)
    plain = sample_ode(model, noise, y, **kw)
    self_guided = sample_ode(model, noise, y, scale=1.5, guide=model, **kw)
    torch.testing.assert_close(self_guided, plain, atol=1e-6, rtol=1e-6)
    other_guided = sample_ode(model, noise, y, scale=1.5, guide=other, **kw)
    assert (other_guided - plain).abs().max() > 1e-3


def test_dit_shapes_presets_and_zero_init():
    from generators.dit import DiTDH_S, DiTDH_XL
    torch.manual_seed(0)
    for cfg in (DiTConfig(), DiTConfig(ddt_depth=0), DiTConfig(in_channels=3, grid=(8, 4), patch_size=2)):
        model = DiT(cfg)
        x = torch.randn(2, cfg.in_channels, *cfg.grid)
        v = model(x, torch.rand(2), torch.tensor([0, cfg.num_classes]))
        assert v.shape == x.shape and v.abs().max() == 0  # zero-init final layer
    assert DiTDH_S().ddt_width == 2048 and DiTDH_XL().dim == 1152 and DiTDH_XL().depth == 28


# --------------------------------------------------------------------------- training
def gpt_run(tmp_path, steps, **kw) -> GeneratorRunConfig:
    gpt = GPTConfig(**{"vocab_size": 64, "grid": (4, 4), "num_classes": 10, "dim": 64, "depth": 2, "heads": 2, **kw})
    return GeneratorRunConfig(kind="gpt", gpt=gpt, data=CodesConfig(num_samples=10), optim=OptimConfig(lr=3e-3),
                              train=train_cfg(tmp_path, steps=steps, batch_size=10, ema_decay=0.0),
                              sample=SampleConfig(num_samples=10, temperature=0))


def dit_run(tmp_path, steps, **kw) -> GeneratorRunConfig:
    dit = DiTConfig(**{"in_channels": 4, "grid": (4, 4), "num_classes": 4, "dim": 32, "depth": 2, "heads": 2,
                       "ddt_width": 64, "ddt_depth": 1, "ddt_heads": 2, **kw})
    return GeneratorRunConfig(kind="dit", dit=dit, data=CodesConfig(num_samples=4), optim=OptimConfig(lr=3e-3),
                              train=train_cfg(tmp_path, steps=steps, batch_size=16, ema_decay=0.0, log_every=10),
                              sample=SampleConfig(num_samples=8, steps=25, guide_fraction=0.0))


def test_tiny_gpt_overfits_fixed_tokens(tmp_path):
    # one random sequence per class, no dropout: the cross-entropy floor is 0
    cfg = gpt_run(tmp_path, 100, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0, class_dropout=0.0)
    rec = Recorder()
    _, metrics = train(cfg, [rec])
    assert rec.losses[1] > 0.9 * math.log(64)  # zero-init head: starts at log(V)
    assert rec.losses[100] < 0.02 and metrics["eval/loss"] < 0.02
    assert metrics["sample/memorized"] == 1.0  # greedy samples reproduce every training sequence


def test_tiny_dit_overfits_fixed_latents(tmp_path):
    cfg = dit_run(tmp_path, 250, class_dropout=0.0)  # one latent per class: flow-matching floor is 0
    rec = Recorder()
    model, metrics = train(cfg, [rec])
    assert rec.losses[10] > 1.2 and rec.losses[250] < 0.3, rec.losses
    gen = load_generator(tmp_path)
    labels = torch.arange(8) % 4
    samples = gen.sample(labels, seed=1)  # de-normalised latents (B, C, h, w)
    data = GeneratorTask(cfg).codes.x  # random source: mean 0, std 1, so data scale == normalised
    dist = torch.cdist(samples.flatten(1), data.flatten(1)) / math.sqrt(64)  # RMS per dimension
    assert torch.equal(dist.argmin(1), labels)  # each sample lands on its own class's latent
    assert dist.min(1).values.max() < 0.3  # (random latents are ~1.41 apart)


@pytest.mark.parametrize("kind", ["gpt", "dit"])
def test_kill_and_resume_reproduces_loss_curve(tmp_path, kind):
    # dropout, label dropout and flow noise all draw from the RNGs the checkpoint must restore
    make = gpt_run if kind == "gpt" else dit_run
    full = Recorder()
    cfg_full = make(tmp_path / "full", 8)
    cfg_full.train.log_every = 1
    train(cfg_full, [full])
    cfg = make(tmp_path / "resumed", 8)
    cfg.train.ckpt_every, cfg.train.log_every = 4, 1
    with pytest.raises(Killed):
        train(cfg, [Recorder(kill_at=6)])
    resumed = Recorder()
    train(cfg, [resumed])
    assert sorted(resumed.losses) == [5, 6, 7, 8]
    assert [resumed.losses[s] for s in range(5, 9)] == [full.losses[s] for s in range(5, 9)]
    assert len(set(full.losses.values())) == 8  # the curve is not flat


def test_batches_are_a_pure_function_of_seed_and_step(tmp_path):
    cfg = gpt_run(tmp_path, 1)
    cfg.train.batch_size = 4  # 10 items: steps 2 and 3 cross an epoch boundary
    a, b = GeneratorTask(cfg), GeneratorTask(cfg)
    stream = a.batches(2, 0, 1)
    for step in (2, 3, 4):
        assert torch.equal(next(stream)[0], b.batch_at(step)[0])
    epoch0 = torch.cat([b.batch_at(s)[1] for s in range(5)])[:10]  # labels == item index here
    assert sorted(epoch0.tolist()) == list(range(10))  # every item once per epoch
    assert torch.equal(torch.cat([b.batch_at(0, r, 2)[1] for r in (0, 1)]), b.batch_at(0)[1])  # ranks split it


def test_codes_file_with_flips_and_shape_checks(tmp_path):
    tokens = torch.randint(0, 64, (6, 16))
    flips = (tokens + 1) % 64  # stands in for the codes of the mirrored images
    path = tmp_path / "codes.pt"
    torch.save({"tokens": tokens, "tokens_flip": flips, "labels": torch.arange(6) % 3, "grid": (4, 4)}, path)
    cfg = gpt_run(tmp_path, 1)
    cfg.data = CodesConfig(source="cache", path=str(path))
    task = GeneratorTask(cfg)
    x = torch.cat([task.batch_at(s)[0] for s in range(4)])  # 40 rows
    is_plain = (x[:, None] == tokens[None]).all(-1).any(-1)
    is_flip = (x[:, None] == flips[None]).all(-1).any(-1)
    assert (is_plain ^ is_flip).all()  # every row is one of the two versions of an item
    assert 10 <= int(is_flip.sum()) <= 30  # flipped with probability 1/2
    cfg.gpt.grid = (2, 8)
    with pytest.raises(ConfigError, match="gpt.grid"):
        GeneratorTask(cfg)


def test_cli_and_shipped_configs(tmp_path):
    from pathlib import Path
    configs = sorted((Path(__file__).parents[1] / "generators" / "configs").glob("*.yaml"))
    assert len(configs) >= 4
    for path in configs:
        cfg = load(GeneratorRunConfig, path)
        declared = cfg.gpt if cfg.kind == "gpt" else cfg.dit  # the file sets its model, not the defaults
        assert isinstance(declared, GPTConfig if cfg.kind == "gpt" else DiTConfig), path.name
    out = tmp_path / "cli"
    main([str(Path(__file__).parents[1] / "generators" / "configs" / "tiny_gpt.yaml"),
          "--set", "train.steps=2", "--set", "train.batch_size=4", "--set", f"train.out_dir={out}",
          "--set", "train.progress=false", "--set", "sample.num_samples=2", "--set", "data.num_samples=8"])
    gen = load_generator(out)
    assert gen.step == 2 and gen.sample(torch.tensor([0, 1])).shape == (2, gen.cfg.model.seq_len)
