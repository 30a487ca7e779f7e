"""Multi-process helpers: regularized training under DDP and LIB fitting over data shards.

Everything goes through ``torch.distributed`` (gloo on CPU, NCCL on GPUs); with no process
group initialised every helper is the single-process identity, so the same code runs
unchanged in one process.

Training under Lightning DDP (``Trainer(strategy="ddp", devices=N)``): each rank computes its
regularizer terms on its own per-rank batch and DDP averages the parameter gradients.

* Per-example-mean penalties (GradientNorm, FiniteDifferenceGradientNorm, JacobianNorm,
  NoisePenalty, RandomizedSmoothing, PGDAdversarial, OffManifold*, InteractionSparsity) are
  mean_i p_i over the rank's batch; with equal per-rank batch sizes the average over ranks of
  these means is the mean over the global batch, and so is the averaged gradient: identical to
  one process on the global batch (no rank-dependent bias). Random draws (noise, PGD starts,
  sampled Jacobian rows) come from each rank's own generator; they are unbiased per example.
  Lightning's ``seed_everything`` gives every rank the same seed, so local example i on every
  rank gets the same draw; seed ``base + rank`` in ``on_train_start`` for independent draws.
* Weight penalties (ConnectionCost) are the same on every rank; their averaged gradient is the
  single-process gradient.
* Batch statistics (ActivationDegeneracy, GradientDegeneracy, FiringPatternDegeneracy: one
  effective rank of all rows of the batch) are NOT means over examples: per rank they are the
  effective rank of the rank's B/N rows, and the averaged gradient is that of
  mean_r erank(rows_r), not of erank(all rows). ``global_batch(reg)`` makes them gather the
  rows of every rank first (``gather_rows``, which keeps the autograd graph), so each rank
  computes erank(all rows) and the averaged gradient is exactly the global-batch gradient.
* Schedules: each regularizer's step advances once per training_step on every rank, so every
  rank uses the same weight w(step).
* Logged values (``reg/...``) are rank 0's local values unless the module logs with sync_dist.

LIB fitting (``evaluation.lib.fit.fit_lib(..., reduce=all_reduce_sum)``): each rank takes the
batches ``shard(batches)`` (batch r, r + N, r + 2N, ...), accumulates its float64 sums and
counts, and ``all_reduce_sum`` adds them over ranks before they are used, so every rank holds
the sums over all data; only rank 0 writes outputs (``is_main_process``).
"""

from __future__ import annotations

import warnings
import os
import socket
import subprocess
import sys
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "GlobalBatchRank",
    "all_reduce_sum",
    "gather_rows",
    "global_batch",
    "is_distributed",
    "is_main_process",
    "fit_lib_distributed",
    "init_from_env",
    "launched_by_torchrun",
    "rank_and_world",
    "relaunch_with_torchrun",
    "shard",
]

T = TypeVar("T")


def is_distributed() -> bool:
    """True when a torch.distributed process group is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that writes files."""
    return rank_and_world()[0] == 0


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


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """cat_r t_r along dim 0 (rank order), differentiable; t without a process group.

    Backward (torch.distributed.nn.functional.all_gather) sums the gradients of every rank's
    copy, so for a penalty P(all rows) computed identically on N ranks each rank receives
    N ∂P/∂t_r; DDP's gradient average then divides by N, giving exactly ∂P/∂θ. Every rank must
    pass the same shape (equal per-rank batch sizes, e.g. ``drop_last=True``).
    """
    if not is_distributed():
        return t
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of a private module; still differentiable
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(t.contiguous()), dim=0)


class GlobalBatchRank:
    """Mixin for the degeneracy regularizers: the effective rank of the rows of all ranks."""

    def _rank(self, matrix: torch.Tensor) -> torch.Tensor:
        return super()._rank(gather_rows(matrix))


_GLOBAL: dict[type, type] = {}


def global_batch(regularizer):
    """Makes a batch-statistic regularizer (ActivationDegeneracy, GradientDegeneracy,
    FiringPatternDegeneracy) compute its statistic over the global batch under DDP; returns it.

    Rows are gathered along the batch dimension before the effective rank (``gather_rows``).
    Identity in a single process. Other regularizers are per-example means and need nothing
    (TypeError, naming the class, if one is passed).
    """
    from interp_train.regularizers.degeneracy import _EffectiveRankPenalty

    cls = type(regularizer)
    if isinstance(regularizer, GlobalBatchRank):
        return regularizer
    if not isinstance(regularizer, _EffectiveRankPenalty):
        raise TypeError(
            f"global_batch applies to batch-statistic regularizers (ActivationDegeneracy, GradientDegeneracy, "
            f"FiringPatternDegeneracy), got {cls.__name__}; per-example-mean penalties are already exact under DDP"
        )
    if cls not in _GLOBAL:
        _GLOBAL[cls] = type(f"GlobalBatch{cls.__name__}", (GlobalBatchRank, cls), {"__module__": cls.__module__})
    regularizer.__class__ = _GLOBAL[cls]
    return regularizer


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


def free_port() -> int:
    """A local TCP port nobody listens on now (for the rendezvous of a one-machine launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relaunch_with_torchrun(nproc: int, module: str, argv: Sequence[str], env: dict | None = None) -> int:
    """Runs ``python -m torch.distributed.run --nproc_per_node nproc -m module *argv`` on this
    machine and returns its exit status (the CLI's ``--nproc N``)."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"the number of processes must be an integer >= 1, got {nproc!r}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", module, *argv]
    return subprocess.run(cmd, env={**os.environ, **(env or {})}).returncode
