"""An explicit forward of a TransformerLens transformer from its weights, for reference checks.

The model is written out in plain torch from a state dict in the ``HookedTransformer`` property
format (``embed.W_E``, ``blocks.0.attn.W_Q`` (n_heads, d_model, d_head), ...) and its config dict,
following TransformerLens's ``HookedTransformer`` conventions:

    resid_pre_0 = W_E[token_t] + W_pos[t]
    resid_mid_i = resid_pre_i + attn_i(LN1_i(resid_pre_i))
    resid_post_i = resid_mid_i + W_out act(LN2_i(resid_mid_i) W_in + b_in) + b_out,  resid_pre_{i+1} = resid_post_i
    logits = LN_final(resid_post_last) W_U + b_U

with attn(x)_t = ∑_h (∑_s A^h_ts (x_s W_V^h + b_V^h)) W_O^h + b_O,
A^h_ts = softmax_{s ≤ t}((x_t W_Q^h + b_Q^h)·(x_s W_K^h + b_K^h) / √d_head), and LN(x) = (x − mean x) /
√(var x + eps) · w + b (no LayerNorm when ``normalization_type`` is None). Nothing here uses hooks,
``run_model`` or the bridge: ``ExplicitTransformerForward`` gives ``evaluation.lib.naive`` activations
and section Jacobians (``torch.func.jacrev`` of these formulas) that share no code path with the fit.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Mapping

import torch
from torch import Tensor
from torch.nn import functional as F

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}
_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|mid|post)$")


class ExplicitTransformer:
    """The HookedTransformer formulas above for one state dict (float64 copies of the weights)."""

    def __init__(self, state_dict: Mapping[str, Tensor], config: Mapping):
        self.w = {k: v.detach().to(torch.float64) for k, v in state_dict.items()}
        self.n_layers, self.d_head = int(config["n_layers"]), int(config["d_head"])
        self.norm = config.get("normalization_type")
        if self.norm not in (None, "LN"):
            raise ValueError(f"normalization_type must be None or 'LN', got {self.norm!r}")
        act = config.get("act_fn", "relu")
        if act not in ACTIVATIONS:
            raise ValueError(f"act_fn {act!r} is not written out here; one of {sorted(ACTIVATIONS)}")
        self.act = ACTIVATIONS[act]
        self.eps = float(config.get("eps", 1e-5))

    def _ln(self, x: Tensor, prefix: str) -> Tensor:
        if self.norm is None:
            return x
        x = x - x.mean(-1, keepdim=True)
        return x / (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt() * self.w[prefix + ".w"] + self.w[prefix + ".b"]

    def embed(self, tokens: Tensor) -> Tensor:
        """resid_pre of block 0, (B, T, d)."""
        return self.w["embed.W_E"][tokens] + self.w["pos_embed.W_pos"][: tokens.shape[-1]]

    def attention_block(self, i: int, resid: Tensor) -> Tensor:
        """resid_pre_i (..., T, d) -> resid_mid_i."""
        p = f"blocks.{i}.attn."
        x = self._ln(resid, f"blocks.{i}.ln1")
        q = torch.einsum("...td,hde->...hte", x, self.w[p + "W_Q"]) + self.w[p + "b_Q"][:, None]
        k = torch.einsum("...td,hde->...hte", x, self.w[p + "W_K"]) + self.w[p + "b_K"][:, None]
        v = torch.einsum("...td,hde->...hte", x, self.w[p + "W_V"]) + self.w[p + "b_V"][:, None]
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.d_head)
        T = resid.shape[-2]
        future = torch.ones(T, T, dtype=torch.bool, device=scores.device).triu(1)
        pattern = scores.masked_fill(future, float("-inf")).softmax(-1)
        z = pattern @ v
        return resid + torch.einsum("...hte,hed->...td", z, self.w[p + "W_O"]) + self.w[p + "b_O"]

    def mlp_block(self, i: int, resid: Tensor) -> Tensor:
        """resid_mid_i (..., T, d) -> resid_post_i."""
        p = f"blocks.{i}.mlp."
        x = self._ln(resid, f"blocks.{i}.ln2")
        return resid + self.act(x @ self.w[p + "W_in"] + self.w[p + "b_in"]) @ self.w[p + "W_out"] + self.w[p + "b_out"]

    def unembed(self, resid: Tensor) -> Tensor:
        """resid_post of the last block (..., T, d) -> logits."""
        b_U = self.w.get("unembed.b_U")
        logits = self._ln(resid, "ln_final") @ self.w["unembed.W_U"]
        return logits if b_U is None else logits + b_U

    def stages(self) -> list[tuple[str, Callable[[Tensor], Tensor]]]:
        """[(name of the stage's output, stage function)] in forward order, starting after resid_pre_0."""
        out = []
        for i in range(self.n_layers):
            out.append((f"blocks.{i}.hook_resid_mid", lambda r, i=i: self.attention_block(i, r)))
            out.append((f"blocks.{i}.hook_resid_post", lambda r, i=i: self.mlp_block(i, r)))
        out.append(("output", self.unembed))
        return out

    def _position(self, name: str) -> int:
        """Index of the residual stream ``name`` in the chain resid_pre_0, mid_0, post_0, ..., output."""
        if name == "output":
            return 2 * self.n_layers + 1
        m = _RESID.match(name)
        if m is None or int(m.group(1)) >= self.n_layers:
            raise KeyError(f"not a residual stream of this {self.n_layers}-layer model: {name!r}")
        i, kind = int(m.group(1)), m.group(2)
        if kind == "pre":
            return 2 * i
        return 2 * i + (1 if kind == "mid" else 2)

    def section(self, l_in: str, l_out: str) -> Callable[[Tensor], Tensor]:
        """The function resid at ``l_in`` (..., T, d) -> activation at ``l_out``."""
        start, stop = self._position(l_in), self._position(l_out)
        if stop <= start:
            raise ValueError(f"{l_out!r} does not come after {l_in!r}")
        chain = [fn for _, fn in self.stages()][start:stop]

        def run(resid: Tensor) -> Tensor:
            for fn in chain:
                resid = fn(resid)
            return resid

        return run

    def __call__(self, tokens: Tensor, name: str = "output") -> Tensor:
        """The activation ``name`` (a residual stream or "output") for tokens (B, T)."""
        resid = self.embed(tokens)
        return resid if self._position(name) == 0 else self.section("blocks.0.hook_resid_pre", name)(resid)


class ExplicitTransformerForward:
    """``forward`` for ``evaluation.lib.naive.naive_fit_lib``: activations and per-example section
    Jacobians of an ``ExplicitTransformer`` (tokens in, float64 out)."""

    def __init__(self, model: ExplicitTransformer):
        self.model = model

    def activation(self, tokens: Tensor, name: str) -> Tensor:
        """(N, T, d) float64."""
        return self.model(tokens, name)

    def jacobian(self, tokens_one: Tensor, l_in: str, l_out: str, f_in: Tensor) -> Tensor:
        """(T_out, d_out, T, d) Jacobian of the section at resid ``f_in`` (T, d); tokens are not needed
        after the embedding."""
        section = self.model.section(l_in, l_out)
        return torch.func.jacrev(section)(f_in.to(torch.float64))


__all__ = ["ACTIVATIONS", "ExplicitTransformer", "ExplicitTransformerForward"]
