"""study.data: deterministic procedural shapes, caches, local datasets, ADM crops, resumable loaders."""

import pickle
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from PIL import Image

from study.config import ConfigError, load
from study.data import (DataConfig, UnreadableImageError, build_dataset, cache_path, center_crop_arr, generate_shapes,
                        iterate_eval, make_loader, random_crop_arr, random_flip, to_tensor_images, to_uint8)
from study.data import sources
from study.data.loader import StepBatchKeys


def shapes_cfg(tmp_path, **kw) -> DataConfig:
    return DataConfig(**{"train_size": 60, "val_size": 20, "cache_dir": str(tmp_path / "cache"), **kw})


def take(stream, n):
    return [next(stream) for _ in range(n)]


# --------------------------------------------------------------------------- shapes dataset
def test_shapes_are_bit_identical_for_equal_seeds_and_differ_for_other_seeds():
    a_images, a_labels = generate_shapes(50, 32, 10, seed=3)
    b_images, b_labels = generate_shapes(50, 32, 10, seed=3)
    c_images, _ = generate_shapes(50, 32, 10, seed=4)
    assert np.array_equal(a_images, b_images) and np.array_equal(a_labels, b_labels)
    assert a_images.dtype == np.uint8 and a_images.shape == (50, 32, 32, 3)
    assert np.mean(a_images != c_images) > 0.5


def test_train_and_val_splits_are_different_images(tmp_path):
    cfg = shapes_cfg(tmp_path, val_size=60)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert not np.array_equal(train.images, val.images)
    assert train.identity != val.identity


def test_every_class_is_present_with_balanced_counts():
    _, labels = generate_shapes(1003, 32, 12, seed=0)
    counts = np.bincount(labels, minlength=12)
    assert len(counts) == 12 and counts.max() - counts.min() <= 1


def _nearest_mean_accuracy(train_x, train_y, test_x, test_y, classes):
    means = np.stack([train_x[train_y == c].mean(0) for c in range(classes)])
    distances = ((test_x[:, None, :] - means[None]) ** 2).sum(-1)
    return float((distances.argmin(1) == test_y).mean())


def _fourier_magnitude(images):
    """Grayscale, per-image standardised (colour removed), |FFT| (position and polarity removed)."""
    gray = images.astype(np.float64).mean(-1)
    gray = (gray - gray.mean((1, 2), keepdims=True)) / (gray.std((1, 2), keepdims=True) + 1e-6)
    return np.log1p(np.abs(np.fft.fft2(gray))).reshape(len(images), -1)


def test_class_lives_in_structure_not_in_colour():
    train_x, train_y = generate_shapes(1000, 32, 10, seed=1)
    test_x, test_y = generate_shapes(500, 32, 10, seed=2)
    structure = _nearest_mean_accuracy(_fourier_magnitude(train_x), train_y, _fourier_magnitude(test_x), test_y, 10)
    mean_colour = _nearest_mean_accuracy(train_x.reshape(1000, -1, 3).mean(1), train_y,
                                         test_x.reshape(500, -1, 3).mean(1), test_y, 10)
    print(f"nearest-mean accuracy: structure {structure:.3f}, mean colour {mean_colour:.3f} (chance 0.1)")
    assert structure > 0.5
    assert mean_colour < 0.18


def test_resolution_64_renders_the_same_scene_sharper():
    small, labels_small = generate_shapes(20, 32, 10, seed=5)
    large, labels_large = generate_shapes(20, 64, 10, seed=5)
    assert large.shape == (20, 64, 64, 3) and np.array_equal(labels_small, labels_large)
    # same parameters at a finer grid: box-downsampled 64 px is close to the 32 px render
    pooled = large.reshape(20, 32, 2, 32, 2, 3).astype(np.float64).mean((2, 4))
    assert np.abs(pooled - small).mean() < 6


