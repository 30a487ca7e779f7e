"""The compare-metric interface (``CompareMetric``), its result (``Measurement``) and the registry.

A metric is a subclass of ``CompareMetric`` decorated with ``@register``, alone in a module of
this package; ``all_metrics()`` imports every module of the package once (pkgutil), so the
decorator is the only registration there is.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from evaluation.compare.context import RunContext
    from evaluation.compare.options import MeasureOptions


@dataclass
class Measurement:
    """A metric's value on one run, with optional details (JSON-ready, merged into the run's
    cache entry ``details``, read by the plots) and notes (shown in the report)."""

    value: float | None
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class CompareMetric:
    """One number per run that ``interp-eval compare`` summarises over seeds and tests against the baseline.

    Class attributes (checked by ``register``):
      name: report/cache key (snake_case, unique). label: short column title.
      higher_is_better: the interpretable direction (for accuracy: the cost, higher is better).
      description: one line for the report's metric list (the formula, in words).
      version: bump when the definition or its code changes; cached values of older versions are
        re-measured (this metric only).
      options: the ``MeasureOptions`` fields its value depends on; they enter its cache key, so
        changing one re-measures exactly the metrics that name it.
      options_added: options named in ``options`` after records were cached, each with the value
        those records were measured at; at that value the option stays out of the key, so adding
        an option re-measures nothing (a new value gets its own key).
      switch: a boolean ``MeasureOptions`` field that turns the metric on (None: always on).
      order: position of its column in the report (ties: by name).

    ``measure(ctx)`` returns the value (a float, None when undefined) or a ``Measurement``;
    ``ctx`` is the run's shared ``RunContext`` (expensive things such as the LIB fit are
    computed there once per run, for all metrics that ask).
    """

    name: str = ""
    label: str = ""
    higher_is_better: bool = True
    description: str = ""
    version: int = 1
    options: tuple[str, ...] = ()
    options_added: Mapping[str, Any] = MappingProxyType({})
    switch: str | None = None
    order: float = 1000.0

    def measure(self, ctx: "RunContext") -> float | None | Measurement:
        raise NotImplementedError

    def enabled(self, options: "MeasureOptions") -> bool:
        return self.switch is None or bool(getattr(options, self.switch))

    def info(self) -> dict[str, Any]:
        """The report's description of the metric."""
        return {"name": self.name, "label": self.label, "higher_is_better": self.higher_is_better,
                "description": self.description, "version": self.version}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, version={self.version})"


_REGISTRY: dict[str, CompareMetric] = {}
_DISCOVERED = False


def _check(metric: CompareMetric) -> None:
    from evaluation.compare.options import MeasureOptions

    fields = {f.name for f in dataclasses.fields(MeasureOptions)}
    where = type(metric).__qualname__
    if not metric.name or not metric.name.isidentifier():
        raise ValueError(f"{where}: name must be a non-empty identifier, got {metric.name!r}")
    if not metric.label or not metric.description:
        raise ValueError(f"{where}: label and description must be non-empty")
    if isinstance(metric.version, bool) or not isinstance(metric.version, int) or metric.version < 1:
        raise ValueError(f"{where}: version must be a positive integer, got {metric.version!r}")
    unknown = [o for o in (*metric.options, *([metric.switch] if metric.switch else [])) if o not in fields]
    if unknown:
        raise ValueError(f"{where}: unknown MeasureOptions field(s) {unknown}; allowed: {', '.join(sorted(fields))}")
    stray = [o for o in metric.options_added if o not in metric.options]
    if stray:
        raise ValueError(f"{where}: options_added names {stray}, which are not in its options {list(metric.options)}")
    if type(metric).measure is CompareMetric.measure:
        raise ValueError(f"{where}: define measure(self, ctx)")


def register(cls: type[CompareMetric]) -> type[CompareMetric]:
    """Class decorator: validates the metric and adds one instance to the registry.

    A second class with a name already registered is an error, unless it is the same class
    re-imported (same module and qualified name), which replaces the old one.
    """
    metric = cls()
    _check(metric)
    old = _REGISTRY.get(metric.name)
    if old is not None and (type(old).__module__, type(old).__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"compare metric {metric.name!r} is defined twice: by {type(old).__module__}."
                         f"{type(old).__qualname__} and {cls.__module__}.{cls.__qualname__}")
    _REGISTRY[metric.name] = metric
    return cls


def unregister(name: str) -> None:
    """Removes a metric from the registry (for tests that register a temporary one)."""
    _REGISTRY.pop(name, None)


def all_metrics() -> list[CompareMetric]:
    """Every registered metric, in report order; the first call imports every module of this package."""
    global _DISCOVERED
    if not _DISCOVERED:
        package = importlib.import_module("evaluation.compare.metrics")
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.startswith("_") and module.name != "base":
                importlib.import_module(f"{package.__name__}.{module.name}")
        _DISCOVERED = True
    return sorted(_REGISTRY.values(), key=lambda m: (m.order, m.name))


def get_metric(name: str) -> CompareMetric:
    metrics = {m.name: m for m in all_metrics()}
    if name not in metrics:
        raise ValueError(f"unknown compare metric {name!r}; known: {', '.join(metrics)}")
    return metrics[name]
