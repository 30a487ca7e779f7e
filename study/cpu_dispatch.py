"""One vector instruction set per comparison: the check ``run_study.py`` makes before it trains or
measures.

torch's CPU kernels are compiled for several instruction sets and dispatch to the widest the CPU
has (``torch.backends.cpu.get_cpu_capability()``: ``DEFAULT``, ``AVX2``, ``AVX512``, ...). The
kernels round differently, and training amplifies the last bits: on one AVX512 machine the
modular-addition baseline (seed 4) trains to 100 % test accuracy, with ``ATEN_CPU_CAPABILITY=avx2``
to 99.86 %, and a circuit search on identical weights keeps different nodes. So runs trained
under one capability are not the runs another trains, and a cell trained on one machine compared
with a baseline trained on another measures the machines as well as the regularizer.

Each run's ``provenance.json`` records the capability it was trained with (interp_train.provenance).
``mixed_capabilities`` groups the trained runs of a task by it; ``check_one_capability`` refuses to
add runs of another capability to a task (or to report a task whose runs already mix), naming the
runs and the environment variables that reproduce theirs. ``ATEN_CPU_CAPABILITY`` can lower the
dispatch (an AVX512 machine trains AVX2 runs), never raise it above what the CPU has; some
kernels (convolutions, and some of the byte LM's) run in oneDNN, whose own level
``ONEDNN_MAX_CPU_ISA`` sets (the study's CNN and byte-LM runs reproduce only with both lowered).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from interp_train.provenance import FILE_NAME as PROVENANCE_FILE
from interp_train.provenance import ONEDNN_FOR_TORCH as ONEDNN_ISA
from interp_train.provenance import TORCH_LEVELS as LEVELS
from interp_train.provenance import dispatch_fields, dispatch_level


def current_level() -> str:
    return dispatch_level(dispatch_fields())


def trained_capability(run_dir: Path) -> str | None:
    """The level of the last ``interp-train fit`` into ``run_dir`` (``interp_train.provenance.dispatch_level``);
    None when not recorded (runs trained before provenance was written, or an unreadable file)."""
    try:
        entries = json.loads((Path(run_dir) / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(entries, list) or not entries or not isinstance(entries[-1], dict):
        return None
    return dispatch_level(entries[-1])


def mixed_capabilities(run_dirs: Iterable[Path]) -> dict[str, list[Path]]:
    """{capability: runs trained with it} over the runs that record one."""
    groups: dict[str, list[Path]] = {}
    for run in run_dirs:
        capability = trained_capability(run)
        if capability is not None:
            groups.setdefault(capability, []).append(Path(run))
    return groups


def _listing(groups: dict[str, list[Path]], limit: int = 4) -> str:
    parts = []
    for capability, runs in sorted(groups.items()):
        names = ", ".join(str(r) for r in runs[:limit]) + (f" and {len(runs) - limit} more" if len(runs) > limit else "")
        parts.append(f"{capability}: {names}")
    return "; ".join(parts)


def how_to_match(level: str, current: str) -> str:
    """The advice for training like runs of ``level`` in a process that dispatches to ``current``."""
    level, current = level.split("+")[0], current.split("+")[0]
    if level in LEVELS and current in LEVELS and LEVELS.index(level) > LEVELS.index(current):
        return (f"this CPU cannot reach {level} (the variables lower the dispatch, never raise it): train on a "
                f"machine that has it")
    onednn = f" ONEDNN_MAX_CPU_ISA={ONEDNN_ISA[level]}" if level in ONEDNN_ISA else ""
    return f"start again with ATEN_CPU_CAPABILITY={level.lower()}{onednn} in the environment"


def check_one_capability(task: str, trained: Iterable[Path], current: str, training: bool) -> None:
    """Raises ValueError when the task's trained runs record more than one capability, or (when
    ``training``: new runs get ``current``) one other than ``current``."""
    groups = mixed_capabilities(trained)
    if len(groups) > 1:
        raise ValueError(f"task {task!r}: its trained runs were trained with different CPU capabilities "
                         f"({_listing(groups)}); a report over them would mix floating-point paths. Re-train "
                         f"one group at the other's level (ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA), or "
                         f"pass --allow-mixed-cpu")
    if training and groups and current not in groups:
        (other,) = groups
        raise ValueError(f"task {task!r}: its trained runs were trained with CPU capability {other} "
                         f"({_listing(groups)}) and this process dispatches to {current}: new runs would not "
                         f"be comparable with them. To add to them, {how_to_match(other, current)}; or use "
                         f"another --root, or pass --allow-mixed-cpu")
