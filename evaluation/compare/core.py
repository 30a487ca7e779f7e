"""``interp-eval compare``: is a regularized variant more interpretable than standard training,
at what accuracy cost, and is the difference real? (DESIGN.md section 5.)

Runs are recipe run directories ``<root>/<variant>/seed<k>/`` (``config.yaml``,
``checkpoints/last.ckpt``) as written by ``interp-train fit``. Each run is measured once
(``measure_run``; cached per checkpoint, see evaluation.compare.cache), then every metric is summarised
per variant over seeds (mean ± std, ddof = 1) and compared with the baseline by
``evaluation.compare.stats.compare_groups`` (Welch t or exact permutation test).

Metrics, with the direction counted as "more interpretable" (``higher_is_better``):

* accuracy — held-out (test split) accuracy; the *cost* of a regularizer, higher is better.
* lib_edge_fraction_90 / pca_edge_fraction_90 — interaction sparsity: ∑_l n90_l / ∑_l N_l, the
  fewest edges holding 90 % of each edge layer's weight over all edges (constant node excluded),
  in the LIB / PCA basis. Lower: the computation is carried by fewer interactions.
* lib_features_99 — ∑ over non-output node layers of the LIB directions holding 99 % of ∑Λ.
  Lower: fewer features take part in the computation.
* modularity_q — Louvain modularity Q (γ = 1) of the LIB interaction graph. Higher: the graph
  splits into more separate modules.
* alignment — mean of ||UUᵀg|| / ||g|| for input gradients g of the per-example loss (U the
  tangent space of the data). Higher: the model's sensitivity lies along the data manifold.
* robustness_ratio — Δ_off(ε)/Δ_on(ε) at one radius ε (evaluation.metrics.robustness). Lower: the
  model ignores off-manifold perturbations relative to on-manifold ones, which is the
  behaviour that aligned gradients imply.
* llc — local learning coefficient (opt-in, SGLD via devinterp). Lower: a more degenerate,
  effectively simpler solution.

Token models (integer inputs) are measured at the embedding (site "hook_embed"): the tangent
spaces come from ``LocalPCATangents`` fitted on the flattened token embeddings (B, T·d_model) of
the training inputs, its dimension k chosen by explained variance (``embedding_tangents``); k, d,
the random baseline sqrt(k/d) and the embedding scale are recorded in details["tangents"]. On a
discrete token set the "manifold" is a point cloud: the local tangent space of an input is the
span of the (centred) embeddings of its nearest other inputs, which for modular addition (p²
points (E_a, E_b, E_=) in 3·d_model dimensions) are mostly the inputs that differ in one token
(a or b) by a token with a nearby embedding. Alignment then reads "the fraction of the embedding
gradient along directions in which the embeddings of nearby valid inputs differ"; directions no
input change can produce (the constant "=" slot, the part of R^{d_model} the embedding table does
not use) count as off-manifold. See ``MeasureOptions`` for the neighbour count and variance.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from evaluation.compare import cache as cache_mod
from interp_train.io import json_safe, write_atomic, write_json_atomic
from evaluation.compare.stats import TESTS, compare_groups

BASELINE = "baseline"
CURVE_POINTS = 200  # cumulative edge-weight curves are stored at this many log-spaced ranks


@dataclass(frozen=True)
class Metric:
    name: str
    label: str
    higher_is_better: bool
    description: str


METRICS = (
    Metric("accuracy", "accuracy", True, "held-out accuracy (the cost; higher is better)"),
    Metric("lib_edge_fraction_90", "LIB edges for 90 %", False, "fraction of LIB edges holding 90 % of edge weight"),
    Metric("pca_edge_fraction_90", "PCA edges for 90 %", False, "fraction of PCA edges holding 90 % of edge weight"),
    Metric("lib_features_99", "LIB features (99 %)", False, "LIB directions holding 99 % of ∑Λ, summed over layers"),
    Metric("modularity_q", "modularity Q", True, "Louvain modularity (γ = 1) of the LIB interaction graph"),
    Metric("alignment", "gradient alignment", True, "mean ||UUᵀg||/||g|| of input gradients (tangent space U)"),
    Metric("robustness_ratio", "off/on robustness", False, "Δ_off/Δ_on: output change off vs on the manifold"),
    Metric("llc", "LLC", False, "local learning coefficient (SGLD, devinterp)"),
)
METRIC_NAMES = tuple(m.name for m in METRICS)
TANGENT_CHOICES = ("auto", "exact", "local_pca", "global_pca")


@dataclass(frozen=True)
class MeasureOptions:
    """What ``measure_run`` computes (all of it enters the cache key).

    max_samples: training examples for the LIB fit and test examples for alignment/robustness
    (a seeded random subset; accuracy always uses the whole test split). node_layers: LIB node
    layers (None: input + hidden activations + output for MLPs, the residual stream for
    transformers). tangents: "auto" = exact where the data module has a generator, else local PCA.
    robustness_eps: radii; ratio_eps: the radius whose off/on ratio is the headline number.
    llc: opt-in (slow); llc_*: its chains, draws, step size, localization and burn-in, at
    estimate_llc's calibrated values (lr 3e-4, γ = 100, 200 burn-in steps; see its docstring:
    with lr 1e-4 and no burn-in the chains had not settled and λ̂ grew with the step size).
    lib_sources / lib_edge_sources / lib_jacobian_dtype: LIBConfig's Rademacher probes over
    output positions and hidden units for M′ (None: exact), over output positions for the edges,
    and the dtype of the Jacobian passes — for long sequences, where exact LIB costs T·k
    vector-Jacobian products per section and example.
    embed_*: token models only (see ``embedding_tangents``): the embedding reference set holds up
    to ``embed_reference`` training inputs; local PCA over ``embed_n_neighbors`` nearest
    neighbours, k = fewest directions explaining ``embed_explained_variance`` of the local
    variance. 32 neighbours: enough for the modular-addition embedding cloud to show the
    directions of both varying tokens (a neighbourhood is mostly one-token changes) while staying
    local (p = 59 gives 2·58 one-token neighbours).
    """

    max_samples: int = 512
    batch_size: int = 256
    node_layers: tuple[str, ...] | None = None
    truncation: float = 1e-12
    alignment: bool = True
    tangents: str = "auto"
    robustness_eps: tuple[float, ...] = (0.03, 0.1, 0.3)
    ratio_eps: float = 0.1
    n_draws: int = 4
    llc: bool = False
    llc_chains: int = 4
    llc_draws: int = 200
    llc_lr: float = 3e-4
    llc_localization: float = 100.0
    seed: int = 0
    llc_burnin: int = 200
    lib_sources: int | None = None
    lib_edge_sources: int | None = None
    lib_jacobian_dtype: str | None = None
    embed_reference: int = 4096
    embed_n_neighbors: int = 32
    embed_explained_variance: float = 0.9
    device: str = "cpu"  # where the run is measured; not part of the cache key (results agree across devices)

    def __post_init__(self):
        if isinstance(self.max_samples, bool) or not isinstance(self.max_samples, int) or self.max_samples < 2:
            raise ValueError(f"max_samples must be an integer >= 2, got {self.max_samples!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.tangents not in TANGENT_CHOICES:
            raise ValueError(f"unknown tangents {self.tangents!r}; allowed: {', '.join(TANGENT_CHOICES)}")
        for name in ("embed_reference", "embed_n_neighbors"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 3:
                raise ValueError(f"{name} must be an integer >= 3, got {value!r}")
        if isinstance(self.llc_burnin, bool) or not isinstance(self.llc_burnin, int) or self.llc_burnin < 0:
            raise ValueError(f"llc_burnin must be a non-negative integer, got {self.llc_burnin!r}")
        if not 0 < self.embed_explained_variance <= 1:
            raise ValueError(f"embed_explained_variance must be in (0, 1], got {self.embed_explained_variance!r}")
        if self.ratio_eps not in self.robustness_eps:
            raise ValueError(f"ratio_eps {self.ratio_eps!r} must be one of robustness_eps {list(self.robustness_eps)}")


@dataclass
class Run:
    """One trained run: variant name, seed label, run directory, checkpoint and config files."""

    variant: str
    seed: str
    run_dir: Path
    checkpoint: Path
    config: Path


# ----------------------------------------------------------------------------- finding runs


def _run_files(path: Path) -> tuple[Path, Path] | None:
    from interp_train.recipes import find_run_files

    try:
        config, ckpt = find_run_files(path)
    except FileNotFoundError:
        return None
    return ckpt, config


def _seed_label(run_dir: Path, config: Path, index: int) -> str:
    if re.fullmatch(r"seed\w+", run_dir.name):
        return run_dir.name
    import yaml

    seed = (yaml.safe_load(config.read_text()) or {}).get("seed_everything")
    return f"seed{seed}" if isinstance(seed, int) and not isinstance(seed, bool) else f"run{index}"


def runs_from_paths(variant: str, paths: Sequence[str | Path]) -> list[Run]:
    """Runs of one variant from explicit run directories (or checkpoint files inside them)."""
    runs = []
    for i, p in enumerate(paths):
        found = _run_files(Path(p))
        if found is None:
            raise FileNotFoundError(f"variant {variant!r}: {str(p)!r} is not a run directory or checkpoint with a "
                                    "config.yaml (expected <run>/config.yaml and <run>/checkpoints/last.ckpt)")
        ckpt, config = found
        run_dir = config.parent
        runs.append(Run(variant, _seed_label(run_dir, config, i), run_dir, ckpt, config))
    labels = [r.seed for r in runs]
    if len(set(labels)) != len(labels):  # e.g. two explicit dirs both called seed0
        runs = [dataclasses.replace(r, seed=f"{r.seed}_{i}") for i, r in enumerate(runs)]
    return runs


def discover_runs(root: str | Path) -> dict[str, list[Run]]:
    """{variant: runs} from ``root/<variant>/<seed dir>/`` (sorted by name).

    Raises FileNotFoundError for a missing root and ValueError, listing what is there, when no
    run directories are found (or when ``root`` is itself one run, or holds several tasks).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(root)!r} does not exist")
    if (root / "config.yaml").is_file():
        raise ValueError(f"{str(root)!r} is a single run; pass the task directory that holds "
                         "<variant>/seed<k>/ run directories (e.g. checkpoints/digits/)")
    variants: dict[str, list[Run]] = {}
    for vdir in sorted(p for p in root.iterdir() if p.is_dir()):
        seed_dirs = [p for p in sorted(vdir.iterdir()) if p.is_dir() and (p / "config.yaml").is_file()
                     and _run_files(p) is not None]
        runs = runs_from_paths(vdir.name, seed_dirs)
        if runs:
            variants[vdir.name] = runs
    if not variants:
        nested = sorted(str(p.relative_to(root)) for p in root.glob("*/*/*/config.yaml"))
        if nested:
            raise ValueError(f"{str(root)!r} holds runs of several tasks ({', '.join(nested[:6])}); "
                             "pass one task directory, e.g. checkpoints/<task>/")
        found = sorted(str(p.relative_to(root)) for p in root.glob("*/*"))[:20] or ["nothing"]
        raise ValueError(f"no runs under {str(root)!r}: expected <variant>/seed<k>/config.yaml with "
                         f"checkpoints/*.ckpt; found: {', '.join(found)}")
    return variants


