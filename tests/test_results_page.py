"""docs/results.md shows exactly the numbers of its committed results file.

The lead generates the real page from a complete objectives run; until it is committed, the
generator runs on the micro real chain's study and its output is checked the same way."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from analysis.report import ReportConfig
from analysis.results import load_sweep
from analysis.results_page import FOLDER, PAGE, RESULTS_FILE, fmt, main, produced_by, write_page
from study import ledger, provenance

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "docs" / PAGE
NUMBER = re.compile(r"(?<![\w.:/-])[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?%?(?![\w/])")


@pytest.fixture(scope="module")
def page(request, tmp_path_factory) -> tuple[str, dict, Path]:
    """(page text, results file, docs folder): the committed page, or a fresh one of the micro study."""
    if COMMITTED.is_file():
        docs = COMMITTED.parent
    else:
        docs = tmp_path_factory.mktemp("docs")
        write_page(request.getfixturevalue("micro_study")["root"], docs, command="python -m study.sweep micro.yaml",
                   commit="0" * 40, cfg=ReportConfig(n_boot=100))
    return (docs / PAGE).read_text(), json.loads((docs / FOLDER / RESULTS_FILE).read_text()), docs


def _numbers(value) -> set[str]:
    """Every number the results file holds, as the page writes it (numbers inside sentences as written)."""
    if isinstance(value, dict):
        return set().union(*map(_numbers, value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*map(_numbers, value)) if value else set()
    if isinstance(value, str):
        return set(NUMBER.findall(value))
    return {fmt(value)}


def _shown_numbers(text: str) -> list[str]:
    """Numbers a reader sees: code spans (command, commit) and link targets are not numbers."""
    text = re.sub(r"`[^`]*`", "", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return NUMBER.findall(text)


def _table_after(text: str, heading: str) -> list[list[str]]:
    block = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in block.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_every_number_on_the_results_page_is_in_its_results_file(page):
    text, results, docs = page
    known = _numbers(results)
    shown = _shown_numbers(text)
    assert shown, "the page shows no numbers"
    assert [n for n in shown if n not in known] == []
    # the one table, cell by cell
    table = _table_after(text, "Results")
    assert table[0] == list(results["table"][0])
    assert table[2:] == [[fmt(v) for v in row.values()] for row in results["table"]]
    for figure in results["figures"]:
        if figure["file"]:
            assert (docs / FOLDER / figure["file"]).is_file()
            assert f"({FOLDER}/{figure['file']})" in text
    assert f"`{results['provenance']['command']}`" in text and f"`{results['provenance']['commit']}`" in text


def test_the_page_opens_with_the_answer_and_compares_with_the_paper(page):
    text, results, _ = page
    sections = re.findall(r"^## (.+)$", text, re.M)
    assert sections[:4] == ["Answer", "Scale and how to read it", "Results", "Comparison with the paper"]
    assert 2 <= len(results["answer"]) <= 3 and results["verdict"] in results["answer"]
    assert results["comparison"] and "global contrastive" in results["paper_claim"]


def test_a_changed_number_on_the_page_is_caught(page):
    text, results, _ = page
    head, table = text.split("## Results\n", 1)
    first = _shown_numbers(table)[0]
    tampered = head + "## Results\n" + table.replace(first, "987654.3", 1)
    assert [n for n in _shown_numbers(tampered) if n not in _numbers(results)] == ["987654.3"]


def test_the_page_states_once_with_the_scale_the_command_and_commit_the_manifest_records(micro_study, tmp_path):
    recorded = provenance.recorded(ledger.read_manifest(micro_study["root"], "micro"))
    assert recorded and recorded[-1].command == f"python -m study.sweep {micro_study['spec']} --quiet"
    latest = recorded[-1]
    page = write_page(micro_study["root"], tmp_path, cfg=ReportConfig(n_boot=50))
    results = json.loads((tmp_path / FOLDER / RESULTS_FILE).read_text())
    assert results["provenance"] == dataclasses.asdict(latest)
    text = page.read_text()
    scale = text.split("## Scale and how to read it\n", 1)[1].split("\n## ", 1)[0]
    for value in (latest.command, *([latest.commit] if latest.commit else [])):
        assert text.count(f"`{value}`") == 1 and f"`{value}`" in scale, value
    assert f"on a host with {latest.cpu_count} CPUs" in scale
    # the flags replace what the manifest says; a commit given by hand says nothing of local changes
    given = produced_by(load_sweep(micro_study["root"]), None, "f" * 40)
    assert (given.command, given.commit, given.dirty) == (latest.command, "f" * 40, None)


def test_cli_names_a_missing_study(tmp_path, capsys):
    assert main([str(tmp_path / "absent"), "--out", str(tmp_path)]) == 2
    assert "absent" in capsys.readouterr().err
