"""`interp-eval compare` on tiny real recipe runs (digits MLP, a few steps) trained in the test setup."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from evaluation.compare import core as compare
from evaluation.cli import main as eval_main
from evaluation.compare.cache import cache_key
from evaluation.compare.core import MeasureOptions, build_report, discover_runs, run_compare, runs_from_paths
from evaluation.compare.stats import compare_groups

OPTIONS = MeasureOptions(max_samples=64)

TINY = """
seed_everything: 0
trainer:
  max_steps: 4
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
  enable_model_summary: false
  log_every_n_steps: 1
model:
  model:
    class_path: interp_train.models.mlp.MLP
    init_args: {{d_in: 64, hidden: {hidden}, d_out: 10}}
  lr: {lr}
data:
  class_path: interp_train.data.digits.DigitsDataModule
  init_args: {{batch_size: 64}}
"""


def _train(tmp, root, variant, seed, lr=0.01, hidden="[12, 12]"):
    from interp_train.cli import main as train_main

    cfg = tmp / f"{variant}_{lr}_{hidden.replace(' ', '')}.yaml"
    cfg.write_text(TINY.format(lr=lr, hidden=hidden))
    train_main(["fit", "--config", str(cfg), "--variant", variant, "--seed_everything", str(seed),
                "--checkpoint_root", str(root), "--test_after_fit", "false"])
    return root / "digits" / variant / f"seed{seed}"


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """checkpoints/digits/{baseline, fast}/seed{0,1} plus, outside that tree, a 1-seed variant and a
    run with another architecture."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("compare_runs")
    root = tmp / "checkpoints"
    for seed in (0, 1):
        _train(tmp, root, "baseline", seed)
        _train(tmp, root, "fast", seed, lr=0.05)
    extra = tmp / "extra"
    single = _train(tmp, extra, "single", 0, lr=0.05)
    wide = _train(tmp, extra, "wide", 0, hidden="[8, 16]")
    return {"task_dir": root / "digits", "single": single, "wide": wide, "tmp": tmp}


def test_discovery_and_empty_dir(runs, tmp_path):
    found = discover_runs(runs["task_dir"])
    assert {v: [r.seed for r in rs] for v, rs in found.items()} == {"baseline": ["seed0", "seed1"],
                                                                      "fast": ["seed0", "seed1"]}
    assert found["fast"][1].checkpoint.name == "last.ckpt"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no runs under .*found: notes/readme.txt"):
        discover_runs(tmp_path)
    with pytest.raises(ValueError, match=r"holds runs of several tasks"):
        discover_runs(runs["task_dir"].parent)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover_runs(tmp_path / "missing")


