"""The sweep report, written from the data as one self-contained HTML file (figures inlined as
base64 PNG) and a Markdown twin (figures as files next to it).  It reads top-down:

1. the answer and its uncertainty in two or three sentences (`analysis.evidence`);
2. the run's scale and provenance (command, commit), how intervals are computed, and the
   single-seed note, once;
3. one table: each backbone x pipeline's headline metrics with their intervals;
4. the figures, each with a one-line takeaway, then its details;
5. the between-objective tests and the predictor table.

    python -m analysis.report sweeps/backbones.yaml [--out DIR] [--set baseline=inhouse:none]

The sweep engine calls `write_report(spec_path, out_dir)` when a sweep ends.
"""

from __future__ import annotations

import argparse
import base64
import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from analysis import evidence, figures, figures_tokens, predictors, stats
from analysis.figures import SERIES, Plot
from analysis.results import describe, direction, load_sweep
from analysis.screenshot import skipped_note
from study import schema as S
from study.config import ConfigError, cli_errors, load
from study.provenance import Provenance
from study.spec import load_spec

SCREENSHOT = Path(S.MLFLOW_SCREENSHOT)
N_ORDER = 10000  # bootstrap resamples for the ranking test (cheap: means of a few seeds)


@dataclass
class ReportConfig:
    baseline: Optional[str] = None  # backbone the speed-up is measured against (None: the one that ends worst)
    level: Optional[float] = None  # quality level of the speed-up (None: where the baseline ends)
    confidence: float = 0.95
    n_boot: int = 2000
    seed: int = 0


@dataclass
class Section:
    title: str
    plot: Plot
    sentences: list[str] = field(default_factory=list)
    table: Optional[pd.DataFrame] = None

    @property
    def takeaway(self) -> str:
        """The one line under the figure: its first finding, or why it was not drawn."""
        if self.plot.missing:
            return f"Not drawn: {self.plot.missing}."
        return self.sentences[0] if self.sentences else "See the figure."


# --------------------------------------------------------------------------- findings as sentences
def _pct(cfg: ReportConfig) -> str:
    return f"{cfg.confidence:.0%}".replace("%", " %")


def bar_sentences(table: pd.DataFrame, cfg: ReportConfig) -> list[str]:
    """Per metric and pipeline: the best backbone with its seed interval, and whether its lead
    over the runner-up survives both a bootstrap over seeds and Welch's t-test."""
    out = []
    for (metric, series), g in table.groupby(["metric", SERIES], sort=False):
        lower = direction(metric) != "max"
        g = g.sort_values("mean", ascending=lower)
        first = g.iloc[0]
        best = "lowest" if lower else "highest"
        text = (f"{series}: {first[S.BACKBONE]} has the {best} {metric} "
                f"({stats.Interval(first['mean'], first['ci'], first['n']).text()}, n = {first['n']})")
        if len(g) > 1:
            second = g.iloc[1]
            text += (f"; runner-up {second[S.BACKBONE]} "
                     f"({stats.Interval(second['mean'], second['ci'], second['n']).text()}); ")
            text += _ranking(first["values"], second["values"], cfg)
        out.append(text + ".")
    return out


def _ranking(a: list, b: list, cfg: ReportConfig) -> str:
    if min(len(a), len(b)) < 2:
        return "the ranking of the top two cannot be tested with a single seed"
    boot = stats.bootstrap_order_p(a, b, N_ORDER, cfg.seed)
    welch = stats.welch_p(a, b)  # nan when both groups have no spread: then not significant
    alpha = 1 - cfg.confidence
    verdict = "is" if boot < alpha and welch < alpha else "is not"
    return (f"the ranking of the top two {verdict} significant (bootstrap p {stats.p_text(boot, N_ORDER)}, "
            f"Welch t-test p = {welch:.3g})")


