"""Step-time overhead of WeightSparsity: time(step + top-k projection) / time(plain step); target <= 1.3x.

A plain step is ``zero_grad; loss = regularized_loss(model, x, y, []); backward; AdamW step``; the
WeightSparsity step adds ``after_optimizer_step(model, [WeightSparsity(...)])`` (a top-k over every
attention/MLP weight matrix). The density is held at its target (anneal_steps=0), the costliest
case: a dense phase (k = n) skips the top-k. Settings (as in ``regularizer_overhead.py``): the
modular-addition CPU recipe's model (1-layer TransformerBridge, p = 59, d_model 64, 4 heads of 16,
d_mlp 256, full batch of 2089 examples) and the p = 113 model (d_model 128, d_mlp 512, batch 512).
One thread, process CPU time by default, plain and sparse blocks alternating, median step.

    python benchmarks/weight_sparsity_overhead.py [--quick] [--density 0.1] [--clock cpu|wall]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from regularizer_overhead import CLOCKS, Setting, step_times, transformer_setting  # noqa: E402

from interp_train.data.modular import ModularAdditionDataModule  # noqa: E402
from interp_train.models.transformer import Transformer  # noqa: E402

from interp_train.regularizers.base import after_optimizer_step, regularized_loss  # noqa: E402
from interp_train.regularizers.weight_sparsity import WeightSparsity  # noqa: E402

TARGET = 1.3


def modular_cpu_setting() -> Setting:
    """The model and full training batch of recipes/modular_addition/cpu.yaml."""
    torch.manual_seed(0)
    model = Transformer(d_vocab=60, d_vocab_out=59, n_ctx=3, d_model=64, n_heads=4, d_head=16, d_mlp=256,
                        init_seed=0)
    data = ModularAdditionDataModule(p=59, train_fraction=0.6)
    x, y = data.splits["train"].tensors
    return Setting(f"modular_addition cpu recipe (p 59, d_model 64, d_mlp 256), full batch {len(y)}", model,
                   [(x, y)], "hook_embed")


def make_step(model, optimizer, regs):
    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        regularized_loss(model, x, y, []).total.backward()
        optimizer.step()
        after_optimizer_step(model, regs)

    return step


def measure(setting, density: float, warmup: int, rounds: int, steps: int, clock) -> tuple[float, float, int]:
    model = setting.model
    model.train()
    reg = WeightSparsity(density=density, anneal_steps=0)
    reg.setup(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    plain, sparse = make_step(model, optimizer, []), make_step(model, optimizer, [reg])
    step_times(plain, setting.batches, warmup)
    step_times(sparse, setting.batches, warmup)
    plain_t, sparse_t = [], []
    for r in range(rounds):
        plain_t += step_times(plain, setting.batches, steps, r * steps, clock)
        sparse_t += step_times(sparse, setting.batches, steps, r * steps, clock)
    return statistics.median(plain_t), statistics.median(sparse_t), len(reg.selected(model))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few timings (a smoke run, noisy ratios)")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warmup, rounds, steps = (2, 2, 3) if args.quick else (5, 6, 10)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.clock} time, density {args.density}; "
          f"median of {rounds * steps} steps each after {warmup} warm-up steps\n")
    print("| setting | matrices | plain step (ms) | WeightSparsity step (ms) | ratio | target | ok |")
    print("|---|---:|---:|---:|---:|---:|:-:|")
    settings = [modular_cpu_setting(), transformer_setting()]
    for setting in settings:
        p, q, n = measure(setting, args.density, warmup, rounds, steps, CLOCKS[args.clock])
        ok = "yes" if q / p <= TARGET else "NO"
        print(f"| {setting.name} | {n} | {1e3 * p:.2f} | {1e3 * q:.2f} | {q / p:.2f}x | <= {TARGET}x | {ok} |", flush=True)


if __name__ == "__main__":
    main()
