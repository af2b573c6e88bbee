r"""MAGT: manifold-aligned generative transport (Tian & Shen, arXiv:2602.19600), reconstructed.

Only the paper's abstract was available; the loss below is the reconstruction of
``shared/specs/magt.md`` (Tweedie + denoising score matching at one fixed smoothing level), checked there.

A generator ``g: R^d -> R^D`` pushes a low-dimensional base ``u ~ N(0, I_d)`` onto the data space; a
sample is ``g(u)`` (NFE = 1). Training smooths data and model at one fixed Gaussian level ``sigma``
(``x~ = x + sigma z``; a level ``tau`` on the path ``tau x + (1 - tau) z`` is the same after dividing by
``tau``: ``sigma = (1 - tau) / tau``). Tweedie's formula writes the smoothed model's score through the
posterior mean of the generator's output given the noisy point,

.. math::  \nabla \log \tilde q_\theta(\tilde x) = (m_\theta(\tilde x) - \tilde x) / \sigma^2, \qquad
           m_\theta(\tilde x) = \mathbb{E}[g_\theta(U) \mid \tilde X = \tilde x],

and denoising score matching turns the Fisher divergence between the smoothed laws into
``sigma^-4 E ||m_theta(x + sigma z) - x||^2`` (+ const). The posterior over the *latent* is estimated with
K anchors ``u_k ~ q`` and self-normalised importance weights

.. math::  \ell_k = -\|\tilde x - g_\theta(u_k)\|^2 / (2\sigma^2) + \log \pi(u_k) - \log q(u_k), \quad
           w_k = \mathrm{softmax}_k(\ell_k), \quad \hat m = \textstyle\sum_k w_k\, g_\theta(u_k),

and the loss is ``lambda * mean_i ||m^(x~_i) - x_i||^2`` with ``lambda = 1/sigma^2`` by default, differentiated
through both the anchor images and the weights. With ``q = pi`` the anchor score ``(m^ - x~)/sigma^2`` is
exactly the score of the K-component mixture ``(1/K) sum_k N(g(u_k), sigma^2 I)`` (:func:`onestep.generators.magt_anchors.anchor_score`).

Proposals: ``mc`` (i.i.d. prior draws) and ``qmc`` (scrambled Sobol points through the normal quantile):
one anchor set shared by the minibatch, drawn fresh every step. ``map_laplace`` adds per data point draws
from the Laplace approximation ``N(u*, H^-1)`` at the MAP latent (``H = I + J^T J / sigma^2``) to the shared
prior anchors, weighted as a defensive mixture (see :meth:`MAGT.posterior_mean`).
Intrinsic densities and projections: :mod:`onestep.generators.magt_density`. Training in an autoencoder's
latent space (spec #8, ``latent_space=True``): :class:`onestep.generators.magt_latent.LatentMAGT`.

Standardisation (spec section 2 and #9). The loss runs on ``x_s = (x - mu) / s``, with ``mu`` and ``s``
estimated from the training data when fitting starts and kept in buffers (they travel with checkpoints);
the network ``net`` maps latents to standardised data and :meth:`MAGT.g` composes it with
``y -> mu + s y``, so samples, densities and metrics stay in the datamodule's units. ``sigma`` is therefore
in standardised units. ``per_coordinate`` takes each coordinate's mean and std; ``global`` keeps the
geometry (one scale, the RMS of the coordinate stds); ``none`` trains on the data as it comes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import torch
from torch import Tensor

from onestep.generators.base import OneStepGenerator, _check
from onestep.generators.magt_anchors import anchor_logits, effective_sample_size, snis_weights, weighted_mean
from onestep.generators.magt_density import (DEGENERATE_SINGULAR_VALUE, intrinsic_log_density, jacobian,
                                             levenberg_marquardt, project_to_manifold, standard_normal_log_prob)
from onestep.modules import datamodule_of, eval_mode
from onestep.nets import build_backbone
from onestep.options import AtLeastOne, NonNegative, Positive, Range

PROPOSALS = ("mc", "qmc", "map_laplace")
LOSS_WEIGHTS = ("inv_sigma2", "per_dim", "fisher")
STANDARDIZATIONS = ("auto", "none", "per_coordinate", "global")
DEFAULT_SIGMA = 0.2
#: what ``standardize="auto"`` means for vector data (images: ``none``; they are already in [-1, 1])
AUTO_VECTOR_STANDARDIZATION = "global"


def standardization_statistics(x: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """``(mu, s)`` of flattened data ``x (N, D)``: per-coordinate mean and std, or the mean and one scale
    (the RMS of the coordinate stds, so the geometry is kept); ``none`` gives ``(0, 1)``. float32, ``(D,)``."""
    x = x.flatten(1).double()
    if kind == "none":
        return torch.zeros(x.shape[1]), torch.ones(x.shape[1])
    mean, std = x.mean(0), x.std(0)
    if kind == "global":
        std = std.pow(2).mean().sqrt().expand_as(mean)
    _check(bool((std > 0).all()) and bool(torch.isfinite(std).all()),
           f"standardize={kind!r}: the training data have a coordinate of zero or non-finite spread; "
           "use standardize: global or none")
    return mean.float(), std.float()


class MAGT(OneStepGenerator):
    """One-step generator trained with the fixed-level anchor (SNIS) denoising loss.

    Args:
        latent_dim: dimension d of the Gaussian base (>= 1); the intrinsic dimension for toy manifolds.
        sigma: smoothing level in standardised data units (> 0); default 0.2 when neither it nor ``tau`` is set.
        tau: alternative level on the path ``tau x + (1 - tau) z`` in (0, 1); ``sigma = (1 - tau) / tau``.
        sigma_max: multi-level smoothing (ours, not the paper's): each training point draws its level
            log-uniformly in ``[sigma, sigma_max]`` (loss weight per point); ``None``: the paper's one level.
            Why: at one small level the score of well separated components does not depend on their
            weights, so the loss cannot correct the mass of a mode (see :meth:`draw_levels`).
        n_anchors: K, prior anchors per step, shared by the batch (``map_laplace`` adds per-point draws and
            starts its MAP search at the best of them).
        proposal: ``mc``, ``qmc`` or ``map_laplace``.
        loss_weight: ``inv_sigma2`` (``mse / sigma^2``), ``per_dim`` (``mse / D``) or ``fisher`` (``mse / sigma^4``,
            the Fisher divergence of the smoothed laws up to a constant; always logged as ``loss_fisher_scaled``).
        detach_weights: ablation only: stop the gradient through the weights (biased even as K -> inf).
        n_noise: noise draws per data point and step.
        laplace_anchors, map_steps: MAP-Laplace only: Laplace draws per data point (added to the K shared
            anchors) and Levenberg-Marquardt steps of the MAP search.
        laplace_fallback_ess: ``mc``/``qmc`` only: a step whose mean ESS is below this uses MAP-Laplace
            (0: never; the spec suggests 5).
        eval_points: generated points whose intrinsic log-density ``extra_eval_metrics`` averages (0: off).
        eval_projection_points: held-out reference points projected onto the learned manifold at
            evaluation (0: off); reports the residual and the log-density at the projection.
        backbone: generator spec; default an MLP (vectors) or ``conv_decoder`` (images), no time input.
        standardize: ``per_coordinate``, ``global`` or ``none`` (module docstring); ``auto`` is
            :data:`AUTO_VECTOR_STANDARDIZATION` for vectors and ``none`` for images.
    """

    nfe = 1

    def __init__(
        self,
        data_shape: Sequence[int] = (2,),
        backbone: Mapping[str, Any] | None = None,
        latent_dim: Annotated[int, AtLeastOne] = 2,
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
        eval_points: Annotated[int, NonNegative] = 512,
        eval_projection_points: Annotated[int, NonNegative] = 0,
        standardize: Literal[STANDARDIZATIONS] = "auto",
        **base: Any,
    ) -> None:
        super().__init__(data_shape=data_shape, backbone=backbone, **base)
        _check(sigma is None or tau is None, f"give sigma or tau, not both (got sigma={sigma}, tau={tau})")
        if tau is not None:
            sigma = (1.0 - tau) / tau
        sigma = DEFAULT_SIGMA if sigma is None else sigma
        self.latent_dim, self.sigma, self.n_anchors, self.proposal = latent_dim, float(sigma), n_anchors, proposal
        _check(sigma_max is None or sigma_max > sigma,
               f"sigma_max={sigma_max} must exceed sigma={sigma} (it is the top of the smoothing range); "
               "leave it unset for one level")
        _check(sigma_max is None or (proposal != "map_laplace" and not laplace_fallback_ess),
               "sigma_max (several smoothing levels) works with proposal mc or qmc and laplace_fallback_ess 0 "
               "(the Laplace proposal is built at one level); unset sigma_max or change the proposal")
        self.sigma_max = None if sigma_max is None else float(sigma_max)
        self.loss_weight, self.detach_weights, self.n_noise = loss_weight, bool(detach_weights), n_noise
        self.laplace_anchors, self.map_steps = laplace_anchors, map_steps
        self.laplace_fallback_ess, self.used_laplace = float(laplace_fallback_ess), False
        self.eval_points, self.eval_projection_points = eval_points, eval_projection_points
        is_image = len(self.data_shape) == 3
        if standardize == "auto":
            standardize = "none" if is_image else AUTO_VECTOR_STANDARDIZATION
        _check(not (is_image and standardize == "per_coordinate"),
               "standardize='per_coordinate' is not for images (constant border pixels); use global or none")
        self.standardize = standardize
        flat = math.prod(self.data_shape)
        self.register_buffer("data_shift", torch.zeros(flat))
        self.register_buffer("data_scale", torch.ones(flat))
        self.register_buffer("standardization_fitted", torch.tensor(standardize == "none"))
        spec = dict(backbone) if backbone else {"name": "conv_decoder" if is_image else "mlp"}
        self.net = build_backbone(spec, (latent_dim,), self.data_shape, time_conditioned=False)

    # ------------------------------------------------------------------ generator
    def g(self, u: Tensor) -> Tensor:
        """The transport map ``g(u)``: latents ``(N, d)`` -> normalised data ``(N, *data_shape)``."""
        return self.unstandardize(self.net(u).flatten(1)).view(len(u), *self.data_shape)

    def g_standardized(self, u: Tensor) -> Tensor:
        """The network alone: latents ``(N, d)`` -> standardised data, flattened ``(N, D)`` (training space)."""
        return self.net(u).flatten(1)

    def unstandardize(self, y: Tensor) -> Tensor:
        """``mu + s y`` for flattened standardised points ``y (N, D)`` (any float dtype)."""
        return self.data_shift.to(y.dtype) + self.data_scale.to(y.dtype) * y

    def fit_standardization(self, x: Tensor) -> None:
        """Set ``mu`` and ``s`` from training data ``x (N, *data_shape)`` in the datamodule's units."""
        mean, std = standardization_statistics(x, self.standardize)
        self.data_shift.copy_(mean)
        self.data_scale.copy_(std)
        self.standardization_fitted.fill_(True)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if bool(self.standardization_fitted):  # standardize=none, or restored from a checkpoint
            return
        datamodule = datamodule_of(self)
        data = getattr(datamodule, "train_data", None)
        _check(isinstance(data, Tensor),
               f"standardize={self.standardize!r} needs the training data: the datamodule has no train_data "
               "tensor; call fit_standardization(x) before fitting or set standardize: none")
        self.fit_standardization(data[:200_000].to(self.data_shift.device))

    def generate(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.g(self.randn(n, (self.latent_dim,), generator))

    # ------------------------------------------------------------------ anchors
    def draw_anchors(self, k: int) -> Tensor:
        """``k`` latent anchors ``(k, d)`` from the prior: i.i.d. (``mc``) or scrambled Sobol (``qmc``).

        The Sobol scramble is seeded from the global generator, so runs are reproducible under
        ``seed_everything`` and every step gets a new randomisation (Sobol balance is exact for powers of 2).
        """
        if self.proposal == "qmc":
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
            engine = torch.quasirandom.SobolEngine(self.latent_dim, scramble=True, seed=seed)
            v = engine.draw(k, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)  # ndtri(0 or 1) = -+inf
            return torch.special.ndtri(v).to(self.device, torch.float32)
        return torch.randn(k, self.latent_dim, device=self.device)

    @torch.no_grad()
    def laplace_proposal(self, x_tilde: Tensor, bank: Tensor, bank_images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-point Laplace approximations of the latent posterior and ``L`` draws from each.

        ``u*_i`` minimises ``||x~_i - g(u)||^2 + sigma^2 ||u||^2`` (Levenberg-Marquardt from the best of the
        shared ``bank`` anchors), ``H_i = I + J^T J / sigma^2`` at ``u*_i`` (Gauss-Newton Hessian). Returns the
        draws ``u_il ~ N(u*_i, H_i^-1)`` ``(B, L, d)`` and ``log N(.; u*_i, H_i^-1)`` at the draws ``(B, L)`` and
        at the shared anchors ``(B, K)``. ``u*`` and ``H`` carry no gradient (any fixed proposal is valid).
        """
        d, s2 = self.latent_dim, self.sigma**2
        start = (anchor_logits(x_tilde, bank_images, self.sigma) + standard_normal_log_prob(bank)[None]).argmax(1)
        u_star, _ = levenberg_marquardt(self.g_standardized, x_tilde.float(), bank[start], s2, self.map_steps)
        jac = jacobian(self.g_standardized, u_star, dtype=torch.float32)          # (B, D, d)
        chol = torch.linalg.cholesky(torch.eye(d, device=self.device) + jac.transpose(1, 2) @ jac / s2)  # H = C C^T
        upper = chol.transpose(1, 2)
        eps = torch.randn(len(x_tilde), self.laplace_anchors, d, device=self.device)
        local = u_star[:, None] + torch.linalg.solve_triangular(upper, eps.transpose(1, 2), upper=True).transpose(1, 2)
        half_logdet = chol.diagonal(dim1=1, dim2=2).log().sum(-1)[:, None]       # log det(H)^(1/2)

        def log_density(u: Tensor) -> Tensor:                                     # u (B, N, d)
            whitened = torch.einsum("bij,bnj->bni", upper, u - u_star[:, None])   # C^T (u - u*)
            return standard_normal_log_prob(whitened) + half_logdet
        return local, log_density(local), log_density(bank.expand(len(x_tilde), -1, -1))

    def draw_levels(self, n: int) -> Tensor | float:
        """Smoothing level per training point: ``sigma`` (one level), or ``(n, 1)`` levels with
        ``log sigma_i ~ U[log sigma, log sigma_max]``.

        Why several levels: at one level ``sigma`` much smaller than the gap between two components, the
        smoothed model's score near each component is that component's own score; the mixture weights cancel
        in ``grad log`` and only points in the gap, where both overlap, see them. The denoising loss then
        leaves each mode's mass where the first steps put it (measured: MAGT's 8gaussians mode shares wander
        between 0.07 and 0.21 over training). Larger levels make the components overlap, so the weights
        enter the loss; the smallest level keeps the fit sharp.
        """
        if self.sigma_max is None:
            return self.sigma
        log_lo, log_hi = math.log(self.sigma), math.log(self.sigma_max)
        return torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, 1, device=self.device))

    def posterior_mean(self, x_tilde: Tensor, sigma: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
        """Anchor estimate ``m^(x~) (B, D)`` of ``E[g(U) | x~]`` (standardised units) and the weights,
        differentiable in the net. Sets :attr:`used_laplace` (whether this call used MAP-Laplace anchors).

        With ``mc``/``qmc`` and ``laplace_fallback_ess > 0``, a batch whose mean ESS under the prior anchors
        is below that threshold (the nearest-anchor regime, spec #4) is re-estimated with MAP-Laplace.
        ``sigma``: the smoothing level(s), a number or one per point ``(B, 1)``; default :attr:`sigma`.
        """
        sigma = self.sigma if sigma is None else sigma
        bank = self.draw_anchors(self.n_anchors)
        images = self.g_standardized(bank)                                        # (K, D)
        self.used_laplace = self.proposal == "map_laplace"
        if not self.used_laplace:
            weights = snis_weights(x_tilde, images, sigma)
            self.used_laplace = (self.laplace_fallback_ess > 0  # (no device sync when the fallback is off)
                                 and float(effective_sample_size(weights.detach()).mean()) < self.laplace_fallback_ess)
            if not self.used_laplace:
                weights = weights.detach() if self.detach_weights else weights
                return weighted_mean(weights, images), weights
        return self._laplace_posterior_mean(x_tilde, bank, images)

    def _laplace_posterior_mean(self, x_tilde: Tensor, bank: Tensor, images: Tensor) -> tuple[Tensor, Tensor]:
        """MAP-Laplace: ``L`` per-point Laplace draws added to the K shared prior anchors, all ``N = K + L``
        weighed with the deterministic-mixture proposal ``q_i = (K/N) pi + (L/N) N(u*_i, H_i^-1)``: the prior
        share bounds every weight by ``N/K`` times the likelihood (finite variance even where the Laplace
        tails are too light) and keeps the global anchors that see mass far from ``u*``.
        """
        local, log_laplace_local, log_laplace_bank = self.laplace_proposal(x_tilde, bank, images.detach())
        local_images = self.g_standardized(local.flatten(0, 1)).reshape(*local.shape[:2], -1)  # (B, L, D)
        k, n = self.n_anchors, self.n_anchors + self.laplace_anchors
        log_prior_bank, log_prior_local = standard_normal_log_prob(bank)[None], standard_normal_log_prob(local)

        def correction(log_prior: Tensor, log_laplace: Tensor) -> Tensor:         # log pi - log q_mix
            log_q = torch.logaddexp(math.log(k / n) + log_prior, math.log1p(-k / n) + log_laplace)
            return log_prior - log_q
        logits = torch.cat([
            anchor_logits(x_tilde, images, self.sigma) + correction(log_prior_bank, log_laplace_bank),
            anchor_logits(x_tilde, local_images, self.sigma) + correction(log_prior_local, log_laplace_local)], -1)
        with torch.autocast(device_type=x_tilde.device.type, enabled=False):
            weights = torch.softmax(logits.float(), dim=-1)
        weights = weights.detach() if self.detach_weights else weights
        mean = weighted_mean(weights[:, :k], images) + weighted_mean(weights[:, k:], local_images)
        return mean, weights

    # ------------------------------------------------------------------ training
    def loss(self, x: Tensor, idx: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        _check(bool(self.standardization_fitted),
               f"MAGT: standardize={self.standardize!r} but the statistics are not set; train through a Trainer "
               "whose datamodule has train_data, call fit_standardization(x) first, or set standardize: none")
        x = (x.flatten(1).float() - self.data_shift) / self.data_scale
        if self.n_noise > 1:
            x = x.repeat(self.n_noise, 1)
        sigma = self.draw_levels(len(x))
        x_tilde = x + sigma * torch.randn_like(x)
        mean, weights = self.posterior_mean(x_tilde, sigma)
        if self.sigma_max is None:
            mse = (mean - x).pow(2).sum(1).mean()
            scale = {"inv_sigma2": self.sigma**-2, "per_dim": 1.0 / x.shape[1], "fisher": self.sigma**-4}[self.loss_weight]
            loss = mse * scale
        else:  # one weight per point (its own level); the logged mse stays the plain mean
            per_point = (mean - x).pow(2).sum(1)
            weight = {"inv_sigma2": sigma**-2, "per_dim": torch.full_like(sigma, 1.0 / x.shape[1]),
                      "fisher": sigma**-4}[self.loss_weight].squeeze(1)
            mse, loss = per_point.mean(), (per_point * weight).mean()
        w = weights.detach()
        ess = effective_sample_size(w)
        logs = {"mse": mse.detach(), "loss_fisher_scaled": mse.detach() * self.sigma**-4,
                "ess_mean": ess.mean(), "ess_min": ess.min(), "weight_max": w.max(),
                "weight_max_mean": w.max(-1).values.mean(),
                "laplace_step": torch.tensor(float(self.used_laplace))}
        return loss, logs

    # ------------------------------------------------------------------ likelihood and projection
    def _raw_output(self, raw_units: bool = True):
        """Standardised network output -> the datamodule's units, then (``raw_units``, when a datamodule is
        attached) its affine ``denormalize``: the map whose Jacobian gives densities in those units."""
        datamodule = datamodule_of(self)
        denormalize = getattr(datamodule, "denormalize", None) if raw_units else None

        def post(y: Tensor) -> Tensor:
            x = self.unstandardize(y.flatten(1)).view(len(y), *self.data_shape)
            return denormalize(x) if denormalize is not None else x
        return post

    def intrinsic_log_density(self, z: Tensor, raw_units: bool = False) -> Tensor:
        """``log p^M(g(z))`` (nats, float64, ``(N,)``) of generated points ``g(z)`` by the area formula.

        Current weights (wrap in :meth:`ema_weights` for the averaged model). ``raw_units`` composes
        ``g`` with the attached datamodule's ``denormalize``.
        """
        return intrinsic_log_density(self.net, z.to(self.device), post=self._raw_output(raw_units))[0]

    def project(self, x: Tensor, n_starts: int = 4, steps: int = 30, prior_weight: float = 0.0,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Latent ``z* (N, d)`` of the nearest point of the learned manifold to ``x (N, *data_shape)``
        (normalised units) and the off-manifold residual ``||x - g(z*)|| (N,)``; ``prior_weight = sigma^2``
        gives the MAP latent of the smoothed model instead of the Euclidean projection."""
        return project_to_manifold(self.g, x.to(self.device).float(), self.latent_dim, n_starts=n_starts,
                                   steps=steps, prior_weight=prior_weight, generator=generator)

    @torch.no_grad()
    def extra_eval_metrics(self, samples_raw: Tensor) -> dict[str, float]:
        """Evaluation hook: intrinsic log-density (raw units) of ``min(eval_points, n)`` generated points.

        The latents come from a fixed-seed generator (every rank computes the same value), with the EMA
        weights. ``eval/intrinsic_degenerate`` is the share of points whose smallest Jacobian singular value
        is below 1e-6; they are left out of the mean (their density is infinite or undefined).
        """
        n = min(self.eval_points, int(samples_raw.shape[0]))
        metrics: dict[str, float] = {}
        if n == 0:
            return metrics
        with eval_mode(self):
            with self.ema_weights():
                z = torch.randn(n, self.latent_dim, generator=torch.Generator().manual_seed(0)).to(self.device)
                logp, sv = intrinsic_log_density(self.net, z, post=self._raw_output())
                ok = sv.min(-1).values > DEGENERATE_SINGULAR_VALUE
                metrics["eval/intrinsic_degenerate"] = float(1.0 - ok.double().mean())
                if ok.any():
                    metrics["eval/intrinsic_logp"] = float(logp[ok].mean())
                    metrics["eval/intrinsic_bits_per_dim"] = float(-logp[ok].mean() / (self.latent_dim * math.log(2)))
                metrics.update(self._heldout_projection_metrics())
        return metrics

    def _heldout_projection_metrics(self) -> dict[str, float]:
        datamodule = datamodule_of(self)
        if self.eval_projection_points == 0 or datamodule is None or not hasattr(datamodule, "reference"):
            return {}
        raw = datamodule.reference("test", self.eval_projection_points).to(self.device)
        z, _ = self.project(datamodule.normalize(raw), generator=torch.Generator().manual_seed(1))
        residual = (datamodule.denormalize(self.g(z)) - raw).flatten(1).norm(dim=1)
        logp = intrinsic_log_density(self.net, z, post=self._raw_output())[0]
        return {"eval/heldout_residual_mean": float(residual.mean()),
                "eval/heldout_intrinsic_logp": float(logp[torch.isfinite(logp)].mean())}
