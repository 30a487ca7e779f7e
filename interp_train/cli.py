"""``interp-train``: train recipes from YAML with LightningCLI (jsonargparse).

    interp-train fit --config recipes/digits/grad_norm.yaml --seed_everything 1 --trainer.max_steps 500
    interp-train fit --config recipes/digits/baseline.yaml --ckpt_path checkpoints/digits/baseline/seed0/checkpoints/last.ckpt
    interp-train sweep --recipe recipes/digits --variants baseline grad_norm --seeds 0 1 2

Every field of the YAML can be overridden on the command line; unknown fields are rejected by
jsonargparse. A run writes to ``<checkpoint_root>/<task>/<variant>/seed<k>/`` (or ``--run_dir``):
``config.yaml`` (resolved config), ``checkpoints/last.ckpt`` (+ best by val/acc), ``metrics.csv``
(CSV logger; TensorBoard in ``tensorboard/`` when installed), ``metrics.json`` (final metrics,
written atomically; includes the test split unless ``--test_after_fit false``) and
``provenance.json`` (package versions, threads, source commit and resume step of every fit into
the directory; interp_train.provenance). Resuming with
``--ckpt_path`` keeps the earlier rows of ``metrics.csv`` and entries of ``metrics.json``
(interp_train.run_log). A diverging run stops (loss non-finite or above ``--max_loss``) and a run
whose accuracy ends at chance is flagged (interp_train.callbacks.health). Errors are one paragraph
with exit code 2 (evaluation.errors); ``--debug`` or ``INTERP_DEBUG=1`` keeps the traceback.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from interp_train.callbacks.health import TrainingHealth
from evaluation.errors import run_command
from interp_train.io import write_json_atomic
from interp_train.provenance import record_fit
from interp_train.recipes import RecipeModule
from interp_train.run_log import HistoryCSVLogger

SUBCOMMANDS = ("fit", "validate", "test", "predict", "sweep")
DESCRIPTION = """Train recipe models (LightningCLI over YAML recipes). Subcommands: fit, validate, test, predict (Lightning's; `interp-train fit --help` lists every field)
and sweep (several variants x seeds: `interp-train sweep --recipe recipes/digits --variants baseline
grad_norm --seeds 0 1 2`; `interp-train sweep --help`). Add --debug (or set INTERP_DEBUG=1) to get full
tracebacks instead of one-paragraph errors."""


class _DropMessages(logging.Filter):
    """Drops Lightning log lines that are not about this run (an advertisement)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def _quiet_lightning() -> None:
    # Warnings caused by how this tool drives Lightning, not by anything the user did:
    # the CLI passes its (already parsed) argv to LightningCLI on purpose, and Lightning's
    # _pytree helper uses a torch API that torch deprecated (Lightning's to fix).
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # a run directory is reused on purpose (resume, or a re-run replacing the old run)
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages())


def _checkpoint_step(ckpt_path: Any) -> int | None:
    """The global step stored in a checkpoint file (None if there is none to read)."""
    if not ckpt_path or not Path(str(ckpt_path)).is_file():
        return None
    try:
        state = torch.load(str(ckpt_path), map_location="cpu", weights_only=False, mmap=True)
        return int(state.get("global_step", 0))
    except Exception:  # noqa: BLE001 - Lightning reports an unreadable checkpoint itself
        return None
def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        value = float(value.detach().cpu()) if isinstance(value, torch.Tensor) else value
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
    return out


def default_loggers(run_dir: Path, resume_step: int | None = None) -> list:
    """CSV logger writing run_dir/metrics.csv (first, so trainer.log_dir == run_dir; on a resume from
    ``resume_step`` it keeps the earlier rows), plus TensorBoard if installed."""
    loggers: list = [HistoryCSVLogger(save_dir=str(run_dir), keep_before_step=resume_step)]
    try:
        import tensorboard  # noqa: F401
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
    except ImportError:
        pass
    return loggers