# ----------------------------------------------------------------------------- consistency


def _load_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


_LOADER_KEYS = ("batch_size", "eval_batch_size", "num_workers")


def check_consistent(variants: Mapping[str, Sequence[Run]]) -> list[str]:
    """Raises ValueError when runs differ in architecture (config ``model.model``) or data module
    class; returns messages for other differences in the data settings (loader settings aside)."""
    archs: dict[str, list[str]] = {}
    tasks: dict[str, list[str]] = {}
    data_settings: dict[str, list[str]] = {}
    for runs in variants.values():
        for run in runs:
            cfg = _load_yaml(run.config)
            name = f"{run.variant}/{run.seed}"
            arch = repr((cfg.get("model") or {}).get("model"))
            data = cfg.get("data") or {}
            archs.setdefault(arch, []).append(name)
            tasks.setdefault(str(data.get("class_path")), []).append(name)
            init = {k: v for k, v in (data.get("init_args") or {}).items() if k not in _LOADER_KEYS}
            data_settings.setdefault(repr(sorted(init.items())), []).append(name)
    if len(tasks) > 1:
        groups = "; ".join(f"{t}: {', '.join(n)}" for t, n in tasks.items())
        raise ValueError(f"runs disagree on the task (data module): {groups}")
    if len(archs) > 1:
        groups = "; ".join(f"{', '.join(n)} have model {a}" for a, n in archs.items())
        raise ValueError(f"runs disagree on the architecture (config 'model.model'): {groups}")
    if len(data_settings) > 1:
        groups = "; ".join(f"{', '.join(n)}: {s}" for s, n in data_settings.items())
        return [f"runs use different data settings (measured on each run's own data): {groups}"]
    return []


