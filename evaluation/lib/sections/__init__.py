"""LIB sections: one protocol (base.Section), one implementation per kind, chosen once per section.

The fit asks each section for its Jacobian Gram and its edges batch by batch (base.py), never for
its kind. Implementations:

* ``autograd.AutogradSection``: any section, by batched backward passes (evaluation.lib.edges),
  with Rademacher probes when asked; the reference of every closed form.
* closed forms (``closed_form.ClosedFormSection`` around a kind), each kind in its own file with
  its recogniser: ``position_wise.py`` (linear maps, TransformerLens MLP blocks without LayerNorm,
  resid_post -> resid_pre, the unembedding, Linear / element-wise activation chains in an
  nn.Sequential), ``attention.py`` (TransformerLens native attention without LayerNorm),
  ``layernorm_position_wise.py`` (LN2 + MLP, final LayerNorm + unembedding) and
  ``layernorm_attention.py`` (LN1 + attention; its edges in ``layernorm_attention_edges.py``) of
  GPT-2-style bridges.

``choose_section`` picks the implementation once per section: the first recogniser (in their
``order``) that returns a kind, per ``LIBConfig.jacobians``. The fit then checks it against
autograd on the first batch (``check_gram`` / ``check_edges``); a failed check warns
(``ClosedFormFallbackWarning``) and ``fall_back`` replaces it by the autograd section (with
``jacobians="structured"``: an error), so a misrecognised layer costs speed, not correctness.
Adding a kind is one file here (a class and a function decorated with ``@recognizer``) plus its
test: this package imports every module of itself, so there is no list to edit.
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings

from torch import nn

from evaluation.lib.positions import site_of
from evaluation.lib.sections.attention import AttentionSection
from evaluation.lib.sections.autograd import AutogradSection, ProbeStreams
from evaluation.lib.sections.base import (
    Batch, ClosedFormFallbackWarning, Section, recognizer, registered_recognizers,
)
from evaluation.lib.sections.closed_form import (
    ClosedFormSection, check_edges, check_section, full_activation, gram, section_positions, structured_edges,
)
from evaluation.lib.sections.position_wise import PositionWiseSection

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

# The recognisers, in the order they are tried (each kind registers its own with @recognizer).
RECOGNIZERS = registered_recognizers()


def find_section(model: nn.Module, l_in: str, l_out: str):
    """(closed-form kind, description) for a recognised section, else (None, why not).

    Node layers may carry position indices (evaluation.lib.positions); the section is recognised
    from their sites, and a kind that cannot restrict positions (no ``supports_positions``
    attribute, or ``supports_positions(input_indexed, output_indexed)`` False) is not used for
    position-indexed layers.
    """
    in_indexed, out_indexed = site_of(l_in) != l_in, site_of(l_out) != l_out
    l_in, l_out = site_of(l_in), site_of(l_out)
    section, why = None, None
    try:
        for recognize in registered_recognizers():
            found = recognize(model, l_in, l_out)
            if found is None:
                continue
            if found[0] is not None:
                section, why = found
                break
            why = why or found[1]
    except (AttributeError, TypeError, IndexError, ValueError) as err:  # an unexpected layout: not recognised
        return None, f"not recognised ({type(err).__name__}: {err})"
    if section is None:
        return None, why or f"no closed form for {l_in} -> {l_out}"
    supports = getattr(section, "supports_positions", False)
    if (in_indexed or out_indexed) and not (supports(in_indexed, out_indexed) if callable(supports) else supports):
        return None, f"the {why} closed form does not restrict positions"
    return section, why


def choose_section(model: nn.Module, l_in: str, l_out: str, config, probes: ProbeStreams) -> Section:
    """The implementation of section l_in -> l_out per ``config.jacobians`` ("auto", "structured", "autograd").

    model: the model the section passes run on (the fit's model, or its copy in ``jacobian_dtype``)."""
    if config.jacobians == "autograd":
        return AutogradSection(model, l_in, l_out, config, probes, "jacobians='autograd'")
    kind, why = find_section(model, l_in, l_out)
    if kind is None:
        if config.jacobians == "structured":
            raise ValueError(f"no closed-form Jacobian for the section {l_in} -> {l_out} ({why}); "
                             "use jacobians='auto' or 'autograd'")
        return AutogradSection(model, l_in, l_out, config, probes, why)
    return ClosedFormSection(kind, l_in, l_out, why, model, config)


def fall_back(section: Section, problem: str, config, probes: ProbeStreams) -> Section:
    """The autograd section in place of ``section``, whose check against autograd found ``problem``."""
    if config.jacobians == "structured":
        raise ValueError(f"the closed-form Jacobian of {section.l_in} -> {section.l_out} failed its check "
                         f"against autograd: {problem}")
    warnings.warn(f"LIB section {section.l_in} -> {section.l_out}: {problem}; using autograd for it",
                  ClosedFormFallbackWarning, stacklevel=3)
    return AutogradSection(section.model, section.l_in, section.l_out, config, probes, problem)


__all__ = ["AttentionSection", "AutogradSection", "Batch", "ClosedFormFallbackWarning", "ClosedFormSection", "ProbeStreams",
           "RECOGNIZERS", "Section", "check_edges", "check_section", "choose_section", "fall_back", "find_section",
           "full_activation", "gram", "PositionWiseSection", "recognizer", "section_positions", "structured_edges"]
