"""Regularized training under Lightning DDP (2 CPU processes, gloo) against one process on the
same global batch.

The 2-process runs are this file run as a script under ``python -m torch.distributed.run
--nproc_per_node 2`` (what ``torchrun`` does), which writes one JSON per rank; the reference is
a plain single-process loop (``regularized_loss`` + SGD) on the global batch of 16 examples.
Each rank gets the examples r, r + 2, ... (8 per rank; a fixed DistributedSampler).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # when run as a script by torchrun
    sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402

from interp_train.distributed import gather_rows, global_batch  # noqa: E402
from interp_train.lightning import attach_regularizers  # noqa: E402
from interp_train.regularizers import (  # noqa: E402
    ActivationDegeneracy,
    ConnectionCost,
    GradientDegeneracy,
    GradientNorm,
    OffManifoldGradientPenalty,
    regularized_loss,
)
from interp_train.regularizers.degeneracy import effective_rank  # noqa: E402
from interp_train.schedules import LinearWarmup  # noqa: E402
from interp_train.tangents import GlobalPCATangents  # noqa: E402

N_EXAMPLES, D_IN, N_CLASSES, STEPS, LR = 16, 5, 3, 3, 0.1
CONFIGS = ("per_example", "global_batch", "local_batch")


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(N_EXAMPLES, D_IN, generator=g, dtype=torch.float64),
            torch.randint(0, N_CLASSES, (N_EXAMPLES,), generator=g))


def make_regularizers(config: str) -> list:
    x, _ = data()
    if config == "per_example":
        return [GradientNorm(weight=LinearWarmup(0.5, warmup_steps=2)),
                ConnectionCost(weight=0.01, layers=["net.0", "net.2"]),
                OffManifoldGradientPenalty(weight=0.3, tangents=GlobalPCATangents(x, dim=2))]
    if config == "global_batch":
        return [global_batch(ActivationDegeneracy(weight=0.2, layers="net.1")),
                global_batch(GradientDegeneracy(weight=0.2, layers="net.1", measure="entropy"))]
    if config == "local_batch":
        return [ActivationDegeneracy(weight=0.2, layers="net.1")]
    raise ValueError(f"unknown config {config!r}; allowed: {', '.join(CONFIGS)}")


def make_net() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(D_IN, 7), nn.Tanh(), nn.Linear(7, N_CLASSES)).double()


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = make_net()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


class RecordTerms(L.Callback):
    """Per step: this rank's logged reg/* values (its local batch)."""

    def __init__(self):
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("reg/")})


def ddp_worker(out_dir: str) -> None:
    """Run by each torchrun process: DDP training for every config, one JSON per rank."""
    from lightning.pytorch.strategies import DDPStrategy

    torch.set_num_threads(1)
    x, y = data()
    # Lightning's own distributed sampler shuffles; a fixed split (rank r: examples r, r + 2, ...)
    # lets the test name each rank's rows.
    dataset = torch.utils.data.TensorDataset(x, y)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=int(os.environ["WORLD_SIZE"]),
                                                  rank=int(os.environ["RANK"]), shuffle=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=N_EXAMPLES // 2, sampler=sampler)
    results = {}
    for config in CONFIGS:
        model = attach_regularizers(Classifier(), make_regularizers(config))
        record = RecordTerms()
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"),
                            max_steps=STEPS, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False, callbacks=[record], use_distributed_sampler=False)
        trainer.fit(model, loader)
        results[config] = {"steps": record.steps, "rank": trainer.global_rank,
                           "params": {k: v.tolist() for k, v in model.net.state_dict().items()},
                           "reg_steps": [r.step for r in model.regularizers]}
    Path(out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(results))


