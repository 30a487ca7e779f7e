"""Edge-ablation sparsity: the fewest top-weight edges that keep the accuracy (docs/DESIGN.md §6.3).

rib's headline sparsity measure (ApolloResearch/rib, ``ablate_edges_and_eval``), in the LIB, PCA
or neuron basis of a ``fit_lib`` result. For a section l → l+1 with input basis (C, C⁺) (features
f̂ = [1, f] C, f = (f̂ C⁺)[1:]), output basis (C′, C′⁺) and edges E (k′ × k):

* Candidate edges: (i, j) with i, j ≥ 1, N_l = (k′ − 1)(k − 1) of them, ranked by E_ij
  (descending, ties by index). The constant features' edges are kept for free, as rib does for a
  centred graph: the constant input carries the mean, not information about the example.
* Keeping the top n edges K_n, each output feature i of l+1 is computed from its kept inputs only,
  the other inputs replaced by a fill value m_j (``ablation``: "mean", m_j = E[f̂_j] over the fit
  data, i.e. [1, μ] C; "zero", m_j = 0):

      f^{(i)} = f + Σ_{j ≥ 1, (i, j) ∉ K_n} (m_j − f̂_j) C⁺_{j, 1:},    ĥ_i = [1, F(f^{(i)})] C′_{:, i}

  (F the section: the model from node layer l to l+1), and the rest of the network runs on
  f′^{l+1} = f^{l+1} + Σ_{i ≥ 1} (ĥ_i − ĥ_i^{clean}) C′⁺_{i, 1:}. Directions a basis truncated keep
  their clean values on both sides, so keeping every edge is the model itself. Outputs whose rows
  of K_n are equal share one pass of the section (rib's grouping): an evaluation costs one section
  pass per distinct non-full row, one clean pass and one pass downstream of l+1, per batch. The
  passes are batched n copies at a time, the model before l run once and its activation repeated
  at l (for a TransformerLens bridge's resid_mid: at the block's resid_pre), after checking once
  per model and section that this reproduces running the n stacked copies from the input.
* n*_l = min {n ∈ [0, N_l] : acc_l(n) ≥ acc − tolerance}, acc the unablated accuracy and acc_l(n)
  the accuracy with section l ablated alone (the others clean), by bisection (⌈log₂ N_l⌉ + 1
  evaluations). Bisection assumes acc_l(n) monotone in n, as rib's schedules do; the probed
  accuracies are returned so that a non-monotone curve shows. One-sided: more accuracy is fine.

Reported per section (n*_l, N_l) and in total: Σ n*_l and the fraction Σ n*_l / Σ N_l (lower:
sparser). With centred bases (``LIBConfig.center``, the default) every non-constant LIB and PCA
feature has mean 0, so "mean" and "zero" ablation coincide there; they differ in the neuron basis.
Accuracy: argmax of the logits; (B,) targets with (B, T, C) logits are read at the last position,
(B, T) targets at every position.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import asdict, dataclass, field
from typing import Iterable

import torch
from torch import Tensor, nn

from evaluation.lib.edges import OUTPUT, as_positions
from evaluation.lib.positions import insert, select, site_of
from interp_train.sites import RESID_MID, eval_mode, run_model

ABLATIONS = ("mean", "zero")
BASES = ("lib", "pca", "neuron")


@dataclass(frozen=True)
class EdgeAblationConfig:
    """tolerance: allowed accuracy drop (default 0.001, rib's); ablation: "mean" or "zero";
    chunk_elements: bound on the elements of the stacked section inputs of one pass (memory only)."""

    tolerance: float = 0.001
    ablation: str = "mean"
    chunk_elements: int = 2 ** 22

    def __post_init__(self):
        if (isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float))
                or not math.isfinite(self.tolerance) or not 0 <= self.tolerance < 1):
            raise ValueError(f"tolerance must be a number in [0, 1) (an accuracy drop), got {self.tolerance!r}")
        if self.ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {self.ablation!r}; allowed: {', '.join(ABLATIONS)}")
        if isinstance(self.chunk_elements, bool) or not isinstance(self.chunk_elements, int) or self.chunk_elements < 1:
            raise ValueError(f"chunk_elements must be an integer >= 1, got {self.chunk_elements!r}")


@dataclass
class SectionAblation:
    """n_kept = n*_l of N_l = n_edges; accuracy = acc_l(n*_l); probes: {n: acc_l(n)} evaluated."""

    n_kept: int
    n_edges: int
    accuracy: float
    probes: dict[int, float] = field(default_factory=dict)


@dataclass
class EdgeAblationResult:
    basis: str
    ablation: str
    tolerance: float
    accuracy: float                         # unablated
    sections: dict[str, SectionAblation]    # keyed by the section's input layer

    @property
    def total_kept(self) -> int:
        return sum(s.n_kept for s in self.sections.values())

    @property
    def total_edges(self) -> int:
        return sum(s.n_edges for s in self.sections.values())

    @property
    def fraction(self) -> float | None:
        return self.total_kept / self.total_edges if self.total_edges else None

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(total_kept=self.total_kept, total_edges=self.total_edges, fraction=self.fraction)
        return out


class _Reached(Exception):
    """Raised by the hook of a section's output layer to skip the rest of the model."""


def _augment(x: Tensor) -> Tensor:
    return torch.cat([torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device), x], dim=-1)


