"""Finding the runs to compare and checking that they are comparable.

Runs are recipe run directories ``<root>/<variant>/seed<k>/`` (``config.yaml``,
``checkpoints/last.ckpt``) as written by ``interp-train fit``. ``discover_runs`` reads a task
directory, ``runs_from_paths`` explicit run directories; ``check_consistent`` refuses runs of
different architectures or tasks and reports differing data settings.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence


@dataclass
class Run:
    """One trained run: variant name, seed label, run directory, checkpoint and config files."""

    variant: str
    seed: str
    run_dir: Path
    checkpoint: Path
    config: Path


def _run_files(path: Path) -> tuple[Path, Path] | None:
    from interp_train.recipes import find_run_files

    try:
        config, ckpt = find_run_files(path)
    except FileNotFoundError:
        return None
    return ckpt, config


def _seed_label(run_dir: Path, config: Path, index: int) -> str:
    if re.fullmatch(r"seed\w+", run_dir.name):
        return run_dir.name
    import yaml

    seed = (yaml.safe_load(config.read_text()) or {}).get("seed_everything")
    return f"seed{seed}" if isinstance(seed, int) and not isinstance(seed, bool) else f"run{index}"


def runs_from_paths(variant: str, paths: Sequence[str | Path]) -> list[Run]:
    """Runs of one variant from explicit run directories (or checkpoint files inside them)."""
    runs = []
    given_at: dict[Path, int] = {}  # resolved checkpoint -> index of the argument that named it
    for i, p in enumerate(paths):
        found = _run_files(Path(p))
        if found is None:
            raise FileNotFoundError(f"variant {variant!r}: {str(p)!r} is not a run directory or checkpoint with a "
                                    "config.yaml (expected <run>/config.yaml and <run>/checkpoints/last.ckpt)")
        ckpt, config = found
        run_dir = config.parent
        first = given_at.setdefault(ckpt.resolve(), i)
        if first != i:  # it would be measured twice and counted as two seeds
            raise ValueError(f"variant {variant!r}: checkpoint {str(ckpt)!r} is given twice "
                             f"(as {str(paths[first])!r} and {str(p)!r}); give each run once")
        runs.append(Run(variant, _seed_label(run_dir, config, i), run_dir, ckpt, config))
    labels = [r.seed for r in runs]
    if len(set(labels)) != len(labels):  # e.g. two explicit dirs both called seed0
        runs = [dataclasses.replace(r, seed=f"{r.seed}_{i}") for i, r in enumerate(runs)]
    return runs


def discover_runs(root: str | Path) -> dict[str, list[Run]]:
    """{variant: runs} from ``root/<variant>/<seed dir>/`` (sorted by name).

    Raises FileNotFoundError for a missing root and ValueError, listing what is there, when no
    run directories are found (or when ``root`` is itself one run, or holds several tasks).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(root)!r} does not exist")
    if (root / "config.yaml").is_file():
        raise ValueError(f"{str(root)!r} is a single run; pass the task directory that holds "
                         "<variant>/seed<k>/ run directories (e.g. checkpoints/digits/)")
    variants: dict[str, list[Run]] = {}
    for vdir in sorted(p for p in root.iterdir() if p.is_dir()):
        seed_dirs = [p for p in sorted(vdir.iterdir()) if p.is_dir() and (p / "config.yaml").is_file()
                     and _run_files(p) is not None]
        runs = runs_from_paths(vdir.name, seed_dirs)
        if runs:
            variants[vdir.name] = runs
    if not variants:
        nested = sorted(str(p.relative_to(root)) for p in root.glob("*/*/*/config.yaml"))
        if nested:
            raise ValueError(f"{str(root)!r} holds runs of several tasks ({', '.join(nested[:6])}); "
                             "pass one task directory, e.g. checkpoints/<task>/")
        found = sorted(str(p.relative_to(root)) for p in root.glob("*/*"))[:20] or ["nothing"]
        raise ValueError(f"no runs under {str(root)!r}: expected <variant>/seed<k>/config.yaml with "
                         f"checkpoints/*.ckpt; found: {', '.join(found)}")
    return variants


def _load_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def _model_of(config: dict) -> str:
    return repr((config.get("model") or {}).get("model"))


def architecture(run: Run) -> str:
    """The run's model as its config states it (``model.model``: class and init arguments), as a
    string; two runs of one architecture give the same string, whatever their regularizers."""
    return _model_of(_load_yaml(run.config))


_LOADER_KEYS = ("batch_size", "eval_batch_size", "num_workers")


def check_consistent(variants: Mapping[str, Sequence[Run]]) -> list[str]:
    """Raises ValueError when runs differ in architecture (config ``model.model``) or data module
    class; returns messages for other differences in the data settings (loader settings aside)."""
    archs: dict[str, list[str]] = {}
    tasks: dict[str, list[str]] = {}
    data_settings: dict[str, list[str]] = {}
    for runs in variants.values():
        for run in runs:
            cfg = _load_yaml(run.config)
            name = f"{run.variant}/{run.seed}"
            data = cfg.get("data") or {}
            archs.setdefault(_model_of(cfg), []).append(name)
            tasks.setdefault(str(data.get("class_path")), []).append(name)
            init = {k: v for k, v in (data.get("init_args") or {}).items() if k not in _LOADER_KEYS}
            data_settings.setdefault(repr(sorted(init.items())), []).append(name)
    if len(tasks) > 1:
        groups = "; ".join(f"{t}: {', '.join(n)}" for t, n in tasks.items())
        raise ValueError(f"runs disagree on the task (data module): {groups}")
    if len(archs) > 1:
        groups = "; ".join(f"{', '.join(n)} have model {a}" for a, n in archs.items())
        raise ValueError(f"runs disagree on the architecture (config 'model.model'): {groups}")
    if len(data_settings) > 1:
        groups = "; ".join(f"{', '.join(n)}: {s}" for s, n in data_settings.items())
        return [f"runs use different data settings (measured on each run's own data): {groups}"]
    return []