def correlation_sentences(numbers: dict, cfg: ReportConfig) -> list[str]:
    out = []
    points = numbers["points"]
    for _, c in numbers["correlations"].iterrows():
        families = sorted(points.loc[points["kind"] == c["kind"], S.FAMILY].unique())
        zero = " — the interval includes 0" if c["low"] <= 0 <= c["high"] else ""
        out.append(f"{c['kind']}: {c['x']} vs {c['y']} across {c['n']} backbones (families: {', '.join(families)}): "
                   f"Spearman ρ = {c['rho']:.2f}, {_pct(cfg)} bootstrap CI [{c['low']:.2f}, {c['high']:.2f}] "
                   f"(p = {c['p']:.2g}){zero}.")
    return out


def speedup_sentences(numbers: dict, cfg: ReportConfig, metric: str) -> list[str]:
    out = []
    for _, s in numbers["speedups"].iterrows():
        where = "where it ends" if cfg.level is None else "the configured level"
        if not np.isfinite(s["speedup"]):  # the best curve starts at the level: no ratio to give
            out.append(f"{s['kind']}: {s['best']} is at {metric} = {s['level']:.3g} ({where} for {s['baseline']}) "
                       f"at its first evaluation (step {s['steps_best']:.0f}), so the speed-up is not resolved "
                       f"(evaluate the generator earlier and more often: generator.train.eval_every).")
            continue
        if s["best"] == s["baseline"]:  # no other backbone reaches the baseline's level at all
            out.append(f"{s['kind']}: no backbone reaches {metric} = {s['level']:.3g} ({where} for {s['baseline']}) "
                       f"sooner than {s['baseline']} itself (step {s['steps_best']:.0f}): no speed-up to report.")
            continue
        out.append(f"{s['kind']}: {s['best']} reaches {metric} = {s['level']:.3g} ({where} for {s['baseline']}) after "
                   f"{s['steps_best']:.0f} steps vs {s['steps_baseline']:.0f} for {s['baseline']}: "
                   f"{s['speedup']:.2f}× faster ({_pct(cfg)} bootstrap CI over seeds "
                   f"[{s['low']:.2f}, {s['high']:.2f}]).")
    return out


def guidance_sentences(table: pd.DataFrame, cfg: ReportConfig) -> list[str]:
    return [f"{r[S.BACKBONE]} {r[SERIES]}: guidance moves {figures.GUIDANCE[0]} from "
            f"{stats.Interval(r['plain_mean'], r['plain_ci'], r['n']).text()} to "
            f"{stats.Interval(r['guided_mean'], r['guided_ci'], r['n']).text()} "
            f"(paired improvement {stats.Interval(r['gain_mean'], r['gain_ci'], r['n']).text()} over {r['n']} runs)."
            for _, r in table.iterrows()]


def ablation_sentences(table: pd.DataFrame, factor: str) -> list[str]:
    out = []
    for (metric, backbone, series), g in table.groupby(["metric", S.BACKBONE, SERIES]):
        lower = direction(metric) != "max"
        best = g.sort_values("mean", ascending=lower).iloc[0]
        levels = "; ".join(f"{factor}={r[factor]}: {stats.Interval(r['mean'], r['ci'], r['n']).text()}"
                           for _, r in g.iterrows())
        out.append(f"{metric}, {backbone} {series}: best at {factor}={best[factor]} ({levels}).")
    return out


def usage_sentences(table: pd.DataFrame) -> list[str]:
    out = []
    for metric, g in table.groupby("metric", sort=False):
        best = g.loc[g["mean"].idxmax()]
        out.append(f"{best[S.BACKBONE]} uses its codebook most by {metric} "
                   f"({stats.Interval(best['mean'], best['ci'], best['n']).text()}, n = {best['n']}).")
    return [" ".join(out)]


def points_sentences(table: pd.DataFrame) -> list[str]:
    far = table.loc[table["mean_reach"].idxmax()]
    return [f"The queries of {far[S.BACKBONE]} reach farthest from their anchor cells "
            f"({far['mean_reach']:.3g} image widths, attention-weighted; "
            f"{table['outside_share'].max():.0%} of attention at most falls outside the image)."]


