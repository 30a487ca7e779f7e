"""Step-time overhead of HardConcreteL0: time(gated step with the l0 term) / time(plain step).

The plain step is ``zero_grad; loss = regularized_loss(model, x, y, []); backward; AdamW step`` on an
ungated model; the HardConcreteL0 step is the same on a second copy of that model (same weights)
whose every attention/MLP weight entry carries a hard-concrete gate (``reg.setup(model)``; embeddings
and unembedding dense, as in recipes/modular_addition/cpu_l0.yaml), with ``regularized_loss(model, x,
y, [reg])``: it adds the gate draw in each forward pass, the gated weight products, the l0 term and
its gradient, and AdamW's update of log α (one per gated entry; in a group without weight decay, as
the recipes put it). Both use the recipe's AdamW (lr 0.003, weight decay 1.0, betas 0.9/0.98), in
training mode. Settings as in ``weight_sparsity_overhead.py``: the modular-addition CPU recipe's model
(1-layer TransformerBridge, p = 59, d_model 64, 4 heads of 16, d_mlp 256, full batch of 2089) and the
p = 113 model of ``regularizer_overhead.py`` (d_model 128, d_mlp 512, batch 512). One thread,
process CPU time by default; each repeat times alternating blocks of plain and gated steps and
reports the ratio of their medians; the summary is the median ratio over the repeats and its range.

    python benchmarks/hard_concrete_overhead.py [--quick] [--repeats 3] [--clock cpu|wall]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from regularizer_overhead import CLOCKS, step_times, transformer_setting  # noqa: E402
from weight_sparsity_overhead import modular_cpu_setting  # noqa: E402

from interp_train.regularizers.base import regularized_loss  # noqa: E402
from interp_train.param_groups import param_groups  # noqa: E402
from interp_train.regularizers.hard_concrete import HardConcreteL0  # noqa: E402

TARGET = 1.3  # the WeightSparsity target (issue 15), applied to the soft variant for comparison


def recipe_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """cpu_l0.yaml's AdamW, log α (flagged no_weight_decay) in a group without decay, as RecipeModule does."""
    return torch.optim.AdamW(param_groups(model.parameters(), lr=3e-3, weight_decay=1.0), lr=3e-3, betas=(0.9, 0.98))


def make_step(model, optimizer, regs):
    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        regularized_loss(model, x, y, regs).total.backward()
        optimizer.step()

    return step


def measure(make_setting, warmup: int, rounds: int, steps: int, repeats: int, clock):
    """(setting name, gated entries, [(plain s, gated s) per repeat])."""
    setting, twin = make_setting(), make_setting()
    twin.model.load_state_dict(setting.model.state_dict())
    reg = HardConcreteL0(weight=20.0)
    reg.setup(twin.model)
    entries = sum(g.log_alpha.numel() for _, g in reg.gates(twin.model))
    setting.model.train(), twin.model.train()
    plain = make_step(setting.model, recipe_optimizer(setting.model), [])
    gated = make_step(twin.model, recipe_optimizer(twin.model), [reg])
    step_times(plain, setting.batches, warmup)
    step_times(gated, twin.batches, warmup)
    results = []
    for _ in range(repeats):
        plain_t, gated_t = [], []
        for r in range(rounds):
            plain_t += step_times(plain, setting.batches, steps, r * steps, clock)
            gated_t += step_times(gated, twin.batches, steps, r * steps, clock)
        results.append((statistics.median(plain_t), statistics.median(gated_t)))
    return setting.name, entries, results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few timings (a smoke run, noisy ratios)")
    parser.add_argument("--repeats", type=int, default=3, help="independent timed repeats per setting")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    parser.add_argument("--only", choices=["modular", "p113"], default=None, help="run one setting")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    torch.set_num_threads(args.threads)
    warmup, rounds, steps = (2, 2, 3) if args.quick else (5, 4, 10)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.clock} time; per repeat the "
          f"median of {rounds * steps} steps each (blocks of {steps} alternating) after {warmup} warm-up steps\n")
    print("| setting | gated entries | repeat | plain step (ms) | HardConcreteL0 step (ms) | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    settings = {"modular": modular_cpu_setting, "p113": transformer_setting}
    summary = []
    for key, make_setting in settings.items():
        if args.only and key != args.only:
            continue
        name, entries, results = measure(make_setting, warmup, rounds, steps, args.repeats, CLOCKS[args.clock])
        for i, (p, q) in enumerate(results):
            print(f"| {name} | {entries} | {i + 1} | {1e3 * p:.2f} | {1e3 * q:.2f} | {q / p:.2f}x |", flush=True)
        summary.append((name, [q / p for p, q in results]))
    print(f"\n| setting | ratio (median of repeats) | range | target | ok |\n|---|---:|---:|---:|:-:|")
    for name, ratios in summary:
        med = statistics.median(ratios)
        print(f"| {name} | {med:.2f}x | {min(ratios):.2f}-{max(ratios):.2f}x | <= {TARGET}x | "
              f"{'yes' if med <= TARGET else 'NO'} |")


if __name__ == "__main__":
    main()
