"""Couplings between noise ``x0 ~ N(0, I)`` and data ``x1``: who is paired with whom.

All strategies use the squared Euclidean cost ``C_ij = ||x0_i - x1_j||^2`` on flattened tensors and the
exact balanced assignment (a permutation), so a batch of B pairs costs one O(B^3) assignment.

* ``independent``: fresh noise, no pairing (the ablation that collapses flow maps to the data mean).
* ``minibatch``: fresh noise re-ordered by the exact assignment within each batch (OT-CFM's coupling).
* ``global``: one fixed noise sample per training point, assigned once by an N x N assignment
  (deterministic and exact, but O(N^3): refused above ``max_size``).
* ``online``: a persistent noise bank (one or more noise slots per data index). Each step re-solves the
  assignment between the batch and its current slots and writes the permutation back. Every swap can
  only lower the total cost, so the bank converges towards the global OT coupling at minibatch cost.

Bank noise is not stored: slot ``k`` holds ``hashed_normal(k)``, a counter-based Gaussian (splitmix64 hash
plus Box-Muller) that any device regenerates identically, so a checkpoint needs only the slot indices.

The exact assignment runs on the CPU (B = 256 in 2-D: ~4 ms for POT's network simplex, 13 ms for scipy's
shortest augmenting path, 22 ms for ``lap.lapjv``, over 30 ms for a vectorised auction; measured on the
2-core development machine). :class:`PairingPipeline` takes it off the training step's critical path by
solving the *next* batch on a background thread while the current one trains.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import ot
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from onestep.modules import datamodule_of

COUPLINGS = ("independent", "minibatch", "global", "online")


def pairwise_sq_dist(x0: Tensor, x1: Tensor) -> Tensor:
    """``C_ij = ||x0_i - x1_j||^2`` for flattened samples, shape ``(len(x0), len(x1))``."""
    a, b = x0.flatten(1).float(), x1.flatten(1).float()
    return (a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)).clamp_min_(0)


def ot_permutation(x0: Tensor, x1: Tensor) -> Tensor:
    """Permutation ``perm`` minimising ``sum_j ||x0[perm[j]] - x1[j]||^2`` (exact assignment).

    Low-dimensional data (D <= 8) is solved as the uniform-weight transport problem by POT's network
    simplex, whose solution is a vertex of the Birkhoff polytope, i.e. a permutation matrix: on 2-D batches
    of 256 it is about 3x faster than ``linear_sum_assignment`` (near-ties in 2-D slow the latter down).
    In high dimension the shortest-augmenting-path solver is the faster one (784-D, B = 256: 1.8 ms
    against 3.7 ms, measured on the 2-core development machine).
    """
    cost = pairwise_sq_dist(x0.detach(), x1.detach()).cpu().double().numpy()
    n = len(cost)
    if n == len(cost[0]) and n > 1 and x0[0].numel() <= 8:
        weights = np.full(n, 1.0 / n)
        plan = ot.emd(weights, weights, cost, numItermax=max(100_000, 50 * n * n))
        perm = plan.argmax(0)  # column j (data) -> row (noise)
        if np.array_equal(np.sort(perm), np.arange(n)):
            return torch.as_tensor(perm, device=x0.device, dtype=torch.long)
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty_like(cols)
    perm[cols] = rows
    return torch.as_tensor(perm, device=x0.device, dtype=torch.long)


def minibatch_ot(x0: Tensor, x1: Tensor) -> Tensor:
    """``x0`` re-ordered so that ``(x0[j], x1[j])`` is the exact OT pairing of the batch."""
    return x0[ot_permutation(x0, x1)]


# ---------------------------------------------------------------------- counter-based noise
_MASK64 = (1 << 64) - 1


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shr(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _splitmix64(z: Tensor) -> Tensor:
    z = z + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def hashed_normal(slots: Tensor, shape: Sequence[int], seed: int = 0) -> Tensor:
    """Standard normal samples ``(len(slots), *shape)``, a pure function of ``(seed, slot)``."""
    numel = int(np.prod(shape))
    counter = slots.long().unsqueeze(1) * numel + torch.arange(numel, device=slots.device)
    key = _splitmix64(torch.tensor(_signed(seed * 0x632BE59BD9B4E019 & _MASK64), device=slots.device))
    bits = _splitmix64(_splitmix64(2 * counter + key)), _splitmix64(_splitmix64(2 * counter + 1 + key))
    u1, u2 = ((_shr(b, 11).double() + 0.5) / float(1 << 53) for b in bits)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)
    return z.float().reshape(len(slots), *shape)


class NoiseBank(torch.nn.Module):
    """Persistent noise slots for the ``global`` and ``online`` couplings.

    ``slot_of[j, c]`` is the c-th noise slot of data index j (``slots`` columns); the slots form a
    bijection with ``range(n_data * slots)`` and slot k holds ``hashed_normal(k)``.

    * :meth:`solve_global` fixes the pairing once by an exact ``N x N`` assignment (``slots = 1``).
    * :meth:`pair_online` draws one column per sample, solves the batch assignment between the batch and
      its current slots and writes the permutation back, so the total cost can only go down.
    """

    def __init__(self, n_data: int, shape: Sequence[int], slots: int = 1, seed: int = 0) -> None:
        super().__init__()
        if n_data < 1 or slots < 1:
            raise ValueError(f"a noise bank needs n_data >= 1 and slots >= 1, got {n_data} and {slots}")
        self.shape, self.seed, self.slots = tuple(shape), seed, slots
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("slot_of", torch.randperm(n_data * slots, generator=g).reshape(n_data, slots))

    def _check_idx(self, idx: Tensor) -> None:
        if idx is None:
            raise ValueError("the global and online couplings need the dataset indices of each batch: "
                             "use OneStepDataModule, whose batches are (x, idx)")
        if int(idx.max()) >= len(self.slot_of):
            raise IndexError(f"data index {int(idx.max())} outside the bank of {len(self.slot_of)} entries; "
                             "the bank was built for a smaller training set")

    def noise(self, slots: Tensor) -> Tensor:
        return hashed_normal(slots, self.shape, self.seed)

    def solve_global(self, data: Tensor, max_size: int = 10_000) -> None:
        n = len(data)
        if n > max_size:
            raise ValueError(
                f"coupling='global' solves one {n} x {n} assignment (O(N^3) time, O(N^2) memory), above "
                f"global_max_size={max_size}. Use coupling='online' (it converges to the same pairing at "
                f"minibatch cost), a smaller data.n_train, or raise global_max_size.")
        if self.slots != 1 or n != len(self.slot_of):
            raise ValueError(f"solve_global needs a bank of {n} entries with one slot each")
        noise = self.noise(torch.arange(n))
        self.slot_of.copy_(ot_permutation(noise, data.cpu()).view(n, 1).to(self.slot_of.device))

    def pair_global(self, x1: Tensor, idx: Tensor) -> Tensor:
        self._check_idx(idx)
        return self.noise(self.slot_of[idx, 0]).to(x1.device)

    def pair_online(self, x1: Tensor, idx: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Noise paired with ``x1`` (data indices ``idx``); updates the bank in place."""
        self._check_idx(idx)
        col = torch.zeros_like(idx) if self.slots == 1 else \
            torch.randint(self.slots, (len(idx),), generator=generator).to(idx.device)
        slots = self.slot_of[idx, col]
        x0 = self.noise(slots).to(x1.device)
        perm = ot_permutation(x0, x1)
        self.slot_of[idx, col] = slots[perm]
        return x0[perm]

    def mean_pair_cost(self, data: Tensor) -> float:
        """Mean ``||x0 - x1||^2`` over the whole bank (first slot column), for diagnostics."""
        x0 = self.noise(self.slot_of[:, 0].cpu())
        return float((x0.flatten(1) - data.cpu().flatten(1)).square().sum(1).mean())


