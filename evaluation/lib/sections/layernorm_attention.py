"""Pre-LayerNorm self-attention with its residual, in closed form (GPT-2 style resid_pre -> resid_mid).

out_t = x_t + attention(LN(x))_t. Per position s the LayerNorm's Jacobian is
L_s = ρ_s (Π₀ − v_s v_sᵀ) Γ (see layernorm_position_wise: ρ = 1/sqrt(var + ε), v = (x − μ)ρ/√d,
Π₀ = I − 11ᵀ/d, Γ = diag(γ)), so by the chain rule per input position

    J_ts = δ_ts I + L_s J^a_ts,   J^a_ts = ∑_h [A_ts W_V + δ_ts c W_Q G_t + c W_K q_tᵀ e_ts] W_O

with J^a the attention's Jacobian at y = LN(x) (attention.py: A, e_ts = A_ts (v_s − o_t),
G_t = ∑_s k_sᵀ e_ts, all computed from y). Writing J^a_ts = L_stack Z_ts W_O (L_stack = [W_V, W_Q, W_K]
per head, Z_ts the per-head d_h-maps A_ts I, δ_ts c G_t, c q_tᵀ e_ts), the input side
L_s L_stack = ρ_s (L̃ − v_s ℓ_sᵀ) is a fixed matrix L̃ = Π₀Γ L_stack scaled by ρ_s plus a rank-one
term (ℓ_s = L_stackᵀ Γ v_s); everything else is the LayerNorm-free closed form:

* Gram (A = W Wᵀ, u_i = W_O w_i, K = ∑_i u_i u_iᵀ, z_ts = Z_tsᵀ ℓ_s, ζ_ts = K z_ts):
  ∑ J A Jᵀ = B·T·A + X + Xᵀ + L̃ S_ρ L̃ᵀ − (L̃ Φ + Φᵀ L̃ᵀ) + ∑_{t,s} ρ_s² (z_ts·ζ_ts) v_s v_sᵀ with
  S_ρ = ∑ ρ_s² Z_ts K Z_tsᵀ (the blocks of attention.py weighted by ρ_s²), Φ = ∑ ρ_s² Z_ts ζ_ts v_sᵀ,
  X = A W_Oᵀ (∑_t ρ_t Z_ttᵀ) L̃ᵀ − A W_Oᵀ ∑_t ρ_t z_tt v_tᵀ.
* Edges (Λ̃_τ = C̃ Π₀Γ W_τ, b_s = C̃ v_s, g^τ_s = W_τᵀ Γ v_s, all at LN(αx) for each point α):
  M_t = Wᵀ C̃ᵀ diag(f̂_t) + ∑_α w_α ∑_h [Ωᵀ Λ̃_Vᵀ diag(∑_s A_ts ρ_s f̂_s) − ∑_s A_ts ρ_s (Ωᵀ g^V_s)(b_s ⊙ f̂_s)ᵀ
        − c ρ_t (Ωᵀ G_tᵀ g^Q_t)(b_t ⊙ f̂_t)ᵀ + c ∑_s (Ωᵀ e_tsᵀ) ⊗ V_ts],
  V_ts = ρ_t (k_s Λ̃_Qᵀ) ⊙ f̂_t + ρ_s (q_t Λ̃_Kᵀ − (q_t·g^K_s) b_s) ⊙ f̂_s;   E += ∑_t M_t².
"""

from __future__ import annotations

import torch
from torch import Tensor

from evaluation.lib.sections.attention import AttentionSection
from evaluation.lib.sections.layernorm_position_wise import LayerNormParams

F64 = torch.float64
GRAM_CHUNK = 2 ** 22  # elements of the largest per-chunk tensor (examples × heads² × T² × d_head) in the Gram