def keep_mask(E: Tensor, n: int) -> Tensor:
    """(k′ − 1, k − 1) bool: the n largest non-constant edges of E (descending, ties by index)."""
    sub = torch.as_tensor(E)[1:, 1:]
    order = torch.argsort(sub.flatten(), descending=True, stable=True)
    mask = torch.zeros(sub.numel(), dtype=torch.bool)
    mask[order[:n].cpu()] = True
    return mask.reshape(sub.shape)


def _batches(data) -> list:
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        return [tuple(data)]
    return list(data)


def _hits(logits: Tensor, targets: Tensor) -> tuple[float, int]:
    if torch.is_floating_point(targets):
        raise ValueError(f"edge ablation measures accuracy, so the targets must be class indices; got {targets.dtype}")
    logits = logits[:, -1] if logits.ndim == 3 and targets.ndim == 1 else logits
    correct = logits.argmax(-1) == targets
    return float(correct.sum()), correct.numel()


def _section_outputs(model, inputs, l_in, l_out, x: Tensor, repeat_at: str | None) -> Tensor:
    """f^{l+1} (at l+1's positions) with node layer l's part of every copy of the batch replaced by x (n·B, P, d).

    repeat_at: a site at or before l where the batch's activation is repeated n times, so that the
    model before it runs on the batch once (None: run the stacked batch from the input)."""
    n = x.shape[0] // inputs.shape[0]
    feed = inputs if repeat_at or n == 1 else torch.cat([inputs] * n)
    holder = {}

    def repeat(act):
        return torch.cat([act] * n) if act.shape[0] != x.shape[0] else act

    def replace(act):
        act = repeat(act)
        return insert(l_in, act, x.to(act.dtype).reshape(select(l_in, act).shape))

    def stop(act):
        holder["out"] = select(l_out, act)
        raise _Reached

    edit = {repeat_at: repeat} if repeat_at and repeat_at != site_of(l_in) else {}
    edit[site_of(l_in)] = replace
    if site_of(l_out) == OUTPUT:
        return select(l_out, run_model(model, feed, edit=edit).output)
    try:
        run_model(model, feed, edit={**edit, site_of(l_out): stop})
    except _Reached:
        pass
    return holder["out"]


def _repeat_sites(l_in: str) -> list[str]:
    """Where the batch may be repeated for a section from l_in: l_in's own site, or for a
    TransformerLens resid_mid (edited through the attention output, whose residual add meets
    resid_pre) the block's resid_pre."""
    site = site_of(l_in)
    if site.endswith(RESID_MID):  # the suffix run_model reroutes through the attention output
        return [site, site[: -len(RESID_MID)] + "hook_resid_pre"]
    return [site]


# model -> {(l_in, l_out): the site where repeating the batch gives the stacked batch's outputs, or
# None}; structural, so checked once per model and section
_REPEAT_AT: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def repeat_site(model: nn.Module, l_in: str, l_out: str) -> str | None:
    """The site at which ``ablated_logits`` repeats the batch for this model and section, once it
    has been checked (None: not checked yet, or the stacked batch is used)."""
    return _REPEAT_AT.get(model, {}).get((l_in, l_out))


def _checked_section_outputs(model, inputs, l_in, l_out, x: Tensor) -> Tensor:
    """``_section_outputs``, repeating the batch at the first of ``_repeat_sites`` that was checked,
    on the first call for this model and section, to reproduce running the stacked batch (a model
    that mixes the batch, or an edit that meets a tensor computed with the batch's own size, fails
    the check and keeps the stacked batch)."""
    known = _REPEAT_AT.setdefault(model, {})
    key = (l_in, l_out)
    if key in known or x.shape[0] == inputs.shape[0]:
        return _section_outputs(model, inputs, l_in, l_out, x, known.get(key))
    stacked = _section_outputs(model, inputs, l_in, l_out, x, None)
    known[key] = None
    scale = float(stacked.abs().max()) or 1.0
    for site in _repeat_sites(l_in):
        try:
            repeated = _section_outputs(model, inputs, l_in, l_out, x, site)
        except RuntimeError:  # shapes that do not broadcast
            continue
        if repeated.shape == stacked.shape and float((repeated - stacked).abs().max()) <= 1e-5 * scale:
            known[key] = site
            break
    return stacked


