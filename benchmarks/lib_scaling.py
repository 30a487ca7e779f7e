"""Time, peak memory and accuracy of a full LIB fit (bases + edges, LIB and PCA) on the modular-addition transformer.

1-layer TransformerBridge (p = 113, d_model 128, 4 heads of 32, d_mlp 512, ReLU, no LayerNorm,
tokens (a, b, =) with = as token 113), randomly initialised, float64; node layers resid_pre,
resid_mid, resid_post, output. Prints: the end-to-end fit on 3830 training pairs for each
setting ("exact": closed-form section Jacobians, float64, the default; "float32": the same with float32
per-example edge products; "autograd": backward passes; "probes"/"probes32": Rademacher probes by autograd) with
its deviation from the exact fit (relative error of Λ per layer and of the edge total per section,
and the number of LIB edges holding 90 % of each section's edge weight); growth with the number of
samples (x1, x2, x4) and with d_model (64, 128, 256) for one setting; and the ratio against the
naive dense reference (evaluation/lib/naive.py) on a small subset. Each measurement runs in a fresh
subprocess so that its peak resident memory (ru_maxrss) is its own. The load average is printed:
the machine may be shared.

Usage: python benchmarks/lib_scaling.py [--threads 2] [--samples 3830] [--base 240] [--sweep exact]
    [--settings exact,float32,autograd,probes,probes32] [--quick]
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

P = 113
LAYERS = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post", "output"]
SETTINGS = {  # LIBConfig keyword arguments per named setting
    "exact": {},  # closed-form section Jacobians (evaluation.lib.sections), float64
    "autograd": {"jacobians": "autograd"},  # the same fit from backward passes
    "float32": {"jacobian_dtype": "float32"},  # closed form with float32 per-example edge products
    "probes": {"jacobians": "autograd", "stochastic_sources": 8, "stochastic_over": "positions_and_hidden", "edge_sources": 1},
    "probes32": {"jacobians": "autograd", "stochastic_sources": 8, "stochastic_over": "positions_and_hidden", "edge_sources": 1,
                 "jacobian_dtype": "float32"},
}


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


def edges_for_fraction(E, fraction: float = 0.9) -> int:
    """Fewest edges (largest first) whose weight reaches ``fraction`` of the section's total."""
    import torch
    w = E.flatten().sort(descending=True).values
    return int((torch.cumsum(w, 0) < fraction * w.sum()).sum().item()) + 1


def measure(kind: str, n: int, d_model: int, batch: int, threads: int, save: str | None) -> dict:
    import torch
    torch.set_num_threads(threads)
    from evaluation.lib.fit import LIBConfig, fit_lib
    from evaluation.lib.naive import naive_fit_lib
    model = build(d_model)
    toks = pairs(n)
    data = [toks[i:i + batch] for i in range(0, n, batch)]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if kind == "naive":
        res = naive_fit_lib(model, data, LAYERS)
    else:
        res = fit_lib(model, data, LAYERS, LIBConfig(**SETTINGS[kind]), progress=False)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if save:
        torch.save({"Lambda": {k: b.Lambda for k, b in res.lib.items()}, "E": res.lib_edges,
                    "E_pca": res.pca_edges}, save)
    return dict(kind=kind, n=n, d_model=d_model, seconds=seconds, peak_rss_mb=peak / 1024,
                added_rss_mb=(peak - base) / 1024, lib_dims=[res.lib[name].C.shape[1] for name in LAYERS],
                edges90=[edges_for_fraction(res.lib_edges[name]) for name in LAYERS[:-1]])


def run(kind, n, d_model, batch, threads, save=None):
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(n), str(d_model), str(batch), str(threads),
                          save or ""], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def deviation(path: str, ref_path: str) -> str:
    """Relative errors ‖ΔΛ‖/‖Λ‖ per layer (when the kept dimensions agree) and of the edge totals."""
    import torch
    got, ref = torch.load(path), torch.load(ref_path)
    lam = []
    for name in LAYERS[:-1]:
        a, b = got["Lambda"][name], ref["Lambda"][name]
        lam.append(f"{((a - b).norm() / b.norm()).item():.1e}" if a.shape == b.shape else f"dims {len(a)}/{len(b)}")
    tot = [f"{abs(got['E'][name].sum() / ref['E'][name].sum() - 1).item():.1e}" for name in LAYERS[:-1]]
    ent = [f"{((got['E'][name] - ref['E'][name]).norm() / ref['E'][name].norm()).item():.1e}"
           for name in LAYERS[:-1] if got["E"][name].shape == ref["E"][name].shape]
    return f"rel. err. Λ {lam}, edge totals {tot}, edge matrices {ent}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--samples", type=int, default=3830, help="pairs for the end-to-end fit")
    ap.add_argument("--settings", default="exact,float32", help=f"of {list(SETTINGS)}")
    ap.add_argument("--base", type=int, default=240, help="smallest sample count of the growth sweeps")
    ap.add_argument("--sweep", default="exact", help="setting of the growth sweeps")
    ap.add_argument("--naive-samples", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="only the end-to-end fits")
    ap.add_argument("--reference", help="saved exact fit (exact.pt of an earlier run) to compare against "
                                        "instead of fitting it again")
    ap.add_argument("--child", nargs=6)
    args = ap.parse_args()
    if args.child:
        kind, n, d, b, t, save = args.child
        print(json.dumps(measure(kind, int(n), int(d), int(b), int(t), save or None)))
        return
    print(f"load average {os.getloadavg()}, {args.threads} thread(s)", flush=True)
    tmp = tempfile.mkdtemp()
    print(f"fits saved under {tmp}", flush=True)
    settings = args.settings.split(",")
    if args.reference:
        os.symlink(os.path.abspath(args.reference), os.path.join(tmp, "exact.pt"))
    for kind in settings:
        r = run(kind, args.samples, 128, args.batch, args.threads, os.path.join(tmp, f"{kind}.pt"))
        line = (f"{kind:8s} {args.samples} pairs: {r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB "
                f"(+{r['added_rss_mb']:.0f}), LIB dims {r['lib_dims']}, edges for 90 % {r['edges90']}")
        if kind != "exact" and os.path.exists(os.path.join(tmp, "exact.pt")):
            line += "\n         " + deviation(os.path.join(tmp, f"{kind}.pt"), os.path.join(tmp, "exact.pt"))
        print(line, f"[load {os.getloadavg()[0]:.1f}]", flush=True)
    if args.quick:
        return
    for n in (args.base, 2 * args.base, 4 * args.base):
        r = run(args.sweep, n, 128, args.batch, args.threads)
        print(f"{args.sweep} samples {n:5d}: {r['seconds']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB "
              f"[load {os.getloadavg()[0]:.1f}]", flush=True)
    for d in (64, 128, 256):
        r = run(args.sweep, args.base, d, args.batch, args.threads)
        print(f"{args.sweep} d_model {d:3d} ({args.base} pairs): {r['seconds']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB, "
              f"LIB dims {r['lib_dims']} [load {os.getloadavg()[0]:.1f}]", flush=True)
    m = args.naive_samples
    fast, naive = run("exact", m, 128, m, args.threads), run("naive", m, 128, m, args.threads)
    print(f"naive dense reference on {m} pairs: {naive['seconds']:.2f} s vs {fast['seconds']:.2f} s "
          f"(ratio {naive['seconds'] / fast['seconds']:.0f}x)", flush=True)


if __name__ == "__main__":
    main()
