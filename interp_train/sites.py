"""Where a regularizer looks inside a model: the model input or a named activation.

A *site* name is ``"input"`` (the tensor passed to ``model(...)``), a module path
(``"net.2"``: the module's output), or a TransformerLens hook name (``"hook_embed"``,
``"blocks.0.hook_resid_mid"``), also when the TransformerLens model is a submodule of the
model that is called (``"model.hook_embed"`` or just ``"hook_embed"``).

``run_model`` performs one forward pass that records the activations at the requested sites
(part of the autograd graph, so gradients and Jacobians with respect to them are available)
and optionally replaces them (``edit``), which is how perturbation-based regularizers act on
intermediate activations.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

INPUT = "input"
Edit = Callable[[torch.Tensor], torch.Tensor]
_MAX_LISTED = 120


def _tl_roots(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Submodules (including the root) that expose a TransformerLens ``hook_dict``."""
    return [(prefix, m) for prefix, m in model.named_modules() if isinstance(getattr(m, "hook_dict", None), dict)]


def available_sites(model: nn.Module) -> list[str]:
    """Names that ``resolve_site`` accepts for this model (besides ``"input"``)."""
    names: list[str] = []
    for prefix, root in _tl_roots(model):
        names.extend(f"{prefix}.{h}" if prefix else h for h in root.hook_dict)
    hidden = "_original_component"  # TransformerLens bridge internals, reachable by hook names instead
    names.extend(n for n, _ in model.named_modules() if n and hidden not in n and n not in names)
    return names


def _unknown_site_error(model: nn.Module, name: str) -> KeyError:
    names = available_sites(model)
    shown = ", ".join(names[:_MAX_LISTED])
    more = f", ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return KeyError(
        f"unknown layer {name!r} in {type(model).__name__}; use 'input' or one of: {shown}{more}"
    )


def resolve_site(model: nn.Module, name: str) -> nn.Module | None:
    """The module whose output is the activation called ``name``; None for ``"input"``.

    Raises KeyError listing the available names when ``name`` is unknown.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"a layer name must be a non-empty string, got {name!r}")
    if name == INPUT:
        return None
    for prefix, root in _tl_roots(model):
        if name in root.hook_dict:
            return root.hook_dict[name]
        if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in root.hook_dict:
            return root.hook_dict[name[len(prefix) + 1:]]
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    raise _unknown_site_error(model, name)


def check_sites(model: nn.Module, names: Iterable[str]) -> None:
    """Resolves every name now so that a typo fails before training starts."""
    for name in names:
        resolve_site(model, name)


@dataclass
class ForwardResult:
    """Output of one forward pass and the activations recorded at the requested sites."""

    output: torch.Tensor
    activations: dict[str, torch.Tensor] = field(default_factory=dict)


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot use a layer whose output is {type(out).__name__}; expected a tensor")


def _replace_first(out, new: torch.Tensor):
    if isinstance(out, torch.Tensor):
        return new
    return type(out)([new, *out[1:]])


def model_output(out) -> torch.Tensor:
    """Logits from what a model returns (a tensor, a tuple, or an object with ``.logits``)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    return _first_tensor(out)


def check_float_input(inputs: torch.Tensor, what: str) -> None:
    if not torch.is_floating_point(inputs):
        raise TypeError(
            f"{what} differentiates with respect to the model input, but the input has dtype "
            f"{inputs.dtype} (integer tokens have no gradient); name an activation instead, "
            "e.g. at='hook_embed' for a TransformerLens model or the module path of the embedding"
        )


RESID_MID = "hook_resid_mid"


def _resid_mid_neighbours(model: nn.Module, name: str):
    """(resid_pre hook, attn_out hook) of the TransformerLens block whose resid_mid is ``name``, or None."""
    stem = name[: -len(RESID_MID)]
    try:
        pre_hook, attn_out_hook = resolve_site(model, stem + "hook_resid_pre"), resolve_site(model, stem + "hook_attn_out")
    except KeyError:
        return None
    if pre_hook is None or attn_out_hook is None:
        return None
    return pre_hook, attn_out_hook


def _edit_resid_mid_through_attention(pre_hook: nn.Module, attn_out_hook: nn.Module, fn: Edit):
    """Hooks that edit a TransformerLens bridge's resid_mid on the residual stream itself.

    The bridge aliases ``hook_resid_mid`` to the LayerNorm/MLP input (``ln2.hook_in``): an edit
    there changes what the MLP reads but not the residual that is added to the MLP's output, so
    resid_post would not depend on the edited value through the skip connection. Editing the
    attention output instead, attn_out -> fn(resid_pre + attn_out) − resid_pre, makes the sum that
    both paths read equal to the edited resid_mid (resid_pre as edited by any earlier hook).
    """
    seen: dict[str, torch.Tensor] = {}

    def keep_pre(_mod, _inp, out):
        seen["pre"] = _first_tensor(out)

    def edit_sum(_mod, _inp, out):
        if "pre" not in seen:
            return out
        pre = seen.pop("pre")
        return _replace_first(out, fn(pre + _first_tensor(out)) - pre)

    return [pre_hook.register_forward_hook(keep_pre), attn_out_hook.register_forward_hook(edit_sum)]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Puts the model in eval mode (no dropout, batch-norm running stats) and restores it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def run_model(
    model: nn.Module,
    inputs: torch.Tensor,
    record: Iterable[str] = (),
    edit: Mapping[str, Edit] | None = None,
    input_requires_grad: bool = False,
) -> ForwardResult:
    """One forward pass of ``model(inputs)``.

    record: site names whose (edited) activations are returned, attached to the graph.
    edit: site name -> function applied to the clean activation; its result is used downstream.
    input_requires_grad: make the floating-point input a leaf that requires grad, so that
        gradients with respect to ``"input"`` exist.
    """
    edit = dict(edit or {})
    record = list(dict.fromkeys(record))
    activations: dict[str, torch.Tensor] = {}
    x = inputs
    if INPUT in edit or INPUT in record:
        check_float_input(inputs, "this regularizer")
    if input_requires_grad and torch.is_floating_point(x) and not x.requires_grad:
        x = x.detach().requires_grad_(True)
    if INPUT in edit:
        x = edit[INPUT](x)
    if INPUT in record:
        activations[INPUT] = x

    handles = []
    with contextlib.ExitStack() as stack:
        rerouted = {n: (edit.pop(n), sites) for n in list(edit) if n.endswith(RESID_MID)
                    for sites in [_resid_mid_neighbours(model, n)] if sites is not None}
        for name in dict.fromkeys([*record, *edit]):
            module = resolve_site(model, name)
            if module is None:
                continue

            def hook(_mod, _inp, out, name=name):
                act = _first_tensor(out)
                if name in edit:
                    act = edit[name](act)
                    out = _replace_first(out, act)
                if name in record:
                    activations[name] = act
                return out

            handles.append(module.register_forward_hook(hook))
        for name, (fn, sites) in rerouted.items():  # after the hooks above, so that they see the edited resid_pre
            handles.extend(_edit_resid_mid_through_attention(*sites, fn))
        stack.callback(lambda: [h.remove() for h in handles])
        output = model_output(model(x))
    missing = [n for n in record if n not in activations]
    if missing:
        raise RuntimeError(f"layer(s) {missing} were not called during the forward pass of {type(model).__name__}")
    return ForwardResult(output=output, activations=activations)