def test_report_matches_the_underlying_api(runs, tmp_path):
    from evaluation.metrics.alignment import gradient_alignment
    from evaluation.io.checkpoints import load_checkpoint
    from evaluation.lib.fit import LIBConfig, fit_lib
    from evaluation.metrics.lib_summary import summarize
    from evaluation.metrics.robustness import evaluate_accuracy, manifold_robustness
    from interp_train.tangents import LocalPCATangents

    result = run_compare(discover_runs(runs["task_dir"]), tmp_path / "out", OPTIONS, progress=False)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {"report.json", "report.md", "metrics.png", "alignment_hist.png", "edge_curves.png"} <= \
        {p.name for p in (tmp_path / "out").iterdir()}
    assert report == json.loads(json.dumps(result.report))

    # recompute baseline/seed1 by hand through the evaluation API
    loaded = load_checkpoint(runs["task_dir"] / "baseline" / "seed1" / "checkpoints" / "last.ckpt")
    model, dm = loaded.model, loaded.datamodule
    dm.setup("fit")
    x_train = dm.splits["train"].tensors[0]
    x_test, y_test = dm.splits["test"].tensors
    acc = evaluate_accuracy(model, [(x_test, y_test)], progress=False)["accuracy"]
    idx = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))[:64]
    layers = ["input", "model.layers.1", "model.layers.3", "output"]
    summary = summarize(fit_lib(model, [(x_train[idx],)], layers, LIBConfig(), progress=False))
    edges = summary["edges"].values()
    lib_frac = sum(e["lib"]["edges_90"] for e in edges) / sum(e["lib"]["n_edges"] for e in edges)
    features = sum(summary["layers"][l]["lib"]["features_99"] for l in layers[:-1])
    idx_test = torch.randperm(len(x_test), generator=torch.Generator().manual_seed(0))[:64]
    batch = [(x_test[idx_test], y_test[idx_test])]
    tangents = LocalPCATangents(x_train)
    align = gradient_alignment(model, batch, tangents, progress=False)
    rob = manifold_robustness(model, batch, tangents, eps=[0.03, 0.1, 0.3], n_draws=4, seed=0, progress=False)

    got = {m: s["values"][1] for m, s in report["variants"]["baseline"]["metrics"].items()}
    assert got["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert got["lib_edge_fraction_90"] == pytest.approx(lib_frac, rel=1e-9)
    assert got["lib_features_99"] == features
    assert got["modularity_q"] == pytest.approx(summary["modularity"]["lib"]["gamma_1.0"]["Q"], rel=1e-9)
    assert got["alignment"] == pytest.approx(align.mean, rel=1e-9)
    assert got["robustness_ratio"] == pytest.approx(rob.ratio[1], rel=1e-9)
    assert "llc" not in got  # opt-in

    # statistics: mean/std over seeds and Welch p-values against scipy and stats.compare_groups
    for metric in ("accuracy", "lib_edge_fraction_90", "alignment", "robustness_ratio"):
        base = report["variants"]["baseline"]["metrics"][metric]
        fast = report["variants"]["fast"]["metrics"][metric]
        assert base["mean"] == pytest.approx(np.mean(base["values"]))
        assert fast["std"] == pytest.approx(np.std(fast["values"], ddof=1))
        cmp = fast["comparison"]
        want = compare_groups(base["values"], fast["values"], higher_is_better=metric in ("accuracy", "alignment"))
        assert cmp["p"] == pytest.approx(want["p"], rel=1e-12) and cmp["improved"] == want["improved"]
        if np.std(base["values"]) + np.std(fast["values"]) > 0:
            scipy_p = scipy_stats.ttest_ind(fast["values"], base["values"], equal_var=False).pvalue
            assert cmp["p"] == pytest.approx(scipy_p, rel=1e-9)
        assert cmp["diff"] == pytest.approx(fast["mean"] - base["mean"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| `fast` | 2 |" in md and "LLC**: not measured" in md


def test_deterministic_cli_and_cache_reuse(runs, tmp_path, monkeypatch):
    task = str(runs["task_dir"])
    run_compare(discover_runs(task), tmp_path / "a", OPTIONS, progress=False)
    rc = eval_main(["compare", task, "--out", str(tmp_path / "b"), "--max-samples", "64", "--quiet"])
    assert rc == 0
    first = (tmp_path / "a" / "report.json").read_bytes()
    assert first == (tmp_path / "b" / "report.json").read_bytes()
    assert sorted(p.name for p in (tmp_path / "a" / "cache" / "fast").iterdir()) == ["seed0.json", "seed1.json"]

    calls = []
    real = compare.measure_run

    def counting(run, options, progress=False):
        calls.append(f"{run.variant}/{run.seed}")
        return real(run, options, progress)

    monkeypatch.setattr(compare, "measure_run", counting)
    run_compare(discover_runs(task), tmp_path / "a", OPTIONS, progress=False)
    assert calls == []  # everything from the cache
    assert (tmp_path / "a" / "report.json").read_bytes() == first
    variants = discover_runs(task)
    variants["single"] = runs_from_paths("single", [runs["single"]])
    run_compare(variants, tmp_path / "a", OPTIONS, progress=False)
    assert calls == ["single/seed0"]  # only the new checkpoint
    calls.clear()
    run_compare(discover_runs(task), tmp_path / "a", MeasureOptions(max_samples=64, n_draws=2), progress=False)
    assert sorted(calls) == ["baseline/seed0", "baseline/seed1", "fast/seed0", "fast/seed1"]  # options changed


def test_one_seed_variant_and_mismatched_architecture(runs, tmp_path, capsys):
    variants = {"baseline": discover_runs(runs["task_dir"])["baseline"],
                "single": runs_from_paths("single", [runs["single"]])}
    report = run_compare(variants, tmp_path / "one", OPTIONS, progress=False).report
    assert any("'single' has 1 seed; no significance test" in m for m in report["messages"])
    cmp = report["variants"]["single"]["metrics"]["accuracy"]["comparison"]
    assert cmp["p"] is None and cmp["improved"] is None and cmp["verdict"] == "" and cmp["arrow"] in "↑↓="
    assert "no test" in (tmp_path / "one" / "report.md").read_text()

    variants["wide"] = runs_from_paths("wide", [runs["wide"]])
    with pytest.raises(ValueError, match=r"disagree on the architecture .*wide/seed0 have model"):
        run_compare(variants, tmp_path / "two", OPTIONS, progress=False)
    assert not (tmp_path / "two").exists()  # checked before anything is measured or written
    rc = eval_main(["compare", "--variant", "baseline", str(runs["task_dir"] / "baseline" / "seed0"),
                    "--variant", "wide", str(runs["wide"]), "--out", str(tmp_path / "three"), "--quiet"])
    assert rc == 2 and "disagree on the architecture" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"no baseline variant 'control'; variants found: baseline, single"):
        run_compare({k: v for k, v in variants.items() if k != "wide"}, tmp_path / "four", OPTIONS,
                    baseline="control", progress=False)


def _entries(values_by_seed, variant):
    return [{"seed": f"seed{i}", "run_dir": f"/runs/{variant}/seed{i}", "notes": [],
             "metrics": {"accuracy": a, "lib_edge_fraction_90": e}, "details": {"task": "toy"}}
            for i, (a, e) in enumerate(values_by_seed)]


def test_build_report_hand_computed_case():
    """Edges fall from {0.5, 0.6, 0.7} to {0.1, 0.2, 0.3}: every relabelling of the 6 values
    but the observed split and its mirror has a smaller |mean difference|, so the exact
    permutation p = 2 / C(6, 3) = 0.1; Welch: t = -0.4 / sqrt(0.01/3 + 0.01/3), df = 4."""
    measurements = {"baseline": _entries([(0.9, 0.5), (0.92, 0.6), (0.94, 0.7)], "baseline"),
                    "reg": _entries([(0.8, 0.1), (0.82, 0.2), (0.84, 0.3)], "reg")}
    perm = build_report(measurements, test="permutation", alpha=0.15)
    edges = perm["variants"]["reg"]["metrics"]["lib_edge_fraction_90"]["comparison"]
    assert edges["p"] == pytest.approx(0.1) and edges["arrow"] == "↓" and edges["verdict"] == "✓"
    acc = perm["variants"]["reg"]["metrics"]["accuracy"]["comparison"]
    assert acc["p"] == pytest.approx(0.1) and acc["arrow"] == "↓" and acc["verdict"] == "✗"
    assert [m["name"] for m in perm["metrics"]] == ["accuracy", "lib_edge_fraction_90"]  # unmeasured dropped

    welch = build_report(measurements, test="welch")
    t = -0.4 / math.sqrt(0.01 / 3 + 0.01 / 3)
    want = 2 * scipy_stats.t.sf(abs(t), 4)
    assert welch["variants"]["reg"]["metrics"]["lib_edge_fraction_90"]["comparison"]["p"] == pytest.approx(want)
    assert welch["variants"]["reg"]["metrics"]["lib_edge_fraction_90"]["mean"] == pytest.approx(0.2)
    md = compare.render_markdown(welch)
    assert f"Δ -0.4 ↓ (p={want:.3g}) ✓" in md
    with pytest.raises(ValueError, match="unknown test 'ttest'; allowed: welch, permutation"):
        build_report(measurements, test="ttest")


def test_bad_options():
    with pytest.raises(ValueError, match=r"ratio_eps 0.5 must be one of robustness_eps \[0.03, 0.1, 0.3\]"):
        MeasureOptions(ratio_eps=0.5)
    with pytest.raises(ValueError, match="unknown tangents 'pca'; allowed: auto, exact, local_pca, global_pca"):
        MeasureOptions(tangents="pca")
    with pytest.raises(ValueError, match="max_samples must be an integer >= 2, got 1"):
        MeasureOptions(max_samples=1)


MANIFOLD = """
seed_everything: 0
trainer: {max_steps: 3, accelerator: cpu, devices: 1, enable_progress_bar: false, enable_model_summary: false}
model:
  model:
    class_path: interp_train.models.mlp.MLP
    init_args: {d_in: 16, hidden: [12, 12], d_out: 3}
data:
  class_path: interp_train.data.manifold.ManifoldDataModule
  init_args: {latent_dim: 2, ambient_dim: 16, n_classes: 3, n_train: 300, n_val: 50, n_test: 100, hidden: 16}
"""

MODULAR = """
seed_everything: 0
trainer: {max_steps: 3, accelerator: cpu, devices: 1, enable_progress_bar: false, enable_model_summary: false}
model:
  model:
    class_path: interp_train.models.transformer.Transformer
    init_args: {d_vocab: 8, d_vocab_out: 7, n_ctx: 3, d_model: 8, n_heads: 2, d_head: 4, d_mlp: 16}
data:
  class_path: interp_train.data.modular.ModularAdditionDataModule
  init_args: {p: 7, train_fraction: 0.5}
"""


def _train_yaml(tmp, text, name):
    from interp_train.cli import main as train_main

    (tmp / f"{name}.yaml").write_text(text)
    train_main(["fit", "--config", str(tmp / f"{name}.yaml"), "--variant", "baseline", "--run_dir", str(tmp / name),
                "--test_after_fit", "false"])
    return runs_from_paths("baseline", [tmp / name])[0]


def test_manifold_run_uses_exact_tangents(runs):
    from evaluation.metrics.alignment import gradient_alignment
    from evaluation.io.checkpoints import load_checkpoint

    run = _train_yaml(runs["tmp"], MANIFOLD, "manifold")
    entry = compare.measure_run(run, OPTIONS)
    loaded = load_checkpoint(run.checkpoint)
    dm = loaded.datamodule
    x, y, z = dm.splits["test"].tensors
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:64]
    # exact tangents read the latents z from the batch's third element
    want = gradient_alignment(loaded.model, [(x[idx], y[idx], z[idx])], dm.tangent_provider("exact"), progress=False)
    assert entry["details"]["alignment"]["provider"].startswith("ExactTangents")
    assert entry["details"]["alignment"]["k"] == 2 and entry["details"]["alignment"]["d"] == 16
    assert entry["metrics"]["alignment"] == pytest.approx(want.mean, rel=1e-9)



def _embeddings(model, tokens):
    """hook_embed activations of a recipe module, read by a plain forward hook (not through interp_train.sites)."""
    seen = []
    handle = model.model.hook_dict["hook_embed"].register_forward_hook(lambda mod, inp, out: seen.append(out.detach()))
    with torch.no_grad():
        model(tokens)
    handle.remove()
    return seen[0].reshape(tokens.shape[0], -1)


def test_token_run_measures_alignment_at_the_embedding(runs):
    from evaluation.metrics.alignment import gradient_alignment
    from evaluation.io.checkpoints import load_checkpoint
    from evaluation.metrics.robustness import manifold_robustness
    from interp_train.tangents import LocalPCATangents

    run = _train_yaml(runs["tmp"], MODULAR, "modular")
    entry = compare.measure_run(run, OPTIONS)
    # modular addition reads only the last position: the paper's layout by default
    assert entry["details"]["node_layers"] == ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid[-1]",
                                                "blocks.0.hook_resid_post[-1]", "output[-1]"]
    assert entry["metrics"]["lib_edge_fraction_90"] is not None

    # the same measurement by hand: local PCA over the embeddings of all 24 training pairs (p = 7,
    # train fraction 0.5), 32 neighbours clamped to N − 2 = 22, then the evaluation API at hook_embed
    loaded = load_checkpoint(run.checkpoint)
    model, dm = loaded.model.eval(), loaded.datamodule
    dm.setup("fit")
    x_train = dm.splits["train"].tensors[0]
    x_test, y_test = dm.splits["test"].tensors
    embeds = _embeddings(model, x_train)
    assert embeds.shape == (24, 3 * 8)
    tangents = LocalPCATangents(embeds, n_neighbors=22, explained_variance=0.9, seed=0)
    batch = [(x_test, y_test)]  # all 25 held-out pairs, in order (max_samples 64 > 25: no subset drawn)
    want = gradient_alignment(model, batch, tangents, target="loss", site="hook_embed", progress=False)
    rob = manifold_robustness(model, batch, tangents, eps=[0.03, 0.1, 0.3], n_draws=4, seed=0, site="hook_embed",
                              progress=False)
    assert entry["metrics"]["alignment"] == pytest.approx(want.mean, rel=1e-9)
    assert entry["metrics"]["robustness_ratio"] == pytest.approx(rob.ratio[1], rel=1e-9)
    info = entry["details"]["tangents"]
    k = tangents.dim
    assert (info["k"], info["d"], info["n_neighbors"], info["n_reference"]) == (k, 24, 22, 24)
    assert 1 <= k < 22 and info["baseline"] == pytest.approx(math.sqrt(k / 24))
    assert entry["details"]["alignment"]["site"] == "hook_embed" and entry["details"]["alignment"]["k"] == k
    assert info["explained_variance_curve"][-1] >= 0.9 > (info["explained_variance_curve"][-2] if k > 1 else 0)
    # the nearest other training embedding, by brute force
    dist = torch.cdist(embeds.double(), embeds.double()) + torch.diag(torch.full((24,), math.inf))
    assert info["median_nearest_distance"] == pytest.approx(float(dist.min(dim=1).values.median()), rel=1e-5)
    # neighbours differing in one token: counted by explicit loops
    near = dist.topk(22, dim=1, largest=False).indices
    one = sum(int((x_train[j] != x_train[i]).sum() == 1) for i in range(24) for j in near[i].tolist())
    assert info["neighbours_one_token_change"] == pytest.approx(one / (24 * 22))
    assert any("hook_embed" in n and f"k = {k} of d = 24" in n for n in entry["notes"])


