"""Throughput of the feature extractors behind the metrics (images/s), on GPU if present.

    python -m study.metrics.bench [--n 32] [--batch 16] [--size 32] [--device auto]

Extractors: the reference CNN (random init: speed does not depend on training), a tiny random
VFM (`random:vit_tiny_p4` from tokenizer.vfm), and torch-fidelity's Inception-v3 at random
init (the real weights cost the same; its input is resized to 299, so the cost per image does not
depend on --size). Prints one line per extractor and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from study.metrics.common import pick_device


def _rate(fn, images: torch.Tensor, batch: int, device: torch.device) -> float:
    fn(images[:batch])  # warm-up (allocations, cudnn autotune)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        fn(images[i:i + batch])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - start)


def run(n: int = 32, batch: int = 16, size: int = 32, device: str = "auto",
        vfm: str = "random:vit_tiny_p4") -> dict[str, float]:
    dev = pick_device(device)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, size, size, generator=gen) * 2 - 1
    out: dict[str, float] = {}

    from study.metrics.reference import RefCNN

    ref = RefCNN(10).to(dev).eval()
    with torch.no_grad():
        out["ref_cnn"] = _rate(lambda x: ref.features(x.to(dev)), images, batch, dev)

    try:
        from tokenizer.vfm import build_vfm

        model = build_vfm(vfm).to(dev)
        out[f"vfm:{vfm}"] = _rate(lambda x: model.final_tokens(x.to(dev)), images, batch, dev)
    except Exception as err:  # the registry may not offer this name on this checkout
        print(f"vfm {vfm}: skipped ({type(err).__name__}: {err})")

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from study.metrics.fid import random_inception_weights

    with tempfile.TemporaryDirectory() as tmp:
        path = random_inception_weights(f"{tmp}/inception_random.pth", calib_images=2)
        inception = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                feature_extractor_weights_path=str(path)).to(dev)
    u8 = ((images + 1) * 127.5).round().to(torch.uint8)
    with torch.no_grad():
        out["inception_v3_random_init"] = _rate(lambda x: inception(x.to(dev)), u8, batch, dev)

    for name, rate in out.items():
        print(f"{name:32s} {rate:10.1f} images/s  ({dev.type}, batch {batch}, input {size}px, "
              f"{torch.get_num_threads()} threads)")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m study.metrics.bench")
    parser.add_argument("--n", type=int, default=32, help="images per extractor")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32, help="input resolution")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--vfm", default="random:vit_tiny_p4")
    args = parser.parse_args(argv)
    result = run(args.n, args.batch, args.size, args.device, args.vfm)
    print(json.dumps({"device": str(pick_device(args.device)), "images_per_s": result}))


if __name__ == "__main__":
    main()
