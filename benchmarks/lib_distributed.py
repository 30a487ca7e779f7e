"""LIB on the modular-addition transformer: one process vs two processes (torch.distributed, gloo).

Model and data as in benchmarks/lib_scaling.py (1-layer TransformerBridge, p = 113, d_model 128,
float64, node layers resid_pre, resid_mid, resid_post, output; randomly initialised). Cases:

* 1 process x 1 thread, 1 process x 2 threads: ``fit_lib`` on all batches;
* 2 processes x 1 thread: ``python -m torch.distributed.run --nproc_per_node 2`` running
  ``fit_lib_distributed`` (batches r, r + 2, ...; float64 sums all-reduced).

Each case is a fresh subprocess; "fit_s" is the fit alone (after a barrier, model built),
"wall_s" includes interpreter start, imports and the rendezvous. The 2-process result is
checked against the 1-process one (max relative difference of every Lambda and edge matrix).

Usage: python benchmarks/lib_distributed.py [--samples 958] [--batch 128] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lib_scaling import LAYERS, build, pairs  # noqa: E402


def child(samples: int, batch: int, threads: int, out: str) -> None:
    import torch

    torch.set_num_threads(threads)
    from evaluation.lib.distributed import all_reduce_sum, fit_lib_distributed, init_from_env, launched_by_torchrun

    rank = init_from_env("gloo")[0] if launched_by_torchrun() else 0
    model = build(128)
    toks = pairs(samples)
    data = [toks[i:i + batch] for i in range(0, samples, batch)]
    all_reduce_sum(torch.zeros(1))  # barrier: every rank has built its model
    t0 = time.perf_counter()
    res = fit_lib_distributed(model, data, LAYERS, progress=False)
    seconds = time.perf_counter() - t0
    if rank == 0:
        tensors = {f"Lambda/{k}": b.Lambda for k, b in res.lib.items()}
        tensors.update({f"E/{k}": e for k, e in res.lib_edges.items()})
        torch.save(tensors, out)
        print(json.dumps({"fit_s": seconds}))


def run_case(nproc: int, threads: int, samples: int, batch: int, out: str) -> dict:
    from evaluation.lib.distributed import torchrun_command

    args = [__file__, "--child", str(samples), str(batch), str(threads), out]
    cmd = [sys.executable, *args] if nproc == 1 else torchrun_command(nproc, *args)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    line = [l for l in proc.stdout.splitlines() if l.startswith("{")][-1]
    return {"processes": nproc, "threads_each": threads, "fit_s": json.loads(line)["fit_s"], "wall_s": wall}


def max_rel_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-300)) for k in b)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=958)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1, help="runs per case (the minimum fit time is reported)")
    ap.add_argument("--child", nargs=4)
    args = ap.parse_args()
    if args.child:
        samples, batch, threads, out = args.child
        child(int(samples), int(batch), int(threads), out)
        from evaluation.lib.distributed import launched_by_torchrun, leave_worker

        if launched_by_torchrun():
            leave_worker(0)  # not through interpreter finalization, where gloo can abort a finished worker
        return
    import tempfile

    import torch

    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for nproc, threads in ((1, 1), (1, 2), (2, 1)):
            out = str(Path(tmp, f"{nproc}x{threads}.pt"))
            runs = [run_case(nproc, threads, args.samples, args.batch, out) for _ in range(args.repeats)]
            best = min(runs, key=lambda r: r["fit_s"])
            rows.append(best)
            results[(nproc, threads)] = torch.load(out)
    base = rows[0]["fit_s"]
    print(f"LIB fit, modular-addition transformer (d_model 128), {args.samples} pairs, batch {args.batch}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print("| processes x threads | fit (s) | wall incl. start-up (s) | speed-up vs 1x1 |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['processes']} x {r['threads_each']} | {r['fit_s']:.1f} | {r['wall_s']:.1f} | "
              f"{base / r['fit_s']:.2f} |")
    print(f"max relative difference 2 processes vs 1: {max_rel_diff(results[(2, 1)], results[(1, 1)]):.1e}")


if __name__ == "__main__":
    main()
