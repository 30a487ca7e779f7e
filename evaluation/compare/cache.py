"""Per-checkpoint measurement cache for ``interp-eval compare`` (atomic writes: ``interp_train.io``).

One JSON per checkpoint, ``<out>/cache/<variant>/<seed>.json``, holding the measurements and
the key they were computed under. The key is sha256 over (the checkpoint's bytes, its
config.yaml's bytes, the measurement options, MEASURE_VERSION): a re-run reuses an entry only
when none of these changed, so editing the options or retraining a seed recomputes just that.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Mapping

# Bump when a measurement's definition changes: old cache entries become stale.
# 2: token models measured at hook_embed; calibrated LLC settings.
# 3: LIB on TransformerLens models includes the skip connection of resid_mid -> resid_post.
MEASURE_VERSION = 4  # 4: default LIB node layers at the last position for one target per sequence


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_key(checkpoint: Path, config: Path | None, options: Mapping[str, Any]) -> str:
    """sha256 of the checkpoint and config contents, the options (sorted JSON) and MEASURE_VERSION."""
    parts = {"checkpoint": file_sha256(checkpoint), "config": file_sha256(config) if config else None,
             "options": options, "version": MEASURE_VERSION}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def safe_name(name: str) -> str:
    """A file-name-safe version of a variant or seed label (other characters become '_')."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(name)) or "_"


def cache_path(out_dir: Path, variant: str, seed: str) -> Path:
    return Path(out_dir) / "cache" / safe_name(variant) / f"{safe_name(seed)}.json"


def read_cached(path: Path, key: str) -> dict | None:
    """The cached entry at ``path`` if it exists, parses and was computed under ``key``; else None."""
    try:
        entry = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return entry if isinstance(entry, dict) and entry.get("key") == key else None


# Atomic writers live in interp_train.io (shared with training).