# ----------------------------------------------------------------------------- measuring one run


def _split_tensors(datamodule, split: str) -> tuple[torch.Tensor, ...]:
    """All tensors of a split: from ``datamodule.splits`` when it has them, else from its loader."""
    splits = getattr(datamodule, "splits", None)
    if isinstance(splits, Mapping) and split in splits and hasattr(splits[split], "tensors"):
        return tuple(splits[split].tensors)
    loader = getattr(datamodule, f"{split}_dataloader")()
    parts = [b if isinstance(b, (tuple, list)) else (b,) for b in loader]
    return tuple(torch.cat(col) for col in zip(*parts))


def _subset(tensors: tuple[torch.Tensor, ...], n: int, seed: int) -> tuple[torch.Tensor, ...]:
    if tensors[0].shape[0] <= n:
        return tensors
    idx = torch.randperm(tensors[0].shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return tuple(t[idx] for t in tensors)


def _batches(tensors: tuple[torch.Tensor, ...], batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    n = tensors[0].shape[0]
    return [tuple(t[i:i + batch_size] for t in tensors) for i in range(0, n, batch_size)]


def default_node_layers(module, last_position: bool = False) -> list[str]:
    """LIB node layers of a recipe module: MLP → "input", every hidden activation, "output";
    TransformerLens model → resid_pre, resid_mid/resid_post of each block, "output", with the
    layers after the last attention at position -1 when ``last_position`` (one target per
    sequence, e.g. modular addition: evaluation.lib.positions.residual_layers)."""
    from torch import nn

    from evaluation.lib.positions import residual_layers
    from interp_train.models.mlp import MLP

    for name, sub in module.named_modules():
        if isinstance(sub, MLP):
            acts = [f"{name}.layers.{i}" for i, m in enumerate(sub.layers) if not isinstance(m, nn.Linear)]
            return ["input", *acts, "output"]
        n_layers = getattr(getattr(sub, "cfg", None), "n_layers", None)
        if isinstance(n_layers, int) and isinstance(getattr(sub, "hook_dict", None), dict):
            return residual_layers(n_layers, last_position)
    raise ValueError(f"cannot choose LIB node layers for {type(module).__name__}; pass node_layers (--layers)")


def tangent_provider(datamodule, kind: str):
    """The tangent provider ``kind`` ("auto": exact with a known generator, else local PCA)."""
    if kind == "auto":
        kind = "exact" if getattr(datamodule, "generator", None) is not None else "local_pca"
    if callable(getattr(datamodule, "tangent_provider", None)):
        return datamodule.tangent_provider(kind)
    from interp_train.tangents import fit_from_datamodule

    return fit_from_datamodule(kind, datamodule)


EMBED_SITE = "hook_embed"


def record_flat(module, inputs: torch.Tensor, site: str, batch_size: int) -> torch.Tensor:
    """The activation at ``site`` for every row of ``inputs``, flattened per example: (N, d)."""
    from interp_train.sites import run_model

    rows = []
    with torch.no_grad():
        for start in range(0, inputs.shape[0], batch_size):
            act = run_model(module, inputs[start:start + batch_size], record=[site]).activations[site]
            rows.append(act.detach().reshape(act.shape[0], -1))
    return torch.cat(rows)


def embedding_tangents(module, train_inputs: torch.Tensor, options: MeasureOptions):
    """(LocalPCATangents, info) on the flattened ``hook_embed`` activations of up to
    ``options.embed_reference`` training inputs (seeded subset).

    The provider's points are e_i = flatten(hook_embed(x_i)) ∈ R^{T·d_model}; U(e) spans the top
    k principal directions of the ``embed_n_neighbors`` nearest reference embeddings of e, with k
    the fewest directions explaining ``embed_explained_variance`` of the local variance averaged
    over 256 probes (chosen once). info: site, n_reference, n_neighbors, explained_variance,
    k, d, baseline = sqrt(k/d), the explained-variance curve up to k, the mean ||e|| and the
    median distance of a reference embedding to its nearest other one (the scale that the
    robustness radii ε compare with), and the fraction of pairs among each probe's neighbours
    that differ from it in exactly one token position.
    """
    from interp_train.tangents import LocalPCATangents

    reference = _subset((train_inputs,), options.embed_reference, options.seed)[0]
    n = reference.shape[0]
    if n < 4:
        raise ValueError(f"embedding tangents need at least 4 training inputs, got {n}")
    n_neighbors = min(options.embed_n_neighbors, n - 2)
    points = record_flat(module, reference, EMBED_SITE, options.batch_size)
    tangents = LocalPCATangents(points, n_neighbors=n_neighbors, explained_variance=options.embed_explained_variance,
                                seed=options.seed)
    probe = points[: min(256, n)]
    dist = torch.cdist(probe, points)
    dist[torch.arange(probe.shape[0]), torch.arange(probe.shape[0])] = math.inf  # not its own neighbour
    near = dist.topk(n_neighbors, dim=1, largest=False).indices
    tokens_differ = (reference[near] != reference[: probe.shape[0], None]).reshape(*near.shape, -1).sum(dim=-1)
    k, d = tangents.dim, points.shape[1]
    info = {"site": EMBED_SITE, "provider": repr(tangents), "n_reference": n, "n_neighbors": n_neighbors,
            "explained_variance": options.embed_explained_variance, "k": k, "d": d, "baseline": math.sqrt(k / d),
            "explained_variance_curve": [float(v) for v in tangents.explained_variance_curve[:k]],
            "mean_embedding_norm": float(points.norm(dim=1, dtype=torch.float64).mean()),
            "median_nearest_distance": float(dist.min(dim=1).values.median()),
            "neighbours_one_token_change": float((tokens_differ == 1).to(torch.float64).mean())}
    return tangents, info


def _alignment_and_robustness(module, eval_set, tangents, site: str, options: MeasureOptions):
    """(alignment mean, robustness ratio at ratio_eps, details) at ``site`` on ``eval_set``."""
    from evaluation.metrics.alignment import gradient_alignment
    from evaluation.metrics.robustness import manifold_robustness

    eval_batches = _batches(eval_set, options.batch_size)
    align = gradient_alignment(module, eval_batches, tangents, target="loss", site=site, progress=False)
    rob = manifold_robustness(module, eval_batches, tangents, eps=list(options.robustness_eps),
                              n_draws=options.n_draws, seed=options.seed, site=site, progress=False)
    details = {"alignment": {**align.to_dict(), "fractions": [float(v) for v in align.fractions]},
               "robustness": rob.to_dict()}
    return align.mean, _finite_or_none(rob.ratio[rob.eps.index(options.ratio_eps)]), details


def cumulative_curve(E, points: int = CURVE_POINTS) -> dict[str, list]:
    """c_n = (sum of the n largest non-constant edges)/(their total) at ≤ ``points`` log-spaced n."""
    from evaluation.lib.plots import cumulative_edge_weight

    c = cumulative_edge_weight(E)
    if c.size == 0:
        return {"n": [], "c": []}
    ns = np.unique(np.round(np.geomspace(1, c.size, num=min(points, c.size))).astype(int))
    return {"n": ns.tolist(), "c": [float(v) for v in c[ns - 1]]}


def _finite_or_none(x) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def lib_metrics(summary: Mapping[str, Any], node_layers: Sequence[str]) -> dict[str, float | None]:
    """The report's LIB scalars from ``evaluation.metrics.lib_summary.summarize`` output (see module docstring)."""
    out: dict[str, float | None] = {}
    for side in ("lib", "pca"):
        n90 = sum(e[side]["edges_90"] for e in summary["edges"].values())
        total = sum(e[side]["n_edges"] for e in summary["edges"].values())
        out[f"{side}_edge_fraction_90"] = n90 / total if total else None
    out["lib_features_99"] = float(sum(summary["layers"][l]["lib"]["features_99"] for l in node_layers[:-1]))
    q = summary.get("modularity", {}).get("lib", {}).get("gamma_1.0", {}).get("Q")
    out["modularity_q"] = _finite_or_none(q)
    return out


def measure_run(run: Run, options: MeasureOptions, progress: bool = False) -> dict:
    """All measurements of one run: {"metrics": {name: value or None}, "details": ..., "notes": [...]}.

    LIB/PCA: ``fit_lib`` on ``max_samples`` training examples (seeded subset), summarised by
    ``metrics.summarize`` (see ``lib_metrics``). Accuracy: ``evaluate_accuracy`` on the whole
    test split. Alignment and robustness: on ``max_samples`` test examples at site "input"
    (tangents from ``tangent_provider``), or at "hook_embed" for token inputs (``embedding_tangents``).
    LLC: ``estimate_llc`` on the training split when ``options.llc``.
    """
    from evaluation.io.checkpoints import load_checkpoint
    from evaluation.lib.fit import LIBConfig, fit_lib
    from evaluation.metrics.lib_summary import summarize
    from evaluation.metrics.robustness import evaluate_accuracy

    from evaluation.io.device import resolve_device
    from evaluation.lib.positions import loss_reads_last_position

    device = resolve_device(options.device)
    loaded = load_checkpoint(run.checkpoint)
    module, dm = loaded.model.to(device).eval(), loaded.datamodule
    if dm is None:
        raise ValueError(f"{str(run.checkpoint)!r} carries no data module; compare needs recipe checkpoints")
    dm.setup("fit")
    train, test = _split_tensors(dm, "train"), _split_tensors(dm, "test")
    train, test = tuple(t.to(device) for t in train), tuple(t.to(device) for t in test)
    metrics: dict[str, float | None] = {name: None for name in METRIC_NAMES}
    details: dict[str, Any] = {}
    notes: list[str] = []

    metrics["accuracy"] = evaluate_accuracy(module, _batches(test, options.batch_size), progress=False)["accuracy"]

    layers = (list(options.node_layers) if options.node_layers
              else default_node_layers(module, last_position=len(train) > 1 and loss_reads_last_position(train[1])))
    lib_data = [b[:1] for b in _batches(_subset(train, options.max_samples, options.seed), options.batch_size)]
    config = LIBConfig(truncation=options.truncation, seed=options.seed, stochastic_sources=options.lib_sources,
                       stochastic_over="positions_and_hidden" if options.lib_sources else "positions",
                       edge_sources=options.lib_edge_sources, jacobian_dtype=options.lib_jacobian_dtype)
    result = fit_lib(module, lib_data, layers, config, progress=progress)
    summary = summarize(result, seed=options.seed)
    metrics.update(lib_metrics(summary, layers))
    details["node_layers"] = layers
    details["edge_curves"] = {l: cumulative_curve(result.lib_edges[l]) for l in layers[:-1]}
    if len(layers) < 3:
        notes.append("modularity needs at least 3 node layers")

    eval_set = _subset(test, options.max_samples, options.seed)
    if options.alignment and not torch.is_floating_point(eval_set[0]):
        tangents, details["tangents"] = embedding_tangents(module, train[0], options)
        metrics["alignment"], metrics["robustness_ratio"], more = _alignment_and_robustness(
            module, eval_set, tangents, EMBED_SITE, options)
        details.update(more)
        notes.append(f"token inputs: alignment and robustness at site {EMBED_SITE} with local-PCA tangents of the "
                     f"training embeddings (k = {details['tangents']['k']} of d = {details['tangents']['d']}, "
                     f"random baseline {details['tangents']['baseline']:.3g})")
    elif options.alignment:
        tangents = tangent_provider(dm, options.tangents)
        metrics["alignment"], metrics["robustness_ratio"], more = _alignment_and_robustness(
            module, eval_set, tangents, "input", options)
        details.update(more)

    if options.llc:
        from evaluation.metrics.llc import estimate_llc
        from interp_train.losses import per_example_cross_entropy

        llc = estimate_llc(module, _batches(train, options.batch_size), per_example_cross_entropy,
                           lr=options.llc_lr, localization=options.llc_localization,
                           num_burnin_steps=options.llc_burnin,
                           num_chains=options.llc_chains, num_draws=options.llc_draws, seed=options.seed,
                           progress=False)
        metrics["llc"] = _finite_or_none(llc.mean)
        details["llc"] = llc.to_dict(include_traces=False)
        if not llc.healthy:
            notes.append(f"LLC chains unhealthy: {'; '.join(llc.warnings)}")
    details["task"] = getattr(dm, "task", type(dm).__name__)
    return {"metrics": metrics, "details": details, "notes": notes}


def measure_all(
    variants: Mapping[str, Sequence[Run]],
    out_dir: Path,
    options: MeasureOptions,
    progress: bool = True,
    measure: Callable[[Run, MeasureOptions], dict] | None = None,
) -> dict[str, list[dict]]:
    """{variant: [cache entry per run]}: read from ``out_dir/cache`` when the key matches, else
    measured (``measure``, default ``measure_run``) and written there atomically."""
    measure = measure or measure_run
    opts = {k: v for k, v in dataclasses.asdict(options).items() if k != "device"}
    runs = [r for rs in variants.values() for r in rs]
    out: dict[str, list[dict]] = {v: [] for v in variants}
    for run in tqdm(runs, desc="checkpoints", disable=not progress):
        key = cache_mod.cache_key(run.checkpoint, run.config, opts)
        path = cache_mod.cache_path(out_dir, run.variant, run.seed)
        entry = cache_mod.read_cached(path, key)
        if entry is None:
            entry = {"key": key, "variant": run.variant, "seed": run.seed, "run_dir": str(run.run_dir),
                     "checkpoint": str(run.checkpoint), "options": opts, **measure(run, options)}
            entry = json_safe(entry)
            write_json_atomic(path, entry)
        out[run.variant].append(entry)
    return out




# ----------------------------------------------------------------------------- aggregation


def arrow(diff: float | None) -> str:
    """↑ / ↓ for the sign of the difference to baseline, = for none, – when undefined."""
    if diff is None:
        return "–"
    return "↑" if diff > 0 else "↓" if diff < 0 else "="


def verdict(comparison: Mapping[str, Any]) -> str:
    """✓ significant in the interpretable direction, ✗ significant the other way, '' otherwise."""
    if not comparison.get("significant"):
        return ""
    return "✓" if comparison.get("improved") else "✗"


def _check_baseline_and_test(variants: Mapping[str, Any], baseline: str, test: str) -> None:
    if baseline not in variants:
        raise ValueError(f"no baseline variant {baseline!r}; variants found: {', '.join(sorted(variants))} "
                         "(choose one with --baseline)")
    if test not in TESTS:
        raise ValueError(f"unknown test {test!r}; allowed: {', '.join(TESTS)}")


def build_report(
    measurements: Mapping[str, Sequence[Mapping[str, Any]]],
    baseline: str = BASELINE,
    test: str = "welch",
    alpha: float = 0.05,
    options: Mapping[str, Any] | None = None,
    messages: Sequence[str] = (),
) -> dict:
    """The report dict: per variant and metric the seed values, mean, std (ddof = 1) and, for
    non-baseline variants, ``compare_groups(baseline values, variant values, higher_is_better)``
    plus ``arrow`` and ``verdict``. Metrics nobody measured are dropped; runs missing a value
    (None) are left out of that metric's statistics."""
    _check_baseline_and_test(measurements, baseline, test)
    messages = list(messages)
    order = [baseline] + sorted(v for v in measurements if v != baseline)
    used = [m for m in METRICS if any(e["metrics"].get(m.name) is not None
                                      for entries in measurements.values() for e in entries)]
    values = {v: {m.name: [e["metrics"].get(m.name) for e in measurements[v]] for m in used} for v in order}
    for v in order:
        n = len(measurements[v])
        if n < 2:
            messages.append(f"variant {v!r} has {n} seed; no significance test (at least 2 seeds per variant "
                            "are needed)")
    report_variants = {}
    for v in order:
        entries = measurements[v]
        row = {"seeds": [e["seed"] for e in entries], "runs": [e["run_dir"] for e in entries], "metrics": {}}
        for m in used:
            vals = [x for x in values[v][m.name] if x is not None]
            stats = {"values": values[v][m.name], "n": len(vals),
                     "mean": float(np.mean(vals)) if vals else None,
                     "std": float(np.std(vals, ddof=1)) if len(vals) >= 2 else None}
            if v != baseline:
                base = [x for x in values[baseline][m.name] if x is not None]
                cmp = compare_groups(base, vals, higher_is_better=m.higher_is_better, test=test, alpha=alpha)
                stats["comparison"] = {**cmp, "arrow": arrow(cmp["diff"]), "verdict": verdict(cmp)}
            row["metrics"][m.name] = stats
        notes = sorted({n for e in entries for n in e.get("notes", [])})
        if notes:
            row["notes"] = notes
        report_variants[v] = row
    tasks = sorted({str(e.get("details", {}).get("task")) for es in measurements.values() for e in es})
    return json_safe({
        "task": tasks[0] if len(tasks) == 1 else tasks, "baseline": baseline, "test": test, "alpha": alpha,
        "metrics": [dataclasses.asdict(m) for m in used], "variants": report_variants,
        "options": dict(options or {}), "messages": messages,
    })


# ----------------------------------------------------------------------------- markdown


def _fmt(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}g}"


def render_markdown(report: Mapping[str, Any], plots: Sequence[str] = ()) -> str:
    """report.md: one table row per variant; cells "mean ± std" and, for variants, the
    difference to baseline with its arrow, p-value and ✓/✗ (see ``verdict``)."""
    metrics = report["metrics"]
    lines = [f"# Regularized vs standard training: {report['task']}", "",
             f"Baseline: `{report['baseline']}`. Test: {report['test']} (α = {report['alpha']}), "
             "seeds as listed. Each cell: mean ± std over seeds; for variants, Δ to baseline, "
             "arrow = direction of the change, p-value, ✓ = significant in the interpretable direction, "
             "✗ = significant the other way.", "",
             "| variant | seeds | " + " | ".join(f"{m['label']} ({'↑' if m['higher_is_better'] else '↓'} better)"
                                             for m in metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for v, row in report["variants"].items():
        cells = [f"`{v}`", str(len(row["seeds"]))]
        for m in metrics:
            s = row["metrics"][m["name"]]
            cell = f"{_fmt(s['mean'])} ± {_fmt(s['std'], 2)}"
            c = s.get("comparison")
            if c is not None:
                p = "no test" if c["p"] is None else f"p={c['p']:.3g}"
                cell += f"<br>Δ {_fmt(c['diff'], 3)} {c['arrow']} ({p}) {c['verdict']}".rstrip()
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Accuracy is the cost: its Δ is what the regularizer costs (or gains) in held-out accuracy.", "",
              "## Metrics", ""]
    lines += [f"- **{m['label']}** ({'higher' if m['higher_is_better'] else 'lower'} = "
              f"{'better' if m['name'] == 'accuracy' else 'more interpretable'}): {m['description']}"
              for m in metrics]
    measured = {m["name"] for m in metrics}
    if "llc" not in measured:
        lines.append("- **LLC**: not measured (opt-in: `--llc`; SGLD sampling is slow).")
    notes = [f"`{v}`: {n}" for v, row in report["variants"].items() for n in row.get("notes", [])]
    if report["messages"] or notes:
        lines += ["", "## Messages", ""] + [f"- {m}" for m in report["messages"]] + [f"- {n}" for n in notes]
    if plots:
        lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in plots)
                  + " (metrics.png: bars = means, dots = seeds)."]
    lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the command


@dataclass
class CompareResult:
    report: dict
    out_dir: Path
    files: list[str] = field(default_factory=list)


def run_compare(
    variants: Mapping[str, Sequence[Run]],
    out_dir: str | Path,
    options: MeasureOptions = MeasureOptions(),
    baseline: str = BASELINE,
    test: str = "welch",
    alpha: float = 0.05,
    progress: bool = True,
) -> CompareResult:
    """Checks the runs, measures them (cached in ``out_dir/cache``), writes ``report.json``,
    ``report.md`` and the plots into ``out_dir`` (each file atomically; a re-run replaces them)."""
    from evaluation.compare import plots as compare_plots

    _check_baseline_and_test(variants, baseline, test)  # before any (slow) measurement
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--out {str(out_dir)!r} exists and is not a directory")
    messages = check_consistent(variants)
    measurements = measure_all(variants, out_dir, options, progress=progress)
    report = build_report(measurements, baseline, test, alpha, dataclasses.asdict(options), messages)
    plots = compare_plots.write_plots(report, measurements, out_dir)
    write_json_atomic(out_dir / "report.json", report)
    write_atomic(out_dir / "report.md", render_markdown(report, plots))
    return CompareResult(report, out_dir, ["report.json", "report.md", *plots])
