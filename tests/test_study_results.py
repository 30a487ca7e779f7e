"""The committed study reports are what the current code makes of their per-seed values: no number
in ``study/results`` is left behind by a change to the statistics, the rendering or a metric's
definition (the guide: a number the current code would no longer produce is a bug)."""

import json
from pathlib import Path

import pytest

from evaluation.compare.metrics.base import all_metrics
from evaluation.compare.report import render_markdown
from study.restat import measured_versions, plots_named_in, restated

RESULTS = Path(__file__).resolve().parents[1] / "study" / "results"
REPORTS = sorted(RESULTS.glob("*/report*.json"))


def test_the_reports_are_found():
    assert len(REPORTS) >= 10, REPORTS


def _stale(recorded: list[dict]) -> list[str]:
    """The recorded metrics whose version is not the code's, as --restat names them."""
    return measured_versions([{"name": m.name, "version": m.version} for m in all_metrics()], recorded)[1]


@pytest.mark.parametrize("path", REPORTS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_metric_is_at_the_codes_version(path):
    stale = _stale(json.loads(path.read_text())["metrics"])
    assert not stale, f"{path.parent.name} holds values of earlier metric definitions: re-measure {stale}"


def _differences(a, b, where: str = "", rtol: float = 1e-9) -> list[str]:
    """Where two JSON values differ; numbers within ``rtol`` count as equal (another scipy or numpy
    may round the last bits of a p-value or a mean differently)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(a.keys() ^ b.keys())}"]
        return [d for k in a for d in _differences(a[k], b[k], f"{where}/{k}", rtol)]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}[{i}]", rtol)]
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return [] if a == pytest.approx(b, rel=rtol, abs=1e-300, nan_ok=True) else [f"{where}: {a!r} vs {b!r}"]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


@pytest.mark.parametrize("path", REPORTS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_statistics_are_the_current_codes(path):
    committed = json.loads(path.read_text())
    rebuilt, _ = restated(committed)
    differences = _differences(rebuilt, committed)
    assert not differences, \
        f"{path.parent.name}: run `python study/run_study.py --restat --tasks {path.parent.name}`: {differences[:5]}"


@pytest.mark.parametrize("path", REPORTS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_the_markdown_is_rendered_from_the_json(path):
    markdown = path.with_suffix(".md").read_text()
    rendered = render_markdown(json.loads(path.read_text()), plots_named_in(markdown))
    # the committed rows may be in another order (the baseline row first); the lines must be the same
    assert sorted(rendered.splitlines()) == sorted(markdown.splitlines())


def test_the_checks_catch_a_stale_report():
    path = RESULTS / "modular_addition" / "report.json"
    committed = json.loads(path.read_text())
    edited = json.loads(path.read_text())
    variant = next(v for v in edited["variants"] if v != edited["baseline"])
    edited["variants"][variant]["metrics"]["accuracy"]["values"][0] -= 0.05  # a re-measured value, stats not rebuilt
    assert _differences(restated(edited)[0], edited)  # the means, p-values and verdicts the edit left behind
    assert not _differences(restated(committed)[0], committed)
    assert _differences({"p": 0.05}, {"p": 0.05 * (1 + 1e-6)}) and not _differences({"p": 0.05}, {"p": 0.05 * (1 + 1e-12)})
    markdown = path.with_suffix(".md").read_text()
    edited_md = render_markdown(restated(edited)[0], plots_named_in(markdown))
    assert sorted(edited_md.splitlines()) != sorted(markdown.splitlines())
    assert not _stale(committed["metrics"])
    bumped = [dict(m, version=m["version"] - 1) if m["name"] == "modularity_q" else m for m in committed["metrics"]]
    code = next(m.version for m in all_metrics() if m.name == "modularity_q")
    assert _stale(bumped) == [f"modularity_q (version {code - 1}; the code: {code})"]


MARKDOWNS = [RESULTS.parent / "README.md", RESULTS.parents[1] / "README.md"]


@pytest.mark.parametrize("path", MARKDOWNS, ids=lambda p: str(p.relative_to(RESULTS.parents[1])))
def test_marked_tables_are_what_the_reports_hold(path):
    from study.readme_table import update

    stale = update(path, write=False)
    assert not stale, f"run `python study/readme_table.py --update {path.relative_to(RESULTS.parents[1])}` (lines {stale})"


def test_study_readme_marks_its_report_tables():
    from study.readme_table import marked_tables

    assert len(marked_tables((RESULTS.parent / "README.md").read_text(), RESULTS.parent)) >= 8


def test_the_summary_is_written_from_the_reports(tmp_path):
    import re
    import shutil

    from study.summary import write_summary

    committed = (RESULTS / "summary.md").read_text()
    tasks = re.findall(r"^## (\S+)", committed, re.M)
    assert {"digits", "manifold", "modular_addition"} <= set(tasks)
    for task in tasks:
        (tmp_path / task).mkdir()
        for name in ("report.json", "study.json"):
            if (RESULTS / task / name).is_file():
                shutil.copyfile(RESULTS / task / name, tmp_path / task / name)
    assert write_summary(tmp_path, tasks).read_text() == committed, \
        "regenerate it: python study/run_study.py --restat"
