"""Per-example losses and target scores shared by the regularizers.

Conventions: ``output`` is (B, C) logits, or (B, T, C) for sequence models. ``targets`` is (B,)
class indices, or (B, T) per-position targets. When a sequence output comes with (B,) targets
the prediction is read at the last position (e.g. modular addition: ``a b =`` -> answer).
Per-example quantities are means over positions, so they do not depend on sequence length.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

TargetKind = Literal["loss", "logit", "logprob"]
TARGET_KINDS = ("loss", "logit", "logprob")


def _align(output: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (logits (B, P, C), targets (B, P)) with P positions per example."""
    if output.ndim == targets.ndim + 1:
        if output.ndim == 2:
            return output.unsqueeze(1), targets.unsqueeze(1)
        return output.reshape(output.shape[0], -1, output.shape[-1]), targets.reshape(targets.shape[0], -1)
    if output.ndim == 3 and targets.ndim == 1:
        return output[:, -1:, :], targets.unsqueeze(1)
    raise ValueError(
        f"cannot match output of shape {tuple(output.shape)} with targets of shape {tuple(targets.shape)}: "
        "expected (B, C) with (B,), (B, T, C) with (B, T), or (B, T, C) with (B,) (last position)"
    )


def per_example_cross_entropy(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """ℓ_i = mean over positions of -log softmax(output_i)[target]; shape (B,)."""
    logits, tgt = _align(output, targets)
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none")
    return losses.reshape(tgt.shape).mean(dim=1)


def target_score(output: torch.Tensor, targets: torch.Tensor, kind: TargetKind) -> torch.Tensor:
    """Per-example scalar whose input gradient a regularizer uses; shape (B,).

    kind="loss": per-example cross-entropy; "logit": the target's logit; "logprob": the target's
    log-probability (each a mean over positions).
    """
    if kind == "loss":
        return per_example_cross_entropy(output, targets)
    if kind not in TARGET_KINDS:
        raise ValueError(f"unknown target {kind!r}; allowed: {', '.join(TARGET_KINDS)}")
    logits, tgt = _align(output, targets)
    if kind == "logprob":
        logits = torch.log_softmax(logits, dim=-1)
    return logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).mean(dim=1)


def per_example_mse(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """ℓ_i = mean_j (output_ij - targets_ij)^2; shape (B,). For regression tasks."""
    diff = (output - targets).reshape(output.shape[0], -1)
    return diff.pow(2).mean(dim=1)