# --------------------------------------------------------------------------- cache
def test_cache_hit_returns_identical_arrays_and_key_tracks_parameters(tmp_path, monkeypatch):
    cfg = shapes_cfg(tmp_path)
    first = build_dataset(cfg, "train")
    assert cache_path(cfg, "train").is_file()
    monkeypatch.setattr(sources, "_BUILDERS", {})  # a second build can only come from the cache
    again = build_dataset(cfg, "train")
    assert np.array_equal(first.images, again.images) and np.array_equal(first.labels, again.labels)
    assert again.identity == first.identity and again.class_names == first.class_names
    for changed in (shapes_cfg(tmp_path, seed=1), shapes_cfg(tmp_path, resolution=48),
                    shapes_cfg(tmp_path, train_size=61), shapes_cfg(tmp_path, num_classes=9)):
        assert cache_path(changed, "train") != cache_path(cfg, "train")
    unchanged = shapes_cfg(tmp_path, augment=True, val_size=30)  # neither alters the train images
    assert cache_path(unchanged, "train") == cache_path(cfg, "train")
    assert list((tmp_path / "cache").glob("*.tmp")) == []


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VFMSTUDY_CACHE", str(tmp_path))
    assert DataConfig().cache_dir == str(tmp_path / "data")


# --------------------------------------------------------------------------- config validation
@pytest.mark.parametrize("kwargs, key", [
    ({"resolution": 8}, "resolution"),
    ({"num_classes": 13}, "num_classes"),
    ({"train_size": 5}, "train_size"),
    ({"seed": -1}, "seed"),
    ({"name": "imagefolder"}, "root"),
    ({"name": "cifar10", "root": "/x", "num_classes": 11}, "num_classes"),
])
def test_bad_config_values_name_their_key(kwargs, key):
    with pytest.raises(ConfigError) as err:
        DataConfig(**kwargs)
    assert err.value.key == key


@dataclass
class RunWithData:
    data: DataConfig = field(default_factory=DataConfig)


def test_yaml_loading_reports_the_nested_key_path():
    with pytest.raises(ConfigError, match=r"data\.resolution: must be at least 16"):
        load(RunWithData, data={"data": {"resolution": 4}})


# --------------------------------------------------------------------------- local datasets
def test_missing_cifar_files_raise_config_error_naming_the_path(tmp_path):
    cfg = DataConfig(name="cifar10", root=str(tmp_path / "nowhere"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="nowhere/cifar-10-batches-py/data_batch_1") as err:
        build_dataset(cfg, "train")
    assert err.value.key == "root" and "nothing is downloaded" in str(err.value)


def test_missing_imagefolder_raises_config_error_naming_the_path(tmp_path):
    cfg = DataConfig(name="imagefolder", root=str(tmp_path / "imnet"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="imnet/val") as err:
        build_dataset(cfg, "val")
    assert err.value.key == "root"


def _write_cifar_batch(path, rng, n):
    data = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
    labels = list(rng.integers(0, 10, size=n))
    with open(path, "wb") as handle:
        pickle.dump({b"data": data, b"labels": labels}, handle)
    return data, labels


def test_cifar10_reads_local_pickle_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        _write_cifar_batch(folder / f"data_batch_{i}", rng, 8)
    test_data, test_labels = _write_cifar_batch(folder / "test_batch", rng, 12)
    cfg = DataConfig(name="cifar10", root=str(tmp_path), train_size=0, val_size=0, cache_dir=str(tmp_path / "c"))
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert train.images.shape == (40, 32, 32, 3) and val.class_names[0] == "airplane"
    # the channel-major rows become HWC pixels: red plane first
    assert np.array_equal(val.images[3, :, :, 0].ravel(), test_data[3, :1024])
    assert val.labels.tolist() == test_labels
    subset = build_dataset(DataConfig(name="cifar10", root=str(tmp_path), train_size=0, val_size=0, num_classes=3,
                                      resolution=16, cache_dir=str(tmp_path / "c")), "val")
    assert subset.images.shape[1:] == (16, 16, 3) and set(subset.labels.tolist()) <= {0, 1, 2}


def test_tiny_imagefolder_loads_center_cropped(tmp_path):
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 3), ("val", 2)):
        for name in ("n01", "n02", "n03"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / name / f"img{i}.JPEG")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), num_classes=2, train_size=0, val_size=3,
                     resolution=16, cache_dir=str(tmp_path / "cache"))
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert train.images.shape == (6, 16, 16, 3) and train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert train.class_names == ("n01", "n02")
    assert len(val) == 3 and set(val.labels.tolist()) <= {0, 1}


