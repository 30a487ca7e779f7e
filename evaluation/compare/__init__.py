"""``interp-eval compare``: run discovery, measuring with its cache, statistics, report and plots."""

from importlib import import_module

_PUBLIC = {"run_compare": "core", "MeasureOptions": "core", "discover_runs": "core",
           "runs_from_paths": "core", "build_report": "core"}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
