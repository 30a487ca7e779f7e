"""Circuit size by pruning (Gao et al. 2025, "Weight-sparse transformers have interpretable circuits"), docs/DESIGN.md §6.2.

Nodes are units of chosen activations (``NodeGroup``): MLP neurons, attention heads (``width``
d_head channels of ``hook_z`` each), residual-stream channels. Each node i has a logit θ_i and a
hard gate g_i = 1[θ_i > 0]; the forward pass replaces every activation a by

    a' = g ⊙ a + (1 − g) ⊙ ā,     ā = mean of a over the examples ("mean" ablation, the default;
                                      per position for sequences) or 0 ("zero" ablation),

and the gradient reaches θ through the sigmoid straight-through estimator ∂g/∂θ := σ'(θ). The
search minimises, with Adam over ``steps`` full-batch steps,

    (1/N) Σ_i σ(θ_i)  +  μ · max(0, L(g) − L*) / δ,       L* = L_full + δ,      (search="penalty")

(L(g) the mean task loss with the gates g, N the number of nodes), keeps the smallest gate set with
L(g) ≤ L* seen on the way, and finishes with a greedy pass that drops every remaining node whose
removal keeps L ≤ L* (lowest θ first). If no step met the constraint, the ablated nodes with the
highest θ are restored first (bisection over their number; all restored is the full model). The
result is therefore always feasible and no single kept node can be removed.

A known weakness of "penalty" (the default, which every committed study figure used): while
L(g) ≤ L* only the first term acts, every θ_i gets the same gradient, and all gates close at the
same step (about init_logit / lr); with mean ablation the all-ablated model's activations equal
their means, every gate's gradient is zero from then on, and the θ stay tied. The result is then
the greedy pass alone, in an order the tie leaves to ``argsort``. ``search="lagrangian"`` keeps the
loss term on throughout with a multiplier λ ≥ 0 raised while L(g) > L* and lowered while below
(dual ascent, λ ← max(0, λ + dual_lr · (L(g) − L*) / δ), starting at μ):

    (1/N) Σ_i σ(θ_i)  +  λ · (L(g) − L*) / δ,

so from the first step a node's θ falls only where its gradient ∂L/∂g_i is small: the gates close
in the order of their attribution, never all at once.

Edges among kept nodes count non-zero weights between kept nodes: Linear layers between
consecutive groups of an ``nn.Sequential``; for TransformerLens models, resid_pre → heads
(any non-zero W_Q/W_K/W_V entry of the channel), heads → resid_mid (W_O), resid_mid → neurons
(W_in), neurons → next resid (W_out) and the skip connections resid_pre → resid_mid → next resid
(one edge per channel kept on both sides). LayerNorm's channel mixing is not counted.

Default δ = 0.01 nats (``CircuitConfig.delta``); the "zero" option follows the replication that
found smaller circuits with zero ablation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from interp_train.losses import per_example_cross_entropy
from interp_train.sites import eval_mode, run_model

ABLATIONS = ("mean", "zero")
SEARCHES = ("penalty", "lagrangian")


@dataclass(frozen=True)
class NodeGroup:
    """``n`` nodes at activation ``site``: node j is channels [j·width, (j+1)·width) of the last dim."""

    site: str
    n: int
    width: int = 1
    kind: str = "neuron"

    def __post_init__(self):
        if not isinstance(self.n, int) or self.n < 1 or not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"a node group needs n >= 1 and width >= 1, got n={self.n!r}, width={self.width!r}")


@dataclass(frozen=True)
class CircuitConfig:
    """Settings of the pruning search (validated on construction).

    delta: allowed loss increase over the full model, L* = L_full + delta (nats; default 0.01).
    target_loss: an explicit L* instead (must be >= the full model's loss).
    ablation: "mean" (ablated nodes take their mean activation) or "zero".
    steps, lr: Adam steps (full batch) and learning rate on the gate logits.
    constraint_weight: μ, the price of exceeding L* by delta relative to keeping all nodes.
    init_logit: θ at the start (> 0: every node kept).
    search: "penalty" (the hinge above) or "lagrangian" (dual ascent on λ, module docstring).
    dual_lr: the multiplier's step per unit of (L − L*) / δ ("lagrangian" only).
    refine: finish with the greedy pass that drops every removable node (one forward pass per kept
        node); False returns the best gate set of the gradient search (still feasible).
    """

    delta: float = 0.01
    target_loss: float | None = None
    ablation: str = "mean"
    steps: int = 300
    lr: float = 0.05
    constraint_weight: float = 1.0
    init_logit: float = 1.0
    refine: bool = True
    search: str = "penalty"
    dual_lr: float = 0.1

    def __post_init__(self):
        if not (isinstance(self.delta, (int, float)) and math.isfinite(self.delta) and self.delta > 0):
            raise ValueError(f"delta must be a finite number > 0, got {self.delta!r}")
        if self.target_loss is not None and not math.isfinite(self.target_loss):
            raise ValueError(f"target_loss must be a finite number or None, got {self.target_loss!r}")
        if self.ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {self.ablation!r}; allowed: {', '.join(ABLATIONS)}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {self.steps!r}")
        if self.search not in SEARCHES:
            raise ValueError(f"unknown search {self.search!r}; allowed: {', '.join(SEARCHES)}")
        for name in ("lr", "constraint_weight", "init_logit", "dual_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


@dataclass
class CircuitResult:
    """nodes_kept of nodes_total (per group in ``kept``: site -> kept node indices), edges among them
    (None when the model's layout is not known), the loss reached and the target."""

    nodes_kept: int
    nodes_total: int
    edges: int | None
    loss: float
    full_loss: float
    target_loss: float
    ablation: str
    kept: dict[str, list[int]] = field(default_factory=dict)
    edges_total: int | None = None
    search: str = "penalty"

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- node groups


def _tl_model(model: nn.Module):
    """(prefix, TransformerLens model) for the first submodule with ``blocks`` and a hook_dict, or None."""
    for prefix, module in model.named_modules():
        if isinstance(getattr(module, "hook_dict", None), dict) and hasattr(module, "blocks") and hasattr(module, "cfg"):
            return prefix, module
    return None


def transformer_node_groups(tl) -> list[NodeGroup]:
    """resid_pre, heads, resid_mid, MLP neurons per block, then the final resid_post."""
    cfg = tl.cfg
    groups = []
    for layer in range(cfg.n_layers):
        groups += [NodeGroup(f"blocks.{layer}.hook_resid_pre", cfg.d_model, kind="resid"),
                   NodeGroup(f"blocks.{layer}.attn.hook_z", cfg.n_heads, width=cfg.d_head, kind="head"),
                   NodeGroup(f"blocks.{layer}.hook_resid_mid", cfg.d_model, kind="resid"),
                   NodeGroup(f"blocks.{layer}.mlp.hook_post", cfg.d_mlp, kind="neuron")]
    groups.append(NodeGroup(f"blocks.{cfg.n_layers - 1}.hook_resid_post", cfg.d_model, kind="resid"))
    return groups


def _sequential(model: nn.Module) -> tuple[str, nn.Sequential] | None:
    """(path, module) of the first nn.Sequential with at least two nn.Linear children (e.g. an MLP's layers)."""
    for path, module in model.named_modules():
        if isinstance(module, nn.Sequential) and sum(isinstance(m, nn.Linear) for m in module) >= 2:
            return path, module
    return None


def _join(prefix: str, index: int) -> str:
    return f"{prefix}.{index}" if prefix else str(index)


def sequential_node_groups(seq: nn.Sequential, prefix: str = "") -> list[NodeGroup]:
    """The outputs of the modules that follow each hidden nn.Linear (its activation), one node per unit."""
    linear = [i for i, m in enumerate(seq) if isinstance(m, nn.Linear)]
    return [NodeGroup(_join(prefix, i + 1), seq[i].out_features) for i in linear[:-1]
            if i + 1 < len(seq) and not isinstance(seq[i + 1], nn.Linear)]


def default_node_groups(model: nn.Module) -> list[NodeGroup]:
    """TransformerLens models: ``transformer_node_groups``; else the hidden units of the first
    nn.Sequential with Linear layers (an MLP)."""
    found = _tl_model(model)
    if found is not None:
        return transformer_node_groups(found[1])
    seq = _sequential(model)
    if seq is not None and sequential_node_groups(seq[1], seq[0]):
        return sequential_node_groups(seq[1], seq[0])
    raise ValueError(f"cannot choose nodes for a {type(model).__name__} by itself (TransformerLens models and "
                     "MLPs built from nn.Sequential are known); pass groups=[NodeGroup(site, n, width), ...]")


# ----------------------------------------------------------------------------- edges


def _nz(t: torch.Tensor) -> torch.Tensor:
    return t.detach() != 0


def _count(adjacency: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> int:
    """Non-zero entries of a (src, dst) adjacency between kept src and kept dst nodes."""
    return int(adjacency[src][:, dst].sum())


def _transformer_edges(tl, masks: dict[str, torch.Tensor]) -> int:
    total = 0
    n_layers = tl.cfg.n_layers
    for layer in range(n_layers):
        block = tl.blocks[layer]
        pre, z, mid = (masks[f"blocks.{layer}.hook_resid_pre"], masks[f"blocks.{layer}.attn.hook_z"],
                       masks[f"blocks.{layer}.hook_resid_mid"])
        neurons = masks[f"blocks.{layer}.mlp.hook_post"]
        post = masks[f"blocks.{layer + 1}.hook_resid_pre" if layer + 1 < n_layers else f"blocks.{layer}.hook_resid_post"]
        reads = (_nz(block.attn.W_Q) | _nz(block.attn.W_K) | _nz(block.attn.W_V)).any(-1).T  # (d_model, H)
        total += _count(reads, pre, z) + _count(_nz(block.attn.W_O).any(1), z, mid)          # W_O (H, d_head, d)
        total += _count(_nz(block.mlp.W_in), mid, neurons) + _count(_nz(block.mlp.W_out), neurons, post)
        total += int((pre & mid).sum()) + int((mid & post).sum())                             # skip connections
    return total


def _sequential_edges(seq: nn.Sequential, prefix: str, groups: Sequence[NodeGroup],
                      masks: dict[str, torch.Tensor]) -> int:
    index = {_join(prefix, i): i for i in range(len(seq))}
    total = 0
    for a, b in zip(groups, groups[1:]):
        between = [m for m in list(seq)[index[a.site] + 1:index[b.site]] if isinstance(m, nn.Linear)]
        if len(between) != 1:
            raise ValueError(f"expected one nn.Linear between node groups {a.site!r} and {b.site!r}")
        total += _count(_nz(between[0].weight).T, masks[a.site], masks[b.site])
    return total


def count_edges(model: nn.Module, groups: Sequence[NodeGroup], masks: dict[str, torch.Tensor]) -> int | None:
    """Non-zero weights between kept nodes (module docstring), or None for an unknown layout."""
    sites = [g.site for g in groups]
    found = _tl_model(model)
    if found is not None:
        return _transformer_edges(found[1], masks) if sites == [g.site for g in transformer_node_groups(found[1])] \
            else None
    seq = _sequential(model)
    if seq is not None and sites == [g.site for g in sequential_node_groups(seq[1], seq[0])]:
        return _sequential_edges(seq[1], seq[0], groups, masks)
    return None


# ----------------------------------------------------------------------------- the search


class _Gated:
    """Forward passes of ``model`` with hard node gates at the groups' sites."""

    def __init__(self, model, inputs, targets, groups, ablation, loss_fn):
        self.model, self.inputs, self.targets, self.groups, self.loss_fn = model, inputs, targets, groups, loss_fn
        with torch.no_grad():
            clean = run_model(model, inputs, record=[g.site for g in groups])
        self.baselines = {}
        for g in groups:
            act = clean.activations[g.site]
            if act.shape[-1] != g.n * g.width:
                raise ValueError(f"site {g.site!r} has {act.shape[-1]} channels, but the node group says "
                                 f"{g.n} nodes x width {g.width}")
            self.baselines[g.site] = act.mean(0, keepdim=True) if ablation == "mean" else torch.zeros_like(act[:1])
        self.full_loss = float(self.loss(clean.output))

    def loss(self, output: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(output, self.targets).mean()

    def run(self, gates: dict[str, torch.Tensor]) -> torch.Tensor:
        def edit_for(g: NodeGroup) -> Callable[[torch.Tensor], torch.Tensor]:
            def edit(act):
                gate = gates[g.site].to(act.dtype).repeat_interleave(g.width)
                return gate * act + (1 - gate) * self.baselines[g.site]
            return edit

        return self.loss(run_model(self.model, self.inputs, edit={g.site: edit_for(g) for g in self.groups}).output)

    def hard_loss(self, masks: dict[str, torch.Tensor]) -> float:
        with torch.no_grad():
            return float(self.run(masks))


def _flat(masks: dict[str, torch.Tensor], groups) -> torch.Tensor:
    return torch.cat([masks[g.site] for g in groups])


def _unflat(flat: torch.Tensor, groups) -> dict[str, torch.Tensor]:
    return dict(zip([g.site for g in groups], flat.split([g.n for g in groups])))


def prune_circuit(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                  config: CircuitConfig = CircuitConfig(), groups: Sequence[NodeGroup] | None = None,
                  loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = per_example_cross_entropy,
                  ) -> CircuitResult:
    """The fewest nodes whose gating keeps the task loss on (inputs, targets) <= L_full + delta (module docstring).

    groups: the node groups (default: ``default_node_groups(model)``). The model is not modified.
    The search is deterministic (no sampling): the same model and data give the same circuit.
    Raises ValueError when ``config.target_loss`` is below the full model's loss.
    """
    groups = list(groups) if groups is not None else default_node_groups(model)
    params = list(model.parameters())
    requires = [p.requires_grad for p in params]
    with eval_mode(model):  # left after the requires_grad flags are restored, as they were set after it
        try:
            for p in params:
                p.requires_grad_(False)
            gated = _Gated(model, inputs, targets, groups, config.ablation, loss_fn)
            target = gated.full_loss + config.delta if config.target_loss is None else float(config.target_loss)
            if target < gated.full_loss:
                raise ValueError(f"target_loss {target!r} is below the full model's loss {gated.full_loss!r} on this "
                                 "data: no circuit can reach it; choose a target >= the full loss (or set delta)")
            delta = target - gated.full_loss if config.target_loss is not None else config.delta
            kept = _search(gated, groups, config, target, max(delta, 1e-12))
        finally:
            for p, r in zip(params, requires):
                p.requires_grad_(r)
        # scored in eval mode too: a model whose training mode is random (dropout, HardConcreteL0's
        # drawn gates) would otherwise report a loss and edges (the gated weights) of another draw
        masks = _unflat(kept, groups)
        edges = count_edges(model, groups, masks)
        all_on = {g.site: torch.ones(g.n, dtype=torch.bool, device=kept.device) for g in groups}
        return CircuitResult(
            nodes_kept=int(kept.sum()), nodes_total=int(kept.numel()), edges=edges,
            loss=gated.hard_loss(masks), full_loss=gated.full_loss, target_loss=target, ablation=config.ablation,
            kept={site: torch.nonzero(m).flatten().tolist() for site, m in masks.items()},
            edges_total=count_edges(model, groups, all_on), search=config.search,
        )


def _search(gated: _Gated, groups, config: CircuitConfig, target: float, delta: float) -> torch.Tensor:
    device = gated.inputs.device
    n = sum(g.n for g in groups)
    theta = torch.full((n,), float(config.init_logit), device=device, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=config.lr)
    best: torch.Tensor | None = None
    multiplier = float(config.constraint_weight)  # λ of search="lagrangian"
    for _ in range(config.steps):
        prob = torch.sigmoid(theta)
        hard = (theta > 0).to(prob.dtype)
        gates = _unflat(hard + prob - prob.detach(), groups)  # straight-through: value hard, gradient sigmoid'
        loss = gated.run(gates)
        excess = (float(loss.detach()) - target) / delta
        if excess <= 0 and (best is None or int(hard.sum()) < int(best.sum())):
            best = hard.detach().bool().clone()
        if config.search == "lagrangian":
            objective = prob.mean() + multiplier * (loss - target) / delta
            multiplier = max(0.0, multiplier + config.dual_lr * excess)
        else:
            objective = prob.mean() + config.constraint_weight * torch.relu(loss - target) / delta
        optimizer.zero_grad()
        objective.backward()
        optimizer.step()
    order = torch.argsort(theta.detach(), descending=True)  # most wanted first
    if best is None:
        best = _restore_until_feasible(gated, groups, (theta > 0).detach(), order, target)
    return _greedy_drop(gated, groups, best, order.flip(0), target) if config.refine else best


def _restore_until_feasible(gated, groups, mask, order, target) -> torch.Tensor:
    """mask plus the fewest of the ablated nodes, in ``order``, that make the loss <= target (bisection)."""
    off = order[~mask[order]]

    def with_top(m: int) -> torch.Tensor:
        out = mask.clone()
        out[off[:m]] = True
        return out

    lo, hi = 0, len(off)  # with_top(len(off)) is the full model: feasible
    while lo < hi:
        mid = (lo + hi) // 2
        if gated.hard_loss(_unflat(with_top(mid), groups)) <= target:
            hi = mid
        else:
            lo = mid + 1
    return with_top(lo)


def _greedy_drop(gated, groups, mask, order, target) -> torch.Tensor:
    """Drops each kept node, in ``order``, whose removal keeps the loss <= target."""
    mask = mask.clone()
    for i in order.tolist():
        if mask[i]:
            mask[i] = False
            if gated.hard_loss(_unflat(mask, groups)) > target:
                mask[i] = True
    return mask
