"""Reading a TransformerLens bridge's structure, shared by the recognisers of its section kinds."""

from __future__ import annotations

import re

from torch import nn

OUTPUT = "output"
_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|mid|post)$")


def inner(component: nn.Module) -> nn.Module:
    """The module a bridge component wraps (the component itself when it wraps none)."""
    return getattr(component, "_original_component", component)


def bridge_of(model: nn.Module):
    """The one TransformerLens bridge inside ``model``, or None."""
    found = [m for m in model.modules() if type(m).__name__ == "TransformerBridge"]
    return found[0] if len(found) == 1 else None


def residual_step(l_in: str, l_out: str):
    """(block i, step) of a section between residual-stream hooks, else None.

    step: "attention" (resid_pre i -> resid_mid i, also from resid_post i−1), "mlp" (resid_mid i ->
    resid_post i), "identity" (resid_post i -> resid_pre i+1), "unembed" (resid_post i -> output).
    """
    m_in = _RESID.match(l_in)
    if m_in is None:
        return None
    i, kind = int(m_in.group(1)), m_in.group(2)
    m_out = _RESID.match(l_out)
    target = (int(m_out.group(1)), m_out.group(2)) if m_out else (None, l_out)
    if kind == "post" and target == (i + 1, "mid"):  # resid_post of block i is resid_pre of block i + 1
        i, kind = i + 1, "pre"
    if kind == "pre" and target == (i, "mid"):
        return i, "attention"
    if kind == "mid" and target == (i, "post"):
        return i, "mlp"
    if kind == "post" and target == (i + 1, "pre"):
        return i, "identity"
    if kind == "post" and l_out == OUTPUT:
        return i, "unembed"
    return None


__all__ = ["OUTPUT", "bridge_of", "inner", "residual_step"]