# --------------------------------------------------------------------------- sections
def build_sections(runs: pd.DataFrame, fig_dir: Path, cfg: ReportConfig) -> list[Section]:
    """Draw every figure and say what it shows (or what data it lacks)."""
    kw = {"confidence": cfg.confidence}
    bars = figures.backbone_bars(runs, fig_dir, **kw)
    scatter = figures.family_scatter(runs, fig_dir, n_boot=cfg.n_boot, seed=cfg.seed, **kw)
    conv = figures.convergence(runs, fig_dir, baseline=cfg.baseline, level=cfg.level,
                               n_boot=min(cfg.n_boot, 1000), seed=cfg.seed, **kw)
    guide = figures.guidance(runs, fig_dir, **kw)
    sections = [
        Section("Per-backbone quality", bars, [] if bars.missing else bar_sentences(bars.numbers, cfg),
                _shown(bars.numbers)),
        Section("Objective family vs tokenizer quality", scatter,
                [] if scatter.missing else correlation_sentences(scatter.numbers, cfg),
                None if scatter.missing else scatter.numbers["correlations"]),
        Section("Convergence of the generators", conv,
                [] if conv.missing else speedup_sentences(conv.numbers, cfg, figures.CONVERGENCE),
                None if conv.missing else conv.numbers["speedups"]),
        Section("With vs without guidance", guide, [] if guide.missing else guidance_sentences(guide.numbers, cfg),
                guide.numbers if not guide.missing else None),
    ]
    for factor, title in ((S.NUM_QUERIES, "Token-count ablation"), (S.SAMPLER, "Region vs grid sampler"),
                          (S.SEMANTIC, "Semantic branch on/off")):
        plot = figures.ablation(runs, fig_dir, factor, **kw)
        sections.append(Section(title, plot, [] if plot.missing else ablation_sentences(plot.numbers, factor),
                                _shown(plot.numbers)))
    usage = figures_tokens.token_usage_figure(figures.main_setting(runs), fig_dir, confidence=cfg.confidence)
    sections.append(Section("Token usage", usage, [] if usage.missing else usage_sentences(usage.numbers),
                            _shown(usage.numbers)))
    points = figures_tokens.sampling_points_figure(figures_tokens.run_points(runs, fig_dir / "artifacts"), fig_dir)
    sections.append(Section("Where the queries look", points, [] if points.missing else points_sentences(points.numbers),
                            None if points.missing else points.numbers))
    for name, title in ((S.RECONSTRUCTIONS_GRID, "Reconstructions"), (S.SAMPLES_GRID, "Samples")):
        plot = figures.image_grids(runs, fig_dir, name)
        sections.append(Section(title, plot, table=None if plot.missing else plot.numbers[[S.BACKBONE, SERIES, "run_id"]]))
    return sections


def _shown(table: pd.DataFrame) -> Optional[pd.DataFrame]:
    return table.drop(columns=["values"], errors="ignore") if len(table) else None


# --------------------------------------------------------------------------- writing
def _fmt(value) -> str:
    if isinstance(value, (float, np.floating)):
        return "" if np.isnan(value) else f"{value:.4g}"
    return str(value)


def markdown_table(table: pd.DataFrame) -> str:
    head = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "---|" * len(table.columns)
    body = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def html_table(table: pd.DataFrame) -> str:
    return table.map(_fmt).to_html(index=False, border=0, classes="numbers")


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


@dataclass
class Block:
    """One headed part of the page: sentences, then an optional figure and table."""
    title: str
    sentences: list[str] = field(default_factory=list)
    image: Optional[Path] = None
    table: Optional[pd.DataFrame] = None
    level: int = 2
    paragraph: bool = False  # the sentences read as one paragraph (the answer), else one paragraph each