def ablated_logits(model: nn.Module, inputs: Tensor, l_in: str, l_out: str, basis_in, basis_out, keep: Tensor,
                   ablation: str = "mean", chunk_elements: int = 2 ** 22, stacked: bool = False) -> Tensor:
    """The model's logits with the section l_in → l_out computed edge by edge: output feature i
    (row i − 1 of ``keep``) from the inputs j ≥ 1 with keep[i − 1, j − 1] only (module docstring).

    stacked: run every copy of the batch through the whole model, the reference the repeated batch
    is checked against (slower; for benchmarks and checks)."""
    in_site, out_site = site_of(l_in), site_of(l_out)
    record = [s for s in (in_site, out_site) if s != OUTPUT]
    clean = run_model(model, inputs, record=record)
    f = as_positions(select(l_in, clean.activations[in_site])).to(torch.float64)        # (B, P, d)
    out_act = clean.output if out_site == OUTPUT else clean.activations[out_site]
    h = select(l_out, out_act).to(torch.float64)                                         # (B, T, d′)
    dev = f.device
    C, C_pinv = basis_in.C.to(dev), basis_in.C_pinv.to(dev)
    C_out, C_out_pinv = basis_out.C.to(dev), basis_out.C_pinv.to(dev)
    if C.shape[0] != f.shape[-1] + 1 or C_out.shape[0] != as_positions(h).shape[-1] + 1:
        raise ValueError(f"section {l_in} -> {l_out}: the bases have {C.shape[0] - 1} and {C_out.shape[0] - 1} "
                         f"units, the activations {f.shape[-1]} and {as_positions(h).shape[-1]}")
    if tuple(keep.shape) != (C_out.shape[1] - 1, C.shape[1] - 1):
        raise ValueError(f"section {l_in} -> {l_out}: keep has shape {tuple(keep.shape)}, expected "
                         f"{(C_out.shape[1] - 1, C.shape[1] - 1)} (non-constant output × input features)")
    f_hat = _augment(f) @ C
    fill = (_augment(basis_in.mean.to(dev, torch.float64)) @ C) if ablation == "mean" else torch.zeros_like(C[0])
    delta = (fill - f_hat)[..., 1:]                                                       # (B, P, k − 1)
    h_hat = _augment(h) @ C_out
    change = torch.zeros_like(h_hat)
    keep = keep.to(dev)
    patterns, group = torch.unique(keep, dim=0, return_inverse=True)
    todo = [p for p in range(patterns.shape[0]) if not bool(patterns[p].all())]
    per_pass = max(1, chunk_elements // max(f.numel(), 1))
    # the section's inputs in the model's own dtype, which they are cast to anyway (float32 halves the
    # cost of these products, which rival a cheap section's pass)
    work = select(l_in, clean.activations[in_site]).dtype
    f_w, delta_w, C_pinv_w = f.to(work), delta.to(work), C_pinv[1:, 1:].to(work)
    for start in range(0, len(todo), per_pass):
        chunk = todo[start:start + per_pass]
        x = torch.cat([f_w + (delta_w * ~patterns[p]) @ C_pinv_w for p in chunk])          # (n·B, P, d)
        outs = (_section_outputs(model, inputs, l_in, l_out, x, None) if stacked
                else _checked_section_outputs(model, inputs, l_in, l_out, x))
        outs = as_positions(outs).to(torch.float64)
        for slot, p in enumerate(chunk):
            cols = (group == p).nonzero().flatten() + 1                                   # output features of p
            o = outs[slot * f.shape[0]:(slot + 1) * f.shape[0]]
            change[..., cols] = _augment(o) @ C_out[:, cols] - h_hat[..., cols]
    h_new = as_positions(h) + change[..., 1:] @ C_out_pinv[1:, 1:]
    if out_site == OUTPUT:
        return insert(l_out, clean.output, h_new.to(clean.output.dtype).reshape(select(l_out, clean.output).shape))
    edit = {out_site: lambda a: insert(l_out, a, h_new.to(a.dtype).reshape(select(l_out, a).shape))}
    return run_model(model, inputs, edit=edit).output


def section_accuracy(model, data, l_in, l_out, basis_in, basis_out, keep: Tensor | None,
                     ablation: str = "mean", chunk_elements: int = 2 ** 22) -> float:
    """Accuracy over ``data`` ((inputs, targets) or batches of them) with the section ablated to
    ``keep`` (None: the unablated model)."""
    device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    correct, count = 0.0, 0
    with torch.no_grad():
        for inputs, targets in _batches(data):
            inputs, targets = inputs.to(device), targets.to(device)
            if keep is None:
                logits = run_model(model, inputs).output
            else:
                logits = ablated_logits(model, inputs, l_in, l_out, basis_in, basis_out, keep, ablation, chunk_elements)
            c, n = _hits(logits, targets)
            correct, count = correct + c, count + n
    if count == 0:
        raise ValueError("edge ablation got no examples in data")
    return correct / count


def edge_ablation(model: nn.Module, data, node_layers: list[str], bases: dict, edges: dict[str, Tensor],
                  config: EdgeAblationConfig = EdgeAblationConfig(), basis: str = "",
                  sections: Iterable[str] | None = None) -> EdgeAblationResult:
    """n*_l per section (input layer) by bisection, for bases {layer: LayerBasis} and edges
    {input layer: E (k′, k)}; ``sections`` picks input layers (default: every section)."""
    pairs = dict(zip(node_layers[:-1], node_layers[1:]))
    chosen = list(pairs) if sections is None else list(sections)
    unknown = [s for s in chosen if s not in pairs]
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; sections are named by their input layer: {list(pairs)}")
    with eval_mode(model):
        base = section_accuracy(model, data, None, None, None, None, None)
        out = {}
        for l_in in chosen:
            l_out = pairs[l_in]
            E = torch.as_tensor(edges[l_in])
            N = (E.shape[0] - 1) * (E.shape[1] - 1)
            probes: dict[int, float] = {N: base}

            def acc(n):
                if n not in probes:
                    probes[n] = section_accuracy(model, data, l_in, l_out, bases[l_in], bases[l_out], keep_mask(E, n),
                                                 config.ablation, config.chunk_elements)
                return probes[n]

            lo, hi = 0, N           # acc(hi) within tolerance; acc(lo) fails unless lo == hi == 0
            if acc(0) >= base - config.tolerance:
                hi = 0
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if acc(mid) >= base - config.tolerance:
                    hi = mid
                else:
                    lo = mid
            out[l_in] = SectionAblation(hi, N, probes[hi], dict(sorted(probes.items())))
    return EdgeAblationResult(basis, config.ablation, float(config.tolerance), base, out)


def basis_set(result, name: str, model: nn.Module | None = None, fit_data=None) -> tuple[dict, dict]:
    """(bases, edges) named ``name`` ("lib", "pca" or "neuron") of a ``fit_lib`` result
    (``result.bases[name]``, ``result.edges[name]``). A fit without neuron edges
    (``LIBConfig(neuron_edges=False)``) gets them here from one edge pass of ``model`` over
    ``fit_data`` (evaluation.lib.fit.fit_edges)."""
    if name not in BASES:
        raise ValueError(f"unknown basis {name!r}; allowed: {', '.join(BASES)}")
    if name in result.edges:
        return result.bases[name], result.edges[name]
    if model is None or fit_data is None:
        raise ValueError(f"the fit has no {name} edges (LIBConfig(neuron_edges=False)); pass model= and fit_data= "
                         "(the fit's data) to compute them")
    from evaluation.lib.fit import fit_edges

    edges = fit_edges(model, fit_data, result.node_layers, {name: result.bases[name]}, result.config)[name]
    return result.bases[name], edges


def edge_ablation_sparsity(model: nn.Module, data, result, basis: str = "lib",
                           config: EdgeAblationConfig = EdgeAblationConfig(), fit_data=None,
                           sections: Iterable[str] | None = None) -> EdgeAblationResult:
    """Edge-ablation sparsity of ``model`` on ``data`` ((inputs, targets) or batches) in basis
    ``basis`` of the ``fit_lib`` result ``result`` (``fit_data``: the fit's data, needed only for
    the neuron basis of a fit without neuron edges, see ``basis_set``)."""
    bases, edges = basis_set(result, basis, model, fit_data)
    return edge_ablation(model, data, result.node_layers, bases, edges, config, basis, sections)


__all__ = ["ABLATIONS", "BASES", "EdgeAblationConfig", "EdgeAblationResult", "SectionAblation", "ablated_logits",
           "basis_set", "edge_ablation", "edge_ablation_sparsity", "keep_mask", "section_accuracy"]
