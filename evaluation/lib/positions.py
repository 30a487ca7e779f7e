"""Node layers at chosen positions: ``"blocks.0.hook_resid_mid[-1]"``, ``"output[-1]"`` (docs/DESIGN.md §4.9).

A node-layer name is a site name (``interp_train.sites``, or ``"output"`` for the logits),
optionally followed by a Python-style position index ``[i]`` on the activation's position axis
(axis 1 of a (batch, positions, d) activation; negative indices count from the end). Such a
layer is the activation at that one position: its moments, Jacobian Gram and edges use only it;
a section into it computes that output position only (from every input position it depends on);
a section out of it varies that input position only, the other positions staying at their clean
values. Names are kept as given in every output (bases, edges, reports).

This is how the LIB paper treats a model whose loss reads only the last position (modular
addition): everything from the attention's output on is taken at the last position.
"""

from __future__ import annotations

import re

import torch

_INDEXED = re.compile(r"^(?P<site>.+?)\[(?P<index>[^\[\]]*)\]$")


def split_layer(name: str) -> tuple[str, int | None]:
    """(site, position index or None) of a node-layer name; ValueError for a malformed index."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"a node layer must be a non-empty string, got {name!r}")
    match = _INDEXED.match(name)
    if match is None:
        if "[" in name or "]" in name:
            raise ValueError(f"node layer {name!r}: a position index is written SITE[i] with one integer i, "
                             "e.g. 'blocks.0.hook_resid_mid[-1]'")
        return name, None
    text = match.group("index").strip()
    try:
        index = int(text)
    except ValueError:
        raise ValueError(f"node layer {name!r}: the position index {text!r} is not an integer; "
                         "write one integer, e.g. [-1] for the last position or [0] for the first") from None
    return match.group("site"), index


def site_of(name: str) -> str:
    """The site (hook or module name, or "output") of a node-layer name."""
    return split_layer(name)[0]


def positions_of(name: str, shape) -> list[int] | None:
    """The absolute positions a node layer takes of an activation of ``shape``; None for all.

    ValueError naming the layer, the shape and what is allowed when the index is out of range or
    the activation has no position axis (it must be (batch, positions, d)).
    """
    _, index = split_layer(name)
    if index is None:
        return None
    shape = tuple(shape)
    if len(shape) != 3:
        raise ValueError(f"node layer {name!r}: the activation has shape {shape}, which has no position axis "
                         "(a position index needs a (batch, positions, d) activation); drop the index")
    T = shape[1]
    if not -T <= index < T:
        raise ValueError(f"node layer {name!r}: position {index} is out of range for the activation of shape "
                         f"{shape} (batch, positions, d); allowed: {-T} .. {T - 1}")
    return [index % T]


def select(name: str, act: torch.Tensor) -> torch.Tensor:
    """The activation of node layer ``name`` as (B, P, d): the chosen position, or every one."""
    from evaluation.lib.edges import as_positions

    positions = positions_of(name, act.shape)
    if positions is None:
        return as_positions(act)
    return act[:, positions[0]:positions[0] + 1]


def insert(name: str, act: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``act`` with node layer ``name``'s part replaced by ``value`` (the shape ``select`` returns);
    differentiable in ``value``."""
    positions = positions_of(name, act.shape)
    if positions is None:
        return value.reshape(act.shape)
    p = positions[0]
    return torch.cat([act[:, :p], value.to(act.dtype), act[:, p + 1:]], dim=1)


def residual_layers(n_layers: int, last_position: bool = False) -> list[str]:
    """The default node layers of a TransformerLens model: resid_pre of block 0, resid_mid and
    resid_post of every block, then "output".

    last_position: the loss reads only the last position (e.g. modular addition: one (B,) target
    per sequence), so the layers after the last attention's output — resid_mid and resid_post of
    the last block and the logits — are taken at position -1 (the LIB paper's layout; earlier
    layers keep every position, which the later attention reads). Otherwise every position.
    """
    layers = ["blocks.0.hook_resid_pre"]
    for block in range(n_layers):
        layers += [f"blocks.{block}.hook_resid_mid", f"blocks.{block}.hook_resid_post"]
    layers.append("output")
    if last_position:
        layers[-3:] = [f"{name}[-1]" for name in layers[-3:]]
    return layers


def loss_reads_last_position(targets) -> bool:
    """True for one target per sequence ((B,) targets; the loss reads the last position), False for
    one per position ((B, T)) or none."""
    return targets is not None and getattr(targets, "dim", lambda: 0)() == 1


__all__ = ["insert", "loss_reads_last_position", "positions_of", "residual_layers", "select", "site_of",
           "split_layer"]
