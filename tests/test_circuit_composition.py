"""study/circuit_composition.py: per-site kept-node counts from a compare cache, checked against
counts written by hand; retrained runs are left out when the run directories are given."""

import json

import pytest

from study.circuit_composition import against_reference, composition, main, render, short_site


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
    assert table["zero"] == {"baseline": {"sites": {pre: [1], post: [0], z: [1]}, "total": [2], "of": 10,
                                          "accuracy": [], "search": "penalty"}}
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
    assert table["mean"] == {"baseline": {"sites": {pre: [3], post: [1], z: [1]}, "total": [5], "of": 10,
                                          "accuracy": [], "search": "penalty"}}
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
    assert table == {"mean": {}, "zero": {"a": {"sites": {site: [2, 1]}, "total": [2, 1], "of": 4,
                                                "accuracy": [], "search": "penalty"}}}


def _write(root, name, nodes: int, total: int, accuracy: float, search: str = "lagrangian") -> None:
    circuit = {"kept": {"blocks.0.mlp.hook_post": list(range(nodes))}, "nodes_kept": nodes, "nodes_total": total,
               "search": search}
    path = root / "cache" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run_digest": "d", "measured": {"circuit_nodes": {"details": {"circuit": circuit}},
                                                                 "accuracy": {"value": accuracy}}}))


def test_several_compare_directories_against_a_reference(tmp_path, capsys):
    """Models of two widths from two compare directories in one table; Welch and Holm checked
    against scipy's t-test and the Holm step-down written out by hand."""
    from scipy import stats

    narrow, wide = tmp_path / "narrow", tmp_path / "wide"
    dense, wide_dense, wide_sparse = [30, 34, 33], [60, 70, 64, 66], [29, 31, 30, 28]
    for seed, n in enumerate(dense):
        _write(narrow, f"baseline/seed{seed}", n, 50, 1.0)
    for seed, (a, b) in enumerate(zip(wide_dense, wide_sparse)):
        _write(wide, f"wide/seed{seed}", a, 100, 1.0)
        _write(wide, f"wide_sparse/seed{seed}", b, 100, 0.99 - 0.01 * seed)
    table, _ = composition([narrow, wide])
    assert table["mean"]["wide_sparse"]["total"] == wide_sparse and table["mean"]["baseline"]["of"] == 50
    tests = against_reference(table, "baseline")
    raw = {v: stats.ttest_ind(dense, vals, equal_var=False).pvalue for v, vals in
           (("wide", wide_dense), ("wide_sparse", wide_sparse))}
    small, large = sorted(raw, key=raw.get)
    holm = {small: min(1.0, 2 * raw[small])}
    holm[large] = min(1.0, max(holm[small], raw[large]))
    for variant in raw:
        assert tests["mean", variant]["p"] == pytest.approx(raw[variant], rel=1e-9)
        assert tests["mean", variant]["p_adjusted"] == pytest.approx(holm[variant], rel=1e-9)
    assert main([str(narrow), str(wide), "--reference", "baseline"]) == 0
    text = capsys.readouterr().out
    assert "lagrangian search" in text and "Holm over 2 comparisons" in text
    ratio = (sum(dense) / 3) / (sum(wide_sparse) / 4)
    assert f"| `wide_sparse` | 4 | 29.5 ± 1.3 | 29.5 ± 1.3 of 100 | 97.5 ± 1.3 % | {ratio:.2f}× fewer" in text
    assert "| `baseline` | 3 | 32.3 ± 2.1 | 32.3 ± 2.1 of 50 | 100.0 ± 0.0 % | reference |" in text
    larger = (sum(wide_dense) / 4) / (sum(dense) / 3)
    assert f"| `wide` | 4 | 65.0 ± 4.2 | 65.0 ± 4.2 of 100 | 100.0 ± 0.0 % | {larger:.2f}× more" in text
    with pytest.raises(SystemExit, match="--reference 'dense': no circuit of that variant; the table has baseline"):
        main([str(narrow), str(wide), "--reference", "dense"])


def test_one_variant_in_two_directories_or_two_searches_is_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, "baseline/seed0", 3, 10, 1.0)
    _write(b, "baseline/seed1", 4, 10, 1.0)
    with pytest.raises(SystemExit, match="variant 'baseline' is cached in both"):
        main([str(a), str(b)])
    _write(b, "sparse/seed0", 4, 10, 1.0, search="penalty")
    (b / "cache" / "baseline" / "seed1.json").unlink()
    with pytest.raises(SystemExit, match="different searches \\(lagrangian, penalty\\)"):
        main([str(a), str(b)])
    with pytest.raises(ValueError, match="one compare directory"):
        composition([a, b], runs=tmp_path)