# ---------------------------------------------------------------------- pairing off the critical path
class PairingPipeline:
    """Minibatch OT pairing solved one batch ahead, on a background thread.

    The data module calls :meth:`submit` when it collates a training batch. Lightning's loop fetches
    batch ``s + 1`` before it runs step ``s``, so the assignment of ``s + 1`` (noise draw, cost matrix,
    network simplex, which releases the GIL) overlaps step ``s``'s forward and backward. The training step
    then calls :meth:`take` for its batch and waits only for whatever is left of the solve.

    The noise of a sample is ``hashed_normal(draw)``, where ``draw = data_epoch * N + index`` names this
    draw of the sample: a pure function of the data order, so results do not depend on thread timing,
    resume exactly, and differ between ranks (disjoint indices). :meth:`take` matches batches by their
    indices and returns ``None`` for a batch it never saw (the caller then pairs inline).
    """

    max_pending = 4  # batches collated but never trained on (an epoch cut short) are dropped beyond this

    def __init__(self, shape: Sequence[int], seed: int) -> None:
        self.shape, self.seed = tuple(shape), int(seed)
        self._pending: deque[tuple[Tensor, Future]] = deque()
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.hits = self.misses = 0  # batches served from the queue / not found there

    def _solve(self, x1: Tensor, draw: Tensor) -> Tensor:
        x0 = hashed_normal(draw, self.shape, self.seed)
        return x0[ot_permutation(x0, x1)]

    def submit(self, x1: Tensor, idx: Tensor, draw: Tensor) -> None:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="onestep-pairing")
            self._pending.append((idx.clone(), self._executor.submit(self._solve, x1.detach().cpu(), draw)))
            while len(self._pending) > self.max_pending:
                self._pending.popleft()

    def take(self, idx: Tensor) -> Tensor | None:
        """The noise paired with the batch of data indices ``idx`` (``None`` if it was not submitted)."""
        idx = idx.detach().cpu()
        with self._lock:
            while self._pending:
                seen, future = self._pending.popleft()
                if seen.shape == idx.shape and torch.equal(seen, idx):
                    self.hits += 1
                    break
            else:
                self.misses += 1
                return None
        return future.result()

    def close(self) -> None:
        with self._lock:
            self._pending.clear()
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def __getstate__(self) -> dict:  # copies (deepcopy, pickling) start with no thread and no queue
        return {"shape": self.shape, "seed": self.seed}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["shape"], state["seed"])


