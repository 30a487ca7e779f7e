"""study/circuit_composition.py: per-site kept-node counts from a compare cache, checked against
counts written by hand; retrained runs are left out when the run directories are given."""

import json

import pytest

from study.circuit_composition import composition, main, render, short_site


def _entry(kept_mean: dict, kept_zero: dict | None, digest="d") -> dict:
    def circuit(kept):
        return {"kept": kept, "nodes_kept": sum(len(v) for v in kept.values()), "nodes_total": 10}

    measured = {"circuit_nodes": {"details": {"circuit": circuit(kept_mean)}}}
    if kept_zero is not None:
        measured["circuit_nodes_zero"] = {"details": {"circuit_zero": circuit(kept_zero)}}
    return {"run_digest": digest, "measured": measured}


def test_counts_per_site_and_variant(tmp_path, capsys):
    pre, post, z = "blocks.0.hook_resid_pre", "blocks.0.mlp.hook_post", "blocks.0.attn.hook_z"
    entries = {"baseline/seed0": _entry({pre: [0, 1, 2], post: [4], z: [0]}, {pre: [0], post: [], z: [0]}),
               "baseline/seed1": _entry({pre: [0], post: [4, 5, 6], z: [0, 1]}, None),
               "sparse/seed0": _entry({pre: [1], post: [], z: []}, None)}
    for name, entry in entries.items():
        path = tmp_path / "cache" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(entry))
    table, skipped = composition(tmp_path)
    assert skipped == []
    base = table["mean"]["baseline"]
    assert base["sites"] == {pre: [3, 1], post: [1, 3], z: [1, 2]} and base["total"] == [5, 6]
    assert table["mean"]["sparse"]["total"] == [1]
    assert table["zero"] == {"baseline": {"sites": {pre: [1], post: [0], z: [1]}, "total": [2], "of": 10}}
    text = render(table)
    # forward order: resid_pre, heads, neurons; mean ± sample std (3, 1 -> 2.0 ± 1.4)
    assert "| variant | n | 0.resid_pre | 0.heads | 0.neurons | all |" in text
    assert "| `baseline` | 2 | 2.0 ± 1.4 | 1.5 ± 0.7 | 2.0 ± 1.4 | 5.5 ± 0.7 of 10 |" in text
    assert short_site("blocks.3.hook_resid_mid") == "3.resid_mid" and short_site("model.layers.1") == "model.layers.1"
    # with the run directories: an entry whose checkpoint is not the one measured is left out
    from evaluation.compare.cache import run_digest

    runs = tmp_path / "runs"
    for name in ("baseline/seed0", "baseline/seed1"):
        (runs / name / "checkpoints").mkdir(parents=True)
        (runs / name / "config.yaml").write_text("model: {}\n")
        (runs / name / "checkpoints" / "last.ckpt").write_bytes(name.encode())
    measured = runs / "baseline" / "seed0"
    entries["baseline/seed0"]["run_digest"] = run_digest(measured / "checkpoints" / "last.ckpt", measured / "config.yaml")
    (tmp_path / "cache" / "baseline" / "seed0.json").write_text(json.dumps(entries["baseline/seed0"]))
    table, skipped = composition(tmp_path, runs)  # seed1: another checkpoint; sparse/seed0: no run directory
    assert table["mean"] == {"baseline": {"sites": {pre: [3], post: [1], z: [1]}, "total": [5], "of": 10}}
    assert sorted(skipped) == ["baseline/seed1 (retrained or gone since measured)",
                               "sparse/seed0 (retrained or gone since measured)"]
    with pytest.raises(SystemExit, match="no cache/ directory"):
        main([str(tmp_path / "nowhere")])


def test_the_ablation_is_read_from_the_record(tmp_path):
    """compare --circuit-ablation zero: the circuit_nodes record is a zero-ablation search; with
    --circuit-zero too the same search is recorded twice and must be counted once."""
    site = "blocks.0.mlp.hook_post"
    zero = {"kept": {site: [1, 2]}, "nodes_kept": 2, "nodes_total": 4, "ablation": "zero"}
    entries = {"a/seed0": {"circuit_nodes": {"details": {"circuit": zero}},
                           "circuit_nodes_zero": {"details": {"circuit_zero": zero}}},
               "a/seed1": {"circuit_nodes": {"details": {"circuit": {**zero, "kept": {site: [3]}, "nodes_kept": 1}}}}}
    for name, measured in entries.items():
        path = tmp_path / "cache" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"run_digest": "d", "measured": measured}))
    table, _ = composition(tmp_path)
    assert table == {"mean": {}, "zero": {"a": {"sites": {site: [2, 1]}, "total": [2, 1], "of": 4}}}
