"""What a LIB section is to the fit: one small protocol, and the registry of section kinds (docs/DESIGN.md §2.4, §4.10).

A *section* maps node layer l to node layer l+1. The fit (evaluation.lib.fit) needs two things
of it, batch by batch, and nothing about its kind:

* ``jacobian_gram(batch, C_out)``: ∑_x ∑_s ∑_{t,i} J_{(t,i),(s,j)} J_{(t,i),(s,j′)} (d_l × d_l) over the
  batch, J the Jacobian of ĥ = f^{l+1} C_out[1:, 1:] w.r.t. f^l (docs/DESIGN.md §4.4);
* ``edges(batch, bases, rule)``: ∑_x ∑_t (∑_α w_α ∑_s ∂ĥ_{t,i}(αf̂)/∂f̂_{s,j} f̂_{s,j})² (k_{l+1} × k_l) per
  basis (C_in, C_in⁺, C_out), row 0 (the constant output feature) zero, and the rows N·P it summed
  (docs/DESIGN.md §4.6).

A section may first be checked on the first batch (``check_gram`` / ``check_edges``: None or why
it is wrong); the autograd section (autograd.py) is the reference and never fails its check.

Section *kinds* with a closed form live one per file in this package. Each file registers its
recogniser with ``@recognizer(order)``: ``f(model, l_in, l_out)`` returns None when the section
is not of its shape, ``(None, reason)`` when it is but cannot be handled, or ``(kind, description)``
where ``kind`` has ``forward(x)``, ``gram(x, W)`` and ``edges(x, rule, bases, chunk_elements,
dtype)`` on the input site's activation (closed_form.py wraps it into a Section). Recognisers are
tried in ``order``; the package imports every module of itself, so a new kind is one file.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor

from interp_train.sites import run_model
from evaluation.lib.edges import as_positions

Basis = tuple[Tensor, Tensor, Tensor]  # (C_in (d_l+1, k_l), C_in⁺ (k_l, d_l+1), C_out (d_{l+1}+1, k_{l+1}))
Rule = tuple[list[float], list[float]]  # integration points α and weights w_α


class ClosedFormFallbackWarning(RuntimeWarning):
    """A recognised section's closed form failed its check against autograd; autograd is used for it."""


class Batch:
    """One batch of data as sections see it: the model input and the activations of sites.

    inputs: the model input on the model's device (in the section model's dtype), or None when
    the pass runs from cached activations only. Activations (B, T, d) float64, every position,
    come from ``cached`` or from one forward pass of ``model`` over the sites ``wanted`` (run on
    first use, shared by every section of the pass).
    """

    def __init__(self, index: int, inputs, model=None, cached: dict[str, Tensor] | None = None,
                 wanted: Sequence[str] = ()):
        self.index, self._inputs, self.model = index, inputs, model
        self._acts = dict(cached or {})
        self.wanted = list(wanted)

    @property
    def inputs(self):
        if self._inputs is None:
            raise RuntimeError("this pass runs on cached activations only; a section asked for the model input")
        return self._inputs

    def activation(self, site: str) -> Tensor:
        if site not in self._acts:
            missing = [s for s in dict.fromkeys([*self.wanted, site]) if s not in self._acts]
            with torch.no_grad():
                acts = run_model(self.model, self.inputs, record=missing).activations
            self._acts.update({s: as_positions(acts[s]).to(torch.float64) for s in missing})
        return self._acts[site]


class Section(Protocol):
    """A section l_in -> l_out as the fit uses it (see the module docstring)."""

    l_in: str
    l_out: str
    method: str        # "closed form: <description>" or "autograd (<why>)", recorded in LIBResult.methods
    reads: str | None  # the site whose activation it reads (Batch.activation), None: it runs the model

    def check_gram(self, batch: Batch, C_out: Tensor) -> str | None: ...

    def jacobian_gram(self, batch: Batch, C_out: Tensor) -> Tensor: ...

    def check_edges(self, batch: Batch, bases: Sequence[Basis], rule: Rule) -> str | None: ...

    def edges(self, batch: Batch, bases: Sequence[Basis], rule: Rule) -> tuple[list[Tensor], int]: ...


Recognizer = Callable[..., "tuple[object | None, str] | None"]
_RECOGNIZERS: list[tuple[int, str, Recognizer]] = []


def recognizer(order: int) -> Callable[[Recognizer], Recognizer]:
    """Registers a recogniser ``f(model, l_in, l_out)`` (site names, no position index), tried in ``order``."""
    def register(fn: Recognizer) -> Recognizer:
        key = (order, f"{fn.__module__}.{fn.__qualname__}", fn)
        if not any(k[1] == key[1] for k in _RECOGNIZERS):
            _RECOGNIZERS.append(key)
            _RECOGNIZERS.sort(key=lambda k: (k[0], k[1]))
        return fn
    return register


def registered_recognizers() -> list[Recognizer]:
    return [fn for _, _, fn in _RECOGNIZERS]


__all__ = ["Basis", "Batch", "ClosedFormFallbackWarning", "Rule", "Section", "recognizer", "registered_recognizers"]
