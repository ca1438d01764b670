"""python -m tokenizer.vfm list | check NAME [--weights PATH] [--input-size N] [--pretrained]"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never stall on an unreachable hub from the CLI by default

import torch  # noqa: E402

from study.config import ConfigError, cli_errors  # noqa: E402

from .backbone import MissingWeightsError, VFMSpec, build_vfm, describe  # noqa: E402
from .registry import ENTRIES  # noqa: E402


def list_table() -> str:
    """One row per registry entry; models are built on the meta device, so this is cheap."""
    rows = [("name", "family", "params", "patch", "input", "grid", "width x depth", "weights")]
    for name, entry in ENTRIES.items():
        vfm = describe(name)
        rows.append((name, entry.family, f"{vfm.num_params / 1e6:.1f}M", str(vfm.patch_size),
                     str(vfm.input_size), f"{vfm.grid[0]}x{vfm.grid[1]}", f"{vfm.width} x {vfm.depth}",
                     vfm.weight_source))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def check(spec: VFMSpec, batch: int) -> str:
    start = time.perf_counter()
    vfm = build_vfm(spec)
    built = time.perf_counter() - start
    images = torch.rand(batch, 3, vfm.input_size, vfm.input_size) * 2 - 1
    start = time.perf_counter()
    levels = vfm.levels(images)
    ran = time.perf_counter() - start
    tokens = vfm.final_tokens(images)
    return "\n".join([
        f"{vfm.name}: family={vfm.family} weights={vfm.weight_source}",
        f"input {vfm.input_size}px patch {vfm.patch_size} grid {vfm.grid} width {vfm.width} depth {vfm.depth} "
        f"prefix tokens {vfm.num_prefix_tokens} params {vfm.num_params / 1e6:.1f}M",
        f"levels at blocks {vfm.level_indices}: {[tuple(t.shape) for t in levels]}",
        f"final_tokens: {tuple(tokens.shape)}",
        f"build {built:.2f}s, levels forward (batch {batch}) {ran:.2f}s",
    ])


@cli_errors(ConfigError, MissingWeightsError)
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenizer.vfm")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="registry table")
    chk = sub.add_parser("check", help="build one backbone, run one batch, print shapes and timing")
    chk.add_argument("name")
    chk.add_argument("--weights", default=None)
    chk.add_argument("--input-size", type=int, default=None)
    chk.add_argument("--pretrained", action="store_true")
    chk.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    if args.cmd == "list":
        print(list_table())
        return 0
    spec = VFMSpec(args.name, pretrained=args.pretrained, weights=args.weights, input_size=args.input_size)
    print(check(spec, args.batch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
