"""Recipe 4: byte-level language modelling on CPython's bundled docs (offline) or TinyStories.

Tokens are bytes (vocabulary 256). An example is a window of ``seq_len + 1`` bytes: inputs are
the first ``seq_len``, targets the last ``seq_len`` (next-byte prediction at every position).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch.utils.data import TensorDataset

from interp_train.recipes import SplitDataModule, split_indices

SOURCES = ("pydoc", "tinystories")
VOCAB_SIZE = 256


def pydoc_text() -> str:
    """The text of CPython's ``pydoc_data.topics`` (help() topics), topics in sorted order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some minimal Python builds drop it
        raise RuntimeError("source='pydoc' needs the standard-library module pydoc_data.topics, "
                           "which this Python installation lacks") from exc
    return "\n\n".join(topics[k] for k in sorted(topics))


def tinystories_text(max_bytes: int) -> str:
    """Concatenated TinyStories (``roneneldan/TinyStories`` through ``datasets``) up to max_bytes."""
    try:
        from datasets import load_dataset

        ds = load_dataset("roneneldan/TinyStories", split="train", streaming=True)
        chunks, size = [], 0
        for row in ds:
            chunks.append(row["text"])
            size += len(row["text"])
            if size >= max_bytes:
                break
    except Exception as exc:  # offline, no cache, or datasets missing
        raise RuntimeError(
            "source='tinystories' downloads roneneldan/TinyStories with the `datasets` library and "
            f"failed ({type(exc).__name__}: {exc}); offline, use source='pydoc'"
        ) from exc
    return "\n\n".join(chunks)


def byte_windows(data: bytes, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows of seq_len + 1 bytes, (N, seq_len + 1) int64."""
    arr = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    n = (len(arr) - 1) // seq_len
    if n < 3:
        raise ValueError(f"text of {len(arr)} bytes is too short for seq_len={seq_len} (need 3 windows)")
    starts = torch.arange(n) * seq_len
    return arr[starts.unsqueeze(1) + torch.arange(seq_len + 1)]


class ByteTextDataModule(SplitDataModule):
    """Next-byte prediction: batches (tokens (B, T), targets (B, T)).

    source: "pydoc" (offline, ~465 kB) or "tinystories" (online). max_bytes caps the text used.
    """

    task = "text"

    def __init__(
        self,
        source: Literal["pydoc", "tinystories"] = "pydoc",
        seq_len: int = 64,
        max_bytes: Optional[int] = None,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        batch_size: Optional[int] = 64,
        split_seed: int = 0,
        num_workers: int = 0,
        eval_batch_size: Optional[int] = 256,
    ):
        super().__init__(batch_size, num_workers, eval_batch_size)
        if source not in SOURCES:
            raise ValueError(f"unknown text source {source!r}; allowed: {', '.join(SOURCES)}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len!r}")
        self.source = source
        self.seq_len = seq_len
        self.max_bytes = max_bytes
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed

    def text_bytes(self) -> bytes:
        if self.source == "pydoc":
            data = pydoc_text().encode("utf-8")
        else:
            data = tinystories_text(self.max_bytes or 20_000_000).encode("utf-8")
        return data[: self.max_bytes] if self.max_bytes else data

    def window_splits(self, n_windows: int) -> dict[str, torch.Tensor]:
        """{"train" | "val" | "test": indices of the windows in that split}, for n_windows windows."""
        train_f = 1.0 - self.val_fraction - self.test_fraction
        parts = split_indices(n_windows, [train_f, self.val_fraction, self.test_fraction], self.split_seed)
        return dict(zip(("train", "val", "test"), parts))

    def build(self) -> dict[str, TensorDataset]:
        windows = byte_windows(self.text_bytes(), self.seq_len)
        return {name: TensorDataset(windows[idx, :-1], windows[idx, 1:])
                for name, idx in self.window_splits(len(windows)).items()}
