"""Per-checkpoint measurement cache for ``interp-eval compare`` (atomic writes: ``interp_train.io``).

One JSON per checkpoint, ``<out>/cache/<variant>/<seed>.json``: the run's digest (sha256 of the
checkpoint's and its config.yaml's bytes) and, under ``measured``, one record per metric with the
key it was measured under:

    key(metric) = sha256(run digest, metric name, metric version, {option: value for the
                         MeasureOptions fields the metric depends on})

A re-run measures a metric again exactly when its key changed (a new metric, a bumped version, a
changed option it depends on, a retrained seed); all other records are reused. Records of
metrics not asked for this time (e.g. the LLC without --llc) are kept for later runs.

Several ``compare`` processes may share one cache (a study measured in parts): a process measures
a run only while it holds that run's lock (``entry_lock``, an ``flock`` on
``<out>/cache/.locks/<variant>/<seed>.lock``), and re-reads the entry once it has it, so a run is
never measured twice at once and what another process measured is reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

try:
    import fcntl
except ImportError:  # Windows: no locking, each process measures what it finds missing
    fcntl = None

if TYPE_CHECKING:
    from evaluation.compare.metrics.base import CompareMetric


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def run_digest(checkpoint: Path, config: Path | None) -> str:
    """sha256 over the checkpoint's and the config's contents."""
    return _sha256_json({"checkpoint": file_sha256(checkpoint), "config": file_sha256(config) if config else None})


def metric_options(metric: "CompareMetric", options: Mapping[str, Any]) -> dict[str, Any]:
    """The values of the options ``metric`` depends on (``options``: ``dataclasses.asdict(MeasureOptions)``),
    less those of ``metric.options_added`` at the value older records were measured at."""
    added = metric.options_added
    return {name: options[name] for name in metric.options
            if not (name in added and options[name] == added[name])}


def metric_key(digest: str, metric: "CompareMetric", options: Mapping[str, Any]) -> str:
    """sha256 of the run digest, the metric's name and version, and its options' values (sorted JSON)."""
    return _sha256_json({"run": digest, "metric": metric.name, "version": metric.version,
                         "options": metric_options(metric, options)})


def safe_name(name: str) -> str:
    """A file-name-safe version of a variant or seed label (other characters become '_')."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(name)) or "_"


def cache_path(out_dir: Path, variant: str, seed: str) -> Path:
    return Path(out_dir) / "cache" / safe_name(variant) / f"{safe_name(seed)}.json"


def lock_path(out_dir: Path, variant: str, seed: str) -> Path:
    """The lock file of a run's cache entry (kept apart from the entries, which are replaced on write)."""
    return Path(out_dir) / "cache" / ".locks" / safe_name(variant) / f"{safe_name(seed)}.lock"


@contextlib.contextmanager
def entry_lock(path: Path, wait: bool = True) -> Iterator[bool]:
    """An exclusive lock on ``path`` (a ``lock_path``) for the ``with`` block; yields whether it is
    held: always True with ``wait`` (it blocks until the holder releases it), False without ``wait``
    while another process holds it. Released when the block ends or the process dies."""
    if fcntl is None:
        yield True
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_entry(path: Path, digest: str) -> dict | None:
    """The cache entry at ``path`` if it exists, parses, has per-metric records and belongs to the
    checkpoint with ``digest``; else None (everything is measured afresh)."""
    try:
        entry = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(entry, dict) or entry.get("run_digest") != digest or not isinstance(entry.get("measured"), dict):
        return None
    return entry


# Atomic writers live in interp_train.io (shared with training).
