"""Memory and speed of the streamed ImageFolder (a measurement, not a test: it writes thousands
of JPEGs).

    python -m study.data.bench memory [--images 20000] [--small 2000] [--dir /tmp/vfmstudy-jpegs]
        [--steps 300] [--batch 32] [--workers 2] [--resolution 256] [--out FILE.json]

Writes two ImageNet-like folders (JPEGs of varied sizes around 500x375, 2,000 distinct
contents), streams each one
through the augmented training loader (random resize-crop + flip of the full image) in a fresh
process, and reports the peak memory of the loading process tree and images/s per worker.  The
claim under test: peak memory does not grow with the number of images.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from io import BytesIO
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from study.data.config import DataConfig
from study.data.loader import make_loader
from study.data.sources import build_dataset

GIB = 2 ** 30
CLASSES = 100


def _noise_tile() -> np.ndarray:
    """int16 (600, 600, 3) Gaussian-like noise, sigma ~6, the same in every process."""
    return np.random.default_rng(0).normal(0, 6, size=(600, 600, 3)).round().astype(np.int16)


NOISE = _noise_tile()


def imagenet_like_jpeg(seed: int) -> bytes:
    """A smooth random scene plus sensor-like noise, so that JPEG sizes (tens of kB) are close to
    ImageNet's; width x height drawn around 500x375, portrait one time in four."""
    rng = np.random.default_rng(seed)
    width, height = int(rng.integers(400, 601)), int(rng.integers(300, 451))
    if rng.random() < 0.25:
        width, height = height, width
    coarse = rng.integers(0, 256, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    top, left = int(rng.integers(0, 601 - height)), int(rng.integers(0, 601 - width))
    pixels = np.clip(smooth + NOISE[top:top + height, left:left + width], 0, 255).astype(np.uint8)
    buffer = BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_imagenet_like(root: Path, n: int, distinct: int = 2000, processes: int = 2) -> Path:
    """root/train/nXXXXXXXX/*.JPEG: n files over 100 classes; file i holds image i % distinct
    (encoding is the slow part, and every file is still read and decoded on its own).  Reused
    when already complete."""
    marker = root / f".complete-{n}"
    if marker.is_file():
        return root
    with ProcessPoolExecutor(processes) as pool:
        blobs = list(pool.map(imagenet_like_jpeg, range(min(n, distinct)), chunksize=64))
    for c in range(CLASSES):
        (root / "train" / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / "train" / f"n{i % CLASSES:08d}" / f"img_{i:08d}.JPEG").write_bytes(blobs[i % len(blobs)])
    marker.write_text(json.dumps({"images": n, "distinct": len(blobs),
                                  "mean_bytes": float(np.mean([len(b) for b in blobs]))}))
    return root


class PeakMemory:
    """Samples the summed RSS and PSS of this process and all its descendants (loader workers)
    in a background thread.  Summed RSS counts pages shared after fork once per process, so it
    bounds the true footprint from above; PSS splits shared pages between their users."""

    def __init__(self, interval_s: float = 0.1):
        self.interval_s, self.rss, self.pss = interval_s, 0, 0
        self.rss_breakdown_mib: list[tuple[int, int]] = []  # (rss, pss) per process at the RSS peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            per_process = []
            for process in [me, *me.children(recursive=True)]:
                try:
                    info = process.memory_full_info()
                except psutil.Error:  # a worker that just exited
                    continue
                per_process.append((info.rss, info.pss))
            rss, pss = sum(r for r, _ in per_process), sum(p for _, p in per_process)
            if rss > self.rss:
                self.rss_breakdown_mib = [(round(r / 2 ** 20), round(p / 2 ** 20)) for r, p in per_process]
            self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
            self._stop.wait(self.interval_s)


def stream_rate(root: Path, *, steps: int, batch: int, workers: int, resolution: int) -> dict:
    """Stream `steps` augmented training batches of the folder; images/s and peak memory."""
    cfg = DataConfig(name="imagefolder", root=str(root), num_classes=CLASSES, train_size=0, val_size=0,
                     resolution=resolution, augment=True)
    with PeakMemory() as memory:
        dataset = build_dataset(cfg, "train")
        stream = make_loader(dataset, batch, train=True, seed=0, num_workers=workers)
        next(stream)  # workers started, first batches in flight
        start = time.perf_counter()
        for _ in range(steps):
            next(stream)
        elapsed = time.perf_counter() - start
        del stream
    rate = steps * batch / elapsed
    return {"images": len(dataset), "steps": steps, "batch": batch, "workers": workers, "resolution": resolution,
            "images_per_s": round(rate, 1), "images_per_s_per_worker": round(rate / max(workers, 1), 1),
            "peak_rss_gib": round(memory.rss / GIB, 3), "peak_pss_gib": round(memory.pss / GIB, 3),
            "at_rss_peak_mib": memory.rss_breakdown_mib}


def _stream_in_fresh_process(root: Path, args: argparse.Namespace) -> dict:
    """A fresh interpreter per folder, so one measurement's peak cannot carry over to the other."""
    command = [sys.executable, "-m", "study.data.bench", "stream", "--root", str(root), "--steps", str(args.steps),
               "--batch", str(args.batch), "--workers", str(args.workers), "--resolution", str(args.resolution)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def memory_benchmark(args: argparse.Namespace) -> dict:
    results = {}
    for n in (args.small, args.images):
        root = write_imagenet_like(Path(args.dir) / f"jpegs-{n}", n, processes=args.workers)
        results[n] = _stream_in_fresh_process(root, args)
        print(json.dumps(results[n]), flush=True)
    small, large = results[args.small], results[args.images]
    growth = large["peak_rss_gib"] / small["peak_rss_gib"] - 1
    return {"small": small, "large": large, "rss_growth": round(growth, 4),
            "pass_under_1_5_gib": large["peak_rss_gib"] < 1.5, "pass_within_10_percent": abs(growth) <= 0.10}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m study.data.bench")
    parser.add_argument("command", choices=["memory", "stream"])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--dir", default="/tmp/vfmstudy-jpegs")
    parser.add_argument("--root", help="stream: an existing folder written by `memory`")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--out", help="also write the JSON summary here")
    args = parser.parse_args(argv)
    if args.command == "stream":
        result = stream_rate(Path(args.root), steps=args.steps, batch=args.batch, workers=args.workers,
                             resolution=args.resolution)
    else:
        result = memory_benchmark(args)
    text = json.dumps(result, indent=None if args.command == "stream" else 2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
