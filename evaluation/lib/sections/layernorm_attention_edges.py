"""The edges of LayerNormAttentionSection (pre-LN attention + residual), laid out for speed.

Same closed form as the module docstring of layernorm_attention.py: per example and output position t,
M_t = Wᵀ C̃ᵀ diag(f̂_t) + ∑_h Ω_hᵀ N^h_t (Ω = W_O W), with N^h_t (d_h × k_in) summed over the rule's
points. Writing the terms of N^h_t by what multiplies f̂:

    N^h_t = ∑_s X^h_ts ⊗ (b_s ⊙ f̂_s) + (∑_s Ẽ^h_ts ⊗ f̂_s) ⊙ (q_t Λ̃_Kᵀ) + Λ̃_Vᵀ diag(u^h_t)
            + (G̃^h_tᵀ Λ̃_Qᵀ) diag(f̂_t),
    X^h_ts = −w ρ_s (A_ts g^V_s + c δ_ts G_tᵀ g^Q_t + c (q_t·g^K_s) e_ts),   Ẽ^h_ts = w c ρ_s e_ts,
    u^h_t = ∑_s w A_ts ρ_s f̂_s,   G̃^h_t = w c ρ_t G_t,

X, Ẽ and G̃ do not depend on the basis, so they are built once per example and shared by all bases;
each basis then costs two matrix products over s (causal: s ≤ t only), one d_h × d_h product per
head and position, and the product with Ω. Work is done per example in blocks of output positions,
in buffers allocated once per call, so the per-example temporaries stay small (cache-resident) and
are not handed back to the allocator each time (which cost page faults and system time).
"""

from __future__ import annotations

import torch
from torch import Tensor

F64 = torch.float64
BLOCK_ELEMENTS = 2 ** 19  # elements of one block's N (heads × d_h × positions × k_in)


