"""The demo code path on tiny settings, and seed-dependent transformer initialisation."""

from __future__ import annotations

import pytest
import torch

from interp_train import demo


def _accuracy_by_hand(run_dir) -> float:
    """Reference: reload the run and count correct argmax predictions on the whole test split."""
    from interp_train.recipes import load_recipe

    module, dm = load_recipe(run_dir)
    dm.setup("fit")
    x, y = dm.splits["test"].tensors[:2]
    with torch.no_grad():
        pred = module.eval()(x).argmax(-1)
    return float((pred == y).double().mean())


@pytest.mark.slow  # ~15 s idle, ~45 s on the shared box: 4 trainings + LIB fits
def test_demo_trains_compares_and_reuses(tmp_path):
    torch.set_num_threads(1)
    task = demo.DemoTask("digits", ("baseline", "grad_norm"))
    extra = ["--trainer.max_epochs", "1"]
    lines: list[str] = []
    reports = demo.run_demo([task], seeds=(0, 1), root=tmp_path / "runs", out=tmp_path / "out", extra=extra,
                            max_samples=32, progress=False, echo=lines.append, workers=2)
    report = reports["digits"]
    assert list(report["variants"]) == ["baseline", "grad_norm"]
    base = report["variants"]["baseline"]["metrics"]["accuracy"]
    assert base["values"][0] == pytest.approx(_accuracy_by_hand(tmp_path / "runs/digits/baseline/seed0"), abs=1e-6)
    assert base["mean"] == pytest.approx(sum(base["values"]) / 2)
    diff = report["variants"]["grad_norm"]["metrics"]["accuracy"]["comparison"]["diff"]
    assert diff == pytest.approx(report["variants"]["grad_norm"]["metrics"]["accuracy"]["mean"] - base["mean"])
    text = "\n".join(lines)
    assert f"{base['mean']:#.3g}" in text and "report.md" in text
    assert (tmp_path / "out/digits/report.md").is_file()

    # A second call trains nothing: every run directory already has metrics.json.
    mtime = (tmp_path / "runs/digits/grad_norm/seed1/metrics.json").stat().st_mtime
    counts = demo.train_missing(task, (0, 1), tmp_path / "runs", extra, progress=False)
    assert counts == {"trained": 0, "reused": 4}
    assert (tmp_path / "runs/digits/grad_norm/seed1/metrics.json").stat().st_mtime == mtime


def test_fit_arguments_order_and_unknown_variant(tmp_path):
    task = demo.DemoTask("manifold", ("baseline",), overrides=("--data.init_args.scale", "10.0"))
    args = demo.fit_arguments(task, "baseline", 2, tmp_path, extra=["--trainer.max_epochs", "1"])
    assert args[:2] == ["fit", "--config"] and args[2].endswith("recipes/manifold/baseline.yaml")
    assert args[3:7] == ["--seed_everything", "2", "--run_dir", str(tmp_path)]
    # The task's overrides come before the caller's extra arguments (LightningCLI: later wins).
    assert args.index("--data.init_args.scale") < args.index("--trainer.max_epochs")
    with pytest.raises(FileNotFoundError, match="no_such_variant"):
        demo.fit_arguments(task, "no_such_variant", 0, tmp_path)


def test_format_table_cells():
    report = {
        "metrics": [{"name": "accuracy", "label": "accuracy", "higher_is_better": True}],
        "variants": {
            "baseline": {"metrics": {"accuracy": {"mean": 0.9, "std": 0.01}}},
            "reg": {"metrics": {"accuracy": {"mean": 0.85, "std": None,
                                             "comparison": {"diff": -0.05, "p": 0.012, "verdict": "✗"}}}},
        },
    }
    lines = demo.format_table(report).splitlines()
    assert lines[0].split() == ["metric", "baseline", "reg"]
    # baseline: mean ± std (3 and 2 significant digits); variant: difference, verdict, p
    assert lines[2].split() == ["accuracy", "↑", "0.900", "±", "0.010", "Δ-0.050", "✗", "p=0.012"]
    report["variants"]["reg"]["metrics"]["accuracy"]["comparison"]["p_adjusted"] = 0.036  # corrected p is shown
    assert demo.format_table(report).splitlines()[2].split()[-1] == "p=0.036"


def test_format_table_fits_the_width():
    """Many variants: columns wrap into further blocks, no line is longer than the width."""
    cell = {"mean": 0.123456, "std": 0.0123, "comparison": {"diff": -0.0512, "p_adjusted": 0.0123, "verdict": "✗"}}
    report = {"metrics": [{"name": f"m{i}", "label": f"a long metric label {i}", "higher_is_better": i % 2 == 0}
                          for i in range(8)],
              "baseline": "baseline",
              "variants": {v: {"metrics": {f"m{i}": dict(cell) for i in range(8)}}
                           for v in ["baseline", *(f"variant_{k}" for k in range(7))]}}
    text = demo.format_table(report, metrics=[f"m{i}" for i in range(8)], width=100)
    assert max(len(line) for line in text.splitlines()) <= 100
    for v in report["variants"]:  # every variant is shown, each once
        assert sum(line.split()[:1] == ["metric"] and v in line.split() for line in text.splitlines()) == 1
    assert "Δ-0.051 ✗ p=0.012" in text and "0.123 ± 0.012" in text


def test_transformer_seed_everything_changes_initialisation():
    import lightning as L

    from interp_train.models.transformer import Transformer

    def first_weight(seed, init_seed=None):
        L.seed_everything(seed, verbose=False)
        model = Transformer(d_vocab=7, d_vocab_out=6, d_model=8, n_heads=2, d_head=4, d_mlp=16, init_seed=init_seed)
        return next(model.parameters()).detach().clone()

    assert not torch.equal(first_weight(0), first_weight(1))
    assert torch.equal(first_weight(0), first_weight(0))
    assert torch.equal(first_weight(0, init_seed=5), first_weight(1, init_seed=5))  # an explicit seed fixes them
