"""Time and peak memory of a full LIB fit (bases + edges, LIB and PCA) on the modular-addition transformer.

1-layer TransformerBridge (p = 113, d_model 128, 4 heads of 32, d_mlp 512, ReLU, no LayerNorm,
tokens (a, b, =) with = as token 113), randomly initialised, float64; node layers resid_pre,
resid_mid, resid_post, output. Prints: the end-to-end fit on 3830 training pairs, growth with the
number of samples (x1, x2, x4) and with d_model (64, 128, 256), and the ratio against the naive
dense reference (evaluation/naive.py) on a small subset. Each measurement runs in a fresh
subprocess so that its peak resident memory (ru_maxrss) is its own.

Usage: python benchmarks/lib_scaling.py [--threads 2] [--samples 3830] [--base 958] [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

P = 113
LAYERS = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post", "output"]


def build(d_model: int):
    import torch
    from transformer_lens import TransformerBridge, TransformerBridgeConfig
    cfg = TransformerBridgeConfig(d_model=d_model, d_head=32, n_layers=1, n_ctx=3, n_heads=d_model // 32,
                                  d_vocab=P + 1, d_vocab_out=P, d_mlp=4 * d_model, act_fn="relu",
                                  normalization_type=None, seed=0)
    return TransformerBridge.boot_native(cfg).to(torch.float64)


def pairs(n: int):
    import torch
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(P * P, generator=g)
    idx = idx.repeat((n + idx.numel() - 1) // idx.numel())[:n]
    a, b = idx // P, idx % P
    return torch.stack([a, b, torch.full_like(a, P)], 1)


def measure(kind: str, n: int, d_model: int, batch: int, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    from evaluation.lib import fit_lib
    from evaluation.naive import naive_fit_lib
    model = build(d_model)
    toks = pairs(n)
    data = [toks[i:i + batch] for i in range(0, n, batch)]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    res = fit_lib(model, data, LAYERS, progress=False) if kind == "fast" else naive_fit_lib(model, data, LAYERS)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ks = [res.lib[name].C.shape[1] for name in LAYERS]
    return dict(kind=kind, n=n, d_model=d_model, seconds=seconds, peak_rss_mb=peak / 1024,
                added_rss_mb=(peak - base) / 1024, lib_dims=ks)


def run(kind, n, d_model, batch, threads):
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(n), str(d_model), str(batch), str(threads)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--samples", type=int, default=3830, help="pairs for the end-to-end fit")
    ap.add_argument("--base", type=int, default=958, help="smallest sample count of the growth sweeps")
    ap.add_argument("--naive-samples", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="only the end-to-end case and the naive ratio")
    ap.add_argument("--child", nargs=5)
    args = ap.parse_args()
    if args.child:
        kind, n, d, b, t = args.child
        print(json.dumps(measure(kind, int(n), int(d), int(b), int(t))))
        return
    rows = [run("fast", args.samples, 128, args.batch, args.threads)]
    print(f"end to end, {args.samples} pairs, d_model 128: {rows[0]['seconds']:.2f} s, peak RSS {rows[0]['peak_rss_mb']:.0f} MB "
          f"(+{rows[0]['added_rss_mb']:.0f} MB during the fit), LIB dims {rows[0]['lib_dims']}", flush=True)
    if not args.quick:
        for n in (args.base, 2 * args.base, 4 * args.base):
            r = run("fast", n, 128, args.batch, args.threads)
            print(f"samples {n:5d}: {r['seconds']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        for d in (64, 128, 256):
            r = run("fast", args.base, d, args.batch, args.threads)
            print(f"d_model {d:3d} ({args.base} pairs): {r['seconds']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB, "
                  f"LIB dims {r['lib_dims']}", flush=True)
    m = args.naive_samples
    fast, naive = run("fast", m, 128, m, args.threads), run("naive", m, 128, m, args.threads)
    print(f"naive dense reference on {m} pairs: {naive['seconds']:.2f} s vs {fast['seconds']:.2f} s "
          f"(ratio {naive['seconds'] / fast['seconds']:.0f}x)", flush=True)


if __name__ == "__main__":
    main()
