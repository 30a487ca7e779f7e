"""study/circuit_search_settings.py: one row per run and setting, equal to prune_circuit called
directly with that setting; runs already written are not searched again."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from study import circuit_search_settings  # noqa: E402
from tests.test_compare import runs  # noqa: E402,F401 - the tiny digits runs fixture


def test_rows_equal_the_direct_search_and_resume(runs, tmp_path, monkeypatch):  # noqa: F811
    from evaluation.compare import MeasureOptions, discover_runs
    from evaluation.compare.context import RunContext
    from evaluation.metrics.circuit import CircuitConfig, prune_circuit

    monkeypatch.setattr(circuit_search_settings, "SETTINGS", ({"lr": 0.2}, {"dual_lr": 0.3}))
    out = tmp_path / "rows.jsonl"
    assert circuit_search_settings.main([str(runs["task_dir"]), "--cells", "baseline", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["seed"], r["settings"]) for r in rows] == [
        ("seed0", {"lr": 0.2}), ("seed0", {"dual_lr": 0.3}), ("seed1", {"lr": 0.2}), ("seed1", {"dual_lr": 0.3})]
    run = discover_runs(runs["task_dir"])["baseline"][1]
    ctx = RunContext(run, MeasureOptions(alignment=False))
    direct = prune_circuit(ctx.module, ctx.eval_set[0], ctx.eval_set[1], CircuitConfig(search="lagrangian", dual_lr=0.3))
    assert (rows[3]["nodes"], rows[3]["edges"], rows[3]["loss"]) == (direct.nodes_kept, direct.edges, direct.loss)
    assert all(r["loss"] <= r["target"] for r in rows)

    from evaluation.metrics import circuit as circuit_mod

    def no_search(*args, **kwargs):
        raise AssertionError("a run already in --out was searched again")

    monkeypatch.setattr(circuit_mod, "prune_circuit", no_search)
    circuit_search_settings.main([str(runs["task_dir"]), "--cells", "baseline", "--out", str(out)])
    assert len(out.read_text().splitlines()) == 4
    with pytest.raises(SystemExit, match=r"no runs of cell\(s\) \['base'\]"):
        circuit_search_settings.main([str(runs["task_dir"]), "--cells", "base", "--out", str(out)])