# --------------------------------------------------------------------------- transforms
def test_center_crop_resizes_short_side_and_takes_the_middle():
    # left third black, middle third white, right third black: the centre crop is white
    pixels = np.zeros((60, 180, 3), dtype=np.uint8)
    pixels[:, 60:120] = 255
    out = center_crop_arr(Image.fromarray(pixels), 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    assert out[:, 2:-2].min() > 240


def test_random_crop_is_seeded_and_varies_with_the_seed():
    pixels = np.random.default_rng(0).integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    crops = [random_crop_arr(image, 32, rng=np.random.default_rng(s)) for s in range(6)]
    assert all(c.shape == (32, 32, 3) for c in crops)
    assert np.array_equal(crops[0], random_crop_arr(image, 32, rng=np.random.default_rng(0)))
    assert len({c.tobytes() for c in crops}) == 6


def test_random_crop_covers_80_to_100_percent_of_the_short_side():
    # red encodes the source column, so a crop's red span measures the fraction it covers
    ramp = np.linspace(0, 255, 100)
    pixels = np.zeros((100, 100, 3), dtype=np.uint8)
    pixels[..., 0] = np.rint(ramp)[None, :]
    image = Image.fromarray(pixels)
    fractions = []
    for s in range(40):
        red = random_crop_arr(image, 32, rng=np.random.default_rng(s))[..., 0].astype(np.float64)
        fractions.append((red[:, -1] - red[:, 0]).mean() / 255 * 99 / 31 * 32 / 100)
    assert 0.77 < min(fractions) < 0.85 and 0.95 < max(fractions) < 1.03


def test_flip_mirrors_left_right_about_half_the_time():
    arr = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    outcomes = [random_flip(arr, np.random.default_rng(s)) for s in range(400)]
    flipped = [o for o in outcomes if not np.array_equal(o, arr)]
    assert all(np.array_equal(o, arr[:, ::-1]) for o in flipped)
    assert 160 < len(flipped) < 240


def test_uint8_tensor_round_trip_is_exact():
    values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
    tensor = to_tensor_images(values)
    assert tensor.shape == (1, 3, 16, 16) and tensor.dtype == torch.float32
    assert tensor.min() == -1 and tensor.max() == 1
    assert np.array_equal(to_uint8(tensor), values)
    assert to_uint8(torch.full((1, 3, 2, 2), 3.0)).max() == 255  # out of range is clipped


# --------------------------------------------------------------------------- loaders
@pytest.fixture(scope="module")
def shapes_train(tmp_path_factory):
    cfg = DataConfig(train_size=40, val_size=10, augment=True, cache_dir=str(tmp_path_factory.mktemp("cache")))
    return build_dataset(cfg, "train")


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for (images_a, labels_a), (images_b, labels_b) in zip(first, second):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)


def test_loader_yields_normalised_batches_per_rank(shapes_train):
    images, labels = next(make_loader(shapes_train, 8, train=True, seed=0, rank=1, world=2))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and -1 <= images.min() and images.max() <= 1


def test_resumed_stream_equals_the_tail_of_an_uninterrupted_one(shapes_train):
    # 40 images / batch 8 = 5 steps per epoch: 12 steps cross two epoch boundaries
    full = take(make_loader(shapes_train, 8, train=True, seed=7), 12)
    resumed = take(make_loader(shapes_train, 8, train=True, seed=7, start_step=7), 5)
    assert_same_batches(full[7:], resumed)
    other_seed = next(make_loader(shapes_train, 8, train=True, seed=8))
    assert not torch.equal(full[0][0], other_seed[0])


def test_ranks_get_disjoint_indices_covering_an_epoch():
    keys = [StepBatchKeys(40, 8, seed=0, start_step=0, rank=r, world=4, shuffle=True) for r in range(4)]
    rows = np.concatenate([k.key(step)[0] for k in keys for step in range(5)])
    assert np.array_equal(np.sort(rows), np.arange(40))
    next_epoch = np.concatenate([k.key(5)[0] for k in keys])
    assert not np.array_equal(next_epoch, np.concatenate([k.key(0)[0] for k in keys]))


def test_global_batch_does_not_depend_on_world_size(shapes_train):
    single = next(make_loader(shapes_train, 8, train=True, seed=3, augment=False))
    halves = [next(make_loader(shapes_train, 8, train=True, seed=3, rank=r, world=2, augment=False)) for r in (0, 1)]
    assert torch.equal(single[0], torch.cat([h[0] for h in halves]))


