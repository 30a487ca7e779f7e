"""The run's ``metrics.csv``: Lightning's CSV logger, except that resuming keeps the history.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when it starts (with a warning), so
``interp-train fit --ckpt_path <run>/checkpoints/last.ckpt`` used to keep only the rows logged
after the resume. :class:`HistoryCSVLogger` instead keeps every earlier row whose ``step`` is
before the checkpoint's global step (rows at or after it are logged again by the resumed run,
so keeping them would duplicate them) and appends the new rows. Without a checkpoint (a fresh
run into an old directory) the old file is replaced, as before, without the warning.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from interp_train.io import write_atomic


class _HistoryWriter(ExperimentWriter):
    def __init__(self, log_dir: str, keep_before_step: int | None):
        self._keep_before_step = keep_before_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # called by the base __init__ instead of deleting with a warning
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        if self._keep_before_step is None:
            path.unlink()
            return
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            fields = list(reader.fieldnames or [])
            rows = [r for r in reader if _step(r) is not None and _step(r) < self._keep_before_step]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(path, out.getvalue())
        self.metrics_keys = sorted(fields)  # the base class appends to these columns


def _step(row: dict) -> float | None:
    try:
        return float(row.get("step", ""))
    except ValueError:
        return None


class HistoryCSVLogger(CSVLogger):
    """CSVLogger writing ``save_dir/metrics.csv`` that keeps rows before ``keep_before_step`` (a resume)."""

    def __init__(self, save_dir: str, keep_before_step: int | None = None):
        super().__init__(save_dir=save_dir, name="", version="")
        self._keep_before_step = keep_before_step

    @property
    @rank_zero_experiment
    def experiment(self) -> _HistoryWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _HistoryWriter(log_dir=self.log_dir, keep_before_step=self._keep_before_step)
        return self._experiment
