"""Loading HookedTransformer-format checkpoints into a TransformerBridge, and bad files."""

import json
import math

import pytest
import torch

from evaluation.io.checkpoints import (
    bridge_to_hooked_transformer_state_dict, load_checkpoint, load_hooked_transformer_state_dict,
)

CONFIG = dict(n_layers=2, d_model=12, n_heads=3, d_head=4, d_mlp=20, d_vocab=7, d_vocab_out=6, n_ctx=5,
              act_fn="relu", normalization_type=None)


def random_ht_state_dict(cfg=CONFIG, seed=0):
    """An old-format HookedTransformer state dict with random weights (and non-zero biases)."""
    g = torch.Generator().manual_seed(seed)
    H, d, dh, dm = cfg["n_heads"], cfg["d_model"], cfg["d_head"], cfg["d_mlp"]
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.3  # noqa: E731
    sd = {"embed.W_E": r(cfg["d_vocab"], d), "pos_embed.W_pos": r(cfg["n_ctx"], d)}
    for l in range(cfg["n_layers"]):
        for x in "QKV":
            sd[f"blocks.{l}.attn.W_{x}"] = r(H, d, dh)
            sd[f"blocks.{l}.attn.b_{x}"] = r(H, dh)
        sd[f"blocks.{l}.attn.W_O"] = r(H, dh, d)
        sd[f"blocks.{l}.attn.b_O"] = r(d)
        sd[f"blocks.{l}.mlp.W_in"] = r(d, dm)
        sd[f"blocks.{l}.mlp.b_in"] = r(dm)
        sd[f"blocks.{l}.mlp.W_out"] = r(dm, d)
        sd[f"blocks.{l}.mlp.b_out"] = r(d)
    sd["unembed.W_U"] = r(d, cfg["d_vocab_out"])
    sd["unembed.b_U"] = r(cfg["d_vocab_out"])
    return sd


def reference_logits(sd, tokens, cfg=CONFIG):
    """HookedTransformer forward written out: causal attention, ReLU MLP, no LayerNorm."""
    T = tokens.shape[1]
    x = sd["embed.W_E"][tokens] + sd["pos_embed.W_pos"][:T]
    causal = torch.ones(T, T).tril().bool()
    for l in range(cfg["n_layers"]):
        p = lambda n: sd[f"blocks.{l}.{n}"]  # noqa: E731
        q = torch.einsum("btd,hde->bthe", x, p("attn.W_Q")) + p("attn.b_Q")
        k = torch.einsum("btd,hde->bthe", x, p("attn.W_K")) + p("attn.b_K")
        v = torch.einsum("btd,hde->bthe", x, p("attn.W_V")) + p("attn.b_V")
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(cfg["d_head"])
        scores = scores.masked_fill(~causal, float("-inf"))
        z = torch.einsum("bhqk,bkhe->bqhe", scores.softmax(-1), v)
        x = x + torch.einsum("bqhe,hed->bqd", z, p("attn.W_O")) + p("attn.b_O")
        hidden = torch.relu(x @ p("mlp.W_in") + p("mlp.b_in"))
        x = x + hidden @ p("mlp.W_out") + p("mlp.b_out")
    return x @ sd["unembed.W_U"] + sd["unembed.b_U"]