def test_two_workers_produce_the_same_stream_as_none(shapes_train):
    inline = take(make_loader(shapes_train, 8, train=True, seed=1, start_step=3), 4)
    workers = take(make_loader(shapes_train, 8, train=True, seed=1, start_step=3, num_workers=2), 4)
    assert_same_batches(inline, workers)


def test_augmentation_changes_pixels_but_not_labels(shapes_train):
    plain = next(make_loader(shapes_train, 8, train=True, seed=2, augment=False))
    augmented = next(make_loader(shapes_train, 8, train=True, seed=2))
    assert torch.equal(plain[1], augmented[1])
    assert (plain[0] - augmented[0]).abs().mean() > 0.02


def test_eval_loaders_walk_the_data_in_order(shapes_train):
    batches = list(iterate_eval(shapes_train, 16))
    assert [len(labels) for _, labels in batches] == [16, 16, 8]
    assert np.array_equal(to_uint8(torch.cat([images for images, _ in batches])), shapes_train.images)
    ordered = next(make_loader(shapes_train, 8, train=False, seed=0))
    assert np.array_equal(to_uint8(ordered[0]), shapes_train.images[:8])


# --------------------------------------------------------------------------- streamed ImageFolder
def write_jpeg_folder(root, classes=3, per_class=8, seed=0):
    """root/train/cNN/iNN.JPEG of varied sizes; each image a distinct noise pattern."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / "train" / f"c{c:02d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            height, width = rng.integers(24, 48), rng.integers(24, 64)
            pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"i{i:02d}.JPEG", quality=95)
    return root


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory):
    return write_jpeg_folder(tmp_path_factory.mktemp("imnet"))


def folder_train(root, **kw):
    cfg = DataConfig(**{"name": "imagefolder", "root": str(root), "num_classes": 3, "train_size": 0, "val_size": 0,
                        "resolution": 16, "augment": True, "cache_dir": str(root / "cache"), **kw})
    return build_dataset(cfg, "train")


def test_imagefolder_streams_from_files_without_an_array_cache(jpeg_root):
    train = folder_train(jpeg_root)
    assert len(train) == 24 and train.images.shape == (24, 16, 16, 3)
    assert not (jpeg_root / "cache").exists()
    # the lazy view decodes exactly what the eval transform gives for that file
    with Image.open(train.path(5)) as image:
        assert np.array_equal(train.images[5], center_crop_arr(image, 16))
    assert np.array_equal(np.asarray(train.images)[[3, 7]], train.images[[3, 7]])


def test_streamed_batches_are_a_function_of_seed_step_rank_world(jpeg_root):
    train = folder_train(jpeg_root)
    first = take(make_loader(train, 8, train=True, seed=5, start_step=2, rank=1, world=2), 3)
    again = take(make_loader(train, 8, train=True, seed=5, start_step=2, rank=1, world=2, num_workers=2), 3)
    assert_same_batches(first, again)
    other_rank = take(make_loader(train, 8, train=True, seed=5, start_step=2, rank=0, world=2), 3)
    other_seed = take(make_loader(train, 8, train=True, seed=6, start_step=2, rank=1, world=2), 3)
    assert not torch.equal(first[0][0], other_rank[0][0]) and not torch.equal(first[0][0], other_seed[0][0])


def test_streamed_resume_equals_the_uninterrupted_stream(jpeg_root):
    train = folder_train(jpeg_root)
    # 24 images / batch 8 = 3 steps per epoch: 8 steps cross two epoch boundaries
    full = take(make_loader(train, 8, train=True, seed=1, rank=0, world=2), 8)
    resumed = take(make_loader(train, 8, train=True, seed=1, rank=0, world=2, start_step=5), 3)
    assert_same_batches(full[5:], resumed)


def test_streamed_ranks_partition_each_epoch(jpeg_root):
    train = folder_train(jpeg_root)
    seen = [images for rank in range(3)
            for images, _ in take(make_loader(train, 6, train=True, seed=2, rank=rank, world=3, augment=False), 4)]
    crops = sorted(to_uint8(batch)[i].tobytes() for batch in seen for i in range(len(batch)))
    assert crops == sorted(image.tobytes() for image in train.images[:])  # every image once: disjoint + covering


def test_training_crops_come_from_the_full_image_not_the_centre_square(tmp_path):
    # a wide image whose outer thirds are white and centre third black: the centre crop is all
    # black, so white pixels in a training crop can only come from cropping the full image
    folder = tmp_path / "train" / "c00"
    folder.mkdir(parents=True)
    pixels = np.full((40, 120, 3), 255, dtype=np.uint8)
    pixels[:, 40:80] = 0
    for i in range(4):
        Image.fromarray(pixels).save(folder / f"i{i}.png")
    (tmp_path / "train" / "c01").mkdir()
    Image.fromarray(pixels).save(tmp_path / "train" / "c01" / "i0.png")
    train = folder_train(tmp_path, num_classes=2)
    assert train.images[0].max() < 30
    crops = to_uint8(torch.cat([images for images, _ in take(make_loader(train, 4, train=True, seed=0), 5)]))
    assert (crops > 200).any(axis=(1, 2, 3)).mean() > 0.5


def test_unreadable_image_is_an_error_naming_the_file(tmp_path):
    root = write_jpeg_folder(tmp_path, classes=2, per_class=4)
    bad = root / "train" / "c01" / "i02.JPEG"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    train = folder_train(root, num_classes=2)
    with pytest.raises(UnreadableImageError, match=r"c01/i02\.JPEG: unreadable image .*on_unreadable: skip"):
        take(make_loader(train, 8, train=True, seed=0), 1)


def test_skipped_unreadable_images_are_replaced_counted_and_warned(tmp_path):
    root = write_jpeg_folder(tmp_path, classes=2, per_class=4)
    bad = root / "train" / "c00" / "i01.JPEG"
    bad.write_text("not an image")
    train = folder_train(root, num_classes=2, augment=False, on_unreadable="skip")
    stream = make_loader(train, 8, train=False, seed=0)  # in order: row 1 is the bad file
    with pytest.warns(UserWarning, match=r"skipped unreadable image .*c00/i01\.JPEG"):
        images, labels = next(stream)
    assert images.shape[0] == 8 and stream.skipped == {str(bad): 1}
    # row 1 is replaced by row 2 (same image, same label), every other row is itself
    expected = train.images[[0, 2, 2, 3, 4, 5, 6, 7]]
    assert np.array_equal(to_uint8(images), expected)
    assert labels.tolist() == train.labels[[0, 2, 2, 3, 4, 5, 6, 7]].tolist()
    next(stream)
    assert stream.skipped == {str(bad): 2}


_BATCH_LOOP = """
import sys, numpy as np, torch
from study.data.loader import keep_large_buffers_out_of_the_heap
if sys.argv[1] == "fixed":
    keep_large_buffers_out_of_the_heap()
