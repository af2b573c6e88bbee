r"""The kernel bank of LMPPM (:mod:`onestep.generators.lmppm`): codes of (a seeded subset of) the training
split, their bandwidth ``h = h_scale * rule(codes)`` (or a fixed one), mean and std, kept in buffers so
checkpoints carry them. Only training codes are ever admitted: held-out codes in the bank would leak test
data into generation and restoration.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from onestep.generators.base import _check
from onestep.generators.latent_flow import nn_median_bandwidth, silverman_bandwidth
from onestep.modules import datamodule_of


class KernelBankMixin:
    """Bank building for a module with ``encode``, ``latent_dim``, ``bank_size``, ``bank_seed``,
    ``bandwidth_rule``, ``h_scale``, ``fixed_bandwidth``, a ``stage`` buffer and the bank buffers
    ``bank``, ``bank_bandwidth``, ``bank_mean``, ``bank_std``, ``bank_step``."""

    @property
    def _datamodule(self) -> Any:
        return datamodule_of(self)

    @property
    def code_scale(self) -> Tensor:
        """RMS per-dimension std of the bank: the unit of the latent noise and of the latent losses."""
        return self.bank_std.square().mean().sqrt()

    def build_bank(self, codes: Tensor, split: str = "train", bandwidth: float | None = None) -> None:
        """Install ``codes`` (N, d) as the kernel bank. Only training codes are allowed (``split="train"``);
        ``bandwidth`` overrides the rule and must be > 0."""
        _check(split == "train", f"build_bank: split={split!r} refused; the kernel bank must come from the "
               "training split only (held-out codes in the bank would leak test data into generation)")
        _check(codes.dim() == 2 and codes.shape[1] == self.latent_dim and len(codes) >= 2,
               f"build_bank: codes must have shape (N >= 2, {self.latent_dim}), got {tuple(codes.shape)}")
        bandwidth = bandwidth if bandwidth is not None else self.fixed_bandwidth
        if bandwidth is None:
            rule = silverman_bandwidth if self.bandwidth_rule == "silverman" else nn_median_bandwidth
            bandwidth = self.h_scale * rule(codes)
        _check(bandwidth > 0, f"build_bank: bandwidth must be > 0, got {bandwidth} (identical codes give 0 with "
               "the rule: set bandwidth= explicitly)")
        codes = codes.detach().to(self.bank_mean)
        self.bank = codes.clone()
        self.bank_bandwidth = torch.tensor(float(bandwidth), device=codes.device)
        self.bank_mean, self.bank_std = codes.mean(0), codes.std(0).clamp_min(1e-8)
        self.bank_step = torch.tensor(self.global_step, device=codes.device)

    @torch.no_grad()
    def build_bank_from_data(self, x: Tensor, split: str = "train", chunk: int = 1024) -> None:
        """Encode (a ``bank_seed``-seeded subset of at most ``bank_size`` rows of) training data ``x``."""
        dm = self._datamodule
        for held_out in ("val", "test"):
            data = getattr(dm, f"{held_out}_data", None)
            _check(data is None or data.data_ptr() != x.data_ptr(),
                   f"build_bank_from_data: x is the datamodule's {held_out} split; the bank must come from train")
        if len(x) > self.bank_size:
            pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.bank_seed))[: self.bank_size]
            x = x[pick.sort().values]
        codes = torch.cat([self.encode(part.to(self.device)) for part in x.split(chunk)])
        self.build_bank(codes, split=split)

    def _bank_from_datamodule(self) -> bool:
        data = getattr(self._datamodule, "train_data", None)
        if data is None:
            return False
        self.build_bank_from_data(data, split="train")
        return True

    def _ensure_bank(self) -> None:
        """Stage 2 keeps its bank; in stage 1 the encoder still moves, so a provisional bank is rebuilt
        (from the training split, current weights) whenever the step changed."""
        stale = int(self.stage) == 1 and self._trainer is not None and int(self.bank_step) != self.global_step
        if (len(self.bank) == 0 or stale) and not self._bank_from_datamodule() and len(self.bank) == 0:
            raise RuntimeError("LMPPM has no kernel bank: train it with a OneStepDataModule (the bank is built "
                               "from the training split), load a trained checkpoint, or call "
                               "build_bank_from_data(train_x)")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # the bank's size is known only once it is built: resize before loading (checkpoint resume,
        # load_from_checkpoint and plain load_state_dict all come through here)
        saved = state_dict.get(prefix + "bank")
        if saved is not None and saved.shape != self.bank.shape:
            self.bank = torch.zeros_like(saved, device=self.bank.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
