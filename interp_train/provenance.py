"""Where and with what a run was trained: ``provenance.json`` in the run directory.

One entry per ``interp-train fit`` into the directory (the first start and every resume): the UTC
time, the command line, the step it resumed from (``None`` for a fresh start), Python, the
platform, the CPU model and the vector instruction set torch dispatches to (it can change
floating-point results), the versions of the packages that decide the numbers, torch's thread
counts, and the source commit of this checkout (``None`` outside a git checkout; ``dirty`` when
interp_train/ differs from it). A re-trained run that does not reproduce an earlier one can then
be told apart from a resumed run, a different thread count or a different package version
instead of being a mystery. A fresh run into an old directory starts the file over, as
``metrics.csv``. The file is rewritten atomically. A resume at another CPU dispatch level than the
run started with is warned about (the levels train different models; study/cpu_dispatch.py reads
the same field to keep a study's runs at one level).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path

import torch

from interp_train.io import write_json_atomic

FILE_NAME = "provenance.json"
PACKAGES = ("torch", "lightning", "numpy", "scipy", "transformer-lens", "transformers", "jsonargparse",
            "devinterp", "networkx")
SOURCE_DIR = Path(__file__).resolve().parent
# what selects the CPU kernels' instruction sets (torch's own, oneDNN's for convolutions, MKL's)
NUMERICS_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                      "MKL_CBWR", "OMP_NUM_THREADS")


def package_versions(names=PACKAGES) -> dict[str, str | None]:
    """``{distribution: version}``; ``None`` for one that is not installed."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(SOURCE_DIR), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_commit() -> dict[str, object] | None:
    """The checkout's commit and whether interp_train/ differs from it; None outside git."""
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return None
    changed = _git("status", "--porcelain", "--untracked-files=no", "--", ".")
    return {"commit": commit, "dirty": bool(changed) if changed is not None else None}


def cpuinfo_field(name: str) -> str | None:
    """The first ``name`` line's value in /proc/cpuinfo; None where there is none (not Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str | None:
    return cpuinfo_field("model name") or platform.processor() or None


# torch's x86 dispatch levels, lowest first, and the oneDNN level (ONEDNN_MAX_CPU_ISA) that goes with each
TORCH_LEVELS = ("DEFAULT", "AVX2", "AVX512")
ONEDNN_FOR_TORCH = {"DEFAULT": "SSE41", "AVX2": "AVX2", "AVX512": "AVX512_CORE"}
# oneDNN's x86 levels, lowest first (ONEDNN_MAX_CPU_ISA values; it ignores unknown ones)
ONEDNN_LEVELS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                 "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_AMX", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16")


def onednn_level() -> str | None:
    """The widest oneDNN level this process may use, as far as it can be told without asking oneDNN:
    AVX512_CORE / AVX2 / SSE41 from the CPU's flags, lowered by ONEDNN_MAX_CPU_ISA (or DNNL_...)
    where set; None off x86 Linux. Kernels of different levels round differently (torch's
    capability does not cover oneDNN's, which runs convolutions and some other kernels)."""
    flags = (cpuinfo_field("flags") or "").split()
    avx512_core = {"avx512f", "avx512bw", "avx512vl", "avx512dq"}.issubset(flags)  # oneDNN's (and torch's) AVX512
    cpu = "AVX512_CORE" if avx512_core else "AVX2" if "avx2" in flags else "SSE41" if flags else None
    limit = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    if cpu is None or limit not in ONEDNN_LEVELS:
        return cpu
    return limit if ONEDNN_LEVELS.index(limit) < ONEDNN_LEVELS.index(cpu) else cpu


def dispatch_fields() -> dict[str, str | None]:
    """What selects this process's CPU kernels, under the names provenance entries record it by."""
    return {"torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "onednn_level": onednn_level()}


def environment() -> dict[str, object]:
    return {
        "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "argv": list(sys.argv),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        **dispatch_fields(),
        "numerics_environment": {name: os.environ[name] for name in NUMERICS_VARIABLES if name in os.environ},
        "packages": package_versions(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "source": source_commit(),
    }


def record_fit(run_dir: str | Path, resumed_from_step: int | None) -> list[dict]:
    """Appends this process's entry to ``run_dir/provenance.json``; returns every entry."""
    path = Path(run_dir) / FILE_NAME
    entries: list = []
    if path.is_file() and resumed_from_step is not None:  # a fresh run into an old directory starts over
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError):
            entries = []
        entries = entries if isinstance(entries, list) else []
    entry = {**environment(), "resumed_from_step": resumed_from_step}
    warn_if_dispatch_changed(entries, entry, path)
    entries.append(entry)
    write_json_atomic(path, entries)  # creates the run directory if need be
    return entries


def dispatch_level(entry: dict) -> str | None:
    """One name for the kernels a provenance entry ran: torch's capability, with oneDNN's level
    appended where it is not the one that goes with it (an AVX512 CPU with only
    ATEN_CPU_CAPABILITY=avx2 set: ``AVX2+oneDNN:AVX512_CORE``, neither machine's level); torch's
    alone for entries recorded before oneDNN's level was. None when torch's is not recorded."""
    capability = entry.get("torch_cpu_capability")
    if not capability:
        return None
    onednn = entry.get("onednn_level")
    if onednn is None or ONEDNN_FOR_TORCH.get(str(capability)) in (None, onednn):
        return str(capability)
    return f"{capability}+oneDNN:{onednn}"


def same_dispatch(earlier: dict, now: dict) -> bool:
    """Whether two entries ran the same kernels; an entry without oneDNN's level (recorded before
    it was) is compared on torch's capability alone."""
    if not earlier.get("onednn_level") or not now.get("onednn_level"):
        return earlier.get("torch_cpu_capability") == now.get("torch_cpu_capability")
    return dispatch_level(earlier) == dispatch_level(now)


def warn_if_dispatch_changed(entries: list, current: dict, path: Path) -> None:
    """Warns when a resumed run's earlier part ran at another CPU dispatch level (torch's or oneDNN's):
    the levels' kernels round differently, so the resumed run is not what an uninterrupted one would
    have been. Entries that predate the oneDNN field compare torch's level only."""
    earlier = sorted({dispatch_level(e) for e in entries
                      if isinstance(e, dict) and e.get("torch_cpu_capability") and not same_dispatch(e, current)})
    now = dispatch_level(current)
    if earlier:
        warnings.warn(f"{path}: this run was started with torch CPU capability {', '.join(earlier)} and is "
                      f"resumed with {now}; they round differently, so the result will not match an "
                      f"uninterrupted run (ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA lower the levels, "
                      f"to resume like it started where the CPU has them)", stacklevel=3)