class InterpTrainCLI(LightningCLI):
    """LightningCLI for RecipeModule + any LightningDataModule (given by class_path)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("subclass_mode_data", True)
        # exit_on_error=False: parse errors are raised and reported in one paragraph by main()
        # instead of a usage dump; the subcommand parsers (fit, ...) get their own kwargs.
        kwargs.setdefault("parser_kwargs", {"exit_on_error": False, "description": DESCRIPTION, "prog": "interp-train",
                                            **{s: {"exit_on_error": False} for s in SUBCOMMANDS if s != "sweep"}})
        _quiet_lightning()
        super().__init__(RecipeModule, L.LightningDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--variant", type=Optional[str], default=None,
                            help="variant name in the run directory (default: the --config file name)")
        parser.add_argument("--checkpoint_root", type=str, default="checkpoints",
                            help="runs go to <checkpoint_root>/<task>/<variant>/seed<k>/")
        parser.add_argument("--run_dir", type=Optional[str], default=None,
                            help="explicit run directory (overrides checkpoint_root/task/variant/seed)")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="evaluate the test split after fit and include it in metrics.json")
        parser.add_argument("--max_loss", type=float, default=1e6,
                            help="stop training when the loss exceeds this (or is NaN/inf); see "
                                 "interp_train.callbacks.health")

    # ------------------------------------------------------------------ run directory
    def _sub_config(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    def variant_name(self) -> str:
        cfg = self._sub_config()
        if cfg.get("variant"):
            return str(cfg["variant"])
        configs = cfg.get("config") or []
        if configs:
            last = configs[-1]
            name = getattr(last, "relative", None) or getattr(last, "absolute", None) or str(last)
            return Path(str(name)).stem
        return "default"

    def run_dir(self) -> Path:
        cfg = self._sub_config()
        if cfg.get("run_dir"):
            return Path(cfg["run_dir"])
        task = getattr(self.datamodule, "task", None) or type(self.datamodule).__name__
        seed = cfg.get("seed_everything")
        seed_part = f"seed{int(seed)}" if isinstance(seed, int) and not isinstance(seed, bool) else "seed_random"
        return Path(cfg.get("checkpoint_root") or "checkpoints") / str(task) / self.variant_name() / seed_part

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        self.run_directory = self.run_dir()
        cfg = self._sub_config()
        self.resume_step = _checkpoint_step(cfg.get("ckpt_path")) if self.subcommand == "fit" else None
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        if trainer_cfg.get("default_root_dir") is None:
            kwargs["default_root_dir"] = str(self.run_directory)
        if trainer_cfg.get("logger") in (None, True):
            kwargs["logger"] = default_loggers(self.run_directory, self.resume_step)
        callbacks = trainer_cfg.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        if trainer_cfg.get("enable_checkpointing") is not False and self.subcommand == "fit":
            if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
                callbacks.append(ModelCheckpoint(dirpath=str(self.run_directory / "checkpoints"), save_last=True,
                                                 monitor="val/acc", mode="max", filename="best"))
        if self.subcommand == "fit" and not any(isinstance(c, TrainingHealth) for c in callbacks):
            callbacks.append(TrainingHealth(max_loss=cfg.get("max_loss", 1e6)))
        trainer_cfg["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)

    def _health(self) -> TrainingHealth | None:
        return next((c for c in self.trainer.callbacks if isinstance(c, TrainingHealth)), None)

    def fit(self, model, **kwargs) -> None:
        """trainer.fit, writing failure.json (and keeping metrics.csv) when training stops on an error."""
        if self.trainer.is_global_zero:
            record_fit(self.run_directory, self.resume_step)
        try:
            self.trainer.fit(model, **kwargs)
        except (KeyboardInterrupt, SystemExit):
            if self.trainer.interrupted:  # Lightning turns Ctrl-C into a graceful stop and sys.exit(1)
                print(f"interp-train: training interrupted at step {self.trainer.global_step}; resume with "
                      f"--ckpt_path {self.run_directory / 'checkpoints' / 'last.ckpt'}", file=sys.stderr)
                raise KeyboardInterrupt from None
            raise
        except BaseException as err:
            if self.trainer.is_global_zero:
                write_json_atomic(self.run_directory / "failure.json",
                                  {"error": f"{type(err).__name__}: {err}", "global_step": self.trainer.global_step})
            raise

    # ------------------------------------------------------------------ final metrics
    def after_fit(self) -> None:
        trainer = self.trainer
        metrics = scalar_metrics(trainer.callback_metrics)
        cfg = self._sub_config()
        if cfg.get("test_after_fit") and not trainer.fast_dev_run and trainer.interrupted is False:
            has_test = type(self.datamodule).test_dataloader is not L.LightningDataModule.test_dataloader
            if has_test:
                for result in trainer.test(self.model, datamodule=self.datamodule, verbose=False):
                    metrics.update(scalar_metrics(result))
        metrics.update(global_step=float(trainer.global_step), epoch=float(trainer.current_epoch))
        health = self._health()
        if health is not None:
            metrics.update(health.final_report(metrics))
        self._save_final_checkpoint()
        if trainer.is_global_zero:
            metrics = {**self._earlier_metrics(), **metrics}
            write_json_atomic(self.run_directory / "metrics.json", metrics)
            (self.run_directory / "failure.json").unlink(missing_ok=True)
            print(self.summary(metrics))

    def _earlier_metrics(self) -> dict[str, float]:
        """metrics.json of the run being resumed: a resume that trains no further (or logs fewer
        keys) keeps the earlier final metrics instead of dropping them."""
        path = self.run_directory / "metrics.json"
        if self.resume_step is None or not path.is_file():
            return {}
        try:
            return {k: v for k, v in json.loads(path.read_text()).items() if isinstance(v, (int, float))}
        except (OSError, ValueError):
            return {}

    def summary(self, metrics: dict[str, float]) -> str:
        """Where the run landed and its final metrics, for the terminal."""
        shown = [k for k in ("test/acc", "test/loss", "val/acc", "val/loss") if k in metrics]
        values = ", ".join(f"{k} {metrics[k]:.4g}" for k in shown) or "no test or validation metrics"
        return (f"run saved in {self.run_directory}/ (step {int(metrics['global_step'])}): {values}; "
                "config.yaml, checkpoints/last.ckpt, metrics.csv, metrics.json")

    def _save_final_checkpoint(self) -> None:
        """Overwrites ``last.ckpt`` with the final state: ModelCheckpoint only saves when validation
        runs, so without this ``last.ckpt`` (what ``load_recipe`` reads) could predate the weights
        that ``metrics.json`` describes."""
        trainer = self.trainer
        if trainer.fast_dev_run or trainer.checkpoint_callback is None:
            return
        final = self.run_directory / "checkpoints" / "last.ckpt"
        tmp = final.with_name(".last.ckpt.tmp")
        trainer.save_checkpoint(tmp, weights_only=False)  # collective under DDP; rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, final)


def _run(argv: list[str]) -> None:
    if not argv or not any(a in SUBCOMMANDS or a in ("-h", "--help") for a in argv):
        raise ValueError(f"give a subcommand: {', '.join(SUBCOMMANDS)} (see `interp-train --help`)")
    if argv and argv[0] == "sweep":
        from interp_train.sweep import main as sweep_main

        sweep_main(argv[1:])
        return
    InterpTrainCLI(args=argv)


def main(args: Optional[list[str]] = None) -> None:
    """Console entry point: ``interp-train {fit,validate,test,predict,sweep} ... [--debug]``.

    Raises SystemExit with the exit code on failure (2: bad input, one paragraph on stderr)."""
    code = run_command("interp-train", _run, list(sys.argv[1:] if args is None else args))
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
