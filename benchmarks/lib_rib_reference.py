"""LIB with the LIB paper's settings on rib's published modular-addition checkpoint, from the CLI.

    python benchmarks/lib_rib_reference.py [--ref ../shared/ref/rib_modadd_seed0] [--device auto] [--repeat 3]

The checkpoint (``model_epoch_60000.pt``: seed 0, p = 113, 1 layer, d_model 128, 4 heads, d_mlp 512,
ReLU, no LayerNorm; see the README next to it) is fitted as in the paper: rib's 3830 training pairs
(``torch.randperm(113², generator seed 0)[:3830]`` of the row-major pairs, which is what
``--data modular-addition:p=113 --max-samples 3830`` draws), node layers resid_pre (every position),
resid_mid[-1], resid_post[-1], output[-1], centred, float64 model, gradient rule, logits unrotated.

1. ``interp-eval lib`` end to end in a subprocess, ``--repeat`` times (3): wall and CPU time of each
   and the children's peak RSS; once more with ``--no-neuron-edges`` (LIB + PCA edges only).
2. The same steps in this process, timed one by one: import, load (checkpoint and data), fit
   (``fit_lib``: LIB + PCA + edges), write (the report without ablation curves) — wall and CPU time
   (the garbage collector and the allocator set as the CLI sets them, see evaluation.startup). The fit, as
   the CLI runs it, includes the edges in the neuron basis (LIBConfig.neuron_edges); it is timed
   again without them (LIB + PCA edges only, what the fit target was set for).
3. ``interp-eval --help`` wall time (nothing heavy may be imported for it).

Per layer it prints the top Λ, the features for 99 % of ΣΛ and, per section, the total edge weight
and the edges for 90 % of it, LIB vs PCA (the constant feature excluded). Targets on a 2-core CPU:
fit ≤ 2 s, peak RSS ≤ 1 GiB, end to end ≤ 8 s, --help ≤ 1.5 s. Timings taken while other jobs run
are inflated; the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid[-1]", "blocks.0.hook_resid_post[-1]", "output[-1]"]
CONFIG = {"n_layers": 1, "d_model": 128, "n_heads": 4, "d_head": 32, "d_mlp": 512, "d_vocab": 114,
          "d_vocab_out": 114, "n_ctx": 3, "act_fn": "relu", "normalization_type": None}
TARGETS = {"fit_s": 2.0, "rss_gib": 1.0, "cli_s": 8.0, "help_s": 1.5}


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def cli_args(ref: Path, config: Path, out: Path, device: str) -> list[str]:
    return ["lib", str(ref / "model_epoch_60000.pt"), "--config", str(config), "--data", "modular-addition:p=113",
            "--max-samples", "3830", "--layers", *LAYERS, "--dtype", "float64",
            "--device", device, "--no-ablation", "--quiet", "--out", str(out)]


def end_to_end(args: list[str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS GiB) of ``python -m evaluation.cli *args`` in a child process."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "evaluation.cli", *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"interp-eval failed ({proc.returncode}): {proc.stderr.strip()}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return wall, cpu, after.ru_maxrss / 2 ** 20  # Linux: KiB, the largest child so far


def help_time() -> float:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "evaluation.cli", "--help"], env=env, capture_output=True, check=True)
    return time.perf_counter() - start


def staged(ref: Path, config: Path, out: Path, device: str) -> dict[str, tuple[float, float]]:
    """{stage: (wall, cpu)} for import, load, fit and write, run in this process like the CLI does."""
    clock = lambda: (time.perf_counter(), time.process_time())  # noqa: E731
    stages, t = {}, clock()

    def mark(name):
        nonlocal t
        now = clock()
        stages[name] = (now[0] - t[0], now[1] - t[1])
        t = now

    from evaluation.startup import collector_paused, keep_freed_memory, release

    keep_freed_memory()  # as the CLI does (evaluation.startup)
    with collector_paused():  # likewise
        import torch

        from evaluation.lib_command import _batches, _subsample, parse_data
        from evaluation.io.checkpoints import load_checkpoint
        from evaluation.io.device import resolve_device
        from evaluation.lib.fit import LIBConfig, fit_lib
        from evaluation.lib.report import write_lib_report
        mark("import")
        loaded = load_checkpoint(ref / "model_epoch_60000.pt", config=json.loads(config.read_text()))
        model = loaded.model.to(resolve_device(device)).to(torch.float64)
    batches = _batches(*_subsample(*parse_data("modular-addition:p=113"), 3830), 512)  # the CLI default
    mark("load")
    result = fit_lib(model, batches, LAYERS, LIBConfig(), progress=False)
    mark("fit")
    write_lib_report(result, out, {"node_layers": LAYERS}, {})
    mark("write")
    fit_lib(model, batches, LAYERS, LIBConfig(neuron_edges=False), progress=False)
    mark("fit, LIB + PCA edges only")
    release()
    return stages


def figures(out: Path) -> None:
    from safetensors.torch import load_file

    from evaluation.metrics.lib_summary import edges_for_fraction, feature_count

    bases, edges = load_file(str(out / "bases.safetensors")), load_file(str(out / "edges.safetensors"))
    print(f"\n{'node layer':32s} {'top Λ (LIB)':>12s} {'top var (PCA)':>14s} {'99 % ΣΛ LIB/PCA':>17s}"
          f" {'edges total LIB / PCA':>25s} {'edges 90 % LIB/PCA':>19s}")
    for layer in LAYERS:
        lam = {side: bases[f"{side}/{layer}/Lambda"] for side in ("lib", "pca")}
        row = (f"{layer:32s} {lam['lib'][1:].max().item():12.4g} {lam['pca'][1:].max().item():14.4g} "
               f"{feature_count(lam['lib']):>8d} / {feature_count(lam['pca']):<6d}")
        if layer != LAYERS[-1]:
            E = {side: edges[f"{side}/{layer}"] for side in ("lib", "pca")}
            n90 = {side: edges_for_fraction(E[side], 0.9)[0] for side in E}
            row += (f" {E['lib'][1:, 1:].sum().item():11.5g} / {E['pca'][1:, 1:].sum().item():<11.5g}"
                    f" {n90['lib']:>8d} / {n90['pca']:<6d}")
        print(row)
    print("(final layer: logits at '=', unrotated; Λ = E[logit²]. 'edges' rows: section from this layer to the next)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", default=str(ROOT / ".." / "shared" / "ref" / "rib_modadd_seed0"),
                        help="folder holding rib's model_epoch_60000.pt")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--repeat", type=int, default=3, help="end-to-end runs (the fastest is compared with the target)")
    args = parser.parse_args()
    ref = Path(args.ref)
    if not (ref / "model_epoch_60000.pt").is_file():
        raise SystemExit(f"no model_epoch_60000.pt in {str(ref)!r}; pass --ref")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = tmp / "config.json"
        config.write_text(json.dumps(CONFIG))
        load_before = load_average()
        help_s = help_time()
        runs = [end_to_end(cli_args(ref, config, tmp / f"cli{i}", args.device)) for i in range(max(1, args.repeat))]
        rss = max(r[2] for r in runs)
        lean = end_to_end([*cli_args(ref, config, tmp / "lean", args.device), "--no-neuron-edges"])
        stages = staged(ref, config, tmp / "staged", args.device)
        load_after = load_average()
        figures(tmp / "cli0")
    import torch

    print(f"\nmachine: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, device {args.device}, "
          f"load average {load_before} (before) / {load_after} (after)")
    print(f"{'measure':34s} {'wall s':>8s} {'cpu s':>8s}   target")
    for name in ("import", "load", "fit", "write", "fit, LIB + PCA edges only"):
        wall, cpu = stages[name]
        target = f"≤ {TARGETS['fit_s']} s (wall, idle 2-core CPU)" if name.startswith("fit") else ""
        print(f"{'in process: ' + name:34s} {wall:8.2f} {cpu:8.2f}   {target}")
    for i, (wall, cpu, _) in enumerate(runs):
        label = f"interp-eval lib, end to end ({i + 1})"
        target = f"≤ {TARGETS['cli_s']} s (fastest: {min(r[0] for r in runs):.2f} s)" if i == 0 else ""
        print(f"{label:34s} {wall:8.2f} {cpu:8.2f}   {target}")
    print(f"{'end to end, --no-neuron-edges':34s} {lean[0]:8.2f} {lean[1]:8.2f}   ≤ {TARGETS['cli_s']} s (LIB + PCA)")
    print(f"{'interp-eval --help':34s} {help_s:8.2f} {'':>8s}   ≤ {TARGETS['help_s']} s")
    print(f"{'peak RSS of interp-eval lib (GiB)':34s} {rss:8.2f} {'':>8s}   ≤ {TARGETS['rss_gib']} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
