r"""OT-NFM: ODE-free neural flow matching with optimal-transport couplings (Shou, 2026).

A flow map conditioned on the *starting point* is regressed onto the linear interpolant:

.. math::  \varphi_\theta(x_0, t) = x_0 + h(t)\,G_\theta(x_0, t), \quad h(0) = 0
           \;\Rightarrow\; \varphi_\theta(x_0, 0) = x_0,

.. math::  \mathcal{L}(\theta) = \mathbb{E}_{t \sim U[0,1],\,(x_0, x_1) \sim \pi}
           \big\|\varphi_\theta(x_0, t) - ((1 - t)x_0 + t x_1)\big\|^2 .

One-step sampling is ``phi(z, 1)`` (NFE = 1). The L2 minimiser is
``phi*(x0, 1) = E_pi[x1 | x0]``: under the independent coupling every sample collapses to the data
mean ("mean collapse"); a deterministic coupling (OT) avoids it. Couplings: see
:mod:`onestep.generators.coupling`. For vectors the default network is a stribor-style invertible
ResNet flow; any other backbone is wrapped as ``x0 + h(t) * net(x0, t)``.

Under DDP the ``online`` bank is kept identical on every rank: each rank re-pairs its own batch and the
slot updates of all ranks are gathered and applied everywhere (the batches are disjoint, so the updates
never conflict). The ``minibatch`` assignment is solved one batch ahead on a background thread unless
``prefetch_pairing=False`` (:class:`~onestep.generators.coupling.PairingPipeline`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import torch
from torch import Tensor

from onestep.generators.base import OneStepGenerator, _check
from onestep.generators.coupling import COUPLINGS, NoiseBank, PrefetchedPairing
from onestep.modules import datamodule_of
from onestep.nets import FlowMap, build_backbone
from onestep.nets.time import FLOW_TIME_EMBEDDINGS
from onestep.options import AtLeastOne, UnitInterval
from onestep.paths import LinearPath

LOSSES = ("position", "velocity")
PATH = LinearPath()  # the regression targets: x_t and d x_t / dt of the linear path


class OTNFM(PrefetchedPairing, OneStepGenerator):
    """One-step flow map trained on OT-coupled linear paths.

    ``p_t1`` (spec §1.5): the fraction of training times set to exactly ``t = 1``, the only time one-step
    sampling uses. Default 0.5, by measurement (8gaussians, 300 steps, batch 256, MLP 128x2, lr 3e-3,
    EMA 0.9, seed 0; floor 0.321): one-step W2 1.228 at p_t1 = 0, 1.042 at 0.5, 1.275 at 1.0. At the
    4,000-step toy budget only p_t1 = 0 was measured (8gaussians 0.557, moons2d 0.290, seed 0).
    """

    nfe = 1

    def __init__(
        self,
        data_shape: Sequence[int] = (2,),
        backbone: Mapping[str, Any] | None = None,
        coupling: Literal[COUPLINGS] = "minibatch",
        time_fn: Literal[tuple(FLOW_TIME_EMBEDDINGS)] = "identity",
        p_t1: Annotated[float, UnitInterval] = 0.5,
        loss_type: Literal[LOSSES] = "position",
        bank_slots: Annotated[int, AtLeastOne] = 1,
        bank_seed: int = 0,
        global_max_size: Annotated[int, AtLeastOne] = 10_000,
        prefetch_pairing: bool = True,
        **base: Any,
    ) -> None:
        super().__init__(data_shape=data_shape, backbone=backbone, **base)
        _check(not (coupling == "global" and bank_slots != 1), "coupling='global' uses one noise per data point: "
               f"set bank_slots=1 (got {bank_slots})")
        self.coupling, self.p_t1, self.loss_type = coupling, p_t1, loss_type
        self.bank_slots, self.bank_seed, self.global_max_size = bank_slots, bank_seed, global_max_size
        spec = dict(backbone) if backbone else {"name": "resnet_flow" if len(self.data_shape) == 1 else "unet"}
        _check(spec.get("name") != "resnet_flow" or time_fn == "identity",
               f"time_fn={time_fn!r} applies to the FlowMap wrapper of mlp/unet backbones; the resnet_flow backbone "
               "embeds time in every block: set backbone.time_embed instead and leave time_fn at 'identity'")
        net = build_backbone(spec, self.data_shape)
        self.flow = net if spec.get("name") == "resnet_flow" else FlowMap(net, time_fn=time_fn)
        self.bank: NoiseBank | None = None
        self.prefetch_pairing = prefetch_pairing

    # ------------------------------------------------------------------ coupling state
    def _make_bank(self, n_data: int) -> NoiseBank:
        bank = NoiseBank(n_data, self.data_shape, slots=self.bank_slots, seed=self.bank_seed)
        self.bank = bank.to(self.device)
        return self.bank

    def setup(self, stage: str) -> None:
        super().setup(stage)  # PrefetchedPairing
        if self.coupling not in ("global", "online") or self.bank is not None:
            return
        datamodule = datamodule_of(self)
        data = getattr(datamodule, "train_data", None)
        if data is None:
            raise ValueError(f"coupling={self.coupling!r} needs the training set up front: train with "
                             "OneStepDataModule (it exposes train_data after setup)")
        bank = self._make_bank(len(data))
        if self.coupling == "global":
            bank.solve_global(data, max_size=self.global_max_size)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        slot_of = checkpoint.get("state_dict", {}).get("bank.slot_of")
        if slot_of is not None and (self.bank is None or self.bank.slot_of.shape != slot_of.shape):
            self._make_bank(slot_of.shape[0])

    def pair(self, x1: Tensor, idx: Tensor | None) -> Tensor:
        """Noise ``x0`` paired with each data point of the batch under the configured coupling."""
        if self.coupling == "independent":
            return torch.randn_like(x1)
        if self.coupling == "minibatch":
            return self.minibatch_noise(x1, idx)
        if self.bank is None:
            raise RuntimeError(f"coupling={self.coupling!r}: the noise bank was not built (setup() not run)")
        if self.coupling == "global":
            return self.bank.pair_global(x1, idx)
        x0 = self.bank.pair_online(x1, idx)
        self._sync_bank(idx)
        return x0

    def _sync_bank(self, idx: Tensor) -> None:
        """Apply every rank's slot updates on every rank (no-op on one process)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        if torch.distributed.get_world_size() == 1:
            return
        new = self.bank.slot_of[idx]
        all_idx, all_new = self.all_gather(idx), self.all_gather(new)
        self.bank.slot_of[all_idx.flatten()] = all_new.reshape(-1, self.bank_slots)

    # ------------------------------------------------------------------ model
    def phi(self, x0: Tensor, t: Tensor | float) -> Tensor:
        """Flow map ``phi(x0, t)``: the point at time ``t`` of the trajectory starting at ``x0``."""
        t = torch.as_tensor(t, dtype=x0.dtype, device=x0.device).expand(len(x0))
        return self.flow(x0, t)

    def loss(self, x1: Tensor, idx: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        x0 = self.pair(x1, idx)
        t = torch.rand(len(x1), device=x1.device)
        if self.p_t1 > 0:
            t = torch.where(torch.rand_like(t) < self.p_t1, torch.ones_like(t), t)
        if self.loss_type == "velocity":
            _, dphi = torch.func.jvp(lambda tt: self.phi(x0, tt), (t,), (torch.ones_like(t),))
            loss = (dphi - PATH.velocity_target(x0, x1, t)).square().mean()
        else:
            loss = (self.phi(x0, t) - PATH.interpolate(x0, x1, t)).square().mean()
        return loss, {"pair_cost": (x1 - x0).flatten(1).square().sum(1).mean().detach()}

    def generate(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.phi(self.randn(n, generator=generator), 1.0)
