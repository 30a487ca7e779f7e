"""Does torch's CPU dispatch level change what a recipe trains? (study/cpu_dispatch.py)

    python benchmarks/cpu_dispatch.py [--recipe recipes/modular_addition/cpu.yaml] [--steps 300] [--seed 0]

Trains the recipe ``--steps`` steps in a fresh process (one torch thread) under every dispatch
level this CPU offers (``ATEN_CPU_CAPABILITY`` = default, avx2, avx512 where available; it can only
lower the level), twice at the CPU's own level (is training deterministic here?), once with MKL
limited to AVX2 (``MKL_ENABLE_INSTRUCTIONS``: does the BLAS path matter too?) and once with torch's
and oneDNN's kernels both at AVX2 (``ONEDNN_MAX_CPU_ISA``: what an AVX2 machine runs; this recipe
uses no oneDNN kernel, the study's CNN and byte LM do). Prints, per
setting, the level torch reports, a hash of the trained weights, their largest difference from the
run at the CPU's own level, the test accuracy and the wall time. Runs with equal hashes are the
same model; the study compares runs only within one level (run_study refuses to mix them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LEVELS = ("default", "avx2", "avx512")


def train(recipe: str, steps: int, seed: int, run_dir: Path, env: dict[str, str]) -> float:
    args = [sys.executable, "-m", "interp_train.cli", "fit", "--config", recipe, "--seed_everything", str(seed),
            "--run_dir", str(run_dir), "--trainer.max_steps", str(steps), "--model.shared_forward", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"training failed under {env}: {proc.stderr.strip()[-2000:]}")
    return time.perf_counter() - start


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return {k: v for k, v in sorted(checkpoint["state_dict"].items()) if v.is_floating_point()}


def digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name, value in state.items():
        h.update(name.encode())
        h.update(value.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/modular_addition/cpu.yaml")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    own = torch.backends.cpu.get_cpu_capability()
    settings = [("CPU's own level", {}), ("CPU's own level, again", {}),
                ("MKL limited to AVX2", {"MKL_ENABLE_INSTRUCTIONS": "AVX2"})]
    settings += [(f"ATEN_CPU_CAPABILITY={level}", {"ATEN_CPU_CAPABILITY": level}) for level in LEVELS]
    # what an AVX2 machine runs: torch's and oneDNN's kernels both at AVX2 (study/cpu_dispatch.py)
    settings.append(("... =avx2, ONEDNN_MAX_CPU_ISA=AVX2", {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        reference = None
        for i, (label, env) in enumerate(settings):
            run = Path(tmp) / f"run{i}"
            seconds = train(args.recipe, args.steps, args.seed, run, env)
            state = weights(run)
            reference = reference or state
            diff = max((state[k].double() - reference[k].double()).abs().max().item() for k in state)
            metrics = json.loads((run / "metrics.json").read_text())
            level = json.loads((run / "provenance.json").read_text())[-1]["torch_cpu_capability"]
            rows.append((label, level, digest(state), diff, metrics.get("test/acc"), seconds))
    print(f"{args.recipe}, {args.steps} steps, seed {args.seed}; this CPU dispatches to {own}")
    print(f"{'setting':34s} {'torch level':>11s} {'weights hash':>17s} {'max |Δw|':>10s} {'test acc':>9s} {'wall s':>7s}")
    for label, level, h, diff, acc, seconds in rows:
        acc_text = "n/a" if acc is None else f"{acc:.4f}"
        print(f"{label:34s} {level:>11s} {h:>17s} {diff:10.3g} {acc_text:>9s} {seconds:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
