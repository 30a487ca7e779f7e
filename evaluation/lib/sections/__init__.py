"""Closed-form ("structured") section Jacobians for LIB: the layers whose Jacobian has a known form.

The autograd path (evaluation.lib.edges) needs T·k backward passes per example for a causal attention
section (k LIB directions of the next layer, T positions), each a full pass through the layer's
weights. The sections recognised here have Jacobians built from a few fixed weight products and
small per-example factors (activation derivatives, attention patterns), so their Jacobian Gram
and edges are accumulated directly, exactly, at a fraction of the cost:

* ``position_wise.PositionWiseSection``: linear maps (TransformerLens unembedding with no final
  LayerNorm, resid_post -> next resid_pre), TransformerLens MLP blocks (no LayerNorm, element-wise
  activation), chains Linear / element-wise activation / Linear inside an nn.Sequential;
* ``attention.AttentionSection``: TransformerLens native attention blocks (no LayerNorm, no
  rotary embedding, no soft-cap, one key/value head per query head).

A section is recognised from the model's structure (``find_section``) and then verified on the
first batch against the autograd path (``check_section``: the output values and the Jacobian Gram
of a few examples, ``check_edges``: their edges), so a misrecognised layer (a hook that edits
activations, an unusual forward) falls back to autograd instead of giving wrong numbers.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from interp_train.sites import run_model
from evaluation.lib.edges import OUTPUT, SectionPass, as_positions, edges_for_batch, jacobian_gram_for_batch, section_forward
from evaluation.lib.positions import positions_of, site_of
from evaluation.lib.sections.attention import AttentionSection
from evaluation.lib.sections.layernorm_recognizer import layernorm_section
from evaluation.lib.sections.position_wise import PositionWiseSection

F64 = torch.float64
CHECK_EXAMPLES = 3
CHECK_DIRECTIONS = 8  # output directions (random mixtures of all) checked against autograd
CHECK_POSITIONS = 16  # token positions of the checked sequences (TransformerLens bridges)
ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.GELU, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Softplus)
_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|mid|post)$")


def _inner(component: nn.Module) -> nn.Module:
    return getattr(component, "_original_component", component)


def _bridge(model: nn.Module):
    """The one TransformerLens bridge inside ``model``, or None."""
    found = [m for m in model.modules() if type(m).__name__ == "TransformerBridge"]
    return found[0] if len(found) == 1 else None


def _transformer_lens_section(model: nn.Module, l_in: str, l_out: str):
    bridge = _bridge(model)
    m_in = _RESID.match(l_in)
    if bridge is None or m_in is None:
        return None, "not a TransformerLens residual-stream section"
    i, kind = int(m_in.group(1)), m_in.group(2)
    n_layers = len(bridge.blocks)
    block = bridge.blocks[i]
    m_out = _RESID.match(l_out)
    target = (int(m_out.group(1)), m_out.group(2)) if m_out else (None, l_out)
    if kind == "post" and target == (i + 1, "mid"):  # resid_post of block i is resid_pre of block i + 1
        i, kind, block = i + 1, "pre", bridge.blocks[i + 1]
    if kind == "pre" and target == (i, "mid"):
        attn = _inner(block.attn)
        if not isinstance(_inner(block.ln1), nn.Identity):
            return None, "attention behind a LayerNorm"
        if (type(attn).__name__ != "NativeAttention" or getattr(attn, "rotary", None) is not None
                or getattr(attn, "attn_scores_soft_cap", 0) > 0 or getattr(attn, "kv_repeats", 1) != 1):
            return None, f"attention {type(attn).__name__} is not plain multi-head attention"
        a = block.attn
        return AttentionSection(a.W_Q, a.b_Q, a.W_K, a.b_K, a.W_V, a.b_V, a.W_O, a.b_O, attn.scale,
                                bool(getattr(attn, "causal", True))), "attention"
    if kind == "mid" and target == (i, "post"):
        mlp = _inner(block.mlp)
        if not isinstance(_inner(block.ln2), nn.Identity):
            return None, "MLP behind a LayerNorm"
        act_fn = str(getattr(bridge.cfg, "act_fn", "")).lower()
        if type(mlp).__name__ != "NativeMLP" or getattr(mlp, "ln", None) is not None or act_fn.startswith("solu"):
            return None, f"MLP {type(mlp).__name__} ({act_fn}) is not an element-wise MLP"
        eye = torch.eye(block.mlp.W_in.shape[0], dtype=F64, device=block.mlp.W_in.device)
        return PositionWiseSection(eye, block.mlp.b_out, block.mlp.W_in, block.mlp.b_in, mlp.act, block.mlp.W_out), "mlp"
    if kind == "post" and target == (i + 1, "pre"):
        d = bridge.cfg.d_model
        return PositionWiseSection(torch.eye(d, dtype=F64, device=bridge.unembed.W_U.device), None), "identity"
    if kind == "post" and l_out == OUTPUT and i == n_layers - 1:
        if not isinstance(_inner(bridge.ln_final), nn.Identity):
            return None, "unembedding behind a LayerNorm"
        return PositionWiseSection(bridge.unembed.W_U, bridge.unembed.b_U), "unembed"
    return None, f"no closed form for {l_in} -> {l_out}"


def _sequential_section(model: nn.Module, l_in: str, l_out: str):
    """Children i+1..j of one nn.Sequential: [Linear], [act], [Linear, act], [act, Linear], [Linear, act, Linear]."""
    modules = dict(model.named_modules())
    parent, _, first = l_out.rpartition(".") if l_out != OUTPUT else ("", "", "")
    if l_out == OUTPUT:
        if not isinstance(model, nn.Sequential):
            return None, "output of a model that is not an nn.Sequential"
        seq, stop = model, len(model)
    else:
        seq = modules.get(parent) if parent else model
        if not isinstance(seq, nn.Sequential) or not first.isdigit():
            return None, f"{l_out} is not a child of an nn.Sequential"
        stop = int(first) + 1
    prefix = parent + "." if parent else ""
    if l_in == "input" and seq is model:
        start = 0
    elif l_in.startswith(prefix) and l_in[len(prefix):].isdigit():
        start = int(l_in[len(prefix):]) + 1
    else:
        return None, f"{l_in} and {l_out} are not in the same nn.Sequential"
    chain = [m for m in list(seq)[start:stop] if not isinstance(m, (nn.Identity, nn.Dropout))]
    kinds = "".join("L" if isinstance(m, nn.Linear) else "a" if isinstance(m, ELEMENTWISE) else "?" for m in chain)
    if kinds not in ("L", "a", "La", "aL", "LaL"):
        return None, f"modules {[type(m).__name__ for m in chain]} have no closed form here"
    lin = [m for m in chain if isinstance(m, nn.Linear)]
    act = next((m for m in chain if isinstance(m, ELEMENTWISE)), None)
    if kinds == "L":
        return PositionWiseSection(lin[0].weight.T, lin[0].bias), "linear"
    if kinds == "a":  # a lone activation: its width from the nearest Linear before or after it
        before = [m for m in list(seq)[:start] if isinstance(m, nn.Linear)]
        after = [m for m in list(seq)[stop:] if isinstance(m, nn.Linear)]
        if not before and not after:
            return None, "an activation whose width no neighbouring nn.Linear gives"
        near = before[-1] if before else after[0]
        eye = torch.eye(near.out_features if before else near.in_features, dtype=F64, device=near.weight.device)
        return PositionWiseSection(None, None, eye, None, act, eye), "activation"
    d_in = lin[0].in_features if kinds[0] == "L" else lin[0].out_features
    device = lin[0].weight.device
    W_in, b_in = (lin[0].weight.T, lin[0].bias) if kinds[0] == "L" else (torch.eye(d_in, dtype=F64, device=device), None)
    W_out, b_out = ((lin[-1].weight.T, lin[-1].bias) if kinds[-1] == "L"
                    else (torch.eye(W_in.shape[1], dtype=F64, device=device), None))
    return PositionWiseSection(None, b_out, W_in, b_in, act, W_out), "mlp"


def _layernorm_section(model: nn.Module, l_in: str, l_out: str):
    bridge = _bridge(model)
    return (None, "not a TransformerLens bridge") if bridge is None else layernorm_section(bridge, l_in, l_out)


# Tried in order; the first that returns a section wins (else the first one's reason is reported).
# A new section kind adds its recogniser here: f(model, l_in, l_out) -> (section or None, description).
RECOGNIZERS = [_transformer_lens_section, _layernorm_section]


def find_section(model: nn.Module, l_in: str, l_out: str):
    """(section, description) for a recognised section, else (None, why not).

    Node layers may carry position indices (evaluation.lib.positions); the section is recognised
    from their sites, and a section kind that cannot restrict positions (no ``supports_positions``
    attribute) is not used for position-indexed layers.
    """
    indexed = site_of(l_in) != l_in or site_of(l_out) != l_out
    l_in, l_out = site_of(l_in), site_of(l_out)
    section, why = None, None
    try:
        for recognize in RECOGNIZERS:
            section, reason = recognize(model, l_in, l_out)
            if section is not None:
                why = reason
                break
            why = why or reason
        if section is None and _bridge(model) is None:
            section, why = _sequential_section(model, l_in, l_out)
    except (AttributeError, TypeError, IndexError, ValueError) as err:  # an unexpected layout: not recognised
        return None, f"not recognised ({type(err).__name__}: {err})"
    if section is not None and indexed and not getattr(section, "supports_positions", False):
        return None, f"the {why} closed form does not restrict positions"
    return section, why


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
            and _bridge(model) is not None):
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
    at = section_positions(l_in, l_out, x.shape)
    try:
        got_out = section.forward(x, **at) if any(v is not None for v in at.values()) else section.forward(x)
        got = gram(section, x, C_out[1:, 1:].to(F64), at)
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
    return section.gram(x, W, **at) if any(v is not None for v in at.values()) else section.gram(x, W)


def structured_edges(section, clean: Tensor, rule, bases, chunk_elements: int, dtype=F64,
                     at: dict | None = None) -> list[Tensor]:
    """Edges E (k_out, k_in) per (C_in, C_in_pinv, C_out) basis, row 0 (the constant output) zero.

    clean: the input site's activation (B, T, d), every position; at: section_positions (None: all)."""
    at = at if at is not None and any(v is not None for v in at.values()) else {}
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


__all__ = ["AttentionSection", "PositionWiseSection", "check_edges", "check_section", "find_section",
           "full_activation", "gram", "section_positions", "structured_edges"]