def edges_all(section, x: Tensor, rule, bases, chunk_elements: int, dtype=F64, mask: Tensor | None = None) -> list[Tensor]:
    """∑_x ∑_t M_t² per basis, every output position, (k_out − 1, k_in); arguments as
    LayerNormAttentionSection._edges_all (chunk_elements is not needed: blocks are sized by
    BLOCK_ELEMENTS)."""
    if not bases:
        return []
    B, T, _ = x.shape
    H, c, d_h = section.H, section.c, section.d_h
    a_, ln = section.attn, section.ln
    points = []
    for alpha, w in zip(*rule):
        a = alpha if mask is None else 1.0 + (alpha - 1.0) * mask    # α per position (T,)
        y, rho, v_bar = ln.parts(x, a if mask is None else a[:, None])
        v = v_bar * (a * rho)[..., None]                                 # v at LN(αx)
        q, k, A, E, _ = a_._heads(y)
        gv = v * ln.gamma
        gV, gQ, gK = (torch.einsum("bsd,hda->bhsa", gv, Wt) for Wt in (a_.W_V, a_.W_Q, a_.W_K))
        G_T = torch.einsum("bhtsa,bhsc->bhtac", E, k)                    # G_tᵀ
        GgQ = torch.einsum("bhtac,bhtc->bhta", G_T, gQ)                  # G_tᵀ g^Q_t
        qgK = q @ gK.transpose(-1, -2)                                   # q_t·g^K_s (B, H, T, T)
        points.append((w, rho, v, q, A, E, G_T, gV, GgQ, qgK))
    tb = max(1, min(T, BLOCK_ELEMENTS // max(1, H * d_h * max(C.shape[0] for _, C, _ in bases))))
    nb = -(-T // tb)
    cuts = [T * i // nb for i in range(nb + 1)]                         # nb blocks of near-equal size
    blocks = list(zip(cuts[:-1], cuts[1:]))
    tb = max(t1 - t0 for t0, t1 in blocks)
    per_basis = [_basis_setup(section, f_hat, C_t, W, dtype, tb) for f_hat, C_t, W in bases]
    idx = torch.arange(T, device=x.device)
    for b in range(B):
        # basis-independent pieces of example b, per point (see the module docstring)
        shared = []
        u_mat = torch.zeros(H, T, T, dtype=dtype, device=x.device)          # ∑_α w A_ts ρ_s
        Gt = torch.zeros(H, d_h, T, d_h, dtype=dtype, device=x.device)      # ∑_α w c ρ_t G_tᵀ, (h, a, t, c)
        for w, rho, v, q, A, E, G_T, gV, GgQ, qgK in points:
            r = rho[b]
            Eb = E[b].permute(0, 3, 1, 2)                                    # e_ts[a] as (h, a, t, s)
            X = A[b][:, None] * gV[b].transpose(1, 2)[:, :, None, :]        # A_ts g^V_s[a]
            X.addcmul_(Eb, qgK[b][:, None], value=c)
            X[:, :, idx, idx] += c * GgQ[b].transpose(1, 2)
            X.mul_((-w) * r)
            Et = (Eb * ((w * c) * r)).to(dtype)
            u_mat += (w * A[b] * r).to(dtype)
            Gt += (G_T[b] * ((w * c) * r)[None, :, None, None]).permute(0, 2, 1, 3).to(dtype)
            shared.append((_blocked(X.to(dtype), blocks), _blocked(Et, blocks), v[b].to(dtype), q[b].to(dtype)))
        Gt_blocks = [Gt[:, :, t0:t1].reshape(H, d_h * (t1 - t0), d_h) for t0, t1 in blocks]
        for pb in per_basis:
            _example(pb, b, shared, u_mat, Gt_blocks, blocks, a_.causal, H, d_h)
    return [pb["E"] for pb in per_basis]


def _blocked(Y: Tensor, blocks) -> list[Tensor]:
    """(H, d_h, T, S) -> per block of positions [t0, t1) a contiguous (H·d_h·(t1 − t0), S) matrix."""
    return [Y[:, :, t0:t1].reshape(-1, Y.shape[-1]) for t0, t1 in blocks]


def _basis_setup(section, f_hat: Tensor, C_t: Tensor, W: Tensor, dtype, tb: int) -> dict:
    """Fixed products of one basis and its buffers (allocated once, reused for every example)."""
    a_, H, d_h = section.attn, section.H, section.d_h
    k_out, k_in = W.shape[1], C_t.shape[0]
    # Λ̃_τᵀ = (C̃ L̃_τ)ᵀ per head from the section's L̃ = Π₀ Γ [W_V, W_Q, W_K], (τ, H, d_h, k_in)
    LamT = (C_t @ section.L_proj).reshape(k_in, H, 3, d_h).permute(2, 1, 3, 0).to(dtype)
    dev = f_hat.device
    return {"f_hat": f_hat, "Ct": C_t.T.to(dtype), "k_in": k_in, "k_out": k_out,
            "Om": (a_.W_O @ W).reshape(H * d_h, k_out).T.contiguous().to(dtype),   # Ωᵀ (k_out, H·d_h)
            "LamVT": LamT[0][:, :, None, :].contiguous(),                           # (H, d_h, 1, k_in)
            "LamQT": LamT[1].contiguous(),                                          # (H, d_h, k_in)
            "LamKT": LamT[2].contiguous(),                                          # (H, d_h, k_in)
            "fixed": (W.T @ C_t.T).to(dtype)[:, None, :],                            # Wᵀ C̃ᵀ (k_out, 1, k_in)
            "N": torch.empty(H * d_h * tb * k_in, dtype=dtype, device=dev),
            "R": torch.empty(H * d_h * tb * k_in, dtype=dtype, device=dev),
            "M": torch.empty(k_out * tb * k_in, dtype=dtype, device=dev),
            "E": torch.zeros(k_out, k_in, dtype=F64, device=dev)}


def _example(pb: dict, b: int, shared, u_mat: Tensor, Gt_blocks, blocks, causal: bool, H: int, d_h: int) -> None:
    """Adds ∑_t M_t² of example b to pb["E"], one block of output positions at a time."""
    k_in, k_out = pb["k_in"], pb["k_out"]
    f = pb["f_hat"][b].to(pb["Ct"].dtype)                                # (T, k_in)
    u = (u_mat @ f)[:, None]                                             # u^h_t (H, 1, T, k_in)
    per_point = [(X, Et, (v @ pb["Ct"]) * f, torch.bmm(q, pb["LamKT"])[:, None])   # b_s ⊙ f̂_s, q_t Λ̃_Kᵀ
                 for X, Et, v, q in shared]
    for i, (t0, t1) in enumerate(blocks):
        n, s_end = t1 - t0, (t1 if causal else f.shape[0])              # causal: A_ts = e_ts = 0 for s > t
        N = pb["N"][:H * d_h * n * k_in].view(H * d_h * n, k_in)
        R = pb["R"][:H * d_h * n * k_in].view(H, d_h, n, k_in)
        N4 = N.view(H, d_h, n, k_in)
        for p, (X, Et, bf, qL) in enumerate(per_point):
            if p == 0:
                torch.mm(X[i][:, :s_end], bf[:s_end], out=N)
            else:
                N.addmm_(X[i][:, :s_end], bf[:s_end])
            torch.mm(Et[i][:, :s_end], f[:s_end], out=R.view(-1, k_in))
            N4.addcmul_(R, qL[:, :, t0:t1])
        N4.addcmul_(pb["LamVT"], u[:, :, t0:t1])
        torch.bmm(Gt_blocks[i], pb["LamQT"], out=R.view(H, d_h * n, k_in))
        N4.addcmul_(R, f[t0:t1])
        M = pb["M"][:k_out * n * k_in].view(k_out, n * k_in)
        torch.mm(pb["Om"], N.view(H * d_h, n * k_in), out=M)
        M3 = M.view(k_out, n, k_in)
        M3.addcmul_(pb["fixed"], f[t0:t1])
        pb["E"] += M3.square_().sum(1).to(F64)