TEXT = """
seed_everything: 0
trainer: {max_steps: 2, accelerator: cpu, devices: 1, enable_progress_bar: false, enable_model_summary: false}
model:
  model:
    class_path: interp_train.models.transformer.Transformer
    init_args: {d_vocab: 256, d_vocab_out: 256, n_ctx: 8, d_model: 8, n_heads: 2, d_head: 4, d_mlp: 16,
      n_layers: 1, act_fn: gelu, normalization_type: LN}
data:
  class_path: interp_train.data.text.ByteTextDataModule
  init_args: {source: pydoc, seq_len: 8, max_bytes: 2000, batch_size: 16}
"""


def test_byte_lm_alignment_at_the_embedding(runs):
    run = _train_yaml(runs["tmp"], TEXT, "bytes")
    options = MeasureOptions(max_samples=16, embed_reference=64, embed_n_neighbors=10, node_layers=(
        "blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "output"))
    entry = compare.measure_run(run, options)
    info = entry["details"]["tangents"]
    assert (info["d"], info["n_reference"], info["n_neighbors"]) == (8 * 8, 64, 10)
    assert info["baseline"] == pytest.approx(math.sqrt(info["k"] / 64))
    align = entry["details"]["alignment"]
    assert align["n"] == 13 and align["site"] == "hook_embed"  # 249 windows of 8 bytes, 5 % test split: 13 < 16
    assert 0 < entry["metrics"]["alignment"] <= 1 and entry["metrics"]["robustness_ratio"] > 0


def test_every_option_is_part_of_the_cache_key(tmp_path):
    ckpt, cfg = tmp_path / "last.ckpt", tmp_path / "config.yaml"
    ckpt.write_bytes(b"weights"), cfg.write_text("model: {}")
    base = dataclasses.asdict(OPTIONS)
    keys = {cache_key(ckpt, cfg, base)}
    for name, value in [("embed_n_neighbors", 8), ("llc_burnin", 0), ("llc_lr", 1e-4), ("max_samples", 7)]:
        keys.add(cache_key(ckpt, cfg, {**base, name: value}))
    assert len(keys) == 5
    with pytest.raises(ValueError, match="embed_n_neighbors must be an integer >= 3, got 2"):
        MeasureOptions(embed_n_neighbors=2)
    with pytest.raises(ValueError, match=r"embed_explained_variance must be in \(0, 1\], got 1.5"):
        MeasureOptions(embed_explained_variance=1.5)


def test_lib_probe_options_reach_fit_lib(monkeypatch, runs):
    from evaluation.lib import fit as lib_mod

    seen = []
    real = lib_mod.fit_lib

    def spy(model, data, layers, config, **kw):
        seen.append(config)
        return real(model, data, layers, config, **kw)

    monkeypatch.setattr(lib_mod, "fit_lib", spy)
    run = discover_runs(runs["task_dir"])["baseline"][0]
    options = MeasureOptions(max_samples=16, alignment=False, lib_sources=3, lib_edge_sources=2,
                             lib_jacobian_dtype="float32")
    entry = compare.measure_run(run, options)
    (config,) = seen
    assert (config.stochastic_sources, config.stochastic_over, config.edge_sources, config.jacobian_dtype) == (
        3, "positions_and_hidden", 2, "float32")
    assert entry["metrics"]["lib_edge_fraction_90"] > 0
