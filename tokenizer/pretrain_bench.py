"""Pretrain every objective at one preset and print what each backbone learned:

    python -m tokenizer.pretrain_bench tokenizer/configs/pretrain_tiny.yaml [--set ...] [--objectives dino,mae]

Same config for all (only `objective` differs). Prints objective, wall time (training only),
final loss (mean of the last 10 % of steps), kNN and linear-probe accuracy, effective rank and
uniformity of the val features (mean of the final patch tokens), the total wall time, and
writes the rows to <train.out_dir>/bench.json. Wall times depend on the machine's load:
report them with `os.getloadavg()`, which the table's footer prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from study.config import load_or_exit
from tokenizer.objectives import OBJECTIVES
from tokenizer.pretrain import PretrainConfig, pretrain

COLUMNS = (("objective", "{:<12}"), ("wall_s", "{:>8.1f}"), ("final_loss", "{:>10.4f}"), ("knn_acc", "{:>8.3f}"),
           ("linear_acc", "{:>10.3f}"), ("effective_rank", "{:>14.2f}"), ("uniformity", "{:>10.3f}"))


def run(cfg: PretrainConfig, objectives: list[str]) -> list[dict]:
    rows = []
    for name in objectives:
        _, metrics = pretrain(dataclasses.replace(cfg, objective=name))
        row = {"objective": name, "wall_s": metrics["wall_time_s"], **metrics}
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(row: dict) -> str:
    return "  ".join(fmt.format(row.get(key, float("nan"))) for key, fmt in COLUMNS)


def header() -> str:
    widths = [len(fmt.format("" if key == "objective" else 0.0)) for key, fmt in COLUMNS]
    return "  ".join(f"{key:<{w}}" if key == "objective" else f"{key:>{w}}" for (key, _), w in zip(COLUMNS, widths))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokenizer.pretrain_bench")
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES), help="comma-separated subset")
    args = parser.parse_args(argv)
    cfg = load_or_exit(PretrainConfig, args.config, args.overrides)
    objectives = [o for o in args.objectives.split(",") if o]
    print(header(), flush=True)
    start = time.perf_counter()
    rows = run(cfg, objectives)
    total = time.perf_counter() - start
    load = os.getloadavg()
    print(f"total wall time {total:.1f} s (training + evaluation, {len(rows)} objectives); "
          f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} CPUs")
    out = Path(cfg.train.out_dir) / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"total_wall_s": total, "loadavg": load, "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
