"""Local learning coefficient (singular learning theory) by SGLD, with chain diagnostics.

λ̂ = nβ · (E_w[L(w)] − L(w*)) where w* are the trained weights, L the training loss (mean over
examples, a negative log-likelihood up to constants) and the expectation runs over SGLD draws
from the localized tempered posterior ∝ exp(−nβ L(w) − γ/2 ||w − w*||²) (Lau et al. 2023;
devinterp's estimator). For a regular model with d parameters λ = d/2; degenerate models have
smaller λ. The sampler is devinterp's ``SGMCMC.sgld`` (the ``llc`` extra); this module runs the
chains on ordinary ``(x, y, *extras)`` batches and keeps every chain's loss trace.

The scale of L is part of the temperature: nβ·c·L samples what nβ·L would at c times the
inverse temperature. λ̂ → λ as n grows at any fixed scale, but at finite n it depends on it.
Cross-entropy is a negative log-likelihood as it stands; a Gaussian one is ½ Σ_j (f_j − y_j)²/σ²,
not the mean squared error (which is 2σ²/N of it for N outputs).

Equilibration. Each chain starts at w*, where L is lowest, and its loss climbs to the level it
fluctuates around; averaging the climb biases λ̂ low. The draws before t0 are discarded, t0
chosen on the chains' mean trace to maximise the effective sample size (T − t0)/g(t0) (Chodera
2016, g the integrated autocorrelation time), searched up to half the draws; a transient that
lasts that long, or a loss still climbing after t0 (Geweke's z of the first 10 % against the
last 50 % of the kept draws below −3), is reported ("not equilibrated"): the chains need more
burn-in, draws or lr; λ̂ is then a lower bound. (On stationary AR(1) traces z has std 1.1 and
falls below −3 in 0-1 % of traces: an occasional false alarm.)

Known learning coefficients (tests/test_llc.py). Reduced-rank regression as devinterp's tests
(x ~ N(0, I_M), y ~ N(0, I_N) independent, n = 1000, B·A Adam-trained 5000 steps, which reaches the
rank-H least-squares minimum; mean squared error, nβ = n/log n, γ = 1), λ from Aoyagi & Watanabe.
devinterp's settings (lr 6e-5, 3 chains × 2000 draws, no burn-in) stop while the chains still
climb: the excess loss over the first eighth of the draws is a quarter of its plateau, reached
after ~800-1000 steps. Averaging all draws (as before this detection, and as devinterp's own chain
loop, which gives identical per-chain values) reads 5.65 ± 2.10 for λ = 6.5 (5,3,5), 5.50 ± 1.51
for 8 (5,4,5), 4.00 ± 0.97 for 6 (4,3,8), 4.96 ± 0.91 for 6 (8,3,4), 3.94 ± 0.34 for 6 (3,8,4)
(seed 0; the issue's seeds gave 4.42, 5.35, 4.10, 5.20, 5.14); with the transient dropped 6.32,
5.98, 5.48, 5.10, 3.94, and every case warns "not equilibrated" (z −3.2 to −7.7). With 2000
burn-in steps and 4 chains × 8000 draws at lr 1e-4: 6.14 ± 0.51, 7.62 ± 0.30, 5.92 ± 0.66,
6.38 ± 0.34, 5.81 ± 0.19 — each inside the midpoints to the λ of the neighbouring ranks. With the
Gaussian NLL ½ Σ_j (f_j − y_j)² instead (N/2 times the mean squared error: a higher effective β;
1000 burn-in, 4 × 5000 draws) the estimates read 6.83, 8.20, 7.29, 6.85, 6.17: at n = 1000 the
trained w* lies ~1/√n from the singular true map BA = 0, and, we think, the sharper posterior
starts to resolve the regular manifold of rank-min(H, M, N) maps through w* (whose d/2 is 10.5, 12,
13.5, 13.5, 6). The normal crossing K(w) ∝ w^(2k) (one weight, y = 0) lands inside the midpoints
to the other powers' λ for k = 1, 2, 3.

Chain health (a warning is issued for each unhealthy chain):
* non-finite: a NaN/inf loss appeared (the chain is stopped there);
* negative: the chain's λ̂ < 0, i.e. SGLD found lower loss than w* (w* is not a local minimum,
  or the step size is too large for the loss surface);
* diverging: the trace has not settled — the mean excess loss L − L(w*) over the last quarter of
  the draws is more than twice that of the second quarter and exceeds it by more than 3 standard
  deviations of the single draws in the middle half (a settled chain fluctuates around a
  constant level; its quarter means move much less than one draw does).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from interp_train.lightning import default_batch_fn
from interp_train.sites import eval_mode, model_output

EQUILIBRATION_MAX_FRACTION = 0.5  # at most this share of the draws is discarded as transient
DRIFT_Z = -3.0  # Geweke z below this after the transient: the chains' loss is still climbing


def _devinterp():
    try:
        from devinterp.optim import SGMCMC
        from devinterp.utils import default_nbeta
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "estimate_llc needs the devinterp library; install the extra: pip install 'interp-train[llc]'"
        ) from err
    return SGMCMC, default_nbeta


@dataclass
class LLCResult:
    """λ̂ over chains (mean, std with ddof=1), per-chain values and loss traces, health verdicts."""

    mean: float
    std: float
    per_chain: list[float]
    loss_traces: list[list[float]]  # per chain, the minibatch loss at every step (burn-in included)
    init_loss: float
    nbeta: float
    num_burnin_steps: int
    healthy: bool
    chain_health: list[str]  # "ok", or the reasons joined by ", "
    warnings: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    equilibrated_at: int = 0  # draws before this index (the detected transient) are not averaged

    def to_dict(self, include_traces: bool = True) -> dict:
        out = dict(self.__dict__)
        if not include_traces:
            out.pop("loss_traces")
        return out


def _batch_loss(model: nn.Module, batch, loss_fn, regularizers: Sequence = ()) -> torch.Tensor:
    """The sampled loss on one batch: the mean task loss, or with ``regularizers`` the training
    objective (task loss + Σ_r w_r Σ_t term_r,t at each regularizer's current weight)."""
    inputs, targets, extras = default_batch_fn(batch)
    if not regularizers:
        return loss_fn(model_output(model(inputs)), targets).mean()
    from interp_train.regularizers.base import NonFiniteRegularizerError, regularized_loss

    try:
        return regularized_loss(model, inputs, targets, list(regularizers), loss_fn=loss_fn, extras=extras,
                                advance=False).total
    except NonFiniteRegularizerError:  # a diverged chain: a non-finite loss, as for the task loss
        return torch.tensor(math.nan, device=inputs.device)


def _first_batch_size(loader: Iterable) -> int:
    size = getattr(loader, "batch_size", None)
    if isinstance(size, int) and size > 0:
        return size
    inputs, _, _ = default_batch_fn(next(iter(loader)))
    return int(inputs.shape[0])


def chain_problems(draw_losses: list[float], init_loss: float, nbeta: float) -> list[str]:
    """Reasons why a chain's losses at its draws look unhealthy (see the module docstring); [] if none."""
    if not draw_losses or not all(math.isfinite(v) for v in draw_losses):
        return ["non-finite loss"]
    draws = torch.tensor(draw_losses, dtype=torch.float64)
    problems = []
    if nbeta * (float(draws.mean()) - init_loss) < 0:
        problems.append("negative LLC")
    if draws.numel() >= 8:
        quarters = torch.tensor_split(draws - init_loss, 4)
        second, last = quarters[1], quarters[3]
        growth = float(last.mean() - second.mean())
        # per-draw spread of the middle half: a settled chain's quarter means move far less than that
        spread = float(torch.cat([quarters[1], quarters[2]]).std())
        if float(last.mean()) > 2 * max(float(second.mean()), 0.0) and growth > 3 * spread:
            problems.append("diverging loss trace")
    return problems


def statistical_inefficiency(trace: torch.Tensor, window: float = 5.0) -> float:
    """g = 1 + 2 Σ_{t ≤ M} ρ_t, the integrated autocorrelation time, with Sokal's automatic window.

    M is the smallest lag with M ≥ window·g(M) (Sokal 1997; emcee's estimator): long enough to
    hold the correlation, short enough to leave out the noise of the far lags. T/g is the
    effective number of independent draws in a trace of T; g = 1 for a constant or iid trace.
    """
    x = trace.double() - trace.double().mean()
    T = x.numel()
    if T < 2 or float(x.pow(2).sum()) == 0.0:
        return 1.0
    spectrum = torch.fft.rfft(x, n=2 * T)
    acov = torch.fft.irfft(spectrum * spectrum.conj(), n=2 * T)[:T]
    taus = 2.0 * torch.cumsum(acov / acov[0], 0) - 1.0  # taus[M] = 1 + 2 Σ_{1 ≤ t ≤ M} ρ_t
    inside = torch.nonzero(torch.arange(T, dtype=torch.float64) >= window * taus)
    M = int(inside[0]) if inside.numel() else T - 1
    return max(1.0, float(taus[M]))


def equilibration_start(trace: torch.Tensor, max_fraction: float = 0.5) -> int:
    """t0 maximising the effective sample size (T − t0)/g(trace[t0:]), searched over t0 ≤ max_fraction·T.

    Chodera's (2016) automatic equilibration detection: discarding the initial transient trades
    bias for draws, and the t0 that keeps the most effective draws removes the transient.
    """
    T = trace.numel()
    step = max(1, T // 100)
    best, best_ess = 0, -1.0
    for t0 in range(0, int(max_fraction * T) + 1, step):
        ess = (T - t0) / statistical_inefficiency(trace[t0:])
        if ess > best_ess:
            best, best_ess = t0, ess
    return best


def drift_z(trace: torch.Tensor, head: float = 0.1, tail: float = 0.5) -> float:
    """Geweke's z: (mean of the first ``head`` − mean of the last ``tail`` of the trace) / its standard error.

    Each mean's variance is var·g/T of its segment (g: statistical_inefficiency). A stationary
    trace gives z ~ N(0, 1); a loss still climbing to its level gives z ≪ 0.
    """
    T = trace.numel()
    first, last = trace[: max(2, int(head * T))].double(), trace[T - max(2, int(tail * T)):].double()
    var = sum(float(seg.var()) * statistical_inefficiency(seg) / seg.numel() for seg in (first, last))
    return (float(first.mean()) - float(last.mean())) / math.sqrt(var) if var > 0 else 0.0


def estimate_llc(
    model: nn.Module,
    loader: Iterable,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    lr: float = 3e-4,
    localization: float = 100.0,
    nbeta: float | None = None,
    num_chains: int = 4,
    num_draws: int = 200,
    num_burnin_steps: int = 200,
    num_steps_bw_draws: int = 1,
    init_loss_batches: int | None = None,
    seed: int = 0,
    progress: bool = True,
    detect_equilibration: bool = True,
    regularizers: Sequence = (),
) -> LLCResult:
    """λ̂ = nβ (mean over draws of L_batch(w_t) − L(w*)) per chain, over ``num_chains`` SGLD chains.

    loader: re-iterable batches ``(x, y, *extras)`` of *training* data (cycled as needed).
    loss_fn(output, y): mean or per-example training loss, a negative log-likelihood in nats
    (cross-entropy; for regression the Gaussian ½ Σ (f − y)²/σ²): its scale is part of nβ.
    nbeta: inverse temperature nβ; default devinterp's B / log B for batch size B.
    localization: γ of the pull back to w*; lr: SGLD step ε. Defaults (lr 3e-4, γ = 100, 200
    burn-in steps, 4 chains × 200 draws, nβ = B/log B) are calibrated by benchmarks/llc_calibration.py
    on the digits MLP baseline (26k parameters) and a modular-addition CPU transformer (58k), B = 256:
    without burn-in, every lr in {1e-5 … 3e-4} × γ in {1, 10, 100} gave λ̂ roughly ∝ lr (the chains
    had not equilibrated within 200 steps; lr ≤ 3e-5 chains flagged "diverging"), only (3e-4, 100)
    changed by < 20 % when lr halved (14 % digits, 19 % modular). With 200 burn-in steps (≈ 6/(lr·γ),
    the relaxation time of the localization term) (3e-4, 100) is healthy on all chains and λ̂ moves
    3 % (digits: 5.75 ± 0.37 vs 5.56) and 5 % (modular: 48.6 ± 1.7 vs 46.0) when lr halves; lr 1e-3
    moved 7 % / 22 %, and γ = 300 shrinks λ̂ about 2-6x (localization bias). Check ``healthy`` and
    the lr/2 change again on a new model class.
    detect_equilibration: average only the draws after the detected transient (module docstring;
    ``equilibrated_at`` in the result); False averages all draws after the burn-in, as devinterp.
    The calibration figures above were taken without it. On a digits MLP (the recipe trained 1000
    steps, benchmarks/llc_calibration.py's fallback) at these defaults it discards 60 of 200 draws
    and moves λ̂ from 4.38 ± 0.40 to 4.52 ± 0.50 (+3 %; lr/2: 4.24 → 4.62, 92 dropped), no warning:
    the study's λ̂ move by a few % (within their chain std) where the chains were already settled.
    regularizers: estimate on the training objective instead of the task loss: L becomes the mean
    task loss plus each regularizer's weighted terms at its current weight (``regularized_loss``
    with ``advance=False``; a regularizer that replaces the task loss, e.g. PGDAdversarial, does
    so here too). A regularized run's weights minimise this objective, not the task loss, so SGLD
    on the task loss starts off the minimum of what it samples (docs/DESIGN.md §5.6). Weight
    constraints that act after the optimizer step (WeightSparsity) add no term and are not applied.
    L(w*) is the mean loss over the first ``init_loss_batches`` batches (all by default). The
    model runs in eval mode (no dropout) and is not modified.
    """
    SGMCMC, default_nbeta = _devinterp()
    for name, value in (("num_chains", num_chains), ("num_draws", num_draws), ("num_steps_bw_draws", num_steps_bw_draws)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(num_burnin_steps, bool) or not isinstance(num_burnin_steps, int) or num_burnin_steps < 0:
        raise ValueError(f"num_burnin_steps must be a non-negative integer, got {num_burnin_steps!r}")
    for name, value in (("lr", lr), ("localization", localization)):
        if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
            raise ValueError(f"{name} must be {'positive' if name == 'lr' else 'non-negative'} and finite, got {value!r}")
    if nbeta is None:
        nbeta = float(default_nbeta(_first_batch_size(loader)))
    elif not math.isfinite(nbeta) or nbeta <= 0:
        raise ValueError(f"nbeta must be positive and finite, got {nbeta!r}")

    regularizers = list(regularizers)
    num_steps = num_burnin_steps + num_draws * num_steps_bw_draws
    traces: list[list[float]] = []
    with eval_mode(model):
        # regularizer terms may differentiate inside (input gradients): no no_grad for the objective
        with torch.set_grad_enabled(bool(regularizers)):
            losses = []
            for i, batch in enumerate(loader):
                if init_loss_batches is not None and i >= init_loss_batches:
                    break
                losses.append(float(_batch_loss(model, batch, loss_fn, regularizers).detach()))
        if not losses:
            raise ValueError("estimate_llc got no batches from the loader")
        init_loss = sum(losses) / len(losses)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*nbeta set to 1.*")
            for chain in range(num_chains):
                traces.append(_run_chain(model, loader, loss_fn, SGMCMC, lr, localization, nbeta, num_steps,
                                         seed + chain, chain, progress, regularizers))

    all_draws = [trace[num_burnin_steps::num_steps_bw_draws] for trace in traces]
    complete = [d for t, d in zip(traces, all_draws) if len(t) == num_steps and all(map(math.isfinite, d))]
    start, messages = 0, []
    if detect_equilibration and complete and num_draws >= 20:
        # one t0 for all chains, from their mean trace (the transient is common, the noise averages)
        mean_trace = torch.tensor(complete, dtype=torch.float64).mean(0)
        start = equilibration_start(mean_trace, EQUILIBRATION_MAX_FRACTION)
        z = drift_z(mean_trace[start:])
        if start >= EQUILIBRATION_MAX_FRACTION * num_draws - max(1, num_draws // 100) or z < DRIFT_Z:
            msg = (f"LLC chains not equilibrated: the loss still climbs after {start} of {num_draws} draws "
                   f"(Geweke z {z:.2f}); add burn-in (now {num_burnin_steps}) or draws, or raise lr (now {lr:g})")
            messages.append(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
    per_chain, health = [], []
    for chain, trace in enumerate(traces):
        draws = all_draws[chain][start:]
        finite = len(trace) == num_steps and all(math.isfinite(v) for v in draws)
        per_chain.append(nbeta * (sum(draws) / len(draws) - init_loss) if finite else math.nan)
        problems = chain_problems(draws, init_loss, nbeta) if len(trace) == num_steps else ["non-finite loss"]
        health.append(", ".join(problems) or "ok")
        if problems:
            msg = (f"LLC chain {chain} looks unhealthy ({health[-1]}; chain LLC {per_chain[-1]:.4g}); "
                   f"try a smaller lr (now {lr:g}), a larger localization (now {localization:g}) or more burn-in")
            messages.append(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
    good = torch.tensor([v for v in per_chain if math.isfinite(v)], dtype=torch.float64)
    mean = float(good.mean()) if good.numel() else math.nan
    std = float(good.std()) if good.numel() > 1 else math.nan
    config = dict(lr=lr, localization=localization, nbeta=nbeta, num_chains=num_chains, num_draws=num_draws,
                  num_burnin_steps=num_burnin_steps, num_steps_bw_draws=num_steps_bw_draws, seed=seed,
                  detect_equilibration=detect_equilibration, sampler="devinterp SGMCMC.sgld",
                  loss="objective" if regularizers else "task",
                  regularizers=[f"{r.name} (weight {r.current_weight():g})" for r in regularizers])
    return LLCResult(mean=mean, std=std, per_chain=per_chain, loss_traces=traces, init_loss=init_loss,
                     nbeta=float(nbeta), num_burnin_steps=num_burnin_steps, healthy=not messages,
                     chain_health=health, warnings=messages, config=config, equilibrated_at=start)


def _forever(loader: Iterable):
    """The loader's batches, pass after pass (a new pass reshuffles when the loader does)."""
    while True:
        yield from loader


def _run_chain(model, loader, loss_fn, SGMCMC, lr, localization, nbeta, num_steps, seed, chain, progress,
               regularizers=()) -> list[float]:
    """One SGLD chain from w*; the minibatch loss before each step.

    The chain moves the model's own parameters and restores w* (and the gradients) afterwards,
    also on error. A deepcopy is not used: a TransformerBridge copy keeps forward hooks that
    write activations into the original's attention modules (TransformerLens 4.3 captures the
    pre-LN residual through a weakref to the original), after which the original cannot be copied.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [(p.detach().clone(), p.grad) for p in params]
    try:
        optimizer = SGMCMC.sgld(params, lr=lr, localization=localization, nbeta=nbeta)
        noise = torch.Generator(device=params[0].device).manual_seed(seed)
        trace: list[float] = []
        batches = _forever(loader)
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # shuffling loaders draw from the global generator
            for _ in tqdm(range(num_steps), desc=f"LLC chain {chain}", disable=not progress, leave=False):
                optimizer.zero_grad(set_to_none=True)
                loss = _batch_loss(model, next(batches), loss_fn, regularizers)
                trace.append(float(loss.detach()))
                if not math.isfinite(trace[-1]):
                    break
                loss.backward()
                optimizer.step(noise_generator=noise)
    finally:
        with torch.no_grad():
            for p, (value, grad) in zip(params, saved):
                p.copy_(value)
                p.grad = grad
    return trace