def attach_pairing(model: torch.nn.Module, shape: Sequence[int]) -> PairingPipeline | None:
    """A :class:`PairingPipeline` fed by the model's data module, or ``None`` where that cannot work.

    Needs a data module that exposes ``train_batch_hook`` (:class:`~onestep.data.OneStepDataModule`) and
    collates in this process (``num_workers = 0``: a worker process has its own copy of the model). The
    noise seed is drawn from the global RNG, so it follows ``seed_everything``."""
    datamodule = datamodule_of(model)
    if datamodule is None or not hasattr(datamodule, "train_batch_hook") or datamodule.num_workers > 0:
        return None
    pipeline = PairingPipeline(shape, seed=int(torch.randint(2**62, (1,))))
    datamodule.train_batch_hook = pipeline.submit
    return pipeline


def paired_noise(x1: Tensor, idx: Tensor | None, pipeline: PairingPipeline | None) -> Tensor:
    """Minibatch-OT noise for ``x1``: from the pipeline when it solved this batch, else solved here."""
    x0 = pipeline.take(idx) if pipeline is not None and idx is not None else None
    return minibatch_ot(torch.randn_like(x1), x1) if x0 is None else x0.to(x1)


class PrefetchedPairing:
    """Mixin for a plugin with a ``minibatch`` coupling (attributes ``coupling``, ``data_shape``): in
    ``fit`` its pairing is solved one batch ahead by a :class:`PairingPipeline` unless
    ``prefetch_pairing`` is False; :meth:`minibatch_noise` returns the paired noise of a batch."""

    prefetch_pairing: bool = True
    _pairing: PairingPipeline | None = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.coupling == "minibatch" and self.prefetch_pairing and self._pairing is None:
            self._pairing = attach_pairing(self, self.data_shape)

    def teardown(self, stage: str) -> None:
        if self._pairing is not None:
            self._pairing.close()
        super().teardown(stage)

    def minibatch_noise(self, x1: Tensor, idx: Tensor | None) -> Tensor:
        return paired_noise(x1, idx, self._pairing)
