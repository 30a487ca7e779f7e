"""A closed-form section kind as a Section, and its check against autograd on the first batch.

A kind (attention.py, position_wise.py, layernorm_*.py) computes ``gram(x, W)`` and
``edges(x, rule, bases, chunk_elements, dtype)`` from the input site's activation x (B, T, d),
every position; node layers with a position index pass ``inputs_at`` / ``outputs_at``
(``section_positions``) to the kinds that support them (``supports_positions``).

The check (``check_section``: the output values and the Jacobian Gram of CHECK_EXAMPLES examples
along CHECK_DIRECTIONS random mixtures of the output directions, token sequences of a bridge cut
to CHECK_POSITIONS; ``check_edges``: their edges) compares the kind with the autograd passes of
evaluation.lib.edges at relative tolerance 1e-7 in float64 (1e-3 in float32), so a misrecognised
layer falls back to autograd instead of giving wrong numbers (docs/DESIGN.md §4.10).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from interp_train.sites import run_model
from evaluation.lib.edges import SectionPass, as_positions, edges_for_batch, jacobian_gram_for_batch, section_forward
from evaluation.lib.positions import positions_of, site_of
from evaluation.lib.sections.base import Basis, Batch, Rule
from evaluation.lib.sections.transformer_lens import bridge_of

F64 = torch.float64
CHECK_EXAMPLES = 3
CHECK_DIRECTIONS = 8  # output directions (random mixtures of all) checked against autograd
CHECK_POSITIONS = 16  # token positions of the checked sequences (TransformerLens bridges)


class ClosedFormSection:
    """The Section of a recognised kind: reads the input site's activation, checked against autograd.

    model: the model the section passes run on (for the check); config: the fit's LIBConfig
    (chunk_elements; jacobian_dtype "float32" computes the per-example edge products in float32).
    """

    def __init__(self, kind, l_in: str, l_out: str, description: str, model: nn.Module, config):
        self.kind, self.l_in, self.l_out, self.model, self.config = kind, l_in, l_out, model, config
        self.method = f"closed form: {description}"
        self.reads = site_of(l_in)
        self.dtype = torch.float32 if config.jacobian_dtype == "float32" else F64

    def check_gram(self, batch: Batch, C_out: Tensor) -> str | None:
        return check_section(self.kind, self.model, batch.inputs, self.l_in, self.l_out, C_out,
                             self.config.chunk_elements)

    def jacobian_gram(self, batch: Batch, C_out: Tensor) -> Tensor:
        x = batch.activation(self.reads)
        return gram(self.kind, x, C_out[1:, 1:], section_positions(self.l_in, self.l_out, x.shape))

    def check_edges(self, batch: Batch, bases: Sequence[Basis], rule: Rule) -> str | None:
        return check_edges(self.kind, self.model, batch.inputs, self.l_in, self.l_out, rule, list(bases),
                           self.config.chunk_elements, self.dtype)

    def edges(self, batch: Batch, bases: Sequence[Basis], rule: Rule) -> tuple[list[Tensor], int]:
        x = batch.activation(self.reads)
        at = section_positions(self.l_in, self.l_out, x.shape)
        rows = x.shape[0] * (x.shape[1] if at["inputs_at"] is None else len(at["inputs_at"]))
        return structured_edges(self.kind, x, rule, list(bases), self.config.chunk_elements, self.dtype, at), rows


def _relative_error(got: Tensor, want: Tensor) -> float:
    scale = want.abs().max().item()
    return (got - want).abs().max().item() / (scale if scale > 0 else 1.0)


def _tolerance(sp: SectionPass) -> float:
    return 1e-7 if sp.out.dtype == F64 else 1e-3


def _slice(inputs, n: int, model: nn.Module | None = None):
    """The first n examples; token sequences of a TransformerLens bridge also cut to CHECK_POSITIONS.

    A bridge takes sequences of any length, and the check compares closed form and autograd on
    the same (shorter) sequences, so it stays exact while its backward passes (one per output
    position and direction) no longer grow with the context length.
    """
    if not isinstance(inputs, Tensor):
        return None
    few = inputs[:n]
    if (model is not None and few.dim() == 2 and not few.is_floating_point() and few.shape[1] > CHECK_POSITIONS
            and bridge_of(model) is not None):
        few = few[:, :CHECK_POSITIONS]
    return few


def _check_basis(C_out: Tensor) -> Tensor:
    """C_out with its non-constant columns replaced by CHECK_DIRECTIONS fixed random mixtures of them.

    The check compares the closed form with autograd for whatever output basis it is given; the
    autograd side costs one backward pass per output direction (and output position group), so
    checking a few mixtures of all directions instead of every direction keeps it cheap at any width.
    """
    k = C_out.shape[1] - 1
    if k <= CHECK_DIRECTIONS:
        return C_out
    mix = torch.randn(k, CHECK_DIRECTIONS, dtype=F64, generator=torch.Generator().manual_seed(0)) / k ** 0.5
    return torch.cat([C_out[:, :1], C_out[:, 1:] @ mix.to(C_out.device)], dim=1)


def section_positions(l_in: str, l_out: str, shape) -> dict:
    """{"inputs_at", "outputs_at"} of a section whose input site's activation has ``shape``
    (B, T, d): the positions each node layer takes (None = all); the closed forms keep positions."""
    shape = tuple(shape)
    return {"inputs_at": positions_of(l_in, shape), "outputs_at": positions_of(l_out, shape)}


def _restricted(at: dict | None) -> dict:
    return at if at is not None and any(v is not None for v in at.values()) else {}


def full_activation(model: nn.Module, inputs, l_in: str) -> Tensor:
    """The activation (B, T, d) float64 at the input layer's site, every position."""
    with torch.no_grad():
        act = run_model(model, inputs, record=[site_of(l_in)]).activations[site_of(l_in)]
    return as_positions(act).to(F64)


