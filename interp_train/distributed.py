"""Training under DDP: process-group helpers and the global-batch gather for batch statistics.

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
  effective rank of all rows of the batch; ``Regularizer.batch_statistic``) are NOT means over
  examples: per rank they are the effective rank of the rank's B/N rows, and the averaged
  gradient is that of mean_r erank(rows_r), not of erank(all rows). ``global_batch(reg)`` sets
  the regularizer's public ``gather`` hook to ``gather_rows`` (which keeps the autograd graph),
  so each rank computes erank(all rows) and the averaged gradient is exactly the global-batch
  gradient.
* Schedules: each regularizer's step advances once per training_step on every rank, so every
  rank uses the same weight w(step).
* Logged values (``reg/...``) are rank 0's local values unless the module logs with sync_dist.

LIB over processes (sums all-reduced over data shards) is ``evaluation.lib.distributed``.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

__all__ = ["gather_rows", "global_batch", "is_distributed", "is_main_process", "rank_and_world"]


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


def global_batch(regularizer):
    """Makes a batch-statistic regularizer (ActivationDegeneracy, GradientDegeneracy,
    FiringPatternDegeneracy) compute its statistic over the global batch under DDP; returns it.

    Sets the regularizer's ``gather`` hook (``Regularizer.batch_rows``) to ``gather_rows``: the rows
    of every rank are gathered along the batch dimension before the statistic. Identity in a single
    process. Other regularizers are per-example means and need nothing (TypeError, naming the
    class, if one is passed).
    """
    if not getattr(regularizer, "batch_statistic", False):
        raise TypeError(
            f"global_batch applies to batch-statistic regularizers (ActivationDegeneracy, GradientDegeneracy, "
            f"FiringPatternDegeneracy), got {type(regularizer).__name__}; per-example-mean penalties are already "
            "exact under DDP"
        )
    regularizer.gather = gather_rows
    return regularizer
