"""TransformerLens models with LayerNorm and GELU against an explicit forward written from their weights.

evaluation.lib.explicit computes the residual streams and logits of a HookedTransformer-format state
dict in plain torch (no hooks, no bridge, no run_model); loading (evaluation.io.checkpoints) and LIB
(evaluation.lib.fit) are checked against it, LIB through the naive reference with the explicit forward's
jacrev Jacobians.
"""

import pytest
import torch

from evaluation.io.checkpoints import load_checkpoint
from evaluation.lib.explicit import ExplicitTransformer, ExplicitTransformerForward
from evaluation.lib.fit import LIBConfig, fit_lib
from evaluation.lib.naive import naive_fit_lib
from interp_train.sites import run_model
from tests.test_lib import assert_same_fit

F64 = torch.float64


def config(n_layers=1, act_fn="gelu", normalization_type="LN"):
    return dict(n_layers=n_layers, d_model=8, n_heads=2, d_head=4, d_mlp=12, d_vocab=7, d_vocab_out=5, n_ctx=5,
                act_fn=act_fn, normalization_type=normalization_type)


def random_state_dict(cfg, seed=0):
    """Random HookedTransformer-format weights, every bias and LayerNorm parameter non-trivial;
    float32 numbers (the loader builds a float32 model) held in float64."""
    g = torch.Generator().manual_seed(seed)
    d, H, dh, m = cfg["d_model"], cfg["n_heads"], cfg["d_head"], cfg["d_mlp"]

    def r(*shape, scale=0.5, offset=0.0):
        return offset + scale * torch.randn(*shape, generator=g, dtype=F64)

    sd = {"embed.W_E": r(cfg["d_vocab"], d), "pos_embed.W_pos": r(cfg["n_ctx"], d)}
    ln = cfg["normalization_type"] == "LN"
    for i in range(cfg["n_layers"]):
        b = f"blocks.{i}."
        for X in "QKV":
            sd |= {f"{b}attn.W_{X}": r(H, d, dh), f"{b}attn.b_{X}": r(H, dh, scale=0.2)}
        sd |= {f"{b}attn.W_O": r(H, dh, d), f"{b}attn.b_O": r(d, scale=0.2), f"{b}mlp.W_in": r(d, m),
               f"{b}mlp.b_in": r(m, scale=0.2), f"{b}mlp.W_out": r(m, d), f"{b}mlp.b_out": r(d, scale=0.2)}
        if ln:
            sd |= {f"{b}{n}.w": r(d, scale=0.2, offset=1.0) for n in ("ln1", "ln2")}
            sd |= {f"{b}{n}.b": r(d, scale=0.2) for n in ("ln1", "ln2")}
    if ln:
        sd |= {"ln_final.w": r(d, scale=0.2, offset=1.0), "ln_final.b": r(d, scale=0.2)}
    sd |= {"unembed.W_U": r(d, cfg["d_vocab_out"]), "unembed.b_U": r(cfg["d_vocab_out"], scale=0.2)}
    return {k: v.float().double() for k, v in sd.items()}


def resid_layers(n_layers):
    return [f"blocks.{i}.hook_resid_{kind}" for i in range(n_layers) for kind in ("pre", "mid", "post")]


def tokens(n=8, T=4, seed=1):
    return torch.randint(0, 7, (n, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("act_fn,normalization_type", [("gelu", "LN"), ("gelu", None), ("relu", "LN")])
def test_loaded_hooked_transformer_matches_the_explicit_forward(tmp_path, act_fn, normalization_type):
    cfg = config(n_layers=2, act_fn=act_fn, normalization_type=normalization_type)
    sd = random_state_dict(cfg)
    torch.save({"state_dict": {k: v.float() for k, v in sd.items()}, "config": cfg}, tmp_path / "model.pt")
    loaded = load_checkpoint(tmp_path / "model.pt")
    assert loaded.kind == "hooked-transformer"
    model, explicit, toks = loaded.model.double(), ExplicitTransformer(sd, cfg), tokens()
    names = resid_layers(2)
    res = run_model(model, toks, record=names)
    for name in names:
        torch.testing.assert_close(res.activations[name], explicit(toks, name), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(res.output, explicit(toks), atol=1e-12, rtol=1e-12)
    # the LayerNorm matters: without it the explicit forward differs
    if normalization_type == "LN":
        plain = ExplicitTransformer(sd, {**cfg, "normalization_type": None})
        assert (plain(toks) - res.output).abs().max() > 1e-2


LAYERS = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post", "output"]


@pytest.mark.parametrize("normalization_type,jacobians,methods", [
    ("LN", "structured", ["closed form: layernorm attention", "closed form: layernorm mlp",
                          "closed form: layernorm unembed"]),
    ("LN", "autograd", ["autograd (jacobians='autograd')"] * 3),
    (None, "structured", ["closed form: attention", "closed form: mlp", "closed form: unembed"]),
    (None, "autograd", ["autograd (jacobians='autograd')"] * 3),
])
def test_lib_of_a_gelu_transformer_matches_the_explicit_reference(normalization_type, jacobians, methods):
    cfg = config(act_fn="gelu", normalization_type=normalization_type)
    sd = random_state_dict(cfg, seed=2)
    from evaluation.io.checkpoints import load_hooked_transformer_state_dict

    model = load_hooked_transformer_state_dict(sd, cfg).double()
    toks = tokens(n=8, T=3)
    data = [toks[:4], toks[4:]]
    lib_cfg = LIBConfig(jacobians=jacobians)
    res = fit_lib(model, data, LAYERS, lib_cfg, progress=False)
    assert [res.methods[name] for name in LAYERS[:-1]] == methods
    ref = naive_fit_lib(model, data, LAYERS, lib_cfg, forward=ExplicitTransformerForward(ExplicitTransformer(sd, cfg)))
    assert_same_fit(res, ref)
