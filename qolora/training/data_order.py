"""The order examples are trained in, reproducible and resumable, and the data's fingerprint.

:class:`DataOrder` is a seeded per-epoch permutation (optionally grouped into batches of similar
length) whose position ``(epoch, index)`` a checkpoint saves; :func:`scan_dataset` fingerprints a
tokenized data set in one pass so a resumed run can prove it sees the same data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["DataOrder", "iter_rows", "scan_dataset"]


def iter_rows(dataset, chunk: int = 1024):
    """The rows of a ``datasets.Dataset`` (read a chunk of columns at a time) or of a list of dicts."""
    for start in range(0, len(dataset), chunk):
        part = dataset[start: start + chunk]  # a Dataset gives {column: values}, a list gives rows
        yield from ([dict(zip(part, values)) for values in zip(*part.values())] if isinstance(part, dict) else part)


def scan_dataset(dataset) -> tuple[str, list[int]]:
    """One pass over a tokenized data set: its fingerprint (size, token ids, labels, positions, in
    order; a resumed run must see the same data) and the length of each example."""
    h = hashlib.sha256(str(len(dataset)).encode())
    lengths = []
    for row in iter_rows(dataset):
        lengths.append(len(row["input_ids"]))
        for key in ("input_ids", "labels", "position_ids"):
            if key in row:
                h.update(key.encode())
                h.update(np.asarray(row[key], dtype=np.int64).tobytes())
    return h.hexdigest()[:16], lengths


class DataOrder:
    """The order examples are trained in; its position ``(epoch, index)`` is saved and restored.

    Each epoch is a permutation from a generator seeded with ``(seed, epoch)``. With ``lengths``, each
    window of ``8 * batch`` consecutive positions is then sorted by length and cut into batches of
    ``batch``, whose order inside the window is shuffled again: every batch holds examples of similar
    length (little padding) and the batch lengths still come in random order.

    In a data-parallel run every rank builds the same order with ``batch`` = the *global* effective
    batch (processes x batch size x accumulation) and takes its slice of each micro-batch, so N
    processes train on exactly the batches of one process with N times the batch size.
    """

    def __init__(self, n: int, seed: int, epoch: int = 0, index: int = 0, *, lengths: Sequence[int] | None = None,
                 batch: int = 1):
        self.n, self.seed, self.epoch, self.index = n, seed, epoch, index
        self.lengths, self.batch = lengths, batch
        self._perm: list[int] | None = None

    def _permutation(self) -> list[int]:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
            if self.lengths is not None and self.batch > 1:
                grouped, window = [], 8 * self.batch
                for start in range(0, self.n, window):
                    by_length = sorted(perm[start: start + window], key=lambda i: -self.lengths[i])
                    batches = [by_length[i: i + self.batch] for i in range(0, len(by_length), self.batch)]
                    grouped += [i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b]]
                perm = grouped
            self._perm = perm
        return self._perm

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.index >= self.n:
                self.epoch, self.index, self._perm = self.epoch + 1, 0, None
            take = min(k - len(out), self.n - self.index)
            out += self._permutation()[self.index: self.index + take]
            self.index += take
        return out

    @property
    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}
