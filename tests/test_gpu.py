"""LIB on a CUDA GPU agrees with the CPU to 1e-9 relative in float64 (skipped without CUDA; `pytest -m gpu`)."""

import json

import pytest
import torch

from evaluation.lib.fit import LIBConfig, fit_lib
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