def check_section(section, model: nn.Module, inputs, l_in: str, l_out: str, C_out: Tensor,
                  chunk_elements: int) -> str | None:
    """None when the section's output and Jacobian Gram on a few examples match autograd, else why not."""
    few = _slice(inputs, CHECK_EXAMPLES, model if site_of(l_in) == l_in and site_of(l_out) == l_out else None)
    if few is None:
        return "inputs are not a tensor, so the closed form cannot be checked"
    C_out = _check_basis(C_out)
    sp = section_forward(model, few, l_in, l_out)
    x, out = full_activation(model, few, l_in), as_positions(sp.out.detach()).to(F64)
    at = _restricted(section_positions(l_in, l_out, x.shape))
    try:
        got_out = section.forward(x, **at)
        got = section.gram(x, C_out[1:, 1:].to(F64), **at)
    except (RuntimeError, ValueError, IndexError) as err:
        return f"closed form failed ({type(err).__name__}: {err})"
    tol = _tolerance(sp)
    if got_out.shape != out.shape or _relative_error(got_out, out) > tol:
        return "closed-form output differs from the model's"
    want = jacobian_gram_for_batch(sp, C_out, chunk_elements)
    error = _relative_error(got, want)
    return None if error <= tol else f"closed-form Jacobian Gram differs from autograd (relative error {error:.1e})"


def gram(section, x: Tensor, W: Tensor, at: dict) -> Tensor:
    """The section's Jacobian Gram on x (B, T, d), positions ``at`` passed only when restricted."""
    return section.gram(x, W, **_restricted(at))


def structured_edges(section, clean: Tensor, rule, bases, chunk_elements: int, dtype=F64,
                     at: dict | None = None) -> list[Tensor]:
    """Edges E (k_out, k_in) per (C_in, C_in_pinv, C_out) basis, row 0 (the constant output) zero.

    clean: the input site's activation (B, T, d), every position; at: section_positions (None: all)."""
    at = _restricted(at)
    x = clean.to(F64)
    node = x if at.get("inputs_at") is None else x[:, at["inputs_at"]]
    aug = torch.cat([torch.ones(*node.shape[:-1], 1, dtype=F64, device=x.device), node], -1)
    args = [(aug @ C_in, C_pinv[:, 1:], C_out[1:, 1:]) for C_in, C_pinv, C_out in bases]
    parts = section.edges(x, rule, args, chunk_elements, dtype, **at)
    out = []
    for part, (C_in, _, C_out) in zip(parts, bases):
        E = torch.zeros(C_out.shape[1], C_in.shape[1], dtype=F64, device=x.device)
        E[1:] = part
        out.append(E)
    return out


def check_edges(section, model: nn.Module, inputs, l_in: str, l_out: str, rule, bases, chunk_elements: int,
                dtype=F64) -> str | None:
    """None when the closed-form edges of a few examples match the autograd edges, else why not."""
    few = _slice(inputs, CHECK_EXAMPLES, model if site_of(l_in) == l_in and site_of(l_out) == l_out else None)
    if few is None:
        return "inputs are not a tensor, so the closed form cannot be checked"
    bases = [(C_in, C_pinv, _check_basis(C_out)) for C_in, C_pinv, C_out in bases]
    passes = [(w, section_forward(model, few, l_in, l_out, a)) for a, w in zip(*rule)]
    want = edges_for_batch(passes, bases, chunk_elements)
    x = full_activation(model, few, l_in)
    got = structured_edges(section, x, rule, bases, chunk_elements, dtype, section_positions(l_in, l_out, x.shape))
    tol = max(_tolerance(passes[0][1]), 1e-3 if dtype != F64 else 0.0)
    for g, w in zip(got, want):
        error = _relative_error(g, w)
        if error > tol:
            return f"closed-form edges differ from autograd (relative error {error:.1e})"
    return None


__all__ = ["CHECK_DIRECTIONS", "CHECK_EXAMPLES", "CHECK_POSITIONS", "ClosedFormSection", "check_edges",
           "check_section", "full_activation", "gram", "section_positions", "structured_edges"]