def torchrun(args: list[str], nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    from evaluation.lib.distributed import torchrun_command

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = torchrun_command(nproc, *args)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def reference_run(config: str) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    """One process, the whole global batch per step: logs per step and final parameters."""
    net = Classifier()  # used as a plain nn.Module: same site names ("net.0") as under Lightning
    regs = make_regularizers(config)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    x, y = data()
    logs = []
    for _ in range(STEPS):
        out = regularized_loss(net, x, y, regs)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        logs.append(out.logs())
    return logs, net.net.state_dict()


# ---------------------------------------------------------------------------- tests
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    """One torchrun launch (the start-up dominates) running the DDP and the LIB workers."""
    out = tmp_path_factory.mktemp("two_process")
    torchrun([str(Path(__file__).resolve()), "ddp,lib", str(out)])
    return out


@pytest.fixture(scope="module")
def ddp_results(two_process_run) -> list[dict]:
    return [json.loads((two_process_run / f"rank{r}.json").read_text()) for r in range(2)]


def rank_mean(ranks: list[dict], config: str, step: int, key: str) -> float:
    key = "total_loss" if key == "loss" else key  # RegularizedMixin logs the total as reg/total_loss
    return sum(r[config]["steps"][step][f"reg/{key}"] for r in ranks) / len(ranks)


@pytest.mark.parametrize("config", ["per_example", "global_batch"])
def test_ddp_matches_single_process_on_global_batch(ddp_results, config):
    ref_logs, ref_params = reference_run(config)
    for step, ref in enumerate(ref_logs):
        # per-example means: the global mean is the mean of the equal-size per-rank means;
        # gathered batch statistics and weight penalties are equal on every rank. Lightning logs
        # in float32, hence rel=1e-6 here; the parameters below are compared in float64.
        for key, value in ref.items():
            assert rank_mean(ddp_results, config, step, key) == pytest.approx(value, rel=1e-6, abs=1e-9), (step, key)
        if config == "global_batch":
            for key in (k for k in ref if k.endswith("erank/net.1")):
                values = [r[config]["steps"][step][f"reg/{key}"] for r in ddp_results]
                assert values[0] == pytest.approx(values[1], rel=1e-6)
    for r in ddp_results:  # same parameter updates (DDP keeps ranks in sync)
        assert r[config]["reg_steps"] == [STEPS] * len(make_regularizers(config))
        for name, value in ref_params.items():
            torch.testing.assert_close(torch.tensor(r[config]["params"][name], dtype=torch.float64), value,
                                       rtol=1e-9, atol=1e-12)


def test_ddp_schedule_weights_agree_across_ranks(ddp_results):
    weights = [[s["reg/gradient_norm/weight"] for s in r["per_example"]["steps"]] for r in ddp_results]
    assert weights[0] == weights[1] == pytest.approx([0.0, 0.25, 0.5])


def test_ungathered_degeneracy_is_the_per_rank_batch_statistic(ddp_results):
    """Without global_batch, rank r's term is the effective rank of its own 8 rows (not of 16)."""
    x, _ = data()
    net = make_net()
    hidden = net[:2](x).detach()
    global_value = float(effective_rank(hidden))
    for r in ddp_results:
        rank = r["local_batch"]["rank"]
        local_value = float(effective_rank(hidden[rank::2]))
        assert r["local_batch"]["steps"][0]["reg/activation_degeneracy/erank/net.1"] == pytest.approx(local_value, rel=1e-6)
        assert abs(local_value - global_value) > 1e-3


def test_single_process_helpers_are_identities():
    t = torch.randn(4, 3, requires_grad=True)
    assert gather_rows(t) is t
    reg = ActivationDegeneracy(layers="net.1")
    assert reg.gather is None and reg.batch_rows(t) is t
    assert global_batch(reg) is reg and type(reg) is ActivationDegeneracy and reg.gather is gather_rows
    assert reg.batch_rows(t) is t  # one process: the gather is the identity
    with pytest.raises(TypeError, match="GradientNorm"):
        global_batch(GradientNorm())


def test_gather_hook_feeds_every_batch_statistic():
    """The public hook: each degeneracy regularizer computes its effective rank from gather(rows)."""
    from interp_train.regularizers import FiringPatternDegeneracy

    x, y = data()
    net = make_net()
    extra = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for reg in (ActivationDegeneracy(layers="1"), GradientDegeneracy(layers="1"), FiringPatternDegeneracy(layers="0")):
        seen = []
        reg.gather = lambda rows: seen.append(rows.shape) or torch.cat([rows, extra])
        term = regularized_loss(net, x, y, [reg]).terms[f"{reg.name}/erank/{reg.layers[0]}"]
        assert seen == [(N_EXAMPLES, 7)]
        if isinstance(reg, ActivationDegeneracy):
            hidden = net[:2](x).detach()
            torch.testing.assert_close(term.detach(), effective_rank(torch.cat([hidden, extra])))


# ---------------------------------------------------------------------------- distributed LIB

MLP_LAYERS = ["0", "1", "output"]
TF_LAYERS = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post", "output"]


def lib_cases():
    """(name, model, batches, node layers, config): 5 uneven batches, so rank 0 gets 3 and rank 1 2."""
    from evaluation.lib.fit import LIBConfig
    from transformer_lens import TransformerBridge, TransformerBridgeConfig

    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()
    x = torch.randn(26, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    tf = TransformerBridge.boot_native(TransformerBridgeConfig(
        d_model=8, d_head=4, n_layers=1, n_ctx=4, n_heads=2, d_vocab=7, d_vocab_out=5, d_mlp=16, act_fn="relu",
        normalization_type=None, seed=0)).double()
    toks = torch.randint(0, 7, (26, 3), generator=torch.Generator().manual_seed(3))
    return [("mlp", mlp, [x[i:i + 6] for i in range(0, 26, 6)], MLP_LAYERS,
             LIBConfig(integration="trapezoid", n_intervals=2)),
            ("transformer", tf, [(toks[i:i + 6],) for i in range(0, 26, 6)], TF_LAYERS, LIBConfig())]


def lib_tensors(result) -> dict[str, torch.Tensor]:
    out = {}
    for side, bases, edges in (("lib", result.lib, result.lib_edges), ("pca", result.pca, result.pca_edges)):
        for layer, basis in bases.items():
            out[f"{side}/{layer}/C"], out[f"{side}/{layer}/Lambda"] = basis.C, basis.Lambda
        out.update({f"{side}/{layer}/E": E for layer, E in edges.items()})
    return out


def lib_worker(out_dir: str) -> None:
    """Run by each torchrun process: fit_lib_distributed on every case; every rank saves its result."""
    from evaluation.lib.distributed import fit_lib_distributed, init_from_env

    torch.set_num_threads(1)
    rank, _ = init_from_env("gloo")
    results = {name: lib_tensors(fit_lib_distributed(model, batches, layers, config, progress=False))
               for name, model, batches, layers, config in lib_cases()}
    torch.save(results, Path(out_dir, f"lib_rank{rank}.pt"))


def assert_same_up_to_column_signs(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """C columns may differ in sign (eigenvector ambiguity); Lambda and E are sign invariant."""
    assert got.keys() == want.keys()
    for key, ref in want.items():
        value = got[key]
        if key.endswith("/C"):
            value = value * torch.sign((value * ref).sum(dim=0)).where((value * ref).sum(dim=0) != 0, 1.0)
        torch.testing.assert_close(value, ref, rtol=1e-8, atol=1e-8 * float(ref.abs().max()), msg=key)


def test_distributed_lib_equals_single_process_fit(two_process_run):
    from evaluation.lib.fit import fit_lib

    ranks = [torch.load(two_process_run / f"lib_rank{r}.pt") for r in range(2)]
    for name, model, batches, layers, config in lib_cases():
        want = lib_tensors(fit_lib(model, batches, layers, config, progress=False))
        for rank in ranks:
            assert_same_up_to_column_signs(rank[name], want)
        assert want["lib/0/E" if name == "mlp" else "lib/blocks.0.hook_resid_pre/E"].abs().sum() > 0


def test_fit_lib_distributed_needs_a_batch_per_process():
    from evaluation.lib.distributed import fit_lib_distributed
    from evaluation.lib.fit import fit_lib

    name, model, batches, layers, config = lib_cases()[0]
    single = fit_lib_distributed(model, batches, layers, config, progress=False)  # no process group: fit_lib
    for key, value in lib_tensors(fit_lib(model, batches, layers, config, progress=False)).items():
        torch.testing.assert_close(lib_tensors(single)[key], value, rtol=0, atol=0)
    # two ranks with one batch: caught before any collective
    import evaluation.lib.distributed as distributed
    original = distributed.rank_and_world
    distributed.rank_and_world = lambda: (0, 2)
    try:
        with pytest.raises(ValueError, match="1 batches cannot be split over 2 processes"):
            fit_lib_distributed(model, batches[:1], layers, config, progress=False)
    finally:
        distributed.rank_and_world = original


@pytest.mark.slow  # ~30 s: two CLI runs, one of them re-launched on 2 processes
def test_interp_eval_lib_on_two_processes_writes_the_single_process_report(tmp_path):
    """`interp-eval lib --nproc 2` (re-launched under torchrun) against the one-process command."""
    from safetensors.torch import load_file

    from evaluation.cli import main
    from tests.test_checkpoints import random_ht_state_dict

    cfg = dict(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=12, d_vocab=6, d_vocab_out=5, n_ctx=3,
               act_fn="relu", normalization_type=None)
    torch.save(random_ht_state_dict(cfg), tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    common = ["lib", str(tmp_path / "model.pt"), "--config", str(tmp_path / "config.json"),
              "--data", "modular-addition:p=5", "--batch-size", "7", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    assert main([*common, "--out", str(tmp_path / "two"), "--nproc", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    for name in ("bases.safetensors", "edges.safetensors"):
        got, want = load_file(str(tmp_path / "two" / name)), load_file(str(tmp_path / "one" / name))
        assert_same_up_to_column_signs({k: v for k, v in got.items() if not k.endswith("C_pinv")},
                                       {k: v for k, v in want.items() if not k.endswith("C_pinv")})
    one, two = (json.loads((tmp_path / d / "lib.json").read_text()) for d in ("one", "two"))
    assert two["metadata"]["n_samples"] == one["metadata"]["n_samples"] == 25
    assert two["ablation"].keys() == one["ablation"].keys()
    for layer, curves in one["ablation"].items():
        assert two["ablation"][layer]["ks"] == curves["ks"]
        for basis in ("lib", "pca"):
            assert two["ablation"][layer][basis] == pytest.approx(curves[basis])
    assert main([*common, "--out", str(tmp_path / "three"), "--nproc", "0"]) == 2  # bad input: exit code 2, no traceback
    assert not (tmp_path / "three").exists()


@pytest.mark.parametrize("worker", [False, True], ids=["plain", "torchrun worker"])
def test_interp_eval_command_skips_interpreter_finalization_only_in_a_torchrun_worker(worker, tmp_path):
    """The console entry point exits with main()'s code; a torchrun worker (WORLD_SIZE and RANK set)
    leaves without interpreter finalization (no atexit handler runs), where gloo can abort it."""
    code = ("import atexit, sys; atexit.register(lambda: print('finalized', flush=True)); "
            "sys.argv = ['interp-eval', 'lib', 'missing.pt', '--out', 'never', '--max-samples', '0']; "
            "from evaluation.cli import console_main; console_main()")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    if worker:
        env.update(WORLD_SIZE="1", RANK="0")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr  # bad input, as from main()
    assert "--max-samples must be >= 1, got 0" in proc.stderr
    assert ("finalized" in proc.stdout) is not worker
    assert not (tmp_path / "never").exists()


if __name__ == "__main__":
    workers = {"ddp": ddp_worker, "lib": lib_worker}
    for worker in sys.argv[1].split(","):
        if worker not in workers:
            raise SystemExit(f"unknown worker {worker!r}; allowed: {', '.join(workers)}")
        workers[worker](sys.argv[2])
    from evaluation.lib.distributed import leave_worker

    leave_worker(0)  # not through interpreter finalization, where gloo can abort a finished worker
