"""study/readme_table.py: the README's report tables, their markers, --check and --update."""

import json

import pytest

from study.readme_table import main, marked_tables, summary, table, update


def _report() -> dict:
    """A two-cell report in build_report's layout, with hand-set statistics."""
    def stats(mean, comparison=None):
        return {"mean": mean, "std": 0.0, "values": [mean] * 3, **({"comparison": comparison} if comparison else {})}

    def comparison(base, variant, p, p_adjusted, significant, improved):
        return {"mean_baseline": base, "mean_variant": variant, "diff": variant - base, "p": p,
                "p_adjusted": p_adjusted, "significant": significant, "improved": improved,
                "correction": "holm", "verdict": ("✓" if improved else "✗") if significant else ""}

    metrics = [{"name": "accuracy", "label": "accuracy", "higher_is_better": True},
               {"name": "lib_edge_fraction_90", "label": "LIB edges for 90 %", "higher_is_better": False},
               {"name": "modularity_q", "label": "modularity Q", "higher_is_better": True}]
    return {"baseline": "base", "metrics": metrics, "variants": {
        "base": {"seeds": [0, 1, 2], "metrics": {"accuracy": stats(0.9), "lib_edge_fraction_90": stats(0.02),
                                                 "modularity_q": stats(0.5)}},
        "reg": {"seeds": [0, 1, 2], "metrics": {
            "accuracy": stats(0.885, comparison(0.9, 0.885, 0.001, 0.004, True, False)),
            "lib_edge_fraction_90": stats(0.01, comparison(0.02, 0.01, 0.03, 0.09, False, True)),
            "modularity_q": stats(0.6, comparison(0.5, 0.6, 0.2, 0.6, False, True))}}}}


def test_table_writes_points_factors_differences_and_verdicts():
    lines = table(_report(), ["accuracy", "lib_edge_fraction_90", "modularity_q"]).splitlines()
    assert lines[0] == "| cell | accuracy ↑ | LIB edges for 90 % ↓ | modularity Q ↑ |"
    assert lines[2] == "| `base` | 90.00 % | 0.02 | 0.5 |"
    # 88.5 % is 1.50 points down, significant the wrong way; the edge fraction halves (raw p 0.03, not
    # after the correction); modularity +0.1, raw p 0.2
    assert lines[3] == "| `reg` | 88.50 % (-1.50 pt ✗) | 0.01 (×0.50 n.s.*) | 0.6 (+0.1 n.s.) |"


def test_summary_keeps_the_asked_rows_and_bad_names_raise():
    lines = summary(_report(), ["accuracy"], ["reg"]).splitlines()
    assert len(lines) == 3 and lines[2].startswith("| `reg` | 3 | 0.885 ± 0 (Δ -0.015, p=0.004, raw 0.001 ✗)")
    with pytest.raises(ValueError, match=r"metrics not in this report: \['nope'\]"):
        summary(_report(), ["nope"])
    with pytest.raises(ValueError, match=r"cells not in this report: \['other'\]"):
        table(_report(), ["accuracy"], ["other"])


def test_check_finds_a_stale_table_and_update_rewrites_only_it(tmp_path, capsys):
    (tmp_path / "r.json").write_text(json.dumps(_report()))
    current = table(_report(), ["accuracy", "modularity_q"])
    text = ("# results\n\n<!-- table: r.json accuracy modularity_q -->\n" + current + "\n\nprose | not a table\n\n"
            "<!-- summary table: r.json accuracy | cells: reg -->\n" + summary(_report(), ["accuracy"], ["reg"]) + "\n")
    doc = tmp_path / "doc.md"
    doc.write_text(text)
    assert main(["--check", str(doc)]) == 0
    doc.write_text(text.replace("88.50 %", "88.60 %"))  # a number edited by hand: no longer the report's
    assert [first for first, _, _ in marked_tables(doc.read_text(), tmp_path)] == [3, 11]  # the markers' lines
    assert main(["--check", str(doc)]) == 1
    assert "lines [3]" in capsys.readouterr().out
    assert main(["--update", str(doc)]) == 0
    assert doc.read_text() == text and update(doc, write=False) == []


def test_a_marker_without_a_table_or_report_is_an_error(tmp_path, capsys):
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- table: r.json accuracy -->\n\ntext\n")
    (tmp_path / "r.json").write_text(json.dumps(_report()))
    with pytest.raises(ValueError, match="line 1: a table marker with no table"):
        update(doc, write=False)
    assert main(["--check", str(doc)]) == 2 and "error:" in capsys.readouterr().err
