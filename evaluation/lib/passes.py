"""The fit's passes over the data: the moments pass, and the batches every section pass reads.

Pass 1 (``gather_moments``) runs the model once per batch, accumulates the float64 moments of
every node layer at its positions and keeps, within a memory budget (``ActivationCache``), the
activations of the sites the closed-form sections read. A section pass (``DataPasses.batches``)
then reads those cached activations instead of running the model, when every section of the pass
can; otherwise it runs the model per batch (once, for every section of the pass that needs it).
"""

from __future__ import annotations

import copy
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from interp_train.sites import run_model
from evaluation.lib.activation_cache import ActivationCache
from evaluation.lib.bases import Moments
from evaluation.lib.edges import OUTPUT, as_positions
from evaluation.lib.positions import select, site_of
from evaluation.lib.sections.base import Batch

try:  # progress bars are optional
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    def tqdm(it, **_):
        return it


def model_input(batch, input_fn: Callable | None, dtype: torch.dtype | None = None,
                device: torch.device | None = None):
    """The model input of a batch (``input_fn(batch)``, its first element, or the batch) on ``device``,
    floating-point inputs cast to ``dtype``."""
    if input_fn is not None:
        x = input_fn(batch)
    elif isinstance(batch, (tuple, list)):
        x = batch[0]
    else:
        x = batch
    if device is not None and isinstance(x, Tensor) and x.device != device:
        x = x.to(device)  # the data follow the model
    if dtype is not None and isinstance(x, Tensor) and torch.is_floating_point(x):
        x = x.to(dtype)  # float inputs follow a section model of another dtype
    return x


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (or buffers); the CPU for a model with neither."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def section_model(model: nn.Module, jacobian_dtype: str | None) -> tuple[nn.Module, torch.dtype | None]:
    """The model that runs the section passes: ``model`` itself, or an eval-mode copy in ``jacobian_dtype``."""
    if jacobian_dtype is None:
        return model, None
    dtype = getattr(torch, jacobian_dtype)
    params = [p for p in model.parameters() if torch.is_floating_point(p)]
    if params and all(p.dtype == dtype for p in params):
        return model, None
    return copy.deepcopy(model).to(dtype).eval(), dtype


def gather_moments(model, data, node_layers, input_fn, progress, device=None,
                   cache: ActivationCache | None = None) -> dict[str, Moments]:
    """Pass 1: mean and covariance of every node layer (at its positions, evaluation.lib.positions);
    fills ``cache`` with the activations of its sites (every position, float64)."""
    moments = {name: Moments() for name in node_layers}
    record = list(dict.fromkeys(site_of(n) for n in node_layers if site_of(n) != OUTPUT))
    for batch in tqdm(data, desc="LIB moments", disable=not progress):
        with torch.no_grad():
            result = run_model(model, model_input(batch, input_fn, device=device), record=record)
        for name in node_layers:
            site = site_of(name)
            act = result.output if site == OUTPUT else result.activations[site]
            rows = select(name, act.detach())  # ValueError for a position index the activation lacks
            if not torch.isfinite(rows).all():
                raise ValueError(f"node layer {name!r} has non-finite (NaN or inf) activations; "
                                 "check the model and the data")
            moments[name].update(rows.reshape(-1, rows.shape[-1]))
        for site in (cache.sites if cache is not None else ()):
            cache.add(site, as_positions(result.activations[site].detach()).to(torch.float64))
    return moments


class DataPasses:
    """Batches for the section passes: from the cache where every section of a pass reads only
    cached sites, else from ``data`` through ``model`` (the section model, inputs in ``dtype``)."""

    def __init__(self, data, input_fn, model: nn.Module, dtype, device, cache: ActivationCache | None,
                 progress: bool):
        self.data, self.input_fn, self.model, self.dtype, self.device = data, input_fn, model, dtype, device
        self.cache, self.progress = cache, progress

    def _inputs(self, batch):
        return model_input(batch, self.input_fn, self.dtype, self.device)

    def first(self) -> Batch:
        """The first batch of the data (for the checks against autograd)."""
        return Batch(0, self._inputs(next(iter(self.data))), self.model)

    def batches(self, sections: Sequence, desc: str) -> Iterator[Batch]:
        sites = list(dict.fromkeys(s.reads for s in sections if s.reads is not None))
        cached = {site: self.cache.get(site) if self.cache is not None else None for site in sites}
        cached = {site: acts for site, acts in cached.items() if acts is not None}
        if cached and len(cached) == len(sites) and all(s.reads is not None for s in sections):
            for index in range(len(next(iter(cached.values())))):
                yield Batch(index, None, None, {site: acts[index] for site, acts in cached.items()})
            return
        wanted = [site for site in sites if site not in cached]
        for index, batch in enumerate(tqdm(self.data, desc=desc, disable=not self.progress)):
            yield Batch(index, self._inputs(batch), self.model,
                        {site: acts[index] for site, acts in cached.items()}, wanted)


__all__ = ["DataPasses", "gather_moments", "model_device", "model_input", "section_model"]
