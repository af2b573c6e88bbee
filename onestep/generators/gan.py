r"""GAN: a generator ``G`` and a discriminator ``D`` trained as a two-player game; sampling is ``G(z)`` (NFE = 1).

With :math:`f(u) = \log(1 + e^u)` (softplus), two losses are offered.

Non-saturating loss (Goodfellow et al., 2014) with the R1 gradient penalty on real data (Mescheder et
al., 2018):

.. math::  L_D = \mathbb{E}_x f(-D(x)) + \mathbb{E}_z f(D(G(z))) + \tfrac{\gamma}{2}\,\mathbb{E}_x \|\nabla_x D(x)\|^2,
           \qquad L_G = \mathbb{E}_z f(-D(G(z))).

Relativistic pairing loss of R3GAN (Huang et al., 2024, "The GAN is dead; long live the GAN"), a real
and a generated sample compared pair by pair, with R1 on real and R2 on generated samples:

.. math::  L_D = \mathbb{E}_{x,z} f\big(D(G(z)) - D(x)\big) + \tfrac{\gamma}{2}\big(\mathbb{E}_x \|\nabla_x D(x)\|^2
           + \mathbb{E}_z \|\nabla_y D(y)|_{y = G(z)}\|^2\big), \qquad L_G = \mathbb{E}_{x,z} f\big(D(x) - D(G(z))\big).

R3GAN reports that the regularised relativistic loss converges locally without further tricks (CIFAR-10
FID 1.96 at one step with a modern ResNet). Zero-centred penalties keep ``D`` smooth near the data, so its
gradient gives ``G`` a useful direction instead of an exploding one.

Training (manual optimisation, the base's two-optimiser path): per batch ``d_steps`` discriminator updates
(:meth:`~onestep.generators.base.OneStepGenerator.clip_and_step`, fresh noise each), then one generator
update (:meth:`~onestep.generators.base.OneStepGenerator.generator_step`: clipping, the learning-rate
schedules, the EMA). ``global_step`` and ``trainer.max_steps`` count generator updates. Both optimisers are
the base's AdamW with ``lr``, ``betas`` and ``weight_decay``; GANs want a small ``beta1`` (default 0.5).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from onestep.generators.base import OneStepGenerator, _check
from onestep.nets import build_backbone
from onestep.options import AtLeastOne, NonNegative

GAN_LOSSES = ("nonsaturating", "relativistic")


class GAN(OneStepGenerator):
    """A GAN trained with its own two optimisers through the base's manual-optimisation helpers.

    Args:
        backbone: the generator ``G``: noise ``(latent_dim,)`` (or the data's shape when ``latent_dim = 0``)
            to data. Default ``mlp`` for vectors, ``conv_decoder`` (needs ``latent_dim``) or ``unet`` for images.
        discriminator: the discriminator ``D``: data to one logit. Default ``mlp`` with the generator's
            ``hidden`` widths for vectors, ``conv_encoder`` for images.
        latent_dim: size of the noise vector ``z``; 0 draws noise of the data's shape.
        loss: ``nonsaturating`` (+ R1) or ``relativistic`` (R3GAN: + R1 and R2).
        r1_gamma: weight ``gamma`` of the zero-centred gradient penalties (0 switches them off).
        d_steps: discriminator updates per generator update (each is not a training step).
    """

    nfe = 1
    ema_excludes = ("discriminator.",)  # sampling is G(z): averaging D would cost memory and time, nothing else

    def __init__(
        self,
        data_shape: Sequence[int] = (2,),
        backbone: Mapping[str, Any] | None = None,
        discriminator: Mapping[str, Any] | None = None,
        latent_dim: Annotated[int, NonNegative] = 0,
        loss: Literal[GAN_LOSSES] = "relativistic",
        r1_gamma: Annotated[float, NonNegative] = 0.1,
        d_steps: Annotated[int, AtLeastOne] = 1,
        betas: tuple[float, float] = (0.5, 0.99),
        **base: Any,
    ) -> None:
        super().__init__(data_shape=data_shape, backbone=backbone, betas=betas, **base)
        self.automatic_optimization = False  # two optimisers, stepped by training_step
        image = len(self.data_shape) == 3
        g_spec = dict(backbone) if backbone else {"name": "conv_decoder" if image and latent_dim else
                                                  "unet" if image else "mlp"}
        _check(not (g_spec["name"] == "conv_decoder" and latent_dim == 0),
               "backbone conv_decoder maps a noise vector to an image: set latent_dim > 0 (e.g. 32)")
        self.latent_shape = (latent_dim,) if latent_dim else self.data_shape
        if discriminator:
            d_spec = dict(discriminator)
        elif image:
            d_spec = {"name": "conv_encoder"}
        else:
            d_spec = {"name": "mlp", **({"hidden": g_spec["hidden"]} if "hidden" in g_spec else {})}
        self.latent_dim, self.loss_type, self.r1_gamma, self.d_steps = latent_dim, loss, r1_gamma, d_steps
        self.generator = build_backbone(g_spec, self.latent_shape, self.data_shape, time_conditioned=False)
        self.discriminator = build_backbone(d_spec, self.data_shape, (1,), time_conditioned=False)

    # ------------------------------------------------------------------ networks
    def generate(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.generator(self.randn(n, self.latent_shape, generator))

    def critic(self, x: Tensor) -> Tensor:
        """``D(x)``: one logit per sample, shape ``(B,)``."""
        return self.discriminator(x).reshape(len(x))

    # ------------------------------------------------------------------ losses
    def _logits_and_penalty(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``D(x)`` and ``E ||grad_x D(x)||^2`` (zero without a penalty), differentiable in ``D``'s weights."""
        if not self.r1_gamma:
            return self.critic(x), x.new_zeros(())
        x = x.detach().requires_grad_(True)
        logits = self.critic(x)
        (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
        return logits, grad.pow(2).flatten(1).sum(1).mean()

    def discriminator_loss(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``L_D`` on real ``x`` and fresh generated samples (``G`` not differentiated)."""
        with torch.no_grad():
            fake = self.generate(len(x))
        real_logits, r1 = self._logits_and_penalty(x)
        if self.loss_type == "relativistic":
            fake_logits, r2 = self._logits_and_penalty(fake)
            game = F.softplus(fake_logits - real_logits).mean()
            penalty = r1 + r2
        else:
            fake_logits, r2 = self.critic(fake), x.new_zeros(())
            game = (F.softplus(-real_logits) + F.softplus(fake_logits)).mean()
            penalty = r1
        loss = game + 0.5 * self.r1_gamma * penalty
        return loss, {"d_game": game.detach(), "r1": r1.detach(), "r2": r2.detach(),
                      "d_real": real_logits.mean().detach(), "d_fake": fake_logits.mean().detach()}

    def generator_loss(self, x: Tensor) -> Tensor:
        """``L_G`` on fresh generated samples (``x``: the real batch, used by the relativistic loss)."""
        fake_logits = self.critic(self.generate(len(x)))
        if self.loss_type == "relativistic":
            return F.softplus(self.critic(x).detach() - fake_logits).mean()
        return F.softplus(-fake_logits).mean()

    def loss(self, x: Tensor, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The discriminator's objective ``L_D`` (a GAN has no single loss; the generator's is
        :meth:`generator_loss`, stepped in :meth:`training_step`)."""
        return self.discriminator_loss(x)

    # ------------------------------------------------------------------ training
    def configure_optimizers(self) -> Any:
        """Two AdamW with the base's options and schedule, the generator's first (it counts the steps)."""
        opt_g = self.make_optimizer(self.generator.parameters())
        opt_d = self.make_optimizer(self.discriminator.parameters())
        return [opt_g, opt_d], [{"scheduler": self.make_scheduler(o), "interval": "step"} for o in (opt_g, opt_d)]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        _, opt_d = self.optimizers()
        for _ in range(self.d_steps):
            d_loss, logs = self.discriminator_loss(x)
            self.clip_and_step(opt_d, d_loss)
        g_loss = self.generator_loss(x)
        self.generator_step(g_loss)
        self.log_training({"loss": g_loss.detach(), "d_loss": d_loss.detach(), **logs})
        return g_loss.detach()
