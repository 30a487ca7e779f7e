"""Position-wise sections behind a LayerNorm, in closed form (pre-LN MLP block; final LayerNorm + unembedding).

Per row x (d units; row vectors), y = LN(x) = γ ⊙ (x − μ)ρ + β with μ the mean, ρ = 1/sqrt(var + ε),
and out = x S_res + y S_lin + σ(y W_in + b_in) W_out + b (a GPT-2 MLP block: S_res = I, no S_lin;
the final LayerNorm and unembedding: no S_res, S_lin = W_U, no hidden layer). The LayerNorm's
Jacobian (d_in × d_out, J[j, k] = ∂y_k/∂x_j) is

    J_LN = ρ (I − 11ᵀ/d − v vᵀ) Γ,   v = (x − μ)ρ/√d,  Γ = diag(γ),

so with Π₀ = I − 11ᵀ/d, S′ = Π₀Γ S_lin, W′ = Π₀Γ W_in (fixed) and D = diag(σ′(y W_in + b_in)) the
section's Jacobian per row is a fixed-weights part plus a rank-one term:

    J = S_res + ρ S′ + W′ diag(ρ d) W_out − v b̃ᵀ,   b̃ = ρ (S_linᵀ Γ v + W_outᵀ (d ⊙ W_inᵀ Γ v)).

* Jacobian Gram (A = W Wᵀ): with H = S_res + ρ S′ + W′ D̃ W_out (D̃ = ρ D),
  ∑ J A Jᵀ = ∑ H A Hᵀ − ∑ (H A b̃ vᵀ + v b̃ᵀ A Hᵀ) + ∑ (b̃ᵀ A b̃) v vᵀ; ∑ H A Hᵀ expands into fixed
  weight products scaled by ∑ρ, ∑ρ², ∑d̃, ∑ρd̃ and K ⊙ ∑ d̃ d̃ᵀ (K = W_out A W_outᵀ), the other two
  into per-row vectors contracted over rows.
* Edges, C̃ = C⁺[:, 1:], at the points α of the rule (LN(αx): ρ_α = 1/sqrt(α² var + ε),
  v_α = c_α v̄ with v̄ = (x − μ)/√d and c_α = α ρ_α):
  M = [Wᵀ S_resᵀ C̃ᵀ + ρ̄ Wᵀ S′ᵀ C̃ᵀ + P diag(d̄) Q − (Wᵀ b̄)(C̃ v̄)ᵀ] diag(f̂),  E += ∑_rows M²,
  with P = Wᵀ W_outᵀ, Q = W′ᵀ C̃ᵀ, ρ̄ = ∑ w_α ρ_α, d̄ = ∑ w_α ρ_α d_α and
  b̄ = ∑ w_α c_α b̃_α = (∑ w_α ρ_α c_α²) S_linᵀ Γ v̄ + W_outᵀ ((∑ w_α ρ_α c_α² d_α) ⊙ W_inᵀ Γ v̄).
  The product P diag(d̄) Q per row is the cost (as without the LayerNorm); the rest is rank one.
  With several bases it can be cheaper to form each row's whole Jacobian J_r = W_outᵀ diag(d̄) W′ᵀ
  + … (d_out × d_in) once and rotate it per basis, M = Wᵀ J_r C̃ᵀ diag(f̂), which is free on a side
  where the basis only selects units (the neuron basis): ``edges`` takes the cheaper way.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from evaluation.lib.sections.base import recognizer
from evaluation.lib.sections.position_wise import activation_derivative, shared_positions, unique_rows
from evaluation.lib.sections.transformer_lens import bridge_of, inner, residual_step

F64 = torch.float64


class LayerNormParams:
    """γ, β and ε of a LayerNorm over the last axis (no affine weights: γ = 1, β = 0)."""

    def __init__(self, weight: Tensor | None, bias: Tensor | None, eps: float, d: int, device=None):
        self.d = d
        self.gamma = torch.ones(d, dtype=F64, device=device) if weight is None else weight.detach().to(F64)
        self.beta = torch.zeros(d, dtype=F64, device=device) if bias is None else bias.detach().to(F64)
        self.eps = float(eps)

    def parts(self, x: Tensor, alpha: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
        """(y = LN(αx), ρ (…,) = 1/sqrt(α² var + ε), v̄ = (x − μ)/√d) of rows x (…, d)."""
        centred = x - x.mean(-1, keepdim=True)
        rho = ((alpha * centred).pow(2).mean(-1) + self.eps).rsqrt()
        y = self.gamma * (alpha * centred) * rho[..., None] + self.beta
        return y, rho, centred / self.d ** 0.5

    def projected(self, M: Tensor) -> Tensor:
        """Π₀ Γ M = Γ M with the column means removed (Π₀ = I − 11ᵀ/d)."""
        GM = self.gamma[:, None] * M
        return GM - GM.mean(0, keepdim=True)


class LayerNormPositionWiseSection:
    """out = x S_res + y S_lin + σ(y W_in + b_in) W_out + b, y = LN(x), per row; pieces may be None."""

    def __init__(self, ln: LayerNormParams, S_res: Tensor | None, S_lin: Tensor | None, bias: Tensor | None,
                 W_in: Tensor | None = None, b_in: Tensor | None = None,
                 act: Callable[[Tensor], Tensor] | None = None, W_out: Tensor | None = None):
        if S_lin is None and act is None:
            raise ValueError("a LayerNorm section needs a linear part S_lin or a hidden layer after the LayerNorm")
        cast = lambda t: None if t is None else t.detach().to(F64)  # noqa: E731
        self.ln = ln
        self.S_res, self.S_lin, self.bias = cast(S_res), cast(S_lin), cast(bias)
        self.act = act
        self.S_proj = None if S_lin is None else ln.projected(self.S_lin)
        if act is not None:
            self.W_in, self.W_out = cast(W_in), cast(W_out)
            self.b_in = torch.zeros(self.W_in.shape[1], dtype=F64, device=self.W_in.device) if b_in is None else cast(b_in)
            self.W_proj = ln.projected(self.W_in)
        self.d_in = ln.d
        self.d_out = (self.S_lin if S_lin is not None else self.W_out).shape[1]

    supports_positions = True  # a row's output depends on that row only: positions restrict the rows

    def forward(self, x: Tensor, inputs_at: list[int] | None = None, outputs_at: list[int] | None = None) -> Tensor:
        """x (B, T, d_in) float64 -> (B, T', d_out) at the output positions (all when None)."""
        if outputs_at is not None:
            x = x[:, outputs_at]
        y, _, _ = self.ln.parts(x)
        out = torch.zeros(*x.shape[:-1], self.d_out, dtype=F64, device=x.device)
        if self.S_res is not None:
            out = out + x @ self.S_res
        if self.S_lin is not None:
            out = out + y @ self.S_lin
        if self.act is not None:
            out = out + self.act(y @ self.W_in + self.b_in) @ self.W_out
        return out if self.bias is None else out + self.bias

    def _pieces(self, rows: Tensor, alpha: float = 1.0):
        """ρ (n,), v̄ (n, d), σ′ (n, h) or None, Γv̄ W_in (n, h) or None at LN(α·rows)."""
        y, rho, v_bar = self.ln.parts(rows, alpha)
        if self.act is None:
            return rho, v_bar, None, None
        d = activation_derivative(self.act, y @ self.W_in + self.b_in)
        return rho, v_bar, d, (v_bar * self.ln.gamma) @ self.W_in

    def _b_tilde(self, scale: Tensor, v_bar: Tensor, d_scaled: Tensor | None, p_bar: Tensor | None) -> Tensor:
        """scale·S_linᵀ Γ v̄ + W_outᵀ (d_scaled ⊙ p̄) per row (n, d_out)."""
        out = torch.zeros(v_bar.shape[0], self.d_out, dtype=F64, device=v_bar.device)
        if self.S_lin is not None:
            out = out + scale[:, None] * ((v_bar * self.ln.gamma) @ self.S_lin)
        if d_scaled is not None:
            out = out + (d_scaled * p_bar) @ self.W_out
        return out

    def gram(self, x: Tensor, W: Tensor, inputs_at: list[int] | None = None,
             outputs_at: list[int] | None = None) -> Tensor:
        """∑_rows J A Jᵀ (d_in × d_in) for A = W Wᵀ, over the positions both layers take."""
        common, _ = shared_positions(x.shape[1], inputs_at, outputs_at)
        if not common:
            return torch.zeros(self.d_in, self.d_in, dtype=F64, device=x.device)
        rows, n = unique_rows(x[:, common])
        A = W @ W.T
        rho, v_bar, d, p_bar = self._pieces(rows)
        v = v_bar * rho[:, None]
        # b̃ = ρ(S_linᵀ Γ v + W_outᵀ (d ⊙ W_inᵀ Γ v)) = ρ² (S_linᵀ Γ v̄ + W_outᵀ (d ⊙ p̄))
        b = self._b_tilde(rho.pow(2), v_bar, None if d is None else d * rho.pow(2)[:, None], p_bar)
        M = torch.zeros(self.d_in, self.d_in, dtype=F64, device=x.device)
        Sr, Sp = self.S_res, self.S_proj
        if Sr is not None:
            M += n.sum() * (Sr @ A @ Sr.T)
        if Sp is not None:
            M += (n @ rho.pow(2)) * (Sp @ A @ Sp.T)
            if Sr is not None:
                cross = (n @ rho) * (Sr @ A @ Sp.T)
                M += cross + cross.T
        if d is not None:
            d_t = d * rho[:, None]
            WA = self.W_out @ A                                                   # (h, d_out)
            if Sr is not None:
                cross = self.W_proj @ ((n @ d_t)[:, None] * (WA @ Sr.T))
                M += cross + cross.T
            if Sp is not None:
                cross = self.W_proj @ (((n * rho) @ d_t)[:, None] * (WA @ Sp.T))
                M += cross + cross.T
            K = WA @ self.W_out.T
            M += self.W_proj @ (K * ((d_t * n[:, None]).T @ d_t)) @ self.W_proj.T
        # − ∑ (H A b̃ vᵀ + transpose): H A b̃ = S_res A b̃ + ρ S′ A b̃ + W′ (d̃ ⊙ W_out A b̃)
        Ab = (b @ A) * n[:, None]                                                 # A b̃ per row, weighted
        HAbv = torch.zeros_like(M)
        if Sr is not None:
            HAbv += Sr @ (Ab.T @ v)
        if Sp is not None:
            HAbv += Sp @ ((Ab * rho[:, None]).T @ v)
        if d is not None:
            HAbv += self.W_proj @ (((Ab @ self.W_out.T) * d_t).T @ v)
        M -= HAbv + HAbv.T
        beta = (Ab * b).sum(1)                                                    # n·b̃ᵀ A b̃
        M += v.T @ (v * beta[:, None])
        return M

    def edges(self, x: Tensor, rule: tuple[list[float], list[float]], bases: list[tuple[Tensor, Tensor, Tensor]],
              chunk_elements: int, dtype: torch.dtype = F64, inputs_at: list[int] | None = None,
              outputs_at: list[int] | None = None) -> list[Tensor]:
        """∑_rows M_r² per basis, (k_out − 1, k_in); bases are (f̂ (B, S, k_in) at the input positions,
        C̃ (k_in, d_in), W (d_out, k_out − 1)); x (B, T, d_in) holds every position. J_ts = 0 for
        s ≠ t, so only the positions both layers take have rows."""
        common, index = shared_positions(x.shape[1], inputs_at, outputs_at)
        if not common:
            return [torch.zeros(W.shape[1], C_t.shape[0], dtype=F64, device=x.device) for _, C_t, W in bases]
        rows, counts, first = unique_rows(x[:, common], with_index=True)
        alphas, weights = rule
        n_rows = rows.shape[0]
        rho_bar = torch.zeros(n_rows, dtype=F64, device=x.device)
        s_bar = torch.zeros_like(rho_bar)
        d_bar = e_bar = p_bar = None
        for a, w in zip(alphas, weights):
            rho, v_bar, d, p_bar = self._pieces(rows, a)
            k = w * rho * (a * rho) ** 2                                          # w ρ c²
            rho_bar += w * rho
            s_bar += k
            if d is not None:
                d_bar = w * rho[:, None] * d + (0 if d_bar is None else d_bar)
                e_bar = k[:, None] * d + (0 if e_bar is None else e_bar)
        b_bar = self._b_tilde(s_bar, v_bar, e_bar, p_bar)                         # (n, d_out)
        fs = [(f_hat[:, index].reshape(-1, f_hat.shape[-1])[first] * counts.sqrt()[:, None]).to(dtype)
              for f_hat, _, _ in bases]                                             # f̂ √count per row
        if d_bar is not None and _jacobian_first(self.W_in.shape[1], self.d_out, self.d_in, bases):
            return self._edges_via_jacobian(bases, fs, rho_bar, d_bar, b_bar, v_bar, chunk_elements, dtype)
        out = []
        for (f_hat, C_t, W), weight_rows in zip(bases, fs):
            k_out, k_in = W.shape[1], C_t.shape[0]
            fixed = torch.zeros(k_out, k_in, dtype=F64, device=x.device)
            if self.S_res is not None:
                fixed += W.T @ self.S_res.T @ C_t.T
            lin = None if self.S_proj is None else (W.T @ self.S_proj.T @ C_t.T).to(dtype)
            left, right = (b_bar @ W).to(dtype), (v_bar @ C_t.T).to(dtype)      # rank-one term per row
            if d_bar is not None:
                P, Q = (W.T @ self.W_out.T).to(dtype), (self.W_proj.T @ C_t.T).to(dtype)
                hidden = P.shape[1]
            fixed_d = fixed.to(dtype)
            E = torch.zeros(k_out, k_in, dtype=F64, device=x.device)
            size = max(1, min(chunk_elements, 2 ** 19) // max(1, k_out * max(k_in, hidden if d_bar is not None else 1)))
            for start in range(0, n_rows, size):
                sl = slice(start, start + size)
                if d_bar is not None:
                    dd = d_bar[sl].to(dtype)
                    G = ((P[None] * dd[:, None, :]).reshape(-1, hidden) @ Q).reshape(dd.shape[0], k_out, k_in)
                else:
                    G = torch.zeros(left[sl].shape[0], k_out, k_in, dtype=dtype, device=x.device)
                G += fixed_d
                if lin is not None:
                    G.add_(rho_bar[sl].to(dtype)[:, None, None] * lin)
                G.sub_(left[sl][:, :, None] * right[sl][:, None, :])
                E += G.mul_(weight_rows[sl][:, None, :]).square_().sum(0).to(F64)
            out.append(E)
        return out

    def _edges_via_jacobian(self, bases, fs, rho_bar, d_bar, b_bar, v_bar, chunk_elements: int, dtype) -> list[Tensor]:
        """The edges from each row's whole Jacobian J_r = S_resᵀ + ρ̄ S′ᵀ + W_outᵀ diag(d̄) W′ᵀ − b̄ v̄ᵀ
        (d_out × d_in), formed once per row and shared by every basis: M_r = Wᵀ J_r C̃ᵀ diag(f̂_r), with
        the product skipped on a side where the basis only selects units (the neuron basis). Rows are
        laid out (d_out, rows, d_in) so that every product is one plain matrix product."""
        hidden, d_out, d_in, dev = self.W_in.shape[1], self.d_out, self.d_in, v_bar.device
        n_rows = v_bar.shape[0]
        size = max(1, min(n_rows, min(chunk_elements, 2 ** 20) // (hidden * d_in)))
        WoT, WpT = self.W_out.T.to(dtype), self.W_proj.T.to(dtype)              # (d_out, h), (h, d_in)
        const = torch.zeros(d_out, d_in, dtype=F64, device=dev)
        if self.S_res is not None:
            const += self.S_res.T
        const = const.to(dtype)[:, None, :]
        lin = None if self.S_proj is None else self.S_proj.T.to(dtype)[:, None, :]
        sides = [(_selection(W), _selection(C_t.T), W.T.to(dtype), C_t.T.to(dtype)) for _, C_t, W in bases]
        Y = torch.empty(hidden * size * d_in, dtype=dtype, device=dev)
        J = torch.empty(d_out * size * d_in, dtype=dtype, device=dev)
        out = [torch.zeros(W.shape[1], C_t.shape[0], dtype=F64, device=dev) for _, C_t, W in bases]
        for start in range(0, n_rows, size):
            sl = slice(start, start + size)
            n = v_bar[sl].shape[0]
            Yc = torch.mul(d_bar[sl].to(dtype).T[:, :, None], WpT[:, None, :], out=Y[:hidden * n * d_in].view(hidden, n, d_in))
            Jc = torch.mm(WoT, Yc.view(hidden, n * d_in), out=J[:d_out * n * d_in].view(d_out, n * d_in)).view(d_out, n, d_in)
            Jc += const
            if lin is not None:
                Jc.addcmul_(lin, rho_bar[sl].to(dtype)[None, :, None])
            Jc.sub_(b_bar[sl].to(dtype).T[:, :, None] * v_bar[sl].to(dtype)[None])
            for E, (W_sel, C_sel, WT, Ct), f in zip(out, sides, fs):
                E += _rotated_squares(Jc, W_sel, C_sel, WT, Ct, f[sl])
        return out


def _jacobian_first(hidden: int, d_out: int, d_in: int, bases) -> bool:
    """Whether forming each row's d_out × d_in Jacobian once (shared by the bases) costs fewer
    multiply-adds than the per-basis products P diag(d) Q (k_out · hidden · k_in each)."""
    direct, shared = 0, d_out * hidden * d_in
    for _, C_t, W in bases:
        k_out, k_in = W.shape[1], C_t.shape[0]
        direct += k_out * hidden * k_in
        shared += (0 if _selection(W) is not None else k_out * d_out * d_in)
        shared += (0 if _selection(C_t.T) is not None else k_out * d_in * k_in)
    return shared < direct


def _selection(S: Tensor) -> Tensor | None:
    """For S (n × k) whose columns are each zero or one unit vector: the row of each column's 1
    (−1 for a zero column), so that (Sᵀ Y)[i] = Y[row_i]; None for any other S."""
    ones = S == 1
    if not bool(((S == 0) | ones).all()) or bool((ones.sum(0) > 1).any()):
        return None
    return torch.where(ones.any(0), ones.to(torch.int8).argmax(0), -1)


def _gather(Y: Tensor, sel: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """(the slices of Y along dim picked by the selection, the kept indices); no copy when the
    selection is every slice in order."""
    kept = (sel >= 0).nonzero().squeeze(1)
    src = sel[kept]
    if src.shape[0] == Y.shape[dim] and bool((src == torch.arange(src.shape[0], device=src.device)).all()):
        return Y, kept
    return Y.index_select(dim, src), kept


def _rotated_squares(J: Tensor, W_sel, C_sel, WT: Tensor, Ct: Tensor, f: Tensor) -> Tensor:
    """∑_r (Wᵀ J_r C̃ᵀ diag(f_r))² (k_out × k_in, float64) for J laid out (d_out, rows, d_in)."""
    d_out, n, d_in = J.shape
    k_out, k_in = WT.shape[0], Ct.shape[1]
    if C_sel is None:
        K, cols = torch.mm(J.view(d_out * n, d_in), Ct).view(d_out, n, k_in), None
    else:
        K, cols = _gather(J, C_sel, 2)
    if W_sel is None:
        G, rows = torch.mm(WT, K.reshape(d_out, -1)).view(k_out, n, -1), None
    else:
        G, rows = _gather(K, W_sel, 0)
    G = G * (f if cols is None else f[:, cols])[None]
    part = G.square_().sum(1).to(F64)
    if cols is not None:  # columns of C̃ᵀ that select nothing: no edges
        part = torch.zeros(part.shape[0], k_in, dtype=F64, device=J.device).index_copy_(1, cols, part)
    if rows is not None:
        part = torch.zeros(k_out, k_in, dtype=F64, device=J.device).index_copy_(0, rows, part)
    return part


def layer_norm_params(norm_bridge: nn.Module, d: int) -> LayerNormParams | None:
    """γ, β, ε of a bridge's LayerNorm component as the bridge applies it; None if it is not a LayerNorm."""
    ln = inner(norm_bridge)
    if not isinstance(ln, nn.LayerNorm) or getattr(norm_bridge, "uses_rms_norm", False):
        return None
    if tuple(ln.normalized_shape) != (d,):
        return None
    weight = ln.weight
    if weight is not None and getattr(norm_bridge, "uses_weight_offset", False):
        weight = 1.0 + weight
    config = getattr(norm_bridge, "config", None)
    native = getattr(norm_bridge, "use_native_layernorm_autograd", False) or getattr(config, "layer_norm_folding", False)
    eps = ln.eps if native or config is None else getattr(config, "eps", ln.eps)
    return LayerNormParams(weight, ln.bias, eps, d, device=ln.weight.device if ln.weight is not None else None)


MLPS = ("NativeMLP", "GPT2MLP")


@recognizer(order=20)
def recognize(model: nn.Module, l_in: str, l_out: str):
    """A TransformerLens bridge's LN2 + element-wise MLP + residual (resid_mid -> resid_post), or its
    final LayerNorm + unembedding (last resid_post -> output); natively booted or Hugging Face GPT-2."""
    bridge, step = bridge_of(model), residual_step(l_in, l_out)
    if bridge is None or step is None or step[1] not in ("mlp", "unembed"):
        return None
    (i, kind), cfg = step, bridge.cfg
    d = cfg.d_model
    if kind == "mlp":
        block = bridge.blocks[i]
        ln = layer_norm_params(block.ln2, d)
        if ln is None:
            return None, "MLP not behind a LayerNorm"
        mlp = inner(block.mlp)
        act_fn = str(getattr(cfg, "act_fn", "")).lower()
        act = getattr(mlp, "act", None)
        if (type(mlp).__name__ not in MLPS or act is None or getattr(mlp, "ln", None) is not None
                or act_fn.startswith("solu") or getattr(cfg, "gated_mlp", False)):
            return None, f"MLP {type(mlp).__name__} ({act_fn}) is not an element-wise MLP"
        m = block.mlp
        eye = torch.eye(d, dtype=torch.float64, device=m.W_in.device)
        return LayerNormPositionWiseSection(ln, eye, None, m.b_out, m.W_in, m.b_in, act, m.W_out), "layernorm mlp"
    if i != len(bridge.blocks) - 1:
        return None
    ln = layer_norm_params(bridge.ln_final, d)
    if ln is None:
        return None, "unembedding not behind a LayerNorm"
    return LayerNormPositionWiseSection(ln, None, bridge.unembed.W_U, bridge.unembed.b_U), "layernorm unembed"
