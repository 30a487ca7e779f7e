"""LIB fitting: the fit (fit.py), its sections (edges.py, sections/), the naive reference
(naive.py), multi-process fitting (distributed.py) and its outputs (report.py, plots.py).

``from evaluation.lib import fit_lib, LIBConfig`` is the public entry point; names are imported
lazily so that importing a submodule does not pull in the whole fit.
"""

from importlib import import_module

_PUBLIC = {"fit_lib": "fit", "LIBConfig": "fit", "LIBResult": "fit", "LayerBasis": "fit"}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