def test_loaded_bridge_matches_hand_written_forward():
    sd = random_ht_state_dict()
    model = load_hooked_transformer_state_dict(sd, CONFIG)
    tokens = torch.randint(0, CONFIG["d_vocab"], (4, CONFIG["n_ctx"]))
    with torch.no_grad():
        got = model(tokens)
    want = reference_logits(sd, tokens)
    assert got.shape == (4, CONFIG["n_ctx"], CONFIG["d_vocab_out"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_round_trip_native_to_ht_to_native():
    from evaluation.io.checkpoints import _native_model

    native = _native_model(CONFIG)
    with torch.no_grad():  # non-zero biases so that bias conversions are exercised too
        for name, p in native.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    ht = bridge_to_hooked_transformer_state_dict(native)
    assert ht["blocks.0.attn.W_Q"].shape == (3, 12, 4) and ht["blocks.1.attn.W_O"].shape == (3, 4, 12)
    assert ht["unembed.W_U"].shape == (12, 6) and ht["blocks.0.mlp.W_in"].shape == (12, 20)
    back = load_hooked_transformer_state_dict(ht, CONFIG)
    for key, t in native.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], t, atol=0, rtol=0)
    tokens = torch.randint(0, 7, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(reference_logits(ht, tokens), native(tokens), atol=1e-5, rtol=1e-5)


def test_load_checkpoint_from_file_with_stored_or_given_config(tmp_path):
    sd = random_ht_state_dict()
    bare, wrapped = tmp_path / "bare.pth", tmp_path / "wrapped.pt"
    torch.save(sd, bare)
    torch.save({"state_dict": sd, "config": CONFIG}, wrapped)
    before = bare.read_bytes()
    tokens = torch.randint(0, 7, (2, 5))
    for loaded in (load_checkpoint(bare, config=CONFIG), load_checkpoint(wrapped)):
        assert loaded.kind == "hooked-transformer"
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(tokens), reference_logits(sd, tokens), atol=1e-5, rtol=1e-5)
    assert bare.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.pth", "wrapped.pt"]  # nothing written


def test_missing_unembed_bias_is_zero():
    sd = random_ht_state_dict()
    sd.pop("unembed.b_U")
    model = load_hooked_transformer_state_dict(sd, CONFIG)
    assert torch.equal(model.state_dict()["unembed.bias"], torch.zeros(6))


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pt' does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    text = tmp_path / "notes.pt"
    text.write_text("hello, I am not a checkpoint\n")
    with pytest.raises(ValueError, match=r"notes\.pt' as a torch checkpoint"):
        load_checkpoint(text)
    good = tmp_path / "good.pt"
    torch.save({"state_dict": random_ht_state_dict(), "config": CONFIG}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"truncated\.pt' as a torch checkpoint \(truncated file"):
        load_checkpoint(truncated)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(ValueError, match=r"tensor\.pt' holds a Tensor; expected a state dict"):
        load_checkpoint(tensor)
    bare = tmp_path / "bare.pt"
    torch.save(random_ht_state_dict(), bare)
    with pytest.raises(ValueError, match=r"HookedTransformer state dict without a stored config"):
        load_checkpoint(bare)
    other = tmp_path / "other.pt"
    torch.save({"net.0.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(ValueError, match=r"state dict of an unknown model"):
        load_checkpoint(other)
    json_file = tmp_path / "config.json"
    json_file.write_text(json.dumps(CONFIG))
    with pytest.raises(ValueError, match=r"config\.json' as a torch checkpoint"):
        load_checkpoint(json_file)


def test_config_mismatch_is_reported():
    wrong = dict(CONFIG, n_heads=4, d_head=3)  # same d_model, different head split
    with pytest.raises(ValueError, match=r"W_Q' has shape \(3, 12, 4\), expected \(4, 12, 3\)"):
        load_hooked_transformer_state_dict(random_ht_state_dict(), wrong)
    with pytest.raises(ValueError, match=r"model config lacks \['d_mlp'\]"):
        load_hooked_transformer_state_dict(random_ht_state_dict(), {k: v for k, v in CONFIG.items() if k != "d_mlp"})


def test_lightning_checkpoint_without_recipe_loader(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "interp_train.recipes", None)  # import fails: loader not available
    ckpt = tmp_path / "run.ckpt"
    torch.save({"state_dict": {"model.w": torch.zeros(2)}, "pytorch-lightning_version": "2.6.0", "epoch": 3}, ckpt)
    with pytest.raises(ValueError, match=r"run\.ckpt' is a Lightning checkpoint, but interp_train\.recipes\.load_recipe"):
        load_checkpoint(ckpt)