def blocks(ev: evidence.Evidence, notes: list[str], sections: list[Section],
           cfg: ReportConfig) -> list[Block]:
    """The report top-down: answer, scale and notes, the one table, figures, tests, predictors."""
    out = [Block("Answer", ev.answer, paragraph=True), Block("Scale and how to read it", notes),
           Block("Results", table=ev.table if len(ev.table) else None,
                 sentences=[] if len(ev.table) else ["No run has a headline metric yet."]),
           Block("Figures")]
    for sec in sections:
        details = sec.sentences[1:] if not sec.plot.missing else []
        out.append(Block(sec.title, [f"Takeaway: {sec.takeaway}", *details], sec.plot.path, sec.table, level=3))
    untested = [f"{series}, {metric}: {why}." for (series, metric), why in ev.untested.items()]
    out.append(Block("Above the floors: chance and the class-mean image", ev.floor_sentences,
                     table=ev.floors if len(ev.floors) else None))
    tested = [f"{series}: {sentence}" for series, sentence in zip(ev.tests[SERIES], ev.tests["sentence"])]
    out.append(Block("Between-objective tests", [*tested, *untested],
                     table=ev.groups if len(ev.groups) else None))
    display = (predictors.predictor_display(ev.predictors.assign(property=ev.predictors["property"] + " ("
                                                                  + ev.predictors[SERIES] + ")"), cfg.confidence)
               if len(ev.predictors) else None)
    out.append(Block("What predicts quality", [ev.verdict] if ev.verdict else
                     ["No backbone property and quality metric were logged together."], table=display))
    return out


def render(title: str, parts: list[Block], screenshot: Optional[Path], out_dir: Path,
           left_out: Optional[str] = None) -> tuple[str, str]:
    """(HTML, Markdown) of the report; Markdown links figures relative to `out_dir`."""
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
         "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}img{max-width:100%}"
         "table.numbers{border-collapse:collapse;font-size:12px}table.numbers td,table.numbers th"
         "{padding:2px 8px;border-bottom:1px solid #ddd}.missing{color:#a33}</style></head><body>",
         f"<h1>{html.escape(title)}</h1>"]
    md = [f"# {title}", ""]
    for part in parts:
        h.append(f"<h{part.level}>{html.escape(part.title)}</h{part.level}>")
        md += [f"{'#' * part.level} {part.title}", ""]
        if part.image is not None:
            h.append(_img(part.image, part.title))
            md += [f"![{part.title}]({part.image.relative_to(out_dir)})", ""]
        h += [f"<p>{html.escape(s)}</p>" for s in part.sentences]
        if part.sentences:
            md += [" ".join(part.sentences), ""] if part.paragraph else [line for s in part.sentences for line in (s, "")]
        if part.table is not None and len(part.table):
            h.append(html_table(part.table))
            md += [markdown_table(part.table), ""]
    if screenshot is not None:
        h += ["<h2>MLflow UI: the sweep's runs compared</h2>", _img(screenshot, "MLflow compare view")]
        md += ["## MLflow UI: the sweep's runs compared", "", f"![MLflow compare view]({SCREENSHOT})", ""]
    elif left_out:
        h += ["<h2>MLflow UI: the sweep's runs compared</h2>", f"<p class='missing'>{html.escape(left_out)}</p>"]
        md += ["## MLflow UI: the sweep's runs compared", "", f"*{left_out}*", ""]
    h.append("</body></html>")
    return "\n".join(h), "\n".join(md)


def provenance_note(run: Optional[Provenance], earlier: list[Provenance]) -> str:
    """The command and commit that produced the numbers (and commits of earlier runs whose cached
    stages they may include)."""
    if run is None:
        return "Produced by: not recorded (the study's manifest predates the record of its runs)."
    commit = f"`{run.commit}`" if run.commit else "none (the code was not a git checkout)"
    text = f"Produced by `{run.command}` at commit {commit}"
    text += " with uncommitted changes to tracked files" if run.dirty else ""
    text += f", started {run.started}" if run.started else ""
    text += f" on a host with {run.cpu_count} CPUs" if run.cpu_count else ""
    others = sorted({r.commit for r in earlier if r.commit and r.commit != run.commit})
    if others:
        text += f". Earlier runs of this study, whose cached stages these results may include, ran at " \
                f"{', '.join(f'`{c}`' for c in others)}"
    return text + "."


def latest_run(runs: pd.DataFrame) -> Optional[Provenance]:
    recorded = runs.attrs.get("provenance") or []
    return recorded[-1] if recorded else None


