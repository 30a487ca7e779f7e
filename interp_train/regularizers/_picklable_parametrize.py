"""Pickling for modules parametrized with ``torch.nn.utils.parametrize`` (HardConcreteL0's gates).

``register_parametrization`` swaps the module's class for a class ``Parametrized<Cls>`` made on the
fly (it holds one property per parametrized tensor) whose ``__getstate__`` raises "Serialization of
parametrized modules is only supported through state_dict()": ``pickle``, ``torch.save(model)``,
multiprocessing and anything else that pickles a model carrying the gates fail (``copy.deepcopy``
works: the class also gets a ``__deepcopy__``). ``make_picklable(module)`` gives that class a
``__reduce_ex__`` that pickles the module as an instance of its own class ``Cls`` with its
``parametrizations`` (original tensors and parametrization modules, pickled as ordinary modules),
and, on loading, registers the parametrization mechanism again with the public API and puts the
pickled ``parametrizations`` back in place — the same tensors, the same parametrization objects,
no parametrization's ``forward`` or ``right_inverse`` run (so no random draw, no change to the
originals).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


def make_picklable(module: nn.Module) -> None:
    """Lets ``module`` (parametrized) be pickled; call after every ``register_parametrization`` on it."""
    if not parametrize.is_parametrized(module):
        raise ValueError(f"make_picklable expects a parametrized module, got an unparametrized {type(module).__name__}")
    type(module).__reduce_ex__ = _reduce_parametrized


def _reduce_parametrized(module: nn.Module, protocol: int):
    (base,) = type(module).__bases__  # the class Parametrized<Cls> made by torch has one base: Cls
    state = dict(module.__dict__)
    state["_modules"] = {k: v for k, v in module._modules.items() if k != "parametrizations"}
    return _new_module, (base,), (state, module._modules["parametrizations"]), None, None, _set_state


def _new_module(cls: type) -> nn.Module:
    return cls.__new__(cls)


def _set_state(module: nn.Module, state_and_parametrizations) -> None:
    state, parametrizations = state_and_parametrizations
    module.__setstate__(state)
    for name in parametrizations:
        # Placeholder buffer + identity parametrization: makes torch inject the class and the
        # property for ``name`` (unsafe: nothing is evaluated); the pickled lists replace them below.
        module.register_buffer(name, torch.empty(0))
        parametrize.register_parametrization(module, name, nn.Identity(), unsafe=True)
    module.parametrizations = parametrizations
    make_picklable(module)
