r"""`ResumableSampler`: seeded shuffling that splits across ranks and resumes exactly where it stopped.

Order. Data epoch ``e`` is one permutation ``perm_e`` of ``range(n)`` drawn from a generator seeded with
``epoch_seed(seed, e)`` (a SeedSequence hash, so epochs and seeds never share a stream). With ``W``
processes the first ``W m`` entries are dealt round-robin, rank ``r`` reading ``perm_e[r::W]``, where
``m = n // W`` rounded down to a multiple of the batch size (so no rank ends an epoch on a partial batch).
Consequently the ``k``-th batches of ``b`` indices of all ranks together are
``perm_e[k b W : (k + 1) b W]``: a run on ``W`` processes with batch ``b`` trains on exactly the global
batches of one process with batch ``b W``.

Stream. The sampler is one continuous stream of data epochs: each pass (each ``iter``) yields the rest
of the current data epoch from the first index not yet handed out, and a new data epoch begins only when
the previous one is used up. Lightning's epoch numbers (``set_epoch``) are therefore not used for the
order (an epoch that Lightning cuts short, e.g. with ``limit_train_batches``, is continued by the next
one). This is what makes resuming exact wherever a checkpoint was taken: after a resume Lightning may cut
its first epoch short (it counts batches from its restored progress), but the stream goes on with the
next unseen index of the interrupted data epoch.

Position. :meth:`state_dict` records ``{"epoch", "samples_seen"}`` where ``samples_seen`` counts the
*global* samples of data epoch ``epoch`` already trained on; :meth:`load_state_dict` makes the stream
continue there (``samples_seen / W`` on each rank, so also after a change of ``W`` when that divides).

The sampler subclasses :class:`torch.utils.data.DistributedSampler` only so that Lightning recognises it
as already distributed and neither replaces nor wraps it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DistributedSampler

__all__ = ["ResumableSampler", "epoch_seed", "distributed_context"]


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed that depends on both ``seed`` and ``epoch``."""
    state = np.random.SeedSequence([int(seed), 104729, int(epoch)]).generate_state(2, np.uint64)
    return int(state[0] >> 1)


def distributed_context(trainer: Any = None) -> tuple[int, int]:
    """``(world_size, rank)`` from the trainer if attached, else from torch.distributed, else ``(1, 0)``."""
    if trainer is not None:
        return int(trainer.world_size), int(trainer.global_rank)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class ResumableSampler(DistributedSampler):
    """One rank's share of a seeded permutation per data epoch, as a resumable stream.

    Args:
        n: dataset size.
        seed: shuffling seed (the same on every rank).
        num_replicas, rank: number of processes and this process's rank.
        shuffle: ``False`` keeps the identity order (still split round-robin).
        batch_size: if given (and at least one full batch fits), each rank's share of an epoch is cut to a
            multiple of it, so a data epoch never ends in a partial batch that a ``drop_last`` loader drops.
    """

    def __init__(self, n: int, seed: int = 0, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 batch_size: int | None = None) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"ResumableSampler: n={n!r} is not allowed; use an integer >= 1")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"ResumableSampler: rank={rank} with num_replicas={num_replicas} is not allowed; "
                             "use 0 <= rank < num_replicas")
        if n < num_replicas:
            raise ValueError(f"ResumableSampler: n={n} samples cannot be split over {num_replicas} processes; "
                             "use at least one sample per process")
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.n = n
        # every rank gets the same count: the last n mod W entries of each permutation are left out
        self.num_samples = n // num_replicas
        if batch_size is not None and self.num_samples >= batch_size:
            self.num_samples -= self.num_samples % batch_size
        self.total_size = self.num_samples * num_replicas
        self.data_epoch = 0  # the data epoch being read
        self.handed_out = 0  # indices of that epoch already yielded by this rank

    def order(self, epoch: int) -> torch.Tensor:
        """The global order of data epoch ``epoch`` (all ranks' indices interleaved)."""
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(epoch_seed(self.seed, epoch)))

    def local_order(self, epoch: int) -> torch.Tensor:
        return self.order(epoch)[: self.total_size][self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        if self.handed_out >= self.num_samples:  # the previous data epoch is used up
            self.data_epoch, self.handed_out = self.data_epoch + 1, 0
        for index in self.local_order(self.data_epoch)[self.handed_out :].tolist():
            self.handed_out += 1
            yield index

    def __len__(self) -> int:
        # the full per-epoch count, also when a pass resumes mid-epoch: Lightning counts the batches
        # already trained on from its own restored progress and stops at the end of the stream's epoch
        return self.num_samples

    # ------------------------------------------------------------------ position
    def state_dict(self, not_trained: int = 0) -> dict[str, int]:
        """Position of the stream, leaving out ``not_trained`` indices that were handed out (fetched or
        prefetched) but not trained on yet. ``samples_seen`` is global (all ranks)."""
        local = max(0, self.handed_out - int(not_trained))
        return {"epoch": int(self.data_epoch), "samples_seen": int(local * self.num_replicas),
                "seed": int(self.seed), "n": self.n}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue the stream at data epoch ``state["epoch"]`` after ``state["samples_seen"]`` samples."""
        if int(state.get("n", self.n)) != self.n or int(state.get("seed", self.seed)) != self.seed:
            warnings.warn(f"ResumableSampler: the checkpoint's data order (n={state.get('n')}, "
                          f"seed={state.get('seed')}) differs from this run's (n={self.n}, seed={self.seed}); the "
                          "position is applied to the new order, so some samples of the interrupted epoch may repeat "
                          "or be skipped", stacklevel=2)
        seen = int(state["samples_seen"])
        if seen % self.num_replicas:
            warnings.warn(f"ResumableSampler: {seen} samples seen do not split evenly over {self.num_replicas} "
                          "processes; resuming at the nearest earlier sample", stacklevel=2)
        self.data_epoch = int(state["epoch"])
        self.handed_out = min(seen // self.num_replicas, self.num_samples)
