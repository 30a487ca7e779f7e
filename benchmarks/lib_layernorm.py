"""LIB on a GPT-2-style LayerNorm transformer: closed-form sections against the autograd path.

Model: a natively booted TransformerBridge, 2 layers, d_model 256, 8 heads of 32, d_mlp 1024,
LayerNorm (gains 1 + 0.2·N(0, 1), biases 0.1·N(0, 1), so that γ ≠ 1 and β ≠ 0), GELU, 64 tokens,
vocabulary 512, float64 weights, seed 0; random token sequences (seed 0). Node layers: resid_pre,
resid_mid, resid_post of block 0, resid_mid and resid_post of block 1 (so the sections are
LN1+attention, LN2+MLP, LN1+attention (block 1), LN2+MLP). Exact fits (no probes), gradient rule,
default LIBConfig otherwise (LIB, PCA and neuron-basis edges).

Both paths run under the same conditions: each measurement in a fresh subprocess (so that the peak
resident memory ru_maxrss is its own), same thread count, same batches. Prints, per measurement, the
wall and CPU time of fit_lib (bases + edges), the peak RSS and the load average before and after (the
machine may be shared), and the method of each section.

The autograd path (LIBConfig(jacobians="autograd"): backward passes in every section) is measured on
each of --autograd-sequences (e.g. 2,4: its cost should be linear in the samples, which the
per-sequence figures show) and extrapolated to --sequences, both proportionally from the largest
sample and by the line through the smallest and largest samples (which allows a fixed cost); the
speed-up is reported against the smaller of the two extrapolations. On each autograd sample the
closed-form fit ("exact") is also run, and the largest relative deviation of Λ and of the edges
(LIB, PCA, neuron) from the autograd fit is printed: both are the same exact LIB, so it must be at
rounding level. The closed form is then timed on --sequences for each of --settings; a setting listed
after "exact" is also compared with the exact fit on those sequences (largest relative deviation of
Λ and of the edges).

Usage: python benchmarks/lib_layernorm.py [--sequences 256] [--autograd-sequences 2,4] [--threads 1]
    [--settings exact,float32] [--skip-autograd] [--batch 16]
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

LAYERS = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post",
          "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]
SETTINGS = {  # LIBConfig keyword arguments per named setting
    "exact": {},                                 # closed form, float64 throughout
    "float32": {"jacobian_dtype": "float32"},    # closed form, float32 per-example edge products
    "autograd": {"jacobians": "autograd"},       # backward passes (the path before the LayerNorm closed forms)
}
T, VOCAB = 64, 512


def build():
    import torch
    from transformer_lens import TransformerBridge, TransformerBridgeConfig
    cfg = TransformerBridgeConfig(d_model=256, d_head=32, n_layers=2, n_ctx=T, n_heads=8, d_vocab=VOCAB,
                                  d_vocab_out=VOCAB, d_mlp=1024, act_fn="gelu", normalization_type="LN", seed=0)
    model = TransformerBridge.boot_native(cfg).to(torch.float64)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln" in name or name.startswith("ln"):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + (0.2 if name.endswith("weight") else 0.1)
                        * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


def sequences(n: int):
    import torch
    return torch.randint(0, VOCAB, (n, T), generator=torch.Generator().manual_seed(0))


def measure(kind: str, n: int, batch: int, threads: int, save: str | None) -> dict:
    import torch
    torch.set_num_threads(threads)
    from evaluation.lib.fit import LIBConfig, fit_lib
    model = build()
    toks = sequences(n)
    data = [toks[i:i + batch] for i in range(0, n, batch)]
    load_before = os.getloadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    res = fit_lib(model, data, LAYERS, LIBConfig(**SETTINGS[kind]), progress=False)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    if save:
        torch.save({"lambda": {k: v.Lambda for k, v in res.lib.items()}, "edges": res.edges}, save)
    return {"kind": kind, "n": n, "seconds": seconds, "cpu_seconds": cpu_seconds, "methods": res.methods,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "load_before": load_before, "load_after": os.getloadavg()}


def run_child(kind: str, n: int, args, save: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, str(n), "--threads", str(args.threads), "--batch", str(args.batch)]
    if save:
        cmd += ["--save", save]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=env)  # stderr passes through
    return json.loads(out.stdout.strip().splitlines()[-1])


def deviation(got_path: str, want_path: str) -> tuple[float, float]:
    import torch
    got, want = torch.load(got_path), torch.load(want_path)
    lam = max(((got["lambda"][k] - want["lambda"][k]).abs().max() / want["lambda"][k].abs().max()).item()
              for k in want["lambda"])
    edges = max(((got["edges"][b][k] - want["edges"][b][k]).abs().max() / want["edges"][b][k].abs().max()).item()
                for b in want["edges"] for k in want["edges"][b])
    return lam, edges


def show(r: dict) -> None:
    load = ", ".join(f"{x:.2f}" for x in r["load_before"]) + " -> " + ", ".join(f"{x:.2f}" for x in r["load_after"])
    print(f"  {r['kind']:9s} {r['n']:4d} sequences: {r['seconds']:8.1f} s ({r['cpu_seconds']:.1f} s CPU, "
          f"{r['seconds'] / r['n']:.2f} s per sequence), peak RSS {r['peak_rss_mib']:.0f} MiB, load average {load}")


def extrapolate(runs: list[dict], n: int, key: str) -> tuple[float, float]:
    """(proportional from the largest sample, line through the smallest and largest) estimates at n."""
    small, large = min(runs, key=lambda r: r["n"]), max(runs, key=lambda r: r["n"])
    proportional = large[key] * n / large["n"]
    if small["n"] == large["n"]:
        return proportional, proportional
    slope = (large[key] - small[key]) / (large["n"] - small["n"])
    return proportional, small[key] + slope * (n - small["n"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--autograd-sequences", default="2,4", help="comma-separated sample sizes for the autograd path")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--settings", default="exact", help="closed-form settings to time on --sequences (exact, float32)")
    parser.add_argument("--skip-autograd", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "N"))
    parser.add_argument("--save")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.batch, args.threads, args.save)))
        return
    samples = sorted({int(x) for x in args.autograd_sequences.split(",")})
    if any(n < 1 for n in samples):
        raise ValueError(f"--autograd-sequences must be positive integers, got {args.autograd_sequences!r}")
    print(f"GPT-2-style LayerNorm transformer (2 layers, d_model 256, 8 heads, d_mlp 1024, GELU, {T} tokens), "
          f"node layers {LAYERS}, exact, gradient rule, {args.threads} threads, batches of {args.batch}")
    with tempfile.TemporaryDirectory() as tmp:
        autos = []
        for n in [] if args.skip_autograd else samples:
            auto = run_child("autograd", n, args, os.path.join(tmp, f"autograd{n}.pt"))
            closed = run_child("exact", n, args, os.path.join(tmp, f"exact{n}.pt"))
            autos.append(auto)
            print(f"autograd path against the closed form on {n} sequences:")
            show(auto)
            show(closed)
            for r in (auto, closed):
                print(f"    methods ({r['kind']}): " + "; ".join(f"{k}: {v}" for k, v in r["methods"].items()))
            lam, edges = deviation(os.path.join(tmp, f"exact{n}.pt"), os.path.join(tmp, f"autograd{n}.pt"))
            print(f"  closed form vs autograd: max relative deviation of Lambda {lam:.1e}, of the edges {edges:.1e}")
        if autos:
            wall, cpu = extrapolate(autos, args.sequences, "seconds"), extrapolate(autos, args.sequences, "cpu_seconds")
            line = (f"; {wall[1]:.0f} s wall ({cpu[1]:.0f} s CPU) by the line through {autos[0]['n']} and "
                    f"{autos[-1]['n']}" if len(autos) > 1 else " (one sample: linearity not checked)")
            print(f"autograd path extrapolated to {args.sequences} sequences: {wall[0]:.0f} s wall ({cpu[0]:.0f} s CPU) "
                  f"proportionally from {autos[-1]['n']}" + line)
        print(f"closed form on {args.sequences} sequences:")
        kinds = args.settings.split(",")
        for kind in kinds:
            r = run_child(kind, args.sequences, args, os.path.join(tmp, f"{kind}-closed.pt"))
            show(r)
            if kind != "exact" and "exact" in kinds[:kinds.index(kind)]:
                lam, edges = deviation(os.path.join(tmp, f"{kind}-closed.pt"), os.path.join(tmp, "exact-closed.pt"))
                print(f"    {kind} vs exact on these sequences: max relative deviation of Lambda {lam:.1e}, "
                      f"of the edges {edges:.1e}")
            if autos:
                five_minutes = (("met" if r["seconds"] < 300 else "not met") if args.sequences == 256
                                else "set for 256 sequences")
                print(f"    speed-up over the autograd path (extrapolated; the smaller estimate): "
                      f"{min(wall) / r['seconds']:.0f}x wall, {min(cpu) / r['cpu_seconds']:.0f}x CPU time "
                      f"(target >= 50x; 5-minute target: {five_minutes})")


if __name__ == "__main__":
    main()
