"""LIB on a CUDA GPU agrees with the CPU to 1e-9 relative in float64 (skipped without CUDA; `pytest -m gpu`)."""

import json

import pytest
import torch

from evaluation.lib.fit import LIBConfig, fit_lib
from tests.test_compare import runs  # noqa: F401 (the session fixture of tiny digits runs)
from tests.test_structured import bridge, tokens

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
PAPER = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid[-1]", "blocks.0.hook_resid_post[-1]", "output[-1]"]
ALL = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post", "output"]


def assert_close_fits(got, want, rtol=1e-9):
    def close(a, b):
        a, b = torch.as_tensor(a).cpu(), torch.as_tensor(b).cpu()
        scale = b.abs().max().clamp_min(1e-300)
        assert (a - b).abs().max() <= rtol * scale, f"relative difference {((a - b).abs().max() / scale).item():.2e}"

    for name in want.node_layers:
        for side in ("lib", "pca"):
            g, w = getattr(got, side)[name], getattr(want, side)[name]
            close(g.Lambda, w.Lambda)
            signs = torch.sign((g.C.cpu() * w.C.cpu()).sum(0))  # eigenvectors are defined up to sign
            close(g.C.cpu() * signs, w.C)
    for name in want.node_layers[:-1]:
        close(got.lib_edges[name], want.lib_edges[name])
        close(got.pca_edges[name], want.pca_edges[name])


@pytest.mark.parametrize("layers", [PAPER, ALL])
@pytest.mark.parametrize("jacobians", ["auto", "autograd"])
def test_cuda_fit_equals_cpu_fit(layers, jacobians):
    model, data = bridge(n_layers=1, act_fn="relu"), tokens(n=20, batch=10)
    cfg = LIBConfig(jacobians=jacobians)
    cpu = fit_lib(model, data, layers, cfg, progress=False)
    gpu = fit_lib(model.to("cuda"), data, layers, cfg, progress=False)  # batches stay on the CPU: moved by fit_lib
    assert cpu.methods == gpu.methods
    assert all(b.C.device.type == "cpu" for b in gpu.lib.values())  # results come back on the CPU
    assert_close_fits(gpu, cpu)


def test_cli_lib_on_cuda_writes_the_cpu_report(tmp_path):
    from safetensors.torch import load_file

    from evaluation.cli import main
    from tests.test_eval_cli import CFG, P
    from tests.test_checkpoints import random_ht_state_dict

    torch.save(random_ht_state_dict(CFG), tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(json.dumps(CFG))
    edges = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        rc = main(["lib", str(tmp_path / "model.pt"), "--config", str(tmp_path / "config.json"), "--data",
                   f"modular-addition:p={P}", "--device", device, "--dtype", "float64", "--quiet", "--out", str(out)])
        assert rc == 0
        edges[device] = load_file(str(out / "edges.safetensors"))
    assert set(edges["cuda"]) == set(edges["cpu"]) and "lib/blocks.0.hook_resid_mid[-1]" in edges["cpu"]
    for key, value in edges["cpu"].items():
        scale = value.abs().max().clamp_min(1e-300)
        assert (edges["cuda"][key] - value).abs().max() <= 1e-9 * scale, key


def test_alignment_robustness_and_node_ablation_on_cuda_equal_cpu():
    """The manifold metrics and LIB's node-ablation curve with model and data on the GPU, a tangent
    provider answering on the CPU: the CPU's values (float64 model) to 1e-9."""
    from evaluation.metrics.alignment import gradient_alignment
    from evaluation.metrics.lib_summary import node_ablation_curve
    from evaluation.metrics.robustness import manifold_robustness
    from interp_train.tangents import GlobalPCATangents
    from tests.helpers import tiny_mlp

    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(6, 2, generator=g, dtype=torch.float64))[0]
    x = torch.randn(48, 2, generator=g, dtype=torch.float64) @ U.T + 0.05 * torch.randn(48, 6, generator=g,
                                                                                        dtype=torch.float64)
    y = torch.randint(0, 3, (48,), generator=g)
    tangents = GlobalPCATangents(x, dim=2)  # fitted, and answering, on the CPU
    model = tiny_mlp(6, 8, 3).double()
    fit = fit_lib(model, [(x,)], ["input", "1", "output"], LIBConfig(), progress=False)
    values = {}
    for device in ("cpu", "cuda"):
        m, batches = model.to(device), [(x[i:i + 16].to(device), y[i:i + 16].to(device)) for i in (0, 16, 32)]
        align = gradient_alignment(m, batches, tangents, progress=False)
        rob = manifold_robustness(m, batches, tangents, eps=(0.1, 0.5), n_draws=2, seed=3, progress=False)
        curve = node_ablation_curve(m, batches, fit, "1", ks=[0, 1, 3], metric="loss")
        values[device] = [align.mean, *align.quantiles.values(), *rob.on_change, *rob.off_change, *curve]
    assert values["cuda"] == pytest.approx(values["cpu"], rel=1e-9)


def test_compare_on_cuda_measures_what_the_cpu_measures(tmp_path, runs):
    """`interp-eval compare --device cuda` on tiny digits runs, every metric including circuits and
    edge ablation: the CPU's values (float32 models: accuracy exactly, the rest to 1e-3)."""
    from evaluation.compare import MeasureOptions, discover_runs, run_compare

    values = {}
    for device in ("cpu", "cuda"):
        options = MeasureOptions(max_samples=64, device=device, circuit=True, circuit_zero=True, edge_ablation=True)
        report = run_compare(discover_runs(runs["task_dir"]), tmp_path / device, options, progress=False).report
        values[device] = {(v, m): s["values"] for v, row in report["variants"].items()
                          for m, s in row["metrics"].items()}
    assert set(values["cuda"]) == set(values["cpu"]) and ("baseline", "edge_ablation_lib") in values["cpu"]
    for key, want in values["cpu"].items():
        rel = 0 if key[1] == "accuracy" else 1e-3
        assert values["cuda"][key] == pytest.approx(want, rel=rel, abs=1e-6), key
