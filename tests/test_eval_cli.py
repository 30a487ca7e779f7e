"""`interp-eval lib` end to end on a tiny HookedTransformer-format checkpoint."""

import json

import pytest
import torch
from safetensors.torch import load_file

from evaluation.io.checkpoints import load_hooked_transformer_state_dict
from evaluation.cli import main
from evaluation.lib_command import modular_addition_data, parse_data
from evaluation.lib.fit import LIBConfig, fit_lib
from evaluation.metrics.lib_summary import summarize
from tests.test_checkpoints import random_ht_state_dict

P = 5
CFG = dict(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=12, d_vocab=P + 1, d_vocab_out=P, n_ctx=3,
           act_fn="relu", normalization_type=None)


@pytest.fixture
def checkpoint(tmp_path):
    sd = random_ht_state_dict(CFG)
    torch.save(sd, tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(json.dumps(CFG))
    return sd, tmp_path


def test_modular_addition_data():
    x, y = modular_addition_data(3)
    assert x.tolist()[:4] == [[0, 0, 3], [0, 1, 3], [0, 2, 3], [1, 0, 3]]
    assert y.tolist() == [(a + b) % 3 for a in range(3) for b in range(3)]
    with pytest.raises(ValueError, match=r"bad --data 'modular-addition:q=3': modular-addition takes only p"):
        parse_data("modular-addition:q=3")
    with pytest.raises(ValueError, match=r"bad --data 'nothing-here'"):
        parse_data("nothing-here")


def test_lib_command_writes_report_matching_the_api(checkpoint):
    sd, tmp = checkpoint
    before = (tmp / "model.pt").read_bytes()
    out = tmp / "report"
    rc = main(["lib", str(tmp / "model.pt"), "--config", str(tmp / "config.json"), "--data", f"modular-addition:p={P}",
               "--batch-size", "10", "--out", str(out), "--quiet"])
    assert rc == 0
    assert (tmp / "model.pt").read_bytes() == before
    names = {p.name for p in out.iterdir()}
    assert {"lib.json", "bases.safetensors", "edges.safetensors", "graph.graphml", "graph_pca.graphml",
            "spectra.png", "edge_curves.png", "graph_lib.png", "graph_pca.png"} <= names
    assert sorted(p.name for p in tmp.iterdir()) == ["config.json", "model.pt", "report"]  # no temp dir left
    report = json.loads((out / "lib.json").read_text())
    assert list(report["methods"].values()) == ["closed form: attention", "closed form: mlp", "closed form: unembed"]

    # the same fit through the Python API
    model = load_hooked_transformer_state_dict(sd, CFG)
    x, y = modular_addition_data(P)
    batches = [(x[i:i + 10], y[i:i + 10]) for i in range(0, len(x), 10)]
    # one target per sequence: by default the paper's layout, the last position after the attention
    layers = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid[-1]", "blocks.0.hook_resid_post[-1]", "output[-1]"]
    result = fit_lib(model, batches, layers, LIBConfig(), progress=False)
    want = json.loads(json.dumps(summarize(result)))
    assert report["metadata"]["node_layers"] == layers and report["metadata"]["n_samples"] == P * P
    got = report["summary"]
    for layer in layers[:-1]:
        for side in ("lib", "pca"):
            assert got["edges"][layer][side]["edges_90"] == want["edges"][layer][side]["edges_90"]
            assert got["edges"][layer][side]["gini"] == pytest.approx(want["edges"][layer][side]["gini"], rel=1e-6)
            assert got["layers"][layer][side]["features_99"] == want["layers"][layer][side]["features_99"]
    assert got["modularity"]["lib"]["gamma_1.0"]["Q"] == pytest.approx(want["modularity"]["lib"]["gamma_1.0"]["Q"])
    edges = load_file(str(out / "edges.safetensors"))
    torch.testing.assert_close(edges["lib/blocks.0.hook_resid_mid[-1]"], result.lib_edges["blocks.0.hook_resid_mid[-1]"])
    bases = load_file(str(out / "bases.safetensors"))
    torch.testing.assert_close(bases["lib/blocks.0.hook_resid_pre/C"], result.lib["blocks.0.hook_resid_pre"].C)
    # ablation with every direction kept reproduces the clean accuracy
    with torch.no_grad():
        clean = (model(x)[:, -1].argmax(-1) == y).double().mean().item()
    for layer, curves in report["ablation"].items():
        assert curves["lib"][-1] == pytest.approx(clean) and curves["pca"][-1] == pytest.approx(clean)


def test_lib_command_errors_write_nothing(checkpoint, capsys):
    _, tmp = checkpoint
    rc = main(["lib", str(tmp / "missing.pt"), "--data", "modular-addition:p=5", "--out", str(tmp / "r1")])
    assert rc == 2 and "missing.pt' does not exist" in capsys.readouterr().err
    rc = main(["lib", str(tmp / "model.pt"), "--data", "modular-addition:p=5", "--out", str(tmp / "r2")])
    assert rc == 2 and "without a stored config" in capsys.readouterr().err
    rc = main(["lib", str(tmp / "model.pt"), "--config", str(tmp / "config.json"), "--data", "modular-addition:p=5",
               "--layers", "blocks.0.hook_resid_pre", "nonsense", "--out", str(tmp / "r3")])
    assert rc == 2 and "unknown layer 'nonsense'" in capsys.readouterr().err
    (tmp / "full").mkdir()
    (tmp / "full" / "keep.txt").write_text("x")
    rc = main(["lib", str(tmp / "model.pt"), "--config", str(tmp / "config.json"), "--out", str(tmp / "full")])
    assert rc == 2 and "already exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in tmp.iterdir()) == ["config.json", "full", "model.pt"]
    assert [p.name for p in (tmp / "full").iterdir()] == ["keep.txt"]
    rc = main(["lib", str(tmp / "model.pt"), "--out", str(tmp / "r4"), "--integration", "simpson"])
    assert rc == 2 and "invalid choice: 'simpson'" in capsys.readouterr().err


def test_report_writer_leaves_nothing_on_error(tmp_path, monkeypatch):
    from evaluation.lib import plots, report as report_lib
    from tests.test_metrics import E3, Basis, FakeResult

    lam = torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)
    basis = Basis("l", torch.eye(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64), lam, torch.zeros(2))
    result = FakeResult(["a", "b", "c"], {l: basis for l in "abc"}, {l: basis for l in "abc"},
                        {"a": E3, "b": E3}, {"a": E3, "b": E3})
    result.config = LIBConfig()

    def broken(*_a, **_k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(plots, "plot_edge_curves", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        report_lib.write_lib_report(result, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the report nor its temporary directory
    monkeypatch.undo()
    report = report_lib.write_lib_report(result, tmp_path / "out")
    assert report["summary"]["edges"]["a"]["lib"]["edges_90"] == 3
    assert json.loads((tmp_path / "out" / "lib.json").read_text())["summary"]["edges"]["b"]["lib"]["gini"] == 0.25


def test_report_directory_mode_and_stale_temporaries(tmp_path):
    """A report folder gets 0777 minus the umask (not mkdtemp's 0700), and the temporary folder
    of a process that was killed outright is removed by the next report written beside it."""
    import os
    import subprocess
    import sys

    from evaluation.lib import report as report_lib
    from tests.test_metrics import E3, Basis, FakeResult

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".old.tmp-{dead_pid}-abc123"
    stale.mkdir()
    (stale / "lib.json").write_text("{}")
    alive = tmp_path / f".other.tmp-{os.getpid()}-xyz"  # a report being written right now
    alive.mkdir()
    lam = torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)
    basis = Basis("l", torch.eye(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64), lam, torch.zeros(2))
    result = FakeResult(["a", "b", "c"], {l: basis for l in "abc"}, {l: basis for l in "abc"},
                        {"a": E3, "b": E3}, {"a": E3, "b": E3})
    result.config = LIBConfig()
    old = os.umask(0o022)
    try:
        report_lib.write_lib_report(result, tmp_path / "out")
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 == 0o755
    assert not stale.exists() and alive.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_absent_device_is_a_clear_error_and_writes_nothing(checkpoint, capsys):
    _, tmp = checkpoint
    out = tmp / "report"
    rc = main(["lib", str(tmp / "model.pt"), "--config", str(tmp / "config.json"), "--data", f"modular-addition:p={P}",
               "--device", "cuda", "--out", str(out), "--quiet"])
    assert rc == 2 and not out.exists()
    assert "device 'cuda' is not available" in capsys.readouterr().err
    rc = main(["lib", str(tmp / "model.pt"), "--config", str(tmp / "config.json"), "--device", "tpu", "--out", str(out)])
    assert rc == 2 and not out.exists()
    assert "unknown device 'tpu'" in capsys.readouterr().err
