"""Training-step overhead of each regularizer: time(step with it) / time(plain step).

A step is ``zero_grad; regularized_loss(model, x, y, regs); total.backward(); optimizer.step()``,
with ``regs = []`` for the plain step. Two settings:

* mlp: 64-128-128-10 ReLU MLP on sklearn's 8x8 digits, batch 128, site "input";
* transformer: 1-layer TransformerBridge (d_model 128, 4 heads of 32, d_mlp 512, ReLU, no LN) on
  modular-addition tokens (a, b, =), p = 113, batch 512, site "hook_embed".

Plain and regularized steps are timed in alternating blocks after a warm-up; the ratio is the
median regularized step over the median plain step. Runs on one CPU thread (torch.set_num_threads(1),
``--threads`` to change). Steps are timed by the process's CPU time by default (``--clock cpu``):
with one thread it equals the wall time on an idle machine, and unlike wall time it is not inflated
when other jobs share the cores; ``--clock wall`` times wall-clock instead.

    python benchmarks/regularizer_overhead.py [--quick]

To add regularizers, append ``Case(name, factory, target)`` to ``CASES``; ``factory(site)`` builds the
regularizer for the site of the setting, ``target`` is the ratio it should stay under (or None).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, NamedTuple

import torch
from torch import nn

from interp_train.regularizers.base import Regularizer, regularized_loss
from interp_train.regularizers.activation_sparsity import ActivationSparsity
from interp_train.regularizers.connection_cost import ConnectionCost
from interp_train.regularizers.degeneracy import ActivationDegeneracy, FiringPatternDegeneracy, GradientDegeneracy
from interp_train.regularizers.interaction import InteractionSparsity
from interp_train.regularizers.smoothness import (
    FiniteDifferenceGradientNorm, GradientNorm, JacobianNorm, NoisePenalty, PGDAdversarial,
    RandomizedSmoothing,
)

PGD_STEPS = 3


class Case(NamedTuple):
    name: str
    factory: Callable[[str], Regularizer]
    target: float | None = None


CASES: list[Case] = [
    Case("gradient_norm (exact, double backprop)", lambda at: GradientNorm(at=at), 3.0),
    Case("finite_difference_gradient_norm", lambda at: FiniteDifferenceGradientNorm(at=at), 2.0),
    Case("jacobian_norm (1 projection)", lambda at: JacobianNorm(at=at), None),
    Case("noise_penalty", lambda at: NoisePenalty(at=at), 2.2),
    Case("randomized_smoothing", lambda at: RandomizedSmoothing(at=at), None),
    Case(f"pgd_adversarial (K={PGD_STEPS})", lambda at: PGDAdversarial(at=at, steps=PGD_STEPS), PGD_STEPS + 1.5),
]

# Degeneracy, interaction sparsity and connection cost read hidden layers, not the setting's site:
# the MLP's ReLU layers, or the transformer's MLP (d_mlp 512, positions flattened into rows).
_TL_LINEAR = "blocks.0._original_component.mlp._original_component.fc_{}._original_component"
_LAYERS = {
    "input": dict(hidden="1", pre="0", source="1", target="3", linear=["0", "2", "4"]),
    "hook_embed": dict(hidden="blocks.0.mlp.hook_post", pre="blocks.0.mlp.hook_pre", source="blocks.0.hook_resid_mid",
                       target="blocks.0.hook_resid_post", linear=[_TL_LINEAR.format("in"), _TL_LINEAR.format("out")]),
}
CASES += [
    Case("activation_degeneracy", lambda at: ActivationDegeneracy(layers=_LAYERS[at]["hidden"]), 2.5),
    Case("activation_degeneracy (nuclear, eigh)",
         lambda at: ActivationDegeneracy(layers=_LAYERS[at]["hidden"], measure="nuclear"), None),
    Case("gradient_degeneracy", lambda at: GradientDegeneracy(layers=_LAYERS[at]["hidden"]), 2.5),
    Case("firing_pattern_degeneracy", lambda at: FiringPatternDegeneracy(layers=_LAYERS[at]["pre"]), 2.5),
    Case("interaction_sparsity (m=1)",
         lambda at: InteractionSparsity(source=_LAYERS[at]["source"], target_layer=_LAYERS[at]["target"]), 2.5),
    Case("interaction_sparsity (m=4)",
         lambda at: InteractionSparsity(source=_LAYERS[at]["source"], target_layer=_LAYERS[at]["target"], m=4), None),
    Case("connection_cost", lambda at: ConnectionCost(layers=_LAYERS[at]["linear"]), 2.5),
    Case("activation_sparsity", lambda at: ActivationSparsity(layers=_LAYERS[at]["hidden"]), None),
]


class Setting(NamedTuple):
    name: str
    model: nn.Module
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    site: str


def mlp_setting(batch_size: int = 128) -> Setting:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    perm = torch.randperm(len(x))
    batches = [(x[idx], y[idx]) for idx in perm.split(batch_size) if len(idx) == batch_size]
    return Setting("mlp 64-128-128-10, digits, batch 128, at=input", model, batches, "input")


def transformer_setting(batch_size: int = 512, p: int = 113) -> Setting:
    from transformer_lens import TransformerBridge, TransformerBridgeConfig

    cfg = TransformerBridgeConfig(d_model=128, d_head=32, n_layers=1, n_ctx=3, n_heads=4, d_vocab=p + 1,
                                  d_vocab_out=p, d_mlp=512, act_fn="relu", normalization_type=None, seed=0)
    model = TransformerBridge.boot_native(cfg)
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.flatten(), b.flatten()
    tokens = torch.stack([a, b, torch.full_like(a, p)], dim=1)  # (a, b, =)
    answers = (a + b) % p
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(tokens), generator=g)[: 8 * batch_size]
    batches = [(tokens[idx], answers[idx]) for idx in perm.split(batch_size)]
    return Setting(f"transformer 1L d128, mod-{p} addition, batch {batch_size}, at=hook_embed", model, batches,
                   "hook_embed")


def make_step(model: nn.Module, regs: list[Regularizer]):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        regularized_loss(model, x, y, regs).total.backward()
        optimizer.step()

    return step


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def step_times(step, batches, n: int, start: int = 0, clock=time.process_time) -> list[float]:
    times = []
    for i in range(n):
        x, y = batches[(start + i) % len(batches)]
        t0 = clock()
        step(x, y)
        times.append(clock() - t0)
    return times


def overhead(setting: Setting, reg: Regularizer, warmup: int, rounds: int, steps: int,
             clock=time.process_time) -> tuple[float, float, float]:
    """(median plain step s, median regularized step s, ratio); blocks alternate to share drift."""
    model = setting.model
    model.train()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    plain, regularized = make_step(model, []), make_step(model, [reg])
    step_times(plain, setting.batches, warmup)
    step_times(regularized, setting.batches, warmup)
    plain_t, reg_t = [], []
    for r in range(rounds):
        plain_t += step_times(plain, setting.batches, steps, r * steps, clock)
        reg_t += step_times(regularized, setting.batches, steps, r * steps, clock)
    model.load_state_dict(initial)  # every case starts from the same weights
    p, q = statistics.median(plain_t), statistics.median(reg_t)
    return p, q, q / p


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few timings (a smoke run, noisy ratios)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="cpu: process CPU time (robust on a shared machine); wall: wall-clock time")
    parser.add_argument("--only", default=None, help="run only cases whose name contains this string")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warmup, rounds, steps = (2, 2, 3) if args.quick else (5, 6, 10)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.clock} time; "
          f"median of {rounds * steps} steps each after {warmup} warm-up steps\n")
    print("| setting | regularizer | plain step (ms) | regularized step (ms) | ratio | target | ok |")
    print("|---|---|---:|---:|---:|---:|:-:|")
    for setting in (mlp_setting(), transformer_setting()):
        for case in CASES:
            if args.only and args.only not in case.name:
                continue
            p, q, ratio = overhead(setting, case.factory(setting.site), warmup, rounds, steps, CLOCKS[args.clock])
            target = "—" if case.target is None else f"<= {case.target:.1f}x"
            ok = "" if case.target is None else ("yes" if ratio <= case.target else "NO")
            print(f"| {setting.name} | {case.name} | {1e3 * p:.2f} | {1e3 * q:.2f} | {ratio:.2f}x | {target} | {ok} |",
                  flush=True)


if __name__ == "__main__":
    main()
