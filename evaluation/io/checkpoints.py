"""Loading trained models for evaluation; reads checkpoints, never writes them.

Supported inputs:

* a state dict in the old TransformerLens ``HookedTransformer`` property format (keys such as
  ``embed.W_E``, ``blocks.0.attn.W_Q`` of shape (n_heads, d_model, d_head)) plus its config
  dict; converted with TransformerLens' own ``convert_tl_checkpoint`` into a
  ``TransformerBridge.boot_native`` model. The file may hold the bare state dict or a dict
  ``{"state_dict"|"model": ..., "config"|"cfg": ...}``.
* a state dict already in the bridge's native format (``embed.weight``, ...) plus a config.
* a Lightning ``.ckpt`` from an interp-train recipe, via ``interp_train.recipes.load_recipe``.
* a local Hugging Face model directory (``config.json`` + weights, as ``save_pretrained`` writes
  it), loaded offline with ``transformers`` and wrapped by TransformerLens'
  ``TransformerBridge.boot_transformers`` (hook names ``blocks.0.hook_resid_pre``, ...; raw HF
  weights, so the logits are the HF model's own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

HT_CONFIG_KEYS = ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx")
_OPTIONAL_KEYS = ("d_vocab_out", "act_fn", "normalization_type", "attn_only", "positional_embedding_type",
                  "n_key_value_heads", "final_rms", "eps", "gated_mlp")
_STATE_KEYS = ("state_dict", "model", "model_state_dict")
_CONFIG_KEYS = ("config", "cfg")


@dataclass
class LoadedModel:
    """A model ready for evaluation and where it came from.

    kind: "hooked-transformer" (old TL format), "bridge" (native bridge state dict), "recipe" or
    "hugging-face" (a local model directory).
    datamodule: the recipe's data module (None for bare state dicts).
    """

    model: nn.Module
    kind: str
    path: Path | None = None
    config: dict = field(default_factory=dict)
    datamodule: Any = None


def bridge_config(config: Mapping[str, Any]):
    """TransformerBridgeConfig for a TL-native model from a HookedTransformer-style config dict."""
    from transformer_lens import TransformerBridgeConfig

    if not isinstance(config, Mapping):
        raise TypeError(f"a model config must be a dict, got {type(config).__name__}")
    missing = [k for k in HT_CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"model config lacks {missing}; a HookedTransformer config needs {list(HT_CONFIG_KEYS)}")
    kwargs = {k: config[k] for k in HT_CONFIG_KEYS}
    kwargs.update({k: config[k] for k in _OPTIONAL_KEYS if k in config and config[k] is not None})
    kwargs.setdefault("d_vocab_out", config["d_vocab"])
    kwargs.setdefault("act_fn", "relu")
    kwargs.setdefault("normalization_type", config.get("normalization_type"))
    kwargs["seed"] = 0  # the random init is overwritten by the checkpoint; seeded so it is reproducible
    return TransformerBridgeConfig(**kwargs)


def _native_model(config: Mapping[str, Any]):
    from transformer_lens import TransformerBridge

    return TransformerBridge.boot_native(bridge_config(config))


def _load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{what} does not match the config: missing keys {missing}, unexpected keys {unexpected}")
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"{what}: {key!r} has shape {tuple(tensor.shape)}, the config implies "
                             f"{tuple(expected[key].shape)}")
    model.load_state_dict(dict(state_dict), strict=True)


def load_hooked_transformer_state_dict(path_or_state_dict, config: Mapping[str, Any]):
    """A ``TransformerBridge`` (native) holding the weights of an old ``HookedTransformer`` state dict.

    Uses ``transformer_lens.utilities.tl_checkpoint_conversion.convert_tl_checkpoint``:
    W_Q/W_K/W_V (n_heads, d_model, d_head) -> q/k/v.weight (n_heads*d_head, d_model),
    W_O (n_heads, d_head, d_model) -> o.weight (d_model, n_heads*d_head), W_in/W_out/W_U
    transposed to nn.Linear layout, W_E/W_pos unchanged. A missing ``unembed.b_U`` is zero
    (as TransformerLens' legacy loader does). The model is returned in eval mode.
    """
    from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

    if isinstance(path_or_state_dict, (str, Path)):
        state_dict = _read_state_dict(Path(path_or_state_dict))
    else:
        state_dict = path_or_state_dict
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError("expected a HookedTransformer state dict (a dict of tensors with keys like 'embed.W_E')")
    model = _native_model(config)
    cfg = model.cfg
    try:
        converted = convert_tl_checkpoint(dict(state_dict), cfg)
    except ValueError as err:
        raise ValueError(f"cannot convert the HookedTransformer state dict: {err}") from err
    if "unembed.bias" not in converted:
        converted["unembed.bias"] = torch.zeros(cfg.d_vocab_out, dtype=converted["unembed.weight"].dtype)
    _load_strict(model, converted, "HookedTransformer state dict")
    return model.eval()


def bridge_to_hooked_transformer_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The inverse of ``convert_tl_checkpoint`` for a native bridge: bridge weights in old
    HookedTransformer property format (q.weight (H*dh, d) -> W_Q (H, d, dh), o.weight
    (d, H*dh) -> W_O (H, dh, d), nn.Linear weights transposed)."""
    cfg = model.cfg
    n_heads, d_head = cfg.n_heads, cfg.d_head
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        t = t.detach().clone()
        stem, leaf = key.rsplit(".", 1)
        if stem.endswith((".q", ".k", ".v")):
            letter = stem[-1].upper()
            base = stem[:-2]
            heads = t.shape[0] // d_head
            if leaf == "weight":
                out[f"{base}.W_{letter}"] = t.reshape(heads, d_head, -1).transpose(1, 2).contiguous()
            else:
                out[f"{base}.b_{letter}"] = t.reshape(heads, d_head)
        elif stem.endswith(".o"):
            base = stem[:-2]
            if leaf == "weight":
                out[f"{base}.W_O"] = t.T.reshape(n_heads, d_head, -1).contiguous()
            else:
                out[f"{base}.b_O"] = t
        elif stem.endswith((".in", ".out", ".gate")):
            base, name = stem.rsplit(".", 1)
            out[f"{base}.{'W' if leaf == 'weight' else 'b'}_{name}"] = t.T.contiguous() if leaf == "weight" else t
        elif stem == "unembed":
            out["unembed.W_U" if leaf == "weight" else "unembed.b_U"] = t.T.contiguous() if leaf == "weight" else t
        elif stem == "embed":
            out["embed.W_E"] = t
        elif stem == "pos_embed":
            out["pos_embed.W_pos"] = t
        else:  # LayerNorm: weight/bias -> w/b
            out[f"{stem}.{'w' if leaf == 'weight' else 'b'}"] = t
    return out


def _read_state_dict(path: Path) -> Any:
    """Reads a torch or safetensors file; FileNotFoundError / ValueError name the path."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} is a directory without a Hugging Face config.json; expected a "
                         ".pt/.pth/.ckpt/.safetensors file or a Hugging Face model directory")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"cannot read {str(path)!r} as safetensors (truncated or another format?): {err}") from err
    try:
        # weights_only: never execute pickled code from a checkpoint
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt files fail in many ways (UnpicklingError, EOFError, KeyError, ...)
        raise ValueError(
            f"cannot read {str(path)!r} as a torch checkpoint (truncated file, or not a file written by "
            f"torch.save / Lightning?): {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err


def _is_lightning(obj: Any) -> bool:
    return isinstance(obj, Mapping) and "state_dict" in obj and ("pytorch-lightning_version" in obj or "epoch" in obj)


def _load_recipe(path: Path) -> LoadedModel:
    try:
        from interp_train.recipes import load_recipe
    except ImportError as err:
        raise ValueError(
            f"{str(path)!r} is a Lightning checkpoint, but interp_train.recipes.load_recipe is not available "
            f"to rebuild its model ({err}); pass a HookedTransformer state dict with --config instead"
        ) from err
    lit_module, datamodule = load_recipe(path)
    return LoadedModel(model=lit_module.eval(), kind="recipe", path=path, datamodule=datamodule)


def is_hugging_face_dir(path) -> bool:
    """A directory holding a Hugging Face ``config.json``."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file()


def load_hugging_face(path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A TransformerBridge around the causal LM in a local Hugging Face directory, never touching the network.

    The model is read with ``local_files_only`` and handed to ``TransformerBridge.boot_transformers``
    (which forces eager attention, so hooks see the attention pattern); HF_HUB_OFFLINE is set while
    booting so that no tokenizer or config lookup reaches the Hub. Eval mode.
    """
    import contextlib
    import os

    path = Path(path)
    if not is_hugging_face_dir(path):
        raise ValueError(f"{str(path)!r} is not a Hugging Face model directory (no config.json in it)")
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformer_lens import TransformerBridge

        try:
            hf_config = AutoConfig.from_pretrained(str(path), local_files_only=True)
            hf_model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype,
                                                            attn_implementation="eager")
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"cannot load the Hugging Face model in {str(path)!r}: {type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}") from err
        with contextlib.redirect_stdout(None):
            bridge = TransformerBridge.boot_transformers(str(path), hf_model=hf_model, device="cpu", dtype=dtype)
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
    return LoadedModel(model=bridge.eval(), kind="hugging-face", path=path, config=hf_config.to_dict())


def load_checkpoint(path, config: Mapping[str, Any] | None = None) -> LoadedModel:
    """Loads a checkpoint for evaluation (read-only).

    config: HookedTransformer-style config dict for bare state dicts; if None, a config stored
    in the file (``{"state_dict": ..., "config": ...}``) is used.
    Raises FileNotFoundError for a missing file and ValueError (naming the path and what was
    expected) for truncated files, other formats and state dicts that do not fit the config.
    """
    path = Path(path)
    if is_hugging_face_dir(path):
        return load_hugging_face(path)
    obj = _read_state_dict(path)
    if _is_lightning(obj):
        return _load_recipe(path)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{str(path)!r} holds a {type(obj).__name__}; expected a state dict (a dict of tensors), "
                         "optionally wrapped as {'state_dict': ..., 'config': ...}, or a Lightning checkpoint")
    state_dict, stored_config = obj, None
    for key in _STATE_KEYS:
        if isinstance(obj.get(key), Mapping):
            state_dict = obj[key]
            stored_config = next((obj[c] for c in _CONFIG_KEYS if isinstance(obj.get(c), Mapping)), None)
            break
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{str(path)!r} holds a dict without tensors (keys {list(state_dict)[:8]}); "
                         "expected a model state dict")
    config = dict(config) if config is not None else (dict(stored_config) if stored_config is not None else None)
    if "embed.W_E" in tensors:
        if config is None:
            raise ValueError(f"{str(path)!r} is a HookedTransformer state dict without a stored config; "
                             f"pass its config (a JSON dict with {list(HT_CONFIG_KEYS)})")
        model = load_hooked_transformer_state_dict(tensors, config)
        return LoadedModel(model=model, kind="hooked-transformer", path=path, config=config)
    if "embed.weight" in tensors:
        if config is None:
            raise ValueError(f"{str(path)!r} is a TransformerBridge state dict without a stored config; "
                             f"pass its config (a JSON dict with {list(HT_CONFIG_KEYS)})")
        model = _native_model(config)
        _load_strict(model, tensors, f"bridge state dict {str(path)!r}")
        return LoadedModel(model=model.eval(), kind="bridge", path=path, config=config)
    raise ValueError(f"{str(path)!r} is a state dict of an unknown model (keys {sorted(tensors)[:6]}...); expected "
                     "a HookedTransformer ('embed.W_E', 'blocks.0.attn.W_Q', ...) or TransformerBridge "
                     "('embed.weight', ...) state dict, or a Lightning .ckpt of an interp-train recipe")
