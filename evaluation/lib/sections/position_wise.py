"""Position-wise sections in closed form: out_t = x_t S + σ(x_t W_in + b_in) W_out + b (row vectors).

Covers a linear map (no hidden layer: S = W), a TransformerLens MLP block with its residual
(S = I), and chains of nn.Linear / element-wise activations in an nn.Sequential. With
d = σ'(x W_in + b_in) per row, the Jacobian of one row is J = S + W_in diag(d) W_out (d_in × d_out).

* Jacobian Gram, A = W Wᵀ (W the next layer's LIB directions), over rows r:
  ∑_r J A Jᵀ = R·S A Sᵀ + W_in diag(∑d) W_out A Sᵀ + (…)ᵀ + W_in (K ⊙ ∑ d dᵀ) W_inᵀ, K = W_out A W_outᵀ.
* Edges, C̃ = C⁺[:, 1:], d̄ = ∑_α w_α σ'(α x W_in + b_in):
  M_r = (Wᵀ Sᵀ C̃ᵀ + P diag(d̄_r) Q) diag(f̂_r), P = Wᵀ W_outᵀ, Q = W_inᵀ C̃ᵀ;  E += ∑_r M_r².
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from evaluation.lib.sections.base import recognizer
from evaluation.lib.sections.row_products import RowPlan, squared_products
from evaluation.lib.sections.transformer_lens import OUTPUT, bridge_of, inner, residual_step

F64 = torch.float64
ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.GELU, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Softplus)


def activation_derivative(act: Callable[[Tensor], Tensor], pre: Tensor) -> Tensor:
    """σ'(pre) of an element-wise activation, by autograd (so relu'(0) = 0, as in autograd passes)."""
    with torch.enable_grad():
        z = pre.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(act(z).sum(), z)
    return g


class PositionWiseSection:
    """out = x S + σ(x W_in + b_in) W_out + b, per position; ``act`` None means no hidden layer."""

    supports_positions = True  # gram/edges/forward take inputs_at/outputs_at (evaluation.lib.positions)

    def __init__(self, S: Tensor | None, bias: Tensor | None, W_in: Tensor | None = None, b_in: Tensor | None = None,
                 act: Callable[[Tensor], Tensor] | None = None, W_out: Tensor | None = None):
        if S is None and act is None:
            raise ValueError("a position-wise section needs a linear part S or a hidden layer")
        self.S = None if S is None else S.detach().to(F64)
        self.bias = None if bias is None else bias.detach().to(F64)
        self.act = act
        if act is not None:
            self.W_in, self.W_out = W_in.detach().to(F64), W_out.detach().to(F64)
            self.b_in = (torch.zeros(self.W_in.shape[1], dtype=F64, device=self.W_in.device) if b_in is None
                         else b_in.detach().to(F64))
        self.d_in = (self.S if S is not None else self.W_in).shape[0]
        self.d_out = (self.S if S is not None else self.W_out).shape[1]

    def _derivative(self, x: Tensor, alpha: float = 1.0) -> Tensor:
        return activation_derivative(self.act, alpha * x @ self.W_in + self.b_in)

    def forward(self, x: Tensor, inputs_at: list[int] | None = None, outputs_at: list[int] | None = None) -> Tensor:
        """x (B, T, d_in) float64 -> (B, T', d_out) at the output positions (all when None)."""
        if outputs_at is not None:
            x = x[:, outputs_at]
        out = torch.zeros(*x.shape[:-1], self.d_out, dtype=F64, device=x.device)
        if self.S is not None:
            out = out + x @ self.S
        if self.act is not None:
            out = out + self.act(x @ self.W_in + self.b_in) @ self.W_out
        return out if self.bias is None else out + self.bias

    def gram(self, x: Tensor, W: Tensor, inputs_at: list[int] | None = None,
             outputs_at: list[int] | None = None) -> Tensor:
        """∑_rows J A Jᵀ (d_in × d_in) for A = W Wᵀ, over the positions both layers take."""
        M = torch.zeros(self.d_in, self.d_in, dtype=F64, device=x.device)
        common, _ = shared_positions(x.shape[1], inputs_at, outputs_at)
        if not common:
            return M
        rows, counts = unique_rows(x[:, common])
        A = W @ W.T
        if self.S is not None:
            M += counts.sum() * (self.S @ A @ self.S.T)
        if self.act is not None:
            d = self._derivative(rows)
            if self.S is not None:
                cross = self.W_in @ ((counts @ d)[:, None] * (self.W_out @ A @ self.S.T))
                M += cross + cross.T
            K = self.W_out @ A @ self.W_out.T
            M += self.W_in @ (K * ((d * counts[:, None]).T @ d)) @ self.W_in.T
        return M

    def edges(self, x: Tensor, rule: tuple[list[float], list[float]], bases: list[tuple[Tensor, Tensor, Tensor]],
              chunk_elements: int, dtype: torch.dtype = F64, inputs_at: list[int] | None = None,
              outputs_at: list[int] | None = None) -> list[Tensor]:
        """∑_rows M_r² per basis, (k_out − 1, k_in); bases are (f̂ (B, S, k_in) at the input positions,
        C̃ (k_in, d_in), W (d_out, k_out − 1)); x (B, T, d_in) holds every position. J_ts = 0 for
        s ≠ t, so only the positions both layers take have rows.

        With F = Wᵀ Sᵀ C̃ᵀ and G_r = P diag(d̄_r) Q: ∑_r f̂_r² (F + G_r)² = F² ∑f̂² + 2 F ⊙ P (Q ⊙ d̄ᵀ f̂²)
        + ∑_r (f̂_r G_r)², the last one product per row (in ``dtype``); repeated rows are counted once.
        The G_r are formed as row_products.RowPlan finds cheapest (planned once, shared by the bases):
        over all units, over the units with d̄ ≠ 0 only (ReLU), or as a running sum along rows whose d̄
        differ in few units.
        """
        common, index = shared_positions(x.shape[1], inputs_at, outputs_at)
        if not common:
            return [torch.zeros(W.shape[1], C_t.shape[0], dtype=F64, device=x.device) for _, C_t, W in bases]
        rows, counts, first = unique_rows(x[:, common], with_index=True)
        d_bar = None
        if self.act is not None:
            alphas, weights = rule
            d_bar = sum(w * self._derivative(rows, a) for a, w in zip(alphas, weights))
        plan = RowPlan(d_bar) if d_bar is not None else None  # shared by every basis
        out = []
        for f_hat, C_t, W in bases:
            f = f_hat[:, index].reshape(-1, f_hat.shape[-1])[first]
            f2 = f.pow(2) * counts[:, None]
            fixed = (W.T @ self.S.T @ C_t.T if self.S is not None
                     else torch.zeros(W.shape[1], C_t.shape[0], dtype=F64, device=x.device))
            E = fixed.pow(2) * f2.sum(0)
            if d_bar is None:  # a linear section
                out.append(E)
                continue
            P, Q = W.T @ self.W_out.T, self.W_in.T @ C_t.T
            E += 2 * fixed * (P @ (Q * (d_bar.T @ f2)))
            out.append(E + squared_products(plan, P, Q, f * counts.sqrt()[:, None], chunk_elements, dtype))
        return out


def shared_positions(T: int, inputs_at: list[int] | None, outputs_at: list[int] | None):
    """(positions both layers take, their indices among the input layer's positions); None = all T."""
    ins = list(range(T)) if inputs_at is None else list(inputs_at)
    outs = set(range(T) if outputs_at is None else outputs_at)
    common = [p for p in ins if p in outs]
    return common, [ins.index(p) for p in common]


def unique_rows(x: Tensor, with_index: bool = False):
    """Distinct rows of x viewed as (rows, d), their counts (float64) and, optionally, where each first occurs.

    A position-wise section gives equal rows equal Jacobians and features, so each is computed once
    (in token models, e.g., every row at position 0 is a function of the first token alone).
    """
    flat = x.reshape(-1, x.shape[-1])
    rows, inverse, counts = torch.unique(flat, dim=0, return_inverse=True, return_counts=True)
    counts = counts.to(F64)
    if not with_index:
        return rows, counts
    first = torch.full((rows.shape[0],), flat.shape[0], dtype=torch.long, device=x.device).scatter_reduce(
        0, inverse, torch.arange(flat.shape[0], device=x.device), reduce="amin")
    return rows, counts, first


@recognizer(order=10)
def recognize_transformer_lens(model: nn.Module, l_in: str, l_out: str):
    """TransformerLens MLP block without LayerNorm, resid_post -> next resid_pre, unembedding without final LayerNorm."""
    bridge, step = bridge_of(model), residual_step(l_in, l_out)
    if bridge is None or step is None or step[1] == "attention":
        return None
    i, kind = step
    if kind == "mlp":
        block = bridge.blocks[i]
        mlp = inner(block.mlp)
        if not isinstance(inner(block.ln2), nn.Identity):
            return None, "MLP behind a LayerNorm"
        act_fn = str(getattr(bridge.cfg, "act_fn", "")).lower()
        if type(mlp).__name__ != "NativeMLP" or getattr(mlp, "ln", None) is not None or act_fn.startswith("solu"):
            return None, f"MLP {type(mlp).__name__} ({act_fn}) is not an element-wise MLP"
        eye = torch.eye(block.mlp.W_in.shape[0], dtype=F64, device=block.mlp.W_in.device)
        return PositionWiseSection(eye, block.mlp.b_out, block.mlp.W_in, block.mlp.b_in, mlp.act, block.mlp.W_out), "mlp"
    if kind == "identity":
        d = bridge.cfg.d_model
        return PositionWiseSection(torch.eye(d, dtype=F64, device=bridge.unembed.W_U.device), None), "identity"
    if i != len(bridge.blocks) - 1:  # unembed from an earlier block
        return None
    if not isinstance(inner(bridge.ln_final), nn.Identity):
        return None, "unembedding behind a LayerNorm"
    return PositionWiseSection(bridge.unembed.W_U, bridge.unembed.b_U), "unembed"


@recognizer(order=30)
def recognize_sequential(model: nn.Module, l_in: str, l_out: str):
    """Children i+1..j of one nn.Sequential: [Linear], [act], [Linear, act], [act, Linear], [Linear, act, Linear]."""
    if bridge_of(model) is not None:
        return None
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
