"""Small file utilities shared by training and evaluation: atomic writes and JSON-safe values."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Writes to a temporary file in the same folder, then renames it over ``path``: a reader
    never sees a half-written file, and an interrupted write leaves the old file intact. The file
    gets the mode any new file gets (0666 minus the umask), not mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            os.fchmod(fh.fileno(), 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def current_umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def json_safe(x: Any) -> Any:
    """Plain JSON values: non-finite floats -> None, tensors/arrays -> lists, numpy scalars ->
    Python numbers, paths -> strings, mapping keys -> strings."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return json_safe(x.tolist())
    if isinstance(x, (np.floating, np.integer)):
        return json_safe(x.item())
    if isinstance(x, Path):
        return str(x)
    return x


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """``write_atomic`` of ``json_safe(obj)`` as indented JSON with sorted keys."""
    return write_atomic(path, json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False))
