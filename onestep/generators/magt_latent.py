r"""MAGT in an autoencoder's latent space (spec ``shared/specs/magt.md`` #8, ``latent_space=True``).

Pixel-space MAGT on images starts in the nearest-anchor regime: with ``[-1, 1]`` pixels even real images as
anchors give a mean ESS of 1-2 (``configs/magt/image_pixels.yaml``), so the loss is close to IMLE. The spec's
remedy is to run MAGT where the data are low-dimensional and standardised: the codes of an autoencoder.
It is MAGT's image default (``configs/magt/image.yaml``, with the measurement that chose it).

**Two stages inside one run** (:mod:`onestep.generators.staged`; switch at ``ae_steps``, or
``ae_fraction * max_steps``):

1. autoencoder: encoder :math:`E: R^D \to R^c` and decoder :math:`G: R^c \to R^D` (``code_dim = c``)
   minimise the per-element reconstruction error :math:`\mathrm{mean}\,(G(E(x)) - x)^2`.
2. generator: at the switch the autoencoder is set to its EMA weights and **frozen** (never differentiated
   again, so its weights no longer change), the code statistics ``(mu, s)`` of :class:`~onestep.generators.
   magt.MAGT`'s ``standardize`` are computed from the codes of the training split, and the EMA restarts.
   The loss is exactly the vector MAGT loss (:meth:`MAGT.loss`) on the codes :math:`z = E(x)` of the batch:
   a generator :math:`g: R^d \to R^c` (``latent_dim = d``) is trained with the fixed-level anchor loss at
   smoothing ``sigma`` in standardised code units; every MAGT option (proposal, K, MAP-Laplace fallback,
   ...) means what it means there. The ESS it logs (``train/ess_mean``) is the code-space ESS.

**Sampling**: :math:`x = G(g(u))`, :math:`u \sim N(0, I_d)`. ``nfe`` counts network passes per sample as
LMPPM does: one generator pass plus one decoder pass, ``nfe = 2`` (:meth:`cost` itemises them). Before the
switch ``g`` is untrained; ``eval/magt_latent_stage`` says which stage a sample came from.

The code-space model is a :class:`MAGT` held as the submodule ``code_model`` (its data are the codes, of
shape ``(c,)``), so the pixel-space MAGT is untouched. Its intrinsic densities are densities of *codes*,
not of images, and are therefore not reported here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from onestep.generators.base import OneStepGenerator, _check
from onestep.generators.magt import LOSS_WEIGHTS, MAGT, PROPOSALS, STANDARDIZATIONS
from onestep.generators.staged import StagedTraining
from onestep.modules import datamodule_of, eval_mode
from onestep.nets import build_backbone
from onestep.options import AtLeastOne, NonNegative, Positive, Range


class LatentMAGT(StagedTraining, OneStepGenerator):
    """MAGT trained on the standardised codes of an autoencoder trained first in the same run.

    Args:
        backbone: the generator ``g: R^d -> R^c`` on codes (default ``{"name": "mlp"}``).
        encoder, decoder: autoencoder specs (default ``conv_encoder``/``conv_decoder`` for images, an ``mlp``
            with two hidden layers of 256 for vectors).
        code_dim: c, the size of the autoencoder's (vector) code.
        ae_steps / ae_fraction: the stage switch (steps, or a fraction of ``trainer.max_steps``).
        latent_dim, sigma, tau, n_anchors, proposal, loss_weight, detach_weights, n_noise, laplace_anchors,
            map_steps, laplace_fallback_ess, standardize: :class:`~onestep.generators.magt.MAGT`'s options,
            applied to the codes (``standardize="auto"`` is ``global`` there: the codes are a vector).
    """

    nfe = 2  # one generator pass + one decoder pass (module docstring)

    def __init__(
        self,
        data_shape: Sequence[int] = (1, 28, 28),
        backbone: Mapping[str, Any] | None = None,
        encoder: Mapping[str, Any] | None = None,
        decoder: Mapping[str, Any] | None = None,
        code_dim: Annotated[int, AtLeastOne] = 16,
        ae_steps: Annotated[int, NonNegative] | None = None,
        ae_fraction: Annotated[float, Range(gt=0, lt=1)] = 0.5,
        latent_dim: Annotated[int, AtLeastOne] = 8,
        sigma: Annotated[float, Positive] | None = None,
        tau: Annotated[float, Range(gt=0, lt=1, note="sigma = (1 - tau) / tau")] | None = None,
        sigma_max: Annotated[float, Positive] | None = None,
        n_anchors: Annotated[int, AtLeastOne] = 512,
        proposal: Literal[PROPOSALS] = "mc",
        loss_weight: Literal[LOSS_WEIGHTS] = "inv_sigma2",
        detach_weights: bool = False,
        n_noise: Annotated[int, AtLeastOne] = 1,
        laplace_anchors: Annotated[int, AtLeastOne] = 16,
        map_steps: Annotated[int, NonNegative] = 5,
        laplace_fallback_ess: Annotated[float, Range(ge=0, note="0: off")] = 0.0,
        standardize: Literal[STANDARDIZATIONS] = "auto",
        **base: Any,
    ) -> None:
        super().__init__(data_shape=data_shape, backbone=backbone, **base)
        _check(latent_dim <= code_dim, f"latent_dim={latent_dim} must not exceed code_dim={code_dim}: the generator "
               "maps N(0, I_d) into the c-dimensional code space; lower latent_dim or raise code_dim")
        self.code_dim, self.ae_steps, self.ae_fraction = code_dim, ae_steps, ae_fraction
        image = len(self.data_shape) == 3
        vector = {"name": "mlp", "hidden": [256, 256]}
        self.encoder = build_backbone(encoder or ({"name": "conv_encoder"} if image else vector),
                                      self.data_shape, (code_dim,), time_conditioned=False)
        self.decoder = build_backbone(decoder or ({"name": "conv_decoder"} if image else vector),
                                      (code_dim,), self.data_shape, time_conditioned=False)
        self.code_model = MAGT(
            data_shape=(code_dim,), backbone=backbone, latent_dim=latent_dim,
            sigma=sigma, tau=tau, sigma_max=sigma_max, n_anchors=n_anchors,
            proposal=proposal, loss_weight=loss_weight, detach_weights=detach_weights, n_noise=n_noise,
            laplace_anchors=laplace_anchors, map_steps=map_steps, laplace_fallback_ess=laplace_fallback_ess,
            eval_points=0, standardize=standardize)
        self.latent_dim = latent_dim
        self.register_buffer("generator_start", torch.tensor(-1))  # global step at which stage 2 began
        self.register_stage(1)                                      # 1 = autoencoder, 2 = MAGT on codes

    # ------------------------------------------------------------------ networks
    def encode(self, x: Tensor) -> Tensor:
        """Codes ``(B, c)`` of data ``(B, *data_shape)``."""
        return self.encoder(x).flatten(1)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z).view(len(z), *self.data_shape)

    def generate(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.decode(self.code_model.g(self.randn(n, (self.latent_dim,), generator)))

    def cost(self) -> dict[str, int]:
        """Network passes per sample: the generator on codes and the decoder."""
        return {"generator": 1, "decoder": 1}

    # ------------------------------------------------------------------ stages
    def switch_step(self) -> int:
        """Global step at which the MAGT stage starts."""
        return self.autoencoder_switch_step(self.ae_steps, self.ae_fraction)

    def stage_starts(self) -> list[int]:
        return [self.switch_step()]

    def stage_origin(self) -> int:
        # stage 2 counts from the step it began (stays right when a resumed run changes max_steps)
        return int(self.generator_start) if int(self.stage) == 2 else 0

    def on_fit_start(self) -> None:
        super().on_fit_start()
        switch = self.switch_step()  # fails now, not mid-training, when it cannot be placed
        needs_codes = not bool(self.code_model.standardization_fitted)
        _check(not needs_codes or isinstance(getattr(datamodule_of(self), "train_data", None), Tensor),
               f"LatentMAGT: standardize={self.code_model.standardize!r} needs the codes of the training data at "
               "the stage switch, but the datamodule has no train_data tensor; use a OneStepDataModule or "
               "set standardize: none")
        max_steps = self.trainer.max_steps
        if int(self.stage) == 1 and max_steps is not None and 0 < max_steps <= switch:
            rank_zero_warn(f"LatentMAGT: the MAGT stage starts at step {switch} >= max_steps={max_steps}; the "
                           "generator will not be trained and samples decode an untrained g")

    def begin_stage(self, stage: int) -> None:
        """Freeze the autoencoder at its EMA weights and standardise the codes of the training split."""
        self.load_ema_into("encoder.", "decoder.")
        self.generator_start.fill_(self.global_step)
        if not bool(self.code_model.standardization_fitted):
            data = datamodule_of(self).train_data[:200_000]
            with torch.no_grad(), eval_mode(self.encoder):
                codes = torch.cat([self.encode(chunk.to(self.device)) for chunk in data.split(1024)])
            self.code_model.fit_standardization(codes)

    # ------------------------------------------------------------------ training
    def loss(self, x: Tensor, idx: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        if int(self.stage) == 1:
            rec = (self.decode(self.encode(x)) - x).square().mean()
            return rec, {"rec": rec.detach(), "stage": torch.tensor(1.0)}
        with torch.no_grad():  # the autoencoder is frozen in this stage
            codes = self.encode(x)
        loss, logs = self.code_model.loss(codes, idx)
        return loss, {**logs, "stage": torch.tensor(2.0)}

    @torch.no_grad()
    def extra_eval_metrics(self, samples_raw: Tensor) -> dict[str, float]:
        return {"eval/magt_latent_stage": float(self.stage)}
