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
* Positions (evaluation.lib.positions): one output position t₀ (causal attention) is the prefix
  through t₀ minus the prefix before it; input positions mask ρ_s in the Gram and f̂_s in the edges.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from evaluation.lib.sections.attention import AttentionSection
from evaluation.lib.sections.base import recognizer
from evaluation.lib.sections.layernorm_attention_edges import edges_all
from evaluation.lib.sections.layernorm_position_wise import LayerNormParams, layer_norm_params
from evaluation.lib.sections.transformer_lens import bridge_of, inner, residual_step

F64 = torch.float64
GRAM_CHUNK = 2 ** 22  # elements of the largest per-chunk tensor (examples × heads² × T² × d_head) in the Gram
GRAM_BLOCK = 2 ** 19  # elements of the largest per-block tensor (examples × positions × (heads · d_head)²)


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

    def supports_positions(self, input_indexed: bool, output_indexed: bool) -> bool:
        """An output position t₀ restricts causal attention exactly (see ``gram``); input positions
        restrict any attention (a mask on ρ_s in the Gram, f̂ zero elsewhere in the edges)."""
        return self.attn.causal or not output_indexed

    def forward(self, x: Tensor, inputs_at: list[int] | None = None, outputs_at: list[int] | None = None) -> Tensor:
        """x (B, T, d) float64 -> (B, T', d) at the output positions (all when None)."""
        y, _, _ = self.ln.parts(x)
        *_, o = self.attn._heads(y)
        out = x + torch.einsum("bhta,hae->bte", o, self.attn.W_O) + self.attn.b_O
        return out if outputs_at is None else out[:, outputs_at]

    @staticmethod
    def _output_position(outputs_at) -> int | None:
        if outputs_at is None:
            return None
        if len(outputs_at) != 1:
            raise ValueError(f"one output position expected, got {outputs_at}")
        return outputs_at[0]

    @staticmethod
    def _input_mask(x: Tensor, inputs_at) -> Tensor | None:
        """m_s (T,) float64: 1 at the input positions, 0 elsewhere; None for every position."""
        if inputs_at is None:
            return None
        mask = torch.zeros(x.shape[1], dtype=F64, device=x.device)
        mask[inputs_at] = 1.0
        return mask

    def gram(self, x: Tensor, W: Tensor, inputs_at: list[int] | None = None,
             outputs_at: list[int] | None = None) -> Tensor:
        """∑_x ∑_{t,s} J_ts A J_tsᵀ (d × d), A = W Wᵀ, over the input positions s (all, or
        ``inputs_at``) and the output positions t (all, or one t₀).

        Input positions: every term of J_ts but the residual δ_ts I carries one LayerNorm Jacobian
        L_s, hence one factor ρ_s, so the sum over s ∈ inputs_at is the full closed form with ρ_s
        replaced by m_s ρ_s (m_s = 1 at the input positions, else 0) and B·T·A by B·∑_s m_s·A.
        Causal attention: row t of the output reads positions ≤ t only, and the LayerNorm is per
        position, so the terms of t < t₀ are the same on the prefix x[:, :t₀] as on x[:, :t₀+1]:
        the sum at t₀ alone is gram(x[:, :t₀+1]) − gram(x[:, :t₀]) (both exact closed forms)."""
        t0, mask = self._output_position(outputs_at), self._input_mask(x, inputs_at)
        if t0 is None:
            return self._gram_all(x, W, mask)
        out = self._gram_all(x[:, :t0 + 1], W, None if mask is None else mask[:t0 + 1])
        return out - self._gram_all(x[:, :t0], W, None if mask is None else mask[:t0]) if t0 > 0 else out

    def edges(self, x: Tensor, rule: tuple[list[float], list[float]], bases: list[tuple[Tensor, Tensor, Tensor]],
              chunk_elements: int, dtype: torch.dtype = F64, inputs_at: list[int] | None = None,
              outputs_at: list[int] | None = None) -> list[Tensor]:
        """∑_x ∑_t M_t² per basis over the output positions (all, or one t₀: as in ``gram``, the prefix
        through t₀ minus the prefix before it; M_t reads f̂_s for s ≤ t only).

        Input positions (``inputs_at``; f̂ (B, S, k_in) holds those positions): f̂ is zero-padded to
        every position, so that the others contribute no term, and the rule's points scale the input
        positions only (the other positions stay clean in the LayerNorm and the attention pattern)."""
        t0, mask = self._output_position(outputs_at), self._input_mask(x, inputs_at)
        if mask is not None:
            padded = []
            for f_in, C, W in bases:
                f_hat = torch.zeros(*x.shape[:2], f_in.shape[-1], dtype=f_in.dtype, device=f_in.device)
                f_hat[:, inputs_at] = f_in
                padded.append((f_hat, C, W))
            bases = padded
        if t0 is None:
            return self._edges_all(x, rule, bases, chunk_elements, dtype, mask)
        upto = self._edges_all(x[:, :t0 + 1], rule, [(f[:, :t0 + 1], C, W) for f, C, W in bases], chunk_elements,
                               dtype, None if mask is None else mask[:t0 + 1])
        if t0 == 0:
            return upto
        before = self._edges_all(x[:, :t0], rule, [(f[:, :t0], C, W) for f, C, W in bases], chunk_elements, dtype,
                                 None if mask is None else mask[:t0])
        return [a - b for a, b in zip(upto, before)]

    def _gram_all(self, x: Tensor, W: Tensor, mask: Tensor | None = None) -> Tensor:
        """∑_x ∑_{t,s} J_ts A J_tsᵀ (d × d), A = W Wᵀ, every t, s with mask[s] = 1 (None: every s)."""
        B, T, d = x.shape
        H, d_h = self.H, self.d_h
        Omega = self.attn.W_O @ W                                       # (H, d_h, k)
        Khg = torch.einsum("hak,gbk->hgab", Omega, Omega)               # W_O^h A W_O^gᵀ
        K = Khg.permute(0, 2, 1, 3).reshape(H * d_h, H * d_h)           # the same, (head, d_h) × (head, d_h)
        Bmat = torch.einsum("ek,hak->eha", W, Omega).reshape(W.shape[0], H * d_h)   # A W_Oᵀ
        acc = {"S": torch.zeros(H, 3, d_h, H, 3, d_h, dtype=F64, device=x.device),
               "R": torch.zeros(H, 3, d_h, d_h, dtype=F64, device=x.device),   # ∑_t ρ_t Z_ttᵀ blocks (u-index last)
               "Phi": torch.zeros(H, 3, d_h, d, dtype=F64, device=x.device),
               "zv": torch.zeros(H, d_h, d, dtype=F64, device=x.device),      # ∑_t ρ_t z_tt v_tᵀ
               "vv": torch.zeros(d, d, dtype=F64, device=x.device)}
        size = max(1, GRAM_CHUNK // max(1, T * T * H * d_h * 4))
        for start in range(0, B, size):
            self._gram_chunk(x[start:start + size], Khg, K, acc, mask)
        S = acc["S"].reshape(3 * H * d_h, 3 * H * d_h)
        Lp = self.L_proj
        Rm = torch.einsum("eha,hxca->ehxc", Bmat.reshape(-1, H, d_h), acc["R"]).reshape(-1, 3 * H * d_h)
        X = Rm @ Lp.T - Bmat @ acc["zv"].reshape(H * d_h, d)
        LPhi = Lp @ acc["Phi"].reshape(3 * H * d_h, d)
        count = T if mask is None else mask.sum()
        return B * count * (W @ W.T) + X + X.T + Lp @ S @ Lp.T - LPhi - LPhi.T + acc["vv"]

    def _gram_chunk(self, x, Khg, K, acc, mask=None):
        H, d_h = self.H, self.d_h
        b, T, _ = x.shape
        y, rho, v_bar = self.ln.parts(x)
        v = v_bar * rho[..., None]                                      # (b, T, d)
        if mask is not None:
            rho = rho * mask                                             # the factor ρ_s of L_s, 0 off the inputs
        q, k, A, E, _ = self.attn._heads(y)
        G_T = torch.einsum("bhtsa,bhsc->bhtac", E, k)                   # G_tᵀ[a, c] = ∑_s e_ts[a] k_s[c]
        gam_v = v * self.ln.gamma                                        # Γ v_s
        l = [torch.einsum("bsd,hda->bhsa", gam_v, Wt) for Wt in (self.attn.W_V, self.attn.W_Q, self.attn.W_K)]
        # every term is a sum over output positions t: blocks of t keep the per-block temporaries
        # (e.g. P_t, (H·d_h)² per t) small enough to be reused by the allocator instead of mapped anew
        tb = max(1, min(T, GRAM_BLOCK // (b * (H * d_h) ** 2)))
        for t0 in range(0, T, tb):
            self._gram_block(t0, min(T, t0 + tb), rho, v, q, A, E, G_T, l, Khg, K, acc)

    def _gram_block(self, t0, t1, rho, v, q, A, E, G_T, l, Khg, K, acc):
        """The Gram terms of output positions t0 ≤ t < t1 (causal: input positions s < t1 only)."""
        c, H, d_h = self.c, self.H, self.d_h
        b, T = rho.shape
        n, s_end = t1 - t0, (t1 if self.attn.causal else T)             # causal: A_ts = e_ts = 0 for s > t
        ii = torch.arange(n, device=rho.device)
        w1, w2 = rho[:, t0:t1], rho[:, t0:t1].pow(2)                     # ρ_t, ρ_t² of the block's t
        w2s, vs = rho[:, :s_end].pow(2), v[:, :s_end]                    # ρ_s², v_s
        A, E, G_T, q = A[:, :, t0:t1, :s_end], E[:, :, t0:t1, :s_end], G_T[:, :, t0:t1], q[:, :, t0:t1]
        l_V, l_Q, l_K = l[0][:, :, :s_end], l[1][:, :, t0:t1], l[2][:, :, :s_end]
        A_diag = A[:, :, ii, t0 + ii]                                    # A_tt (b, H, n)
        E_diag = E[:, :, ii, t0 + ii]                                    # e_tt (b, H, n, d_h)
        # --- S_ρ = ∑ ρ_s² Z_ts K Z_tsᵀ, blocks [h, τ, :, g, τ′, :] (τ: V, Q, K)
        Aw = A * w2s[:, None, None, :]                                   # A_ts ρ_s²
        VV = torch.einsum("bhts,bgts->hg", Aw, A)[:, :, None, None] * Khg
        VQ = c * Khg @ torch.einsum("bht,bgtac->hgac", A_diag * w2[:, None], G_T)
        VK = c * Khg @ torch.einsum("bhgta,bgtc->hgac", torch.einsum("bhts,bgtsa->bhgta", Aw, E), q)
        Gw = G_T * w2[:, None, :, None, None]
        KG = torch.einsum("xga,bgtac->btxgc", K.reshape(H * d_h, H, d_h), G_T)       # K G^g_tᵀ, rows (h, a)
        QQ = c * c * torch.einsum("bhtac,bthagd->hcgd", Gw, KG.reshape(b, n, H, d_h, H, d_h))
        Ke = torch.einsum("hgax,ngtx->nhgta", Khg, E_diag)              # K_hg e^g_tt
        QK = c * c * torch.einsum("bhgtc,bgtd->hgcd", torch.einsum("bhtac,bhgta->bhgtc", Gw, Ke), q)
        # KK = c² ∑_t q^h_t ⊗ q^g_t ∑_s ρ_s² e^h_ts K_hg e^g_ts, via P_t = ∑_s ρ_s² e_ts e_tsᵀ (all heads)
        Es = (E * rho[:, None, None, :s_end, None]).permute(0, 2, 3, 1, 4).reshape(b, n, s_end, H * d_h)
        P = Es.transpose(2, 3) @ Es                                      # (b, n, H·d_h, H·d_h)
        omega_hg = P.mul_(K).reshape(b, n, H, d_h, H, d_h).sum((3, 5))  # (b, n, H, H)
        KK = c * c * torch.einsum("bhgta,bgtc->hgac", omega_hg.permute(0, 2, 3, 1)[..., None] * q[:, :, None], q)
        S = acc["S"]
        S[:, 0, :, :, 0] += VV.permute(0, 2, 1, 3)
        S[:, 0, :, :, 1] += VQ.permute(0, 2, 1, 3)
        S[:, 1, :, :, 0] += VQ.permute(1, 3, 0, 2)
        S[:, 0, :, :, 2] += VK.permute(0, 2, 1, 3)
        S[:, 2, :, :, 0] += VK.permute(1, 3, 0, 2)
        S[:, 1, :, :, 1] += QQ
        S[:, 1, :, :, 2] += QK.permute(0, 2, 1, 3)
        S[:, 2, :, :, 1] += QK.permute(1, 3, 0, 2)
        S[:, 2, :, :, 2] += KK.permute(0, 2, 1, 3)
        # --- R = ∑_t ρ_t Z_ttᵀ: V: A_tt I, Q: c G_tᵀ, K: c e_tt q_tᵀ (rows: y-index, columns: u-index)
        eye = torch.eye(d_h, dtype=F64, device=rho.device)
        R = acc["R"]
        R[:, 0] += torch.einsum("bht,bt->h", A_diag, w1)[:, None, None] * eye
        R[:, 1] += c * torch.einsum("bhtac,bt->hca", G_T, w1)
        R[:, 2] += c * torch.einsum("bhta,bhtc->hca", E_diag * w1[:, None, :, None], q)
        # --- z_ts = Z_tsᵀ ℓ_s (u-space, all heads) and ζ_ts = K z_ts
        qlK = torch.einsum("bhta,bhsa->bhts", q, l_K)                    # q_t·ℓ^K_s
        GlQ = torch.einsum("bhtac,bhtc->bhta", G_T, l_Q)                 # G_tᵀ ℓ^Q_t
        z = A[..., None] * l_V[:, :, None] + c * qlK[..., None] * E      # (b, H, n, s, d_h)
        z[:, :, ii, t0 + ii] += c * GlQ
        acc["zv"] += torch.einsum("bhta,btd->had", z[:, :, ii, t0 + ii] * w1[:, None, :, None], v[:, t0:t1])
        zeta = (z.permute(0, 2, 3, 1, 4).reshape(b, n, s_end, H * d_h) @ K).reshape(b, n, s_end, H, d_h).permute(0, 3, 1, 2, 4)
        # --- scalar term ∑ ρ_s² (z_ts·ζ_ts) v_s v_sᵀ
        omega = torch.einsum("bhtsa,bhtsa->bs", z, zeta) * w2s
        acc["vv"] += torch.einsum("bsd,bse->de", vs * omega[..., None], vs)
        # --- Φ = ∑ ρ_s² Z_ts ζ_ts v_sᵀ: V: ∑_t A_ts ζ_ts, Q: c G_s ζ_ss (s in the block), K: ∑_t c (e_ts·ζ_ts) q_t
        phi_V = torch.einsum("bhts,bhtsa->bhsa", A, zeta)
        phi_Q = c * torch.einsum("bhsac,bhsa->bhsc", G_T, zeta[:, :, ii, t0 + ii])
        phi_K = c * torch.einsum("bhts,bhtc->bhsc", (E * zeta).sum(-1), q)
        for tau, phi, ws, vv in ((0, phi_V, w2s, vs), (1, phi_Q, w2, v[:, t0:t1]), (2, phi_K, w2s, vs)):
            acc["Phi"][:, tau] += torch.einsum("bhsa,bsd->had", phi * ws[:, None, :, None], vv)

    def _edges_all(self, x: Tensor, rule: tuple[list[float], list[float]], bases: list[tuple[Tensor, Tensor, Tensor]],
                   chunk_elements: int, dtype: torch.dtype = F64, mask: Tensor | None = None) -> list[Tensor]:
        """∑_x ∑_t M_t² per basis, every position, (k_out − 1, k_in); bases are (f̂ (B, T, k_in), C̃ (k_in, d_in), W (d_out, k_out − 1)).
        mask (T,): the positions the rule's points scale (the others stay at α = 1); None: every position.
        Computed by layernorm_attention_edges.edges_all (terms regrouped by what multiplies f̂)."""
        return edges_all(self, x, rule, bases, chunk_elements, dtype, mask)


def _attention_scale(attn: nn.Module, d_head: int, layer: int) -> float | None:
    if type(attn).__name__ == "NativeAttention":
        return float(attn.scale)
    if type(attn).__name__ == "GPT2Attention":
        if getattr(attn, "reorder_and_upcast_attn", False) or getattr(attn, "is_cross_attention", False):
            return None
        scale = math.sqrt(d_head) if getattr(attn, "scale_attn_weights", True) else 1.0
        return scale * (layer + 1) if getattr(attn, "scale_attn_by_inverse_layer_idx", False) else scale
    return None


@recognizer(order=20)
def recognize(model: nn.Module, l_in: str, l_out: str):
    """A TransformerLens bridge's LN1 + attention + residual (resid_pre -> resid_mid); natively
    booted (NativeAttention) or Hugging Face GPT-2 (GPT2Attention)."""
    bridge, step = bridge_of(model), residual_step(l_in, l_out)
    if bridge is None or step is None or step[1] != "attention":
        return None
    i, cfg = step[0], bridge.cfg
    block = bridge.blocks[i]
    ln = layer_norm_params(block.ln1, cfg.d_model)
    if ln is None:
        return None, "attention not behind a LayerNorm"
    attn = inner(block.attn)
    scale = _attention_scale(attn, cfg.d_head, i)
    if (scale is None or getattr(attn, "rotary", None) is not None
            or getattr(attn, "attn_scores_soft_cap", 0) > 0 or getattr(attn, "kv_repeats", 1) != 1
            or str(getattr(cfg, "positional_embedding_type", "standard")) == "rotary"):
        return None, f"attention {type(attn).__name__} is not plain multi-head attention"
    a = block.attn
    return LayerNormAttentionSection(ln, a.W_Q, a.b_Q, a.W_K, a.b_K, a.W_V, a.b_V, a.W_O, a.b_O, scale,
                                     bool(getattr(attn, "causal", True))), "layernorm attention"