def rss_mib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
keep = []
for step in range(120):
    images = torch.from_numpy(np.full((32, 256, 256, 3), step, dtype=np.uint8))
    batch = images.permute(0, 3, 1, 2).float().div(127.5).sub(1)  # as study.data.to_tensor_images
    keep.append(torch.empty(1000))  # small long-lived allocations between the large ones, as in training
    if step == 10:
        start = rss_mib()
print(rss_mib() - start)
"""


def test_converted_batches_do_not_pile_up_in_the_heap():
    """A 256-px batch of 32 converted to float is 25 MB a step. Without a fixed mmap threshold glibc
    carves those from a heap that only grows (the control below grows by over a gigabyte in 110
    steps); make_loader fixes the threshold, after which the process stays flat."""
    import subprocess
    import sys

    def growth(mode: str) -> int:
        return int(subprocess.run([sys.executable, "-c", _BATCH_LOOP, mode], capture_output=True, text=True,
                                  check=True).stdout)

    assert growth("default") > 1000
    assert growth("fixed") < 100


def test_only_streamed_image_folders_fix_the_mmap_threshold(tmp_path, jpeg_root, monkeypatch):
    """In-memory sets (32-px shapes) keep glibc's default: fixing the threshold makes CPU training
    allocate more slowly, and their batches are too small to pile up."""
    from study.data import loader

    calls = []
    monkeypatch.setattr(loader, "keep_large_buffers_out_of_the_heap", lambda: calls.append(1))
    loader.make_loader(build_dataset(shapes_cfg(tmp_path), "train"), 4, train=True, seed=0)
    assert calls == []
    loader.make_loader(folder_train(jpeg_root), 4, train=True, seed=0)
    assert calls == [1]
