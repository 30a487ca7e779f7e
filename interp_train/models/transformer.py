"""TransformerLens models (``TransformerBridge.boot_native``) for the token recipes.

The wrapped bridge is the submodule ``net``; its hook names (``hook_embed``,
``blocks.0.hook_resid_mid``, ``blocks.0.mlp.hook_post``, ...) are valid regularizer sites.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import nn


class Transformer(nn.Module):
    """A TransformerLens transformer: tokens (B, T) -> logits (B, T, d_vocab_out).

    Defaults are the LIB paper's modular-addition model for p = 113: d_vocab 114 (p + "="),
    d_vocab_out 113, n_ctx 3, one layer, d_model 128, 4 heads of 32, d_mlp 512, ReLU, no LayerNorm.
    init_seed None (default) draws the initialisation seed from torch's global RNG (so
    ``seed_everything(k)`` gives seed-dependent weights); an int fixes the weights.
    """

    def __init__(
        self,
        d_vocab: int = 114,
        d_vocab_out: Optional[int] = 113,
        n_ctx: int = 3,
        d_model: int = 128,
        n_heads: int = 4,
        d_head: int = 32,
        d_mlp: int = 512,
        n_layers: int = 1,
        act_fn: Literal["relu", "gelu"] = "relu",
        normalization_type: Optional[Literal["LN", "LNPre"]] = None,
        init_seed: Optional[int] = None,
    ):
        super().__init__()
        from transformer_lens import TransformerBridge, TransformerBridgeConfig

        if init_seed is None:  # boot_native reseeds torch with cfg.seed: draw it from the global RNG so seed_everything matters
            init_seed = int(torch.randint(0, 2**31 - 1, ()).item())
        cfg = TransformerBridgeConfig(
            d_model=d_model, d_head=d_head, n_layers=n_layers, n_ctx=n_ctx, n_heads=n_heads, d_vocab=d_vocab,
            d_vocab_out=d_vocab_out or d_vocab, d_mlp=d_mlp, act_fn=act_fn,
            normalization_type=normalization_type, seed=init_seed,
        )
        self.net = TransformerBridge.boot_native(cfg)
        self.n_ctx = n_ctx

    @property
    def hook_dict(self):  # lets sites resolve "hook_embed" etc. on this wrapper as well
        return self.net.hook_dict

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[-1] > self.n_ctx:
            raise ValueError(f"sequence length {tokens.shape[-1]} exceeds the model's n_ctx={self.n_ctx}")
        return self.net(tokens)
