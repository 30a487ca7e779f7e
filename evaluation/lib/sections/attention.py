"""Self-attention with its residual, in closed form (TransformerLens resid_pre -> resid_mid, no LayerNorm).

Per head h (row vectors, c = 1/attn scale): q_t = x_t W_Q + b_Q, k_s, v_s alike; A_ts = softmax_s(c q_t·k_s)
(causal mask); o_t = ∑_s A_ts v_s; out_t = x_t + ∑_h o_t W_O + b_O. With e_ts = A_ts (v_s − o_t) and
G_t = ∑_s k_sᵀ e_ts (d_h × d_h), the Jacobian block J_ts = ∂out_t/∂x_s (d_in × d_out) is

    J_ts = δ_ts I + ∑_h [A_ts W_V + δ_ts c W_Q G_t + c W_K q_tᵀ e_ts] W_O,

i.e. fixed weight products scaled by A_ts plus terms of rank ≤ T per head. The Jacobian Gram and
the edges are assembled from O(T²·d_head²) numbers per example and head pair and a few fixed
products of the weights, instead of T·k backward passes through the layer per example:

* Gram ∑ J A Jᵀ (A = W Wᵀ): with u_i = W_O^h w_i the cotangent of a column w_i of W, J_ts w_i =
  δ_ts w_i + ∑_h (W_V y_V + W_Q y_Q + W_K y_K) with y_V = A_ts u_i, y_Q = δ_ts c G_t u_i,
  y_K = c (e_ts·u_i) q_tᵀ; the sums over i only need K_hg = ∑_i u^h_i u^gᵀ_i = W_O^h A W_O^gᵀ.
* Edges, Ω = W_O^h W, Λ_τ = C̃ W_τ^h (τ = V, Q, K):
  M_t = Wᵀ C̃ᵀ diag(f̂_t) + ∑_α w_α ∑_h [Ωᵀ Λ_Vᵀ diag(∑_s A_ts f̂_s)
        + c ∑_s (Ωᵀ e_tsᵀ) ⊗ ((k_s Λ_Qᵀ) ⊙ f̂_t + (q_t Λ_Kᵀ) ⊙ f̂_s)],   E += ∑_t M_t².

Positions (evaluation.lib.positions): t runs over the output layer's positions only (for output
position t only row t of the pattern matters, so q, A and e are computed for those rows), s over
the input layer's positions (δ_ts, A_ts and e_ts are masked to them; G_t and the keys still sum
over every position, which the attention reads whether or not it is a node).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from evaluation.lib.sections.base import recognizer
from evaluation.lib.sections.transformer_lens import bridge_of, inner, residual_step

F64 = torch.float64


class AttentionSection:
    """out = x + attention(x); weights in TransformerLens layout W_Q/W_K/W_V (H, d_in, d_h), W_O (H, d_h, d_out)."""

    supports_positions = True  # gram/edges/forward take inputs_at/outputs_at (evaluation.lib.positions)

    def __init__(self, W_Q, b_Q, W_K, b_K, W_V, b_V, W_O, b_O, scale: float, causal: bool = True):
        cast = lambda t: t.detach().to(F64)  # noqa: E731
        self.W_Q, self.W_K, self.W_V, self.W_O = cast(W_Q), cast(W_K), cast(W_V), cast(W_O)
        self.b_Q, self.b_K, self.b_V, self.b_O = cast(b_Q), cast(b_K), cast(b_V), cast(b_O)
        self.c = 1.0 / scale
        self.causal = causal
        self.H, self.d_in, self.d_h = self.W_Q.shape
        self.d_out = self.W_O.shape[2]

    def _heads(self, x: Tensor, queries: list[int] | None = None):
        """q (B, H, T', d_h) at the query positions (all T when None), k (B, H, T, d_h),
        A (B, H, T', T), E (B, H, T', T, d_h) with E[t, s] = A_ts (v_s − o_t), o (B, H, T', d_h)."""
        T = x.shape[1]
        to = list(range(T)) if queries is None else queries
        q = torch.einsum("btd,hda->bhta", x[:, to], self.W_Q) + self.b_Q[:, None]
        k = torch.einsum("btd,hda->bhta", x, self.W_K) + self.b_K[:, None]
        v = torch.einsum("btd,hda->bhta", x, self.W_V) + self.b_V[:, None]
        scores = self.c * q @ k.transpose(-1, -2)
        if self.causal:
            later = torch.arange(T, device=x.device)[None, :] > torch.tensor(to, device=x.device)[:, None]
            scores = scores.masked_fill(later, float("-inf"))
        A = scores.softmax(-1)
        o = A @ v
        E = A[..., None] * (v[:, :, None, :, :] - o[:, :, :, None, :])
        return q, k, A, E, o

    def forward(self, x: Tensor, inputs_at: list[int] | None = None, outputs_at: list[int] | None = None) -> Tensor:
        """out_t (B, T', d_out) at the output positions (all when None)."""
        to = list(range(x.shape[1])) if outputs_at is None else outputs_at
        *_, o = self._heads(x, outputs_at)
        return x[:, to] + torch.einsum("bhta,hae->bte", o, self.W_O) + self.b_O

    @staticmethod
    def _masks(x: Tensor, inputs_at, outputs_at):
        """m_s (T,): 1 at the input positions; Dm (T', T): δ_ts restricted to them; m_t = ∑_s Dm (T',)."""
        T = x.shape[1]
        to = list(range(T)) if outputs_at is None else outputs_at
        m_s = torch.zeros(T, dtype=F64, device=x.device)
        m_s[list(range(T)) if inputs_at is None else inputs_at] = 1.0
        Dm = torch.zeros(len(to), T, dtype=F64, device=x.device)
        Dm[torch.arange(len(to), device=x.device), torch.tensor(to, device=x.device)] = 1.0
        Dm = Dm * m_s
        return m_s, Dm, Dm.sum(1)

    def gram(self, x: Tensor, W: Tensor, inputs_at: list[int] | None = None,
             outputs_at: list[int] | None = None) -> Tensor:
        """∑_x ∑_{t,s} J_ts A J_tsᵀ (d_in × d_in), A = W Wᵀ, over output positions t (``outputs_at``)
        and input positions s (``inputs_at``); x (B, T, d_in) holds every position (None = all)."""
        B = x.shape[0]
        H, d_h, c = self.H, self.d_h, self.c
        q, k, A, E, _ = self._heads(x, outputs_at)
        m_s, Dm, m_t = self._masks(x, inputs_at, outputs_at)
        Omega = self.W_O @ W                                       # (H, d_h, k)
        Khg = torch.einsum("hak,gbk->hgab", Omega, Omega)          # W_O^h A W_O^gᵀ
        Bh = torch.einsum("ek,hak->hea", W, Omega)                 # A W_O^hᵀ (H, d_out, d_h)
        A_diag = torch.einsum("bhts,ts->bht", A, Dm)               # A_tt where t is an input position, else 0
        E_diag = torch.einsum("bhtsa,ts->bhta", E, Dm)             # e_tt likewise (B, H, T', d_h)
        G_T = torch.einsum("bhtsa,bhsc->bhtac", E, k)              # G_tᵀ = ∑_s e_tsᵀ k_s (every s)
        EK = torch.einsum("bhtsc,hgcd->bhgtsd", E, Khg)            # e^h_ts K_hg
        # blocks of S = ∑ y yᵀ, indexed [h, g] with (d_h × d_h) entries
        VV = torch.einsum("bhts,bgts,s->hg", A, A, m_s)[:, :, None, None] * Khg
        VQ = c * Khg @ torch.einsum("bht,bgtac->hgac", A_diag, G_T)
        VK = c * Khg @ torch.einsum("bhgta,bgtc->hgac", torch.einsum("bhts,bgtsa,s->bhgta", A, E, m_s), q)
        inner = torch.einsum("bhgtsd,bgtrd->bhgtsr", EK, E)         # e^h_ts K_hg e^gᵀ_tr
        QQ = c * c * torch.einsum("bhsa,bhgtsc->hgac", k, torch.einsum("bhgtsr,bgrc,t->bhgtsc", inner, k, m_t))
        vec = torch.einsum("bhgtsd,bgtd->bhgts", EK, E_diag)        # e^h_ts K_hg e^gᵀ_tt
        QK = c * c * torch.einsum("bhgta,bgtc->hgac", torch.einsum("bhsa,bhgts->bhgta", k, vec), q)
        ss = torch.einsum("bhgtss,s->bhgt", inner, m_s)             # ∑_s e^h_ts K_hg e^gᵀ_ts (B, H, H, T')
        KK = c * c * torch.einsum("bhgt,bhta,bgtc->hgac", ss, q, q)
        S = torch.zeros(H, 3, d_h, H, 3, d_h, dtype=F64, device=x.device)          # order of τ: V, Q, K
        S[:, 0, :, :, 0] = VV.permute(0, 2, 1, 3)
        S[:, 0, :, :, 1] = VQ.permute(0, 2, 1, 3)
        S[:, 1, :, :, 0] = VQ.permute(1, 3, 0, 2)
        S[:, 0, :, :, 2] = VK.permute(0, 2, 1, 3)
        S[:, 2, :, :, 0] = VK.permute(1, 3, 0, 2)
        S[:, 1, :, :, 1] = QQ.permute(0, 2, 1, 3)
        S[:, 1, :, :, 2] = QK.permute(0, 2, 1, 3)
        S[:, 2, :, :, 1] = QK.permute(1, 3, 0, 2)
        S[:, 2, :, :, 2] = KK.permute(0, 2, 1, 3)
        S = S.reshape(3 * H * d_h, 3 * H * d_h)
        # residual cross terms ∑ δ_ts w_i yᵀ, per head (d_out × d_h)
        RV = Bh * A_diag.sum((0, 2))[:, None, None]
        RQ = c * Bh @ torch.einsum("bhtac,t->hac", G_T, m_t)
        RK = c * Bh @ torch.einsum("bhta,bhtc->hac", E_diag, q)
        R = torch.stack([RV, RQ, RK], 1).permute(2, 0, 1, 3).reshape(self.d_out, 3 * H * d_h)
        L = torch.stack([self.W_V, self.W_Q, self.W_K], 1).permute(2, 0, 1, 3).reshape(self.d_in, 3 * H * d_h)
        cross = R @ L.T
        return B * Dm.sum() * (W @ W.T) + cross + cross.T + L @ S @ L.T

    @torch.no_grad()  # sums of squares, never differentiated; the in-place products below need no graph
    def edges(self, x: Tensor, rule: tuple[list[float], list[float]], bases: list[tuple[Tensor, Tensor, Tensor]],
              chunk_elements: int, dtype: torch.dtype = F64, inputs_at: list[int] | None = None,
              outputs_at: list[int] | None = None) -> list[Tensor]:
        """∑_x ∑_t M_t² per basis, (k_out − 1, k_in); bases are (f̂ (B, S, k_in) at the input positions,
        C̃ (k_in, d_in), W (d_out, k_out − 1)); x (B, T, d_in) holds every position.

        f̂ is zero-padded to all T positions: a position outside the input layer contributes no term
        (its f̂ is 0), while every key and value still enters the attention pattern."""
        B, T, _ = x.shape
        H = self.H
        alphas, weights = rule
        to = list(range(T)) if outputs_at is None else outputs_at
        heads = [(w, self._heads(a * x if inputs_at is None else _scaled(x, a, inputs_at), outputs_at))
                 for a, w in zip(alphas, weights)]
        out = []
        for f_in, C_t, W in bases:
            if inputs_at is None:
                f_hat = f_in
            else:
                f_hat = torch.zeros(B, T, f_in.shape[-1], dtype=f_in.dtype, device=f_in.device)
                f_hat[:, inputs_at] = f_in
            k_out, k_in = W.shape[1], C_t.shape[0]
            Omega = self.W_O @ W                                                 # (H, d_h, k_out)
            Lam = {n: torch.einsum("jd,hda->hja", C_t, Wt) for n, Wt in (("V", self.W_V), ("Q", self.W_Q), ("K", self.W_K))}
            # Wᵀ C̃ᵀ, then Ωᵀ Λ_Vᵀ per head: fixed matrices whose columns j are scaled per example
            fixed = torch.cat([(W.T @ C_t.T)[None], torch.einsum("hak,hja->hkj", Omega, Lam["V"])]).to(dtype)
            Omega, LQ, LK = Omega.to(dtype), Lam["Q"].to(dtype), Lam["K"].to(dtype)
            E_acc = torch.zeros(k_out, k_in, dtype=F64, device=x.device)
            Tq = len(to)
            size = max(1, min(chunk_elements, 2 ** 19) // max(1, Tq * k_out * k_in))  # small chunks stay in cache
            # one buffer for every chunk's M: a fresh multi-MB tensor per chunk costs page faults
            buffer = torch.empty(min(size, B) * Tq, k_out, k_in, dtype=dtype, device=x.device)
            for start in range(0, B, size):
                sl = slice(start, start + size)
                f = f_hat[sl].to(dtype)
                f_t = f[:, to]
                b_ = f.shape[0]
                M = torch.mul(fixed[0], f_t[:, :, None, :], out=buffer[:b_ * Tq].view(b_, Tq, k_out, k_in))
                for w, (q, k, A, E, _) in heads:
                    q, k, A, E = q[sl].to(dtype), k[sl].to(dtype), A[sl].to(dtype), E[sl].to(dtype)
                    scales = w * torch.einsum("bhts,bsj->hbtj", A, f)            # ∑_s A_ts f̂_s
                    for h in range(H):
                        M.addcmul_(fixed[1 + h], scales[h][:, :, None, :])
                    U = torch.einsum("hak,bhtsa->btkhs", Omega, E).reshape(b_ * Tq, k_out, H * T)   # Ωᵀ e_tsᵀ
                    V = (torch.einsum("bhsa,hja->bhsj", k, LQ)[:, :, None] * f_t[:, None, :, None, :]
                         + torch.einsum("bhta,hja->bhtj", q, LK)[:, :, :, None] * f[:, None, None, :, :])
                    V = V.permute(0, 2, 1, 3, 4).reshape(b_ * Tq, H * T, k_in)
                    M.view(b_ * Tq, k_out, k_in).baddbmm_(U, V, alpha=w * self.c)  # M += w c U V, in place
                E_acc += M.square_().sum((0, 1)).to(F64)
            out.append(E_acc)
        return out


def _scaled(x: Tensor, alpha: float, positions: list[int]) -> Tensor:
    """x with the given positions scaled by α (the input layer's positions; the others stay clean)."""
    if alpha == 1.0:
        return x
    scale = torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
    scale[positions] = alpha
    return x * scale[:, None]


@recognizer(order=10)
def recognize(model: nn.Module, l_in: str, l_out: str):
    """TransformerLens native attention without LayerNorm (resid_pre -> resid_mid)."""
    bridge, step = bridge_of(model), residual_step(l_in, l_out)
    if bridge is None or step is None or step[1] != "attention":
        return None
    block = bridge.blocks[step[0]]
    attn = inner(block.attn)
    if not isinstance(inner(block.ln1), nn.Identity):
        return None, "attention behind a LayerNorm"
    if (type(attn).__name__ != "NativeAttention" or getattr(attn, "rotary", None) is not None
            or getattr(attn, "attn_scores_soft_cap", 0) > 0 or getattr(attn, "kv_repeats", 1) != 1):
        return None, f"attention {type(attn).__name__} is not plain multi-head attention"
    a = block.attn
    return AttentionSection(a.W_Q, a.b_Q, a.W_K, a.b_K, a.W_V, a.b_V, a.W_O, a.b_O, attn.scale,
                            bool(getattr(attn, "causal", True))), "attention"
