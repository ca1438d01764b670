"""tokenizer.export: generator codes over the recipe's augmented views, sharded and resumable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tokenizer.export as export
from study.data import adm_augment, build_dataset, to_tensor_images
from tests.test_tokenizer import small_cfg
from tokenizer.model import VFMTokenizer
from tokenizer.vfm import build_vfm


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    cfg = small_cfg(tmp_path_factory.mktemp("run"), "data.train_size=20")
    torch.manual_seed(0)
    model = VFMTokenizer(cfg.model, build_vfm(cfg.vfm)).eval()
    return model, build_dataset(cfg.data, "train")


def encode(model, images: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model.encode(to_tensor_images(images))


def test_codes_are_the_centre_crop_its_mirror_and_seeded_adm_views(model_and_data, tmp_path):
    model, data = model_and_data
    payload = export.export_codes(model, data, tmp_path / "codes.pt", views=2, seed=3, shard_size=8)
    n = len(data)
    assert payload["tokens"].shape == (n, 16) and payload["tokens_views"].shape == (n, 2, 16)
    assert torch.equal(payload["tokens"].long(), encode(model, data.images))
    assert torch.equal(payload["tokens_flip"].long(), encode(model, np.ascontiguousarray(data.images[:, :, ::-1])))
    # view v of image i: the ADM random resize-crop + flip drawn from (seed, i, v), recomputed here
    for view in range(2):
        crops = np.stack([adm_augment(data.images[i], np.random.default_rng([3, i, view])) for i in range(n)])
        assert torch.equal(payload["tokens_views"][:, view].long(), encode(model, crops))
    assert (payload["tokens_views"][:, 0] != payload["tokens"]).any()
    assert torch.equal(payload["labels"], torch.as_tensor(data.labels))
    assert torch.load(tmp_path / "codes.pt", weights_only=True)["views"] == payload["views"]


def test_preempted_two_rank_export_resumes_to_the_uninterrupted_codes(model_and_data, tmp_path, monkeypatch):
    model, data = model_and_data
    kw = {"views": 1, "seed": 0, "shard_size": 6}  # 20 images: 4 shards, rank 0 owns shards 0 and 2
    reference = export.export_codes(model, data, tmp_path / "one" / "codes.pt", **kw)

    path = tmp_path / "two" / "codes.pt"
    path.parent.mkdir()
    encode_rows, calls = export.encode_rows, []

    def preempted_after_one_shard(*args, **kwargs):
        if len(calls) == 1:
            raise KeyboardInterrupt("preempted")
        calls.append(args[2])
        return encode_rows(*args, **kwargs)

    monkeypatch.setattr(export, "encode_rows", preempted_after_one_shard)
    with pytest.raises(KeyboardInterrupt):
        export.write_code_shards(model, data, path, rank=0, world=2, **kw)
    monkeypatch.setattr(export, "encode_rows", lambda *a, **k: (calls.append(a[2]), encode_rows(*a, **k))[1])
    plan = export.write_code_shards(model, data, path, rank=1, world=2, **kw)
    with pytest.raises(FileNotFoundError, match="1 of 4 code shards missing"):
        export.merge_code_shards(model, plan, path)
    export.write_code_shards(model, data, path, rank=0, world=2, **kw)  # the requeued rank 0
    assert calls == [range(0, 6), range(6, 12), range(18, 20), range(12, 18)]  # shard 0 not redone
    merged = export.merge_code_shards(model, plan, path)
    for key in ("tokens", "tokens_flip", "tokens_views", "labels"):
        assert torch.equal(merged[key], reference[key]), key
    assert list(path.parent.glob("**/*.tmp")) == []


def test_generator_trains_on_the_exported_views(model_and_data, tmp_path):
    from generators.train import CodesConfig, GeneratorTask
    from tests.test_generators import gpt_run
    model, data = model_and_data
    payload = export.export_codes(model, data, tmp_path / "codes.pt", views=3, shard_size=8)
    cfg = gpt_run(tmp_path, 1)
    cfg.gpt.vocab_size, cfg.gpt.num_classes = 32, 10
    cfg.data = CodesConfig(source="cache", path=str(tmp_path / "codes.pt"))
    task = GeneratorTask(cfg)
    rows, labels = zip(*(task.batch_at(step) for step in range(6)))
    rows, labels = torch.cat(rows), torch.cat(labels)
    assert rows.dtype == torch.long
    views = payload["tokens_views"].long()
    # every row is one of its item's views (items identified by their codes), and all 3 views occur
    matches = (rows[:, None, None] == views[None]).all(-1)  # (rows, items, views)
    assert matches.any(-1).any(-1).all()
    assert set(matches.any(1).float().argmax(-1).tolist()) == {0, 1, 2}
