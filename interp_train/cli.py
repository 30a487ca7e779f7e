"""``interp-train``: train recipes from YAML with LightningCLI (jsonargparse).

    interp-train fit --config recipes/digits/grad_norm.yaml --seed_everything 1 --trainer.max_steps 500
    interp-train fit --config recipes/digits/baseline.yaml --ckpt_path checkpoints/digits/baseline/seed0/checkpoints/last.ckpt
    interp-train sweep --recipe recipes/digits --variants baseline grad_norm --seeds 0 1 2

Every field of the YAML can be overridden on the command line; unknown fields are rejected by
jsonargparse. A run writes to ``<checkpoint_root>/<task>/<variant>/seed<k>/`` (or ``--run_dir``):
``config.yaml`` (resolved config), ``checkpoints/last.ckpt`` (+ best by val/acc), ``metrics.csv``
(CSV logger; TensorBoard in ``tensorboard/`` when installed) and ``metrics.json`` (final metrics,
written atomically; includes the test split unless ``--test_after_fit false``).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger

from interp_train.io import write_json_atomic
from interp_train.recipes import RecipeModule




def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        value = float(value.detach().cpu()) if isinstance(value, torch.Tensor) else value
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
    return out


def default_loggers(run_dir: Path) -> list:
    """CSVLogger writing run_dir/metrics.csv (first, so trainer.log_dir == run_dir), plus TensorBoard if installed."""
    loggers: list = [CSVLogger(save_dir=str(run_dir), name="", version="")]
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
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        if trainer_cfg.get("default_root_dir") is None:
            kwargs["default_root_dir"] = str(self.run_directory)
        if trainer_cfg.get("logger") in (None, True):
            kwargs["logger"] = default_loggers(self.run_directory)
        if trainer_cfg.get("enable_checkpointing") is not False and self.subcommand == "fit":
            callbacks = trainer_cfg.get("callbacks") or []
            callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
            if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
                callbacks.append(ModelCheckpoint(dirpath=str(self.run_directory / "checkpoints"), save_last=True,
                                                 monitor="val/acc", mode="max", filename="best"))
            trainer_cfg["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)

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
        self._save_final_checkpoint()
        if trainer.is_global_zero:
            write_json_atomic(self.run_directory / "metrics.json", metrics)


    def _save_final_checkpoint(self) -> None:
        """Overwrites ``last.ckpt`` with the final state: ModelCheckpoint only saves when validation
        runs, so without this ``last.ckpt`` (what ``load_recipe`` reads) could predate the weights
        that ``metrics.json`` describes."""
        trainer = self.trainer
        if trainer.fast_dev_run or trainer.checkpoint_callback is None:
            return
        final = self.run_directory / "checkpoints" / "last.ckpt"
        tmp = final.with_name(".last.ckpt.tmp")
        trainer.save_checkpoint(tmp)  # collective under DDP; rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, final)


def main(args: Optional[list[str]] = None) -> None:
    """Console entry point: ``interp-train {fit,validate,test,sweep} ...``."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "sweep":
        from interp_train.sweep import main as sweep_main

        sweep_main(argv[1:])
        return
    InterpTrainCLI(args=argv)


if __name__ == "__main__":
    main()