class LayerNormAttentionSection:
    """out = x + attention(LN(x)); attention weights in TransformerLens layout (see AttentionSection)."""

    def __init__(self, ln: LayerNormParams, W_Q, b_Q, W_K, b_K, W_V, b_V, W_O, b_O, scale: float, causal: bool = True):
        self.ln = ln
        self.attn = AttentionSection(W_Q, b_Q, W_K, b_K, W_V, b_V, W_O, b_O, scale, causal)
        a = self.attn
        self.H, self.d_h, self.c, self.d = a.H, a.d_h, a.c, a.d_in
        # L_stack (d, H·3·d_h), order (head, τ ∈ V, Q, K, d_h), and L̃ = Π₀ Γ L_stack
        self.L_stack = torch.stack([a.W_V, a.W_Q, a.W_K], 1).permute(2, 0, 1, 3).reshape(self.d, -1)
        self.L_proj = ln.projected(self.L_stack)

    def forward(self, x: Tensor) -> Tensor:
        y, _, _ = self.ln.parts(x)
        *_, o = self.attn._heads(y)
        return x + torch.einsum("bhta,hae->bte", o, self.attn.W_O) + self.attn.b_O

    def gram(self, x: Tensor, W: Tensor) -> Tensor:
        """∑_x ∑_{t,s} J_ts A J_tsᵀ (d × d), A = W Wᵀ."""
        B, T, d = x.shape
        H, d_h = self.H, self.d_h
        Omega = self.attn.W_O @ W                                       # (H, d_h, k)
        Khg = torch.einsum("hak,gbk->hgab", Omega, Omega)               # W_O^h A W_O^gᵀ
        Bmat = torch.einsum("ek,hak->eha", W, Omega).reshape(W.shape[0], H * d_h)   # A W_Oᵀ
        S = torch.zeros(H, 3, d_h, H, 3, d_h, dtype=F64, device=x.device)
        R = torch.zeros(H, 3, d_h, d_h, dtype=F64, device=x.device)      # ∑_t ρ_t Z_ttᵀ blocks (u-index last)
        Phi = torch.zeros(H, 3, d_h, d, dtype=F64, device=x.device)
        zv = torch.zeros(H, d_h, d, dtype=F64, device=x.device)          # ∑_t ρ_t z_tt v_tᵀ
        vv = torch.zeros(d, d, dtype=F64, device=x.device)
        size = max(1, GRAM_CHUNK // max(1, H * H * T * T * d_h))
        for start in range(0, B, size):
            self._gram_chunk(x[start:start + size], Khg, S, R, Phi, zv, vv)
        S = S.reshape(3 * H * d_h, 3 * H * d_h)
        Lp = self.L_proj
        Rm = torch.einsum("eha,hxca->ehxc", Bmat.reshape(-1, H, d_h), R).reshape(-1, 3 * H * d_h)
        X = Rm @ Lp.T - Bmat @ zv.reshape(H * d_h, d)
        LPhi = Lp @ Phi.reshape(3 * H * d_h, d)
        return B * T * (W @ W.T) + X + X.T + Lp @ S @ Lp.T - LPhi - LPhi.T + vv

    def _gram_chunk(self, x, Khg, S, R, Phi, zv, vv):
        c = self.c
        y, rho, v_bar = self.ln.parts(x)
        v = v_bar * rho[..., None]                                      # (b, T, d)
        w1, w2 = rho, rho.pow(2)
        q, k, A, E, _ = self.attn._heads(y)
        G_T = torch.einsum("bhtsa,bhsc->bhtac", E, k)                   # G_tᵀ[a, c] = ∑_s e_ts[a] k_s[c]
        A_diag = A.diagonal(dim1=2, dim2=3)                              # (b, H, T)
        E_diag = E.diagonal(dim1=2, dim2=3).permute(0, 1, 3, 2)         # e_tt (b, H, T, d_h)
        gam_v = v * self.ln.gamma                                        # Γ v_s
        l_V, l_Q, l_K = (torch.einsum("bsd,hda->bhsa", gam_v, Wt) for Wt in (self.attn.W_V, self.attn.W_Q, self.attn.W_K))
        # --- S_ρ = ∑ ρ_s² Z_ts K Z_tsᵀ, blocks [h, τ, :, g, τ′, :]
        VV = torch.einsum("bhts,bgts,bs->hg", A, A, w2)[:, :, None, None] * Khg
        VQ = c * Khg @ torch.einsum("bht,bgtac,bt->hgac", A_diag, G_T, w2)
        VK = c * Khg @ torch.einsum("bhgta,bgtc->hgac", torch.einsum("bhts,bgtsa,bs->bhgta", A, E, w2), q)
        KG = torch.einsum("hgax,ngtxc->nhgtac", Khg, G_T)                # K_hg G^g_tᵀ
        QQ = c * c * torch.einsum("bhtac,bhgtad,bt->hgcd", G_T, KG, w2)   # G_t^h K_hg G_t^gᵀ
        QK = c * c * torch.einsum("bhtac,bhgta,bgtd,bt->hgcd", G_T,
                                  torch.einsum("hgax,ngtx->nhgta", Khg, E_diag), q, w2)
        EK = torch.einsum("bhtsc,hgcd->bhgtsd", E, Khg)                  # e^h_ts K_hg
        eKe = torch.einsum("bhgtsd,bgtsd->bhgts", EK, E)
        KK = c * c * torch.einsum("bhgts,bs,bhta,bgtc->hgac", eKe, w2, q, q)
        S[:, 0, :, :, 0] += VV.permute(0, 2, 1, 3)
        S[:, 0, :, :, 1] += VQ.permute(0, 2, 1, 3)
        S[:, 1, :, :, 0] += VQ.permute(1, 3, 0, 2)
        S[:, 0, :, :, 2] += VK.permute(0, 2, 1, 3)
        S[:, 2, :, :, 0] += VK.permute(1, 3, 0, 2)
        S[:, 1, :, :, 1] += QQ.permute(0, 2, 1, 3)
        S[:, 1, :, :, 2] += QK.permute(0, 2, 1, 3)
        S[:, 2, :, :, 1] += QK.permute(1, 3, 0, 2)
        S[:, 2, :, :, 2] += KK.permute(0, 2, 1, 3)
        # --- R = ∑_t ρ_t Z_ttᵀ: V: A_tt I, Q: c G_tᵀ, K: c e_tt q_tᵀ (rows: y-index, columns: u-index)
        eye = torch.eye(self.d_h, dtype=F64, device=x.device)
        R[:, 0] += torch.einsum("bht,bt->h", A_diag, w1)[:, None, None] * eye
        R[:, 1] += c * torch.einsum("bhtac,bt->hca", G_T, w1)
        R[:, 2] += c * torch.einsum("bhta,bhtc,bt->hca", E_diag, q, w1)
        # --- z_ts = Z_tsᵀ ℓ_s (u-space) and ζ_ts = K z_ts
        qlK = torch.einsum("bhta,bhsa->bhts", q, l_K)                    # q_t·ℓ^K_s
        GlQ = torch.einsum("bhtac,bhtc->bhta", G_T, l_Q)                 # G_tᵀ ℓ^Q_t
        z = A[..., None] * l_V[:, :, None] + c * qlK[..., None] * E
        z_diag = A_diag[..., None] * l_V + c * GlQ + c * torch.einsum("bhtt->bht", qlK)[..., None] * E_diag
        zv += torch.einsum("bhta,btd,bt->had", z_diag, v, w1)
        KGlQ = torch.einsum("hgax,ngtx->nhta", Khg, GlQ)
        zeta = (torch.einsum("ngts,nghsa->nhtsa", A, torch.einsum("hgax,ngsx->nghsa", Khg, l_V))
                + c * torch.einsum("bgts,bghtsa->bhtsa", qlK, EK))
        T = x.shape[1]
        idx = torch.arange(T, device=x.device)
        zeta[:, :, idx, idx] += c * KGlQ                                  # δ_ts term of z
        z[:, :, idx, idx] += c * GlQ                                      # δ_ts term of z
        # --- scalar term ∑ ρ_s² (z_ts·ζ_ts) v_s v_sᵀ
        omega = torch.einsum("bhtsa,bhtsa->bs", z, zeta) * w2
        vv += torch.einsum("bs,bsd,bse->de", omega, v, v)
        # --- Φ = ∑ ρ_s² Z_ts ζ_ts v_sᵀ: V: ∑_t A_ts ζ_ts, Q: c G_s ζ_ss, K: ∑_t c (e_ts·ζ_ts) q_t
        zeta_diag = zeta[:, :, idx, idx]                                 # (b, H, T, d_h)
        phi_V = torch.einsum("bhts,bhtsa->bhsa", A, zeta)
        phi_Q = c * torch.einsum("bhsac,bhsa->bhsc", G_T, zeta_diag)
        phi_K = c * torch.einsum("bhtsa,bhtsa,bhtc->bhsc", E, zeta, q)
        for tau, phi in enumerate((phi_V, phi_Q, phi_K)):
            Phi[:, tau] += torch.einsum("bhsa,bsd,bs->had", phi, v, w2)

    def edges(self, x: Tensor, rule: tuple[list[float], list[float]], bases: list[tuple[Tensor, Tensor, Tensor]],
              chunk_elements: int, dtype: torch.dtype = F64) -> list[Tensor]:
        """∑_x ∑_t M_t² per basis, (k_out − 1, k_in); bases are (f̂ (B, T, k_in), C̃ (k_in, d_in), W (d_out, k_out − 1))."""
        B, T, _ = x.shape
        H, c = self.H, self.c
        a_ = self.attn
        alphas, weights = rule
        points = []
        for alpha, w in zip(alphas, weights):
            y, rho, v_bar = self.ln.parts(x, alpha)
            v = v_bar * (alpha * rho)[..., None]                             # v at LN(αx)
            q, k, A, E, _ = a_._heads(y)
            gv = v * self.ln.gamma
            g = {n: torch.einsum("bsd,hda->bhsa", gv, Wt) for n, Wt in (("V", a_.W_V), ("Q", a_.W_Q), ("K", a_.W_K))}
            GgQ = torch.einsum("bhtsa,bhsc,bhtc->bhta", E, k, g["Q"])        # G_tᵀ g^Q_t
            points.append((w, rho, v, q, k, A, E, g, GgQ))
        out = []
        for f_hat, C_t, W in bases:
            k_out, k_in = W.shape[1], C_t.shape[0]
            Omega = a_.W_O @ W                                                # (H, d_h, k_out)
            Lam = {n: torch.einsum("jd,hda->hja", C_t, self.ln.projected(Wt.permute(1, 0, 2).reshape(self.d, -1))
                                   .reshape(self.d, H, -1).permute(1, 0, 2))
                   for n, Wt in (("V", a_.W_V), ("Q", a_.W_Q), ("K", a_.W_K))}
            fixed = torch.cat([(W.T @ C_t.T)[None], torch.einsum("hak,hja->hkj", Omega, Lam["V"])]).to(dtype)
            Om, LQ, LK = Omega.to(dtype), Lam["Q"].to(dtype), Lam["K"].to(dtype)
            E_acc = torch.zeros(k_out, k_in, dtype=F64, device=x.device)
            size = max(1, min(chunk_elements, 2 ** 19) // max(1, T * k_out * k_in))
            for start in range(0, B, size):
                sl = slice(start, start + size)
                f = f_hat[sl].to(dtype)
                b_ = f.shape[0]
                M = fixed[0] * f[:, :, None, :]                               # (b, T, k_out, k_in)
                for w, rho, v, q, k, A, E, g, GgQ in points:
                    rho_, v_ = rho[sl].to(dtype), v[sl].to(dtype)
                    q, k, A, E = q[sl].to(dtype), k[sl].to(dtype), A[sl].to(dtype), E[sl].to(dtype)
                    gV, gK, GgQ_ = g["V"][sl].to(dtype), g["K"][sl].to(dtype), GgQ[sl].to(dtype)
                    b_s = v_ @ C_t.T.to(dtype)                                # (b, T, k_in)
                    bf = b_s * f                                              # b_s ⊙ f̂_s
                    scales = w * torch.einsum("bhts,bs,bsj->hbtj", A, rho_, f)  # ∑_s A_ts ρ_s f̂_s
                    for h in range(H):
                        M.addcmul_(fixed[1 + h], scales[h][:, :, None, :])
                    Psi = torch.einsum("bhts,bs,hak,bhsa->btks", A, rho_, Om, gV)   # ∑_h A_ts ρ_s Ωᵀ g^V_s
                    M.sub_(Psi @ bf[:, None], alpha=w)
                    qv = torch.einsum("hak,bhta->btk", Om, GgQ_)              # ∑_h Ωᵀ G_tᵀ g^Q_t
                    M.sub_((c * w) * (rho_[:, :, None, None] * qv[:, :, :, None] * bf[:, :, None, :]))
                    U = torch.einsum("hak,bhtsa->btkhs", Om, E).reshape(b_, T, k_out, H * T)
                    qgK = torch.einsum("bhta,bhsa->bhts", q, gK)              # q_t·g^K_s
                    kLQ = torch.einsum("bhsa,hja->bhsj", k, LQ)
                    qLK = torch.einsum("bhta,hja->bhtj", q, LK)
                    V = ((rho_[:, None, :, None, None] * kLQ[:, :, None] * f[:, None, :, None, :])
                         + rho_[:, None, None, :, None] * (qLK[:, :, :, None] - qgK[..., None] * b_s[:, None, None])
                         * f[:, None, None, :, :])                           # (b, H, t, s, k_in)
                    V = V.permute(0, 2, 1, 3, 4).reshape(b_, T, H * T, k_in)
                    M.add_(U @ V, alpha=w * c)
                E_acc += M.square_().sum((0, 1)).to(F64)
            out.append(E_acc)
        return out
