"""LIB over processes: fitting over data shards with all-reduced sums, and launching under torchrun.

Everything goes through ``torch.distributed`` (gloo on CPU, NCCL on GPUs); with no process
group initialised every helper is the single-process identity. The training-time helpers
(``gather_rows``, ``global_batch`` for batch-statistic regularizers under DDP) are
``interp_train.distributed``.

LIB fitting (``evaluation.lib.fit.fit_lib(..., reduce=all_reduce_sum)``): each rank takes the
batches ``shard(batches)`` (batch r, r + N, r + 2N, ...), accumulates its float64 sums and
counts, and ``all_reduce_sum`` adds them over ranks before they are used, so every rank holds
the sums over all data; only rank 0 writes outputs (``is_main_process``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable, Iterable, Iterator, NoReturn, Sequence, TypeVar

import torch
import torch.distributed as dist

from interp_train.distributed import is_distributed, is_main_process, rank_and_world

__all__ = [
    "all_reduce_sum",
    "is_distributed",
    "is_main_process",
    "fit_lib_distributed",
    "init_from_env",
    "launched_by_torchrun",
    "leave_worker",
    "rank_and_world",
    "relaunch_with_torchrun",
    "shard",
]

T = TypeVar("T")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ_ranks t (in place, returned); t itself without a process group. Not differentiable:
    for accumulated statistics (Gram sums, counts), not for training losses."""
    if is_distributed():
        if t.device.type == "cpu" and dist.get_backend() == "nccl":  # NCCL reduces GPU tensors only
            on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            t.copy_(on_gpu)
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def shard(items: Iterable[T], rank: int | None = None, world: int | None = None) -> Iterator[T]:
    """Items r, r + N, r + 2N, ... of ``items`` (DistributedSampler-like split of batches);
    all items with no process group. rank/world default to the current process group's."""
    cur_rank, cur_world = rank_and_world()
    rank = cur_rank if rank is None else rank
    world = cur_world if world is None else world
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f"need 0 <= rank < world with world >= 1, got rank={rank!r}, world={world!r}")
    for index, item in enumerate(items):
        if index % world == rank:
            yield item


# ---------------------------------------------------------------------------- LIB over processes

def fit_lib_distributed(model, batches: Sequence, node_layers: list[str], config=None,
                        input_fn: Callable | None = None, progress: bool = True):
    """``fit_lib`` on all ``batches``, split over the processes of the current process group.

    Process r fits on ``shard(batches)`` (batches r, r + N, ...) with ``reduce=all_reduce_sum``:
    the Gram sums, Jacobian Grams M′, edge sums and row counts are summed over processes
    before use, so every process returns the fit of all the batches (the same numbers as one
    process, up to float64 rounding). Plain ``fit_lib`` without a process group.
    """
    from evaluation.lib.fit import LIBConfig, fit_lib

    config = LIBConfig() if config is None else config
    batches = list(batches)
    rank, world = rank_and_world()
    if len(batches) < world:
        # checked on every process alike, before any collective, so no process is left waiting
        raise ValueError(f"{len(batches)} batches cannot be split over {world} processes; "
                         "use a smaller --batch-size or fewer processes")
    if world == 1:
        return fit_lib(model, batches, node_layers, config, input_fn=input_fn, progress=progress)
    return fit_lib(model, list(shard(batches, rank, world)), node_layers, config, input_fn=input_fn,
                   progress=progress, reduce=all_reduce_sum)


# ---------------------------------------------------------------------------- launching

def launched_by_torchrun() -> bool:
    """True inside a process started by torchrun / torch.distributed.run (WORLD_SIZE and RANK set)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """Initialises the default process group from torchrun's environment (once); returns
    (rank, world). backend: "gloo" on CPU, "nccl" when CUDA is available (default)."""
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
    return rank_and_world()


def leave_worker(code: int = 0) -> NoReturn:
    """Ends a torchrun worker: destroys the process group (if any), flushes stdout and stderr and
    leaves through ``os._exit(code)``, skipping interpreter finalization: gloo's threads can still
    hold tensors there, and releasing them can abort the process (SIGABRT, "terminate called
    without an active exception"; pytorch/pytorch#190489), which torchrun reports as a failed
    launch after the work was done."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def torchrun_command(nproc: int, *args: str) -> list[str]:
    """``python -m torch.distributed.run`` on this machine with ``nproc`` processes. ``--standalone``
    lets the launcher's own rendezvous store bind a free port: a port picked here and handed over
    could be taken in between (by another launch's connections), which failed a launch under load."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]


def relaunch_with_torchrun(nproc: int, module: str, argv: Sequence[str], env: dict | None = None) -> int:
    """Runs ``python -m torch.distributed.run --nproc_per_node nproc -m module *argv`` on this
    machine and returns its exit status (the CLI's ``--nproc N``)."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"the number of processes must be an integer >= 1, got {nproc!r}")
    cmd = torchrun_command(nproc, "-m", module, *argv)
    return subprocess.run(cmd, env={**os.environ, **(env or {})}).returncode