def scale_notes(runs: pd.DataFrame, ev: evidence.Evidence, cfg: ReportConfig,
                run: Optional[Provenance] = None) -> list[str]:
    """The run's scale and provenance, how its numbers are made, and the single-seed note: said
    once, here. `run` replaces the latest run the manifest records (the results page's flags)."""
    notes = [f"Scale: {describe(runs)}. Tracking store: {runs.attrs.get('tracking_uri')}.",
             provenance_note(run or latest_run(runs), (runs.attrs.get("provenance") or [])[:-1]),
             f"Intervals: mean [low, high] or mean ± half-width, {_pct(cfg)} Student-t over seeds; with few seeds "
             f"the bootstrap p-values are coarse, so a ranking is called significant only when Welch's t-test agrees.",
             "fd_ref / rfd_ref are Fréchet distances in the project's reference-classifier feature space (an offline "
             "proxy, not FID); generation metrics are measured on samples whose labels follow the label_sampling "
             "column of the table.",
             "Deviations from the paper's recipe are listed item by item in docs/fidelity.md (python -m study.fidelity)."]
    if ev.single_seed:
        notes.append("Note: some cells ran 1 seed, so their numbers carry no interval (1 seed, no interval): such a "
                     "run shows which backbones clear chance and the class-mean image (see Above the floors), not "
                     "which backbone is best.")
    return notes


def report(runs: pd.DataFrame, out_dir: Path, cfg: Optional[ReportConfig] = None) -> Path:
    """Write report.html and report.md for a loaded runs frame into `out_dir`; return the HTML path."""
    cfg = cfg or ReportConfig()
    out_dir = Path(out_dir)
    sections = build_sections(runs, out_dir / "figures", cfg)
    ev = evidence.gather(runs, confidence=cfg.confidence, n_boot=cfg.n_boot, seed=cfg.seed)
    screenshot = out_dir / SCREENSHOT
    name = runs.attrs.get("experiment", "sweep")
    left_out = None
    if not screenshot.is_file() and skipped_note(screenshot).is_file():
        left_out = f"MLflow UI screenshot skipped: {skipped_note(screenshot).read_text().strip()}"
    title = f"vfmstudy report: {name}"
    page, md = render(title, blocks(ev, scale_notes(runs, ev, cfg), sections, cfg),
                      screenshot if screenshot.is_file() else None, out_dir, left_out)
    (out_dir / "report.md").write_text(md)
    path = out_dir / "report.html"
    path.write_text(page)
    return path


def default_out_dir(source: str | Path) -> Path:
    """<study folder>/report: a folder source is the study folder; a spec names its study_dir."""
    if Path(source).is_dir():
        return Path(source) / S.REPORT_DIR
    return load_spec(source).root / S.REPORT_DIR


def write_report(spec_path: str | Path, out_dir: Optional[str | Path] = None,
                 cfg: Optional[ReportConfig] = None, experiment: Optional[str] = None) -> Path:
    """Load the sweep at `spec_path` (spec, study folder, or tracking URI with `experiment`) and
    write its report; return the path of report.html."""
    if out_dir is None:
        out_dir = default_out_dir(spec_path)
    return report(load_sweep(spec_path, experiment), Path(out_dir), cfg)


@cli_errors(ConfigError, FileNotFoundError, LookupError, ValueError)
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="sweep spec YAML, study folder, or tracking URI (with --experiment)")
    parser.add_argument("--out", help="output folder (default: <study folder>/report)")
    parser.add_argument("--experiment", help="MLflow experiment name (default: from the spec)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="report option, e.g. --set baseline=inhouse:none --set level=40")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per grid is noise
    cfg = load(ReportConfig, None, args.overrides)
    if args.out is None and "://" in args.sweep:
        raise ConfigError("a tracking URI needs --out DIR", source=args.sweep)
    path = write_report(args.sweep, args.out, cfg, args.experiment)
    print(f"report: {path.resolve()}\n        {path.with_suffix('.md').resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
