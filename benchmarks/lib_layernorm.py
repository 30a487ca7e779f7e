"""LIB on a GPT-2-style LayerNorm transformer: closed-form sections against the autograd path.

Model: a natively booted TransformerBridge, 2 layers, d_model 256, 8 heads of 32, d_mlp 1024,
LayerNorm (gains 1 + 0.2·N(0, 1), biases 0.1·N(0, 1), so that γ ≠ 1 and β ≠ 0), GELU, 64 tokens,
vocabulary 512, float64 weights, seed 0; random token sequences (seed 0). Node layers: resid_pre,
resid_mid, resid_post of block 0, resid_mid and resid_post of block 1 (so the sections are
LN1+attention, LN2+MLP, LN1+attention (block 1), LN2+MLP). Exact fits (no probes), gradient rule.

Prints, per measurement (each in a fresh subprocess, so that the peak resident memory ru_maxrss is
its own): the wall and CPU time of fit_lib (bases + edges, LIB and PCA), the method of each section, the
peak RSS and the load average before and after (the machine may be shared). The autograd path is
measured on --autograd-sequences sequences and extrapolated linearly to --sequences (its cost is
linear in the samples); the closed form on --sequences. On the autograd sample the closed-form
fit is also run, and the largest relative deviation of Λ and of the edges from the autograd fit
is printed.

Usage: python benchmarks/lib_layernorm.py [--sequences 256] [--autograd-sequences 8] [--threads 2]
    [--settings float32,exact] [--skip-autograd] [--batch 16]
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
        torch.save({"lambda": {k: v.Lambda for k, v in res.lib.items()}, "lib_edges": res.lib_edges,
                    "pca_edges": res.pca_edges}, save)
    return {"kind": kind, "n": n, "seconds": seconds, "cpu_seconds": cpu_seconds, "methods": res.methods,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "load_before": load_before, "load_after": os.getloadavg()}


def run_child(kind: str, n: int, args, save: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, str(n), "--threads", str(args.threads), "--batch", str(args.batch)]
    if save:
        cmd += ["--save", save]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def deviation(got_path: str, want_path: str) -> tuple[float, float]:
    import torch
    got, want = torch.load(got_path), torch.load(want_path)
    lam = max(((got["lambda"][k] - want["lambda"][k]).abs().max() / want["lambda"][k].abs().max()).item()
              for k in want["lambda"])
    edges = max(((got[e][k] - want[e][k]).abs().max() / want[e][k].abs().max()).item()
                for e in ("lib_edges", "pca_edges") for k in want[e])
    return lam, edges


def show(r: dict) -> None:
    load = ", ".join(f"{x:.2f}" for x in r["load_before"]) + " -> " + ", ".join(f"{x:.2f}" for x in r["load_after"])
    print(f"  {r['kind']:9s} {r['n']:4d} sequences: {r['seconds']:8.1f} s ({r['cpu_seconds']:.1f} s CPU), "
          f"peak RSS {r['peak_rss_mib']:.0f} MiB, load average {load}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--autograd-sequences", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--settings", default="float32,exact", help="closed-form settings to time on --sequences")
    parser.add_argument("--skip-autograd", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "N"))
    parser.add_argument("--save")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.batch, args.threads, args.save)))
        return
    print(f"GPT-2-style LayerNorm transformer (2 layers, d_model 256, 8 heads, d_mlp 1024, GELU, {T} tokens), "
          f"node layers {LAYERS}, exact, gradient rule, {args.threads} threads, batches of {args.batch}")
    with tempfile.TemporaryDirectory() as tmp:
        auto = None
        if not args.skip_autograd:
            n = args.autograd_sequences
            auto = run_child("autograd", n, args, os.path.join(tmp, "autograd.pt"))
            closed = run_child("exact", n, args, os.path.join(tmp, "exact.pt"))
            print(f"autograd path against the closed form on {n} sequences:")
            show(auto)
            show(closed)
            print("  methods (closed form): " + "; ".join(f"{k}: {v}" for k, v in closed["methods"].items()))
            lam, edges = deviation(os.path.join(tmp, "exact.pt"), os.path.join(tmp, "autograd.pt"))
            print(f"  closed form vs autograd: max relative deviation of Lambda {lam:.1e}, of the edges {edges:.1e}")
            print(f"  autograd extrapolated to {args.sequences} sequences: "
                  f"{auto['seconds'] * args.sequences / n:.0f} s")
        print(f"closed form on {args.sequences} sequences:")
        for kind in args.settings.split(","):
            r = run_child(kind, args.sequences, args)
            show(r)
            if auto is not None:
                speedup = auto["seconds"] * args.sequences / auto["n"] / r["seconds"]
                cpu_speedup = auto["cpu_seconds"] * args.sequences / auto["n"] / r["cpu_seconds"]
                print(f"    speed-up over the autograd path (extrapolated linearly from {auto['n']} sequences): "
                      f"{speedup:.0f}x wall, {cpu_speedup:.0f}x CPU time (target >= 50x)")


if __name__ == "__main__":
    main()
