"""Recognises the LayerNorm sections of a TransformerLens bridge (GPT-2 style pre-LN blocks).

resid_pre -> resid_mid: LN1 + attention + residual (LayerNormAttentionSection);
resid_mid -> resid_post: LN2 + element-wise MLP + residual (LayerNormPositionWiseSection);
last resid_post -> output: final LayerNorm + unembedding (LayerNormPositionWiseSection).
Works for natively booted bridges (NativeAttention/NativeMLP) and Hugging Face GPT-2 models
booted with ``TransformerBridge.boot_transformers`` (GPT2Attention/GPT2MLP); the weights are read
through the bridge's TransformerLens-layout properties (W_Q, W_in, W_U, ...). Anything unusual
(RMSNorm, rotary embeddings, grouped key/value heads, gated MLPs) is not recognised; whatever is
recognised is still checked against autograd on the first batch.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from evaluation.lib.sections.layernorm_attention import LayerNormAttentionSection
from evaluation.lib.sections.layernorm_position_wise import LayerNormParams, LayerNormPositionWiseSection

OUTPUT = "output"
_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|mid|post)$")
ATTENTIONS = ("NativeAttention", "GPT2Attention")
MLPS = ("NativeMLP", "GPT2MLP")


def _inner(component: nn.Module) -> nn.Module:
    return getattr(component, "_original_component", component)


def layer_norm_params(norm_bridge: nn.Module, d: int) -> LayerNormParams | None:
    """γ, β, ε of a bridge's LayerNorm component as the bridge applies it; None if it is not a LayerNorm."""
    ln = _inner(norm_bridge)
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


def _attention_scale(attn: nn.Module, d_head: int, layer: int) -> float | None:
    if type(attn).__name__ == "NativeAttention":
        return float(attn.scale)
    if type(attn).__name__ == "GPT2Attention":
        if getattr(attn, "reorder_and_upcast_attn", False) or getattr(attn, "is_cross_attention", False):
            return None
        scale = math.sqrt(d_head) if getattr(attn, "scale_attn_weights", True) else 1.0
        return scale * (layer + 1) if getattr(attn, "scale_attn_by_inverse_layer_idx", False) else scale
    return None


def layernorm_section(bridge: nn.Module, l_in: str, l_out: str):
    """(section, description) for a LayerNorm section of ``bridge``, else (None, why not)."""
    m_in = _RESID.match(l_in)
    if m_in is None:
        return None, "not a TransformerLens residual-stream section"
    i, kind = int(m_in.group(1)), m_in.group(2)
    m_out = _RESID.match(l_out)
    target = (int(m_out.group(1)), m_out.group(2)) if m_out else (None, l_out)
    if kind == "post" and target == (i + 1, "mid"):  # resid_post of block i is resid_pre of block i + 1
        i, kind = i + 1, "pre"
    cfg = bridge.cfg
    d = cfg.d_model
    if kind == "pre" and target == (i, "mid"):
        block = bridge.blocks[i]
        ln = layer_norm_params(block.ln1, d)
        if ln is None:
            return None, "attention not behind a LayerNorm"
        attn = _inner(block.attn)
        scale = _attention_scale(attn, cfg.d_head, i)
        if (scale is None or getattr(attn, "rotary", None) is not None
                or getattr(attn, "attn_scores_soft_cap", 0) > 0 or getattr(attn, "kv_repeats", 1) != 1
                or str(getattr(cfg, "positional_embedding_type", "standard")) == "rotary"):
            return None, f"attention {type(attn).__name__} is not plain multi-head attention"
        a = block.attn
        return LayerNormAttentionSection(ln, a.W_Q, a.b_Q, a.W_K, a.b_K, a.W_V, a.b_V, a.W_O, a.b_O, scale,
                                         bool(getattr(attn, "causal", True))), "layernorm attention"
    if kind == "mid" and target == (i, "post"):
        block = bridge.blocks[i]
        ln = layer_norm_params(block.ln2, d)
        if ln is None:
            return None, "MLP not behind a LayerNorm"
        mlp = _inner(block.mlp)
        act_fn = str(getattr(cfg, "act_fn", "")).lower()
        act = getattr(mlp, "act", None)
        if (type(mlp).__name__ not in MLPS or act is None or getattr(mlp, "ln", None) is not None
                or act_fn.startswith("solu") or getattr(cfg, "gated_mlp", False)):
            return None, f"MLP {type(mlp).__name__} ({act_fn}) is not an element-wise MLP"
        m = block.mlp
        eye = torch.eye(d, dtype=torch.float64, device=m.W_in.device)
        return LayerNormPositionWiseSection(ln, eye, None, m.b_out, m.W_in, m.b_in, act, m.W_out), "layernorm mlp"
    if kind == "post" and l_out == OUTPUT and i == len(bridge.blocks) - 1:
        ln = layer_norm_params(bridge.ln_final, d)
        if ln is None:
            return None, "unembedding not behind a LayerNorm"
        return LayerNormPositionWiseSection(ln, None, bridge.unembed.W_U, bridge.unembed.b_U), "layernorm unembed"
    return None, f"no LayerNorm closed form for {l_in} -> {l_out}"
