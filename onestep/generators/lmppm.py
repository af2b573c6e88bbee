r"""LMPPM: manifold-probabilistic projection inside an autoencoder latent space (a reconstruction).

Bar et al., arXiv:2510.00666. Its method sections could not be read; ``shared/specs/mppm.md`` rebuilds the
model and tags every choice. This is the spec's variant **(B)**: MPPM in an autoencoder's latent space.

**Model.** Encoder :math:`F: R^D \to R^d`, decoder :math:`G: R^d \to R^D`. Clean codes form a set
:math:`M_z = F(\text{data}) \subset R^d`. A network :math:`D_\theta(z) = \mathrm{softplus}(\mathrm{mlp}(z))`
approximates the distance to :math:`M_z`. The probability is a Gaussian tube times a kernel density:

.. math::  \log P(z) = -\frac{D_\theta(z)^2}{2\sigma_d^2} + \log \frac1N\sum_i \mathcal N(z; z_i, h^2 I) + c,

with the bank :math:`\{z_i\}` = codes of (a seeded subset of) the **training** split and bandwidth
:math:`h` = Silverman's rule (or the median nearest-neighbour distance) times ``h_scale``.

**Flow** (deterministic, splitting of one Euler ascent step on :math:`\log P`), ``K = steps`` times:

.. math::  z \leftarrow z - \eta_d\, D_\theta(z)\, \frac{\nabla D_\theta(z)}{\|\nabla D_\theta(z)\|}
           \quad\text{(projection; } \eta_d = \sigma_d^2 = 1 \text{ lands on the zero set)}

.. math::  z \leftarrow z + \alpha\,(m(z) - z) = z + \alpha h^2 \nabla \log P_{ker}(z), \qquad
           m(z) = \sum_i \mathrm{softmax}_i\!\big(-\|z - z_i\|^2 / 2h^2\big)\, z_i \quad\text{(mean shift)}

Generation starts at :math:`z_0 \sim N(\mu_{bank}, \mathrm{diag}(s_{bank}^2))` (the spec says zero mean;
an unconstrained encoder's codes need not be centred, so we centre on the bank) and decodes once:
:math:`x = G(z_K)`. Deterministic mean shift seeks modes; ``anneal_h > 1`` starts the kernel wide and
shrinks :math:`h` to its rule value at the last step (spec #11). A tensor latent (``latent_shape``, the
spec's 4x8x8 for MNIST) is flattened for D and the kernel. ``K = 1`` is the one-step setting. Blind
restoration: :math:`z_0 = F(\tilde x)`, the same flow with ``restore_steps`` (constant ``h``), then
:math:`G(z_K)`; the noise level is never given to any network.

**Ablations** (``mode``, same training, so one checkpoint serves all): ``kernel_only`` = spec variant (A),
kernel steps only; ``dae`` = the autoencoder projection: restore :math:`G(F(\tilde x))`, generate by
:math:`z \leftarrow F(G(z))` ``K`` times.

**Training, two stages inside the module** (switch at ``ae_steps``, or ``ae_fraction * max_steps``;
:mod:`onestep.generators.staged`):

1. autoencoder: :math:`\lambda_{rec}\|G(F(x)) - x\|^2 + \lambda_{proj}\|G(F(x + \sigma\epsilon)) - x\|^2`
   (a denoising AE, so :math:`G \circ F` projects off-manifold inputs), :math:`\sigma \sim U(\sigma_{min}, \sigma_{max})`
   in data units, plus the optional probabilistic alignment :math:`\lambda_{prob}\,\mathrm{mean}_i\,
   KL(p_{\cdot|i} \| q_{\cdot|i})` of SNE neighbourhoods in pixel and latent space (bandwidths: the
   batch's median pairwise distance). Squared errors are per-element means.
2. distance: at the switch the autoencoder is **frozen at its EMA weights**, the bank is built (so D,
   the bank and sampling all see one fixed latent space) and the EMA restarts with its warm-up. With
   :math:`z = F(x)`, :math:`\tilde z` a distorted code (``distance_inputs``: the code of distorted data
   :math:`F(x + \sigma\epsilon)` as in the spec's Algorithm 1, so D sees the encoder's own restoration
   error; a noisy code :math:`z + \sigma s\epsilon`, :math:`s` the RMS per-dimension std of the bank, which
   generation from latent noise needs; or half of each) and :math:`\pi(\tilde z) = \tilde z - D n`:

   .. math:: \lambda_{cons}\|\pi(\tilde z) - t\|^2 + \lambda_{den}\|\pi(\tilde z) - z\|^2
             + \lambda_{eik}(\|\nabla D(\tilde z)\| - 1)^2 + \lambda_{zero} D(z)^2,

   latent squared distances (:math:`D^2` included) divided by :math:`d s^2` so the weights do not depend on
   the code scale or size. The
   consistency target :math:`t` is the clean code :math:`z` (spec Algorithm 1, ``consistency_target:
   clean``) or :math:`sg[F(G(\tilde z))]` (``reencoded``); the latter pulls D away from the denoising
   target: on MNIST :math:`|F(G(\tilde z)) - z| / |\tilde z - z|` = 0.74-0.94, i.e. the re-encoded code is
   nearly as far from the clean one as the input was.
   Before the switch ``generate`` runs without the (untrained) projection step; ``eval/lmppm_stage`` says so.

**Cost** (``nfe``): a projection step (one forward plus one input-gradient backward of the small latent
net D) counts as **one** evaluation, the decoder pass as one: ``nfe = K + 1`` (lmppm), ``1`` (kernel_only),
``2K + 1`` (dae). The kernel step uses no network but :math:`O(N d)` per sample; :meth:`cost` itemises.
:meth:`extra_eval_metrics` logs the nearest-neighbour distance of (re-encoded) generated samples to the
bank next to that of held-out codes (memorisation check). Each stage leaves the other stage's networks
without gradients, so under DDP ``onestep fit`` switches on DDP's unused-parameter search
(``trains_in_stages``). The latent-space pieces live in :mod:`onestep.generators.latent_flow`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from onestep.generators.base import OneStepGenerator, _check
from onestep.generators.latent_bank import KernelBankMixin
from onestep.generators.staged import StagedTraining
from onestep.generators.latent_flow import (  # noqa: F401 - kernel_mean and projection_step are re-exported
    annealed_bandwidths,
    kernel_mean,
    kernel_step,
    nn_distance,
    projection_step,
    sne_alignment,
)
from onestep.modules import eval_mode
from onestep.nets import build_backbone
from onestep.options import AtLeastOne, NonNegative, Positive, Range

MODES = ("lmppm", "kernel_only", "dae")
BANDWIDTH_RULES = ("silverman", "nn_median")
DISTANCE_INPUTS = ("encoded", "latent_noise", "both")
CONSISTENCY_TARGETS = ("clean", "reencoded")


# ---------------------------------------------------------------------------------------- the module
class LMPPM(StagedTraining, KernelBankMixin, OneStepGenerator):
    """Latent MPPM (variant B) with the kernel-only flow and the DAE projection as ablation modes.

    Args:
        backbone: must stay None (kept for the common signature and checkpoint hyperparameters).
        encoder, decoder: backbone specs (default ``conv_encoder``/``conv_decoder`` for images, ``mlp``).
        distance_net: spec of D (an ``mlp`` without time; smooth activations: it is differentiated twice).
        latent_dim: d. latent_shape: a tensor latent ``(c, h, w)`` instead (``d = c h w``; codes are
            flattened for D and the kernel), e.g. ``[4, 8, 8]`` with ``conv_encoder``/``conv_decoder``.
        mode: ``lmppm`` | ``kernel_only`` | ``dae``.
        steps, alpha, eta_d: generation flow (K, kernel step size, projection step size).
        anneal_h: generation's kernel bandwidth starts at ``anneal_h * h`` and shrinks geometrically to
            ``h`` at the last step (1 = constant ``h``; spec #11, against mode seeking).
        distance_inputs: what D learns to project in stage 2: ``encoded`` codes of distorted data
            ``F(x + sigma eps)`` (spec Algorithm 1), ``latent_noise`` ``F(x) + sigma s eps``, or ``both``
            (half the batch each).
        consistency_target: ``clean`` (``F(x)``, spec Algorithm 1's ``a``) or ``reencoded``
            (``sg[F(G(z~))]``, which disagrees with the clean target: see the module docstring).
        restore_steps, restore_alpha: restoration flow (``restore_alpha=None`` means ``alpha``).
        bank_size, bank_seed: bank = a seeded subset of at most ``bank_size`` training codes.
        bandwidth_rule, h_scale, bandwidth: ``h = h_scale * rule(bank)``, or the fixed ``bandwidth``.
        ae_steps / ae_fraction: the stage switch (steps, or a fraction of ``trainer.max_steps``).
        sigma_min, sigma_max: DAE noise in data units; latent_sigma_min/max: D's noise in code-std units.
        lambda_*: loss weights (``lambda_prob = 0`` switches the probabilistic alignment off).
    """

    def __init__(
        self, data_shape: Sequence[int] = (2,), backbone: Mapping[str, Any] | None = None,
        encoder: Mapping[str, Any] | None = None, decoder: Mapping[str, Any] | None = None,
        distance_net: Mapping[str, Any] | None = None,
        latent_dim: Annotated[int, AtLeastOne] = 16, latent_shape: Sequence[int] | None = None,
        mode: Literal[MODES] = "lmppm",
        steps: Annotated[int, Range(ge=1, label="K, flow iterations")] = 10,
        alpha: Annotated[float, Range(ge=0, le=1, note="1 = full mean shift")] = 0.1,
        eta_d: Annotated[float, Range(gt=0, note="1 = full projection")] = 1.0,
        anneal_h: Annotated[float, Range(ge=1, note="the first step's bandwidth over h; 1 = no annealing")] = 1.0,
        distance_inputs: Literal[DISTANCE_INPUTS] = "both", consistency_target: Literal[CONSISTENCY_TARGETS] = "clean",
        restore_steps: Annotated[int, Range(ge=1, label="K for restoration")] = 10,
        restore_alpha: Annotated[float, Range(ge=0, le=1, note="1 = full mean shift")] | None = None,
        bank_size: Annotated[int, AtLeastOne] = 10_000, bank_seed: int = 0,
        bandwidth_rule: Literal[BANDWIDTH_RULES] = "silverman", h_scale: Annotated[float, Positive] = 1.0,
        bandwidth: Annotated[float, Range(gt=0, note="or None: use the rule")] | None = None,
        ae_steps: Annotated[int, NonNegative] | None = None,
        ae_fraction: Annotated[float, Range(gt=0, lt=1)] = 0.5,
        sigma_min: Annotated[float, NonNegative] = 0.05, sigma_max: float = 1.0,
        latent_sigma_min: Annotated[float, NonNegative] = 0.05, latent_sigma_max: float = 1.0,
        lambda_rec: Annotated[float, NonNegative] = 1.0, lambda_proj: Annotated[float, NonNegative] = 1.0,
        lambda_cons: Annotated[float, NonNegative] = 1.0, lambda_den: Annotated[float, NonNegative] = 1.0,
        lambda_eik: Annotated[float, NonNegative] = 0.1, lambda_zero: Annotated[float, NonNegative] = 1.0,
        lambda_prob: Annotated[float, NonNegative] = 0.0, **base: Any,
    ) -> None:
        _check(backbone is None, "LMPPM has three networks: give encoder=, decoder= and distance_net= specs "
               f"instead of backbone= (got backbone={backbone!r})")
        super().__init__(data_shape=data_shape, backbone=None, **base)
        if latent_shape is not None:
            _check(len(latent_shape) == 3 and min(latent_shape) >= 1, "latent_shape must be a tensor latent "
                   f"[c, h, w] of positive sizes, e.g. [4, 8, 8], or None for a vector; got {list(latent_shape)}")
            latent_dim = math.prod(int(v) for v in latent_shape)
        for pre, lo, hi in (("", sigma_min, sigma_max), ("latent_", latent_sigma_min, latent_sigma_max)):
            _check(lo <= hi, f"need 0 <= {pre}sigma_min <= {pre}sigma_max, got {lo}, {hi}")
        self.loss_weights = {"rec": lambda_rec, "proj": lambda_proj, "cons": lambda_cons, "den": lambda_den,
                             "eik": lambda_eik, "zero": lambda_zero, "prob": lambda_prob}
        self.latent_dim, self.mode, self.steps, self.alpha, self.eta_d = latent_dim, mode, steps, alpha, eta_d
        self.latent_shape = tuple(int(v) for v in latent_shape) if latent_shape is not None else (latent_dim,)
        self.anneal_h, self.distance_inputs, self.consistency_target = anneal_h, distance_inputs, consistency_target
        self.restore_steps = restore_steps
        self.restore_alpha = alpha if restore_alpha is None else restore_alpha
        self.bank_size, self.bank_seed, self.bandwidth_rule = bank_size, bank_seed, bandwidth_rule
        self.h_scale, self.fixed_bandwidth = h_scale, bandwidth
        self.ae_steps, self.ae_fraction = ae_steps, ae_fraction
        self.sigma_range, self.latent_sigma_range = (sigma_min, sigma_max), (latent_sigma_min, latent_sigma_max)
        image = len(self.data_shape) == 3
        vector = {"name": "mlp", "hidden": [256, 256]}
        self.encoder = build_backbone(encoder or ({"name": "conv_encoder"} if image else vector),
                                      self.data_shape, self.latent_shape, time_conditioned=False)
        self.decoder = build_backbone(decoder or ({"name": "conv_decoder"} if image else vector),
                                      self.latent_shape, self.data_shape, time_conditioned=False)
        self.distance_mlp = build_backbone(distance_net or {"name": "mlp", "hidden": [256, 256, 256]},
                                           (latent_dim,), (1,), time_conditioned=False)
        # the kernel bank and the stage live in buffers: saved in the state_dict, so checkpoints carry them
        self.register_buffer("bank", torch.zeros(0, latent_dim))
        self.register_buffer("bank_bandwidth", torch.zeros(()))
        self.register_buffer("bank_mean", torch.zeros(latent_dim))
        self.register_buffer("bank_std", torch.ones(latent_dim))
        self.register_buffer("bank_step", torch.tensor(-1))  # global step at which the bank was built
        self.register_stage(1)                               # 1 = autoencoder, 2 = distance net

    # ------------------------------------------------------------------ networks
    def encode(self, x: Tensor) -> Tensor:
        """Codes ``(B, d)``, flattened when the latent is a tensor (D and the kernel see vectors)."""
        return self.encoder(x).flatten(1)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z.reshape(len(z), *self.latent_shape))

    def distance(self, z: Tensor) -> Tensor:
        """The learned distance ``D(z) >= 0`` to the code manifold, (B,)."""
        return nn.functional.softplus(self.distance_mlp(z)).reshape(len(z))

    # ------------------------------------------------------------------ stages
    def switch_step(self) -> int:
        """Global step at which the distance stage starts."""
        return self.autoencoder_switch_step(self.ae_steps, self.ae_fraction)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        switch = self.switch_step()  # fails now, not mid-training, when it cannot be placed
        max_steps = self.trainer.max_steps
        if int(self.stage) == 1 and max_steps is not None and 0 < max_steps <= switch:
            rank_zero_warn(f"LMPPM: the distance stage starts at step {switch} >= max_steps={max_steps}; D will "
                           "not be trained and the flow runs without its projection step")

    def stage_starts(self) -> list[int]:
        return [self.switch_step()]

    def begin_stage(self, stage: int) -> None:
        """Freeze the autoencoder at its EMA weights and build the final bank from the training split; the
        staged base then restarts the EMA (with its warm-up) so D's average does not start from its
        untrained weights."""
        self.load_ema_into("encoder.", "decoder.")
        self._bank_from_datamodule()

    def stage_origin(self) -> int:
        # stage 2 counts from the step its bank was built (the switch), which stays right when a resumed
        # run changes max_steps and with it an ae_fraction switch
        return int(self.bank_step) if int(self.stage) == 2 else 0

    def loss(self, x: Tensor, idx: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        return self._autoencoder_loss(x) if int(self.stage) == 1 else self._distance_loss(x)

    def _autoencoder_loss(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        lo, hi = self.sigma_range
        sigma = (lo + (hi - lo) * torch.rand(len(x), device=x.device)).view(-1, *[1] * (x.dim() - 1))
        z = self.encode(x)
        rec = (self.decode(z) - x).square().mean()
        proj = (self.decode(self.encode(x + sigma * torch.randn_like(x))) - x).square().mean()
        w = self.loss_weights
        total = w["rec"] * rec + w["proj"] * proj
        logs = {"rec": rec.detach(), "proj": proj.detach(), "stage": torch.tensor(1.0)}
        if w["prob"] > 0:
            prob = sne_alignment(x, z)
            total, logs["prob"] = total + w["prob"] * prob, prob.detach()
        return total, logs

    @torch.no_grad()
    def distorted_codes(self, x: Tensor, z: Tensor) -> Tensor:
        """The inputs D learns to project (``distance_inputs``): codes of noisy data ``F(x + sigma eps)``
        (sigma in data units, the DAE's range), noisy codes ``z + sigma s eps`` (sigma in code-std units),
        or the first half of the batch the one way and the rest the other."""
        n_latent = {"latent_noise": len(z), "encoded": 0, "both": len(z) // 2}[self.distance_inputs]
        parts = []
        if n_latent > 0:
            lo, hi = self.latent_sigma_range
            sigma = (lo + (hi - lo) * torch.rand(n_latent, 1, device=z.device)) * self.code_scale
            parts.append(z[:n_latent] + sigma * torch.randn_like(z[:n_latent]))
        if n_latent < len(z):
            lo, hi = self.sigma_range
            rest = x[n_latent:]
            sigma = (lo + (hi - lo) * torch.rand(len(rest), device=x.device)).view(-1, *[1] * (x.dim() - 1))
            parts.append(self.encode(rest + sigma * torch.randn_like(rest)))
        return torch.cat(parts)

    def _distance_loss(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():  # the autoencoder is frozen in this stage
            z = self.encode(x)
        scale = self.code_scale
        z_noisy = self.distorted_codes(x, z).requires_grad_(True)
        projected, _, grad = projection_step(z_noisy, self.distance, 1.0, create_graph=True)
        unit = self.latent_dim * scale**2
        den = (projected - z).square().sum(1).mean() / unit
        if self.consistency_target == "reencoded":
            with torch.no_grad():
                target_ae = self.encode(self.decode(z_noisy))
            cons = (projected - target_ae).square().sum(1).mean() / unit
        else:  # the clean code: the consistency term is the denoising term
            cons = den
        eik = (grad.norm(dim=1) - 1).square().mean()
        # D^2 is a squared latent distance like the two above: the same unit (per-dimension scale / s^2 alone
        # made it d times stronger; at d = 256 that drove softplus into saturation, D = 0 and dead in 30 steps)
        zero = self.distance(z).square().mean() / unit
        w = self.loss_weights
        total = w["cons"] * cons + w["den"] * den + w["eik"] * eik + w["zero"] * zero
        return total, {"cons": cons.detach(), "den": den.detach(), "eik": eik.detach(), "zero": zero.detach(),
                       "stage": torch.tensor(2.0)}

    # ------------------------------------------------------------------ flow, generation, restoration
    def flow(self, z: Tensor, steps: int, alpha: float, mode: str | None = None, anneal_h: float = 1.0) -> Tensor:
        """``steps`` iterations of the deterministic latent flow of ``mode`` (default: ``self.mode``); the
        kernel bandwidth goes from ``anneal_h * h`` down to ``h`` (geometric)."""
        mode = mode or self.mode
        _check(steps >= 1, f"steps (K) must be >= 1, got {steps}")
        project = mode == "lmppm" and int(self.stage) == 2  # before stage 2, D is untrained: skip it
        bandwidths = annealed_bandwidths(float(self.bank_bandwidth), steps, anneal_h)
        for h in bandwidths:
            if mode == "dae":
                z = self.encode(self.decode(z))
                continue
            if project:
                z = projection_step(z, self.distance, self.eta_d)[0]
            if alpha > 0:
                z = kernel_step(z, self.bank, h, alpha)
        return z

    def generate(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        self._ensure_bank()
        z = self.bank_mean + self.bank_std * self.randn(n, (self.latent_dim,), generator)
        return self.decode(self.flow(z, self.steps, self.alpha, anneal_h=self.anneal_h))

    @torch.no_grad()
    def restore(self, x: Tensor, steps: int | None = None, alpha: float | None = None, mode: str | None = None,
                use_ema: bool = True) -> Tensor:
        """Blind restoration of degraded ``x`` (normalised space): ``G(flow(F(x)))``; ``dae``: ``G(F(x))``."""
        steps = self.restore_steps if steps is None else steps
        alpha = self.restore_alpha if alpha is None else alpha
        mode = mode or self.mode
        _check(steps >= 1, f"restore: steps (K) must be >= 1, got {steps}")
        _check(mode in MODES, f"restore: mode must be one of {MODES}, got {mode!r}")
        with eval_mode(self):
            with self.ema_weights() if use_ema else torch.no_grad():
                z = self.encode(x.to(self.device))
                if mode != "dae":  # the DAE projection needs no bank
                    self._ensure_bank()
                    z = self.flow(z, steps, alpha, mode)
                return self.decode(z)

    @property
    def nfe(self) -> int:  # type: ignore[override]
        return {"lmppm": self.steps + 1, "kernel_only": 1, "dae": 2 * self.steps + 1}[self.mode]

    def cost(self, task: str = "generate") -> dict[str, int]:
        """Per-sample work: network passes by net, and the kernel's code distances (K * N, each O(d))."""
        _check(task in ("generate", "restore"), f"task must be 'generate' or 'restore', got {task!r}")
        k = self.steps if task == "generate" else self.restore_steps
        dae = self.mode == "dae"
        proj = k if self.mode == "lmppm" else 0
        return {"distance_forward": proj, "distance_input_grad": proj,
                "decoder": 1 + (k if dae and task == "generate" else 0),
                "encoder": (k if dae and task == "generate" else 0) + (task == "restore"),
                "kernel_code_distances": 0 if dae else k * len(self.bank)}

    @torch.no_grad()
    def extra_eval_metrics(self, samples_raw: Tensor) -> dict[str, float]:
        """Memorisation check: NN distance of re-encoded samples to the bank vs. that of test codes."""
        dm = self._datamodule
        x = dm.normalize(samples_raw) if dm is not None else samples_raw
        with self.ema_weights():
            self._ensure_bank()
            fake = nn_distance(torch.cat([self.encode(p.to(self.device)) for p in x.split(1024)]), self.bank)
            out = {"bank_nn_dist": fake.mean().item(), "bandwidth": float(self.bank_bandwidth),
                   "lmppm_stage": float(self.stage)}
            test = getattr(dm, "test_data", None)
            if test is not None:
                real = torch.cat([self.encode(p.to(self.device)) for p in test[: len(x)].split(1024)])
                out["bank_nn_dist_test"] = nn_distance(real, self.bank).mean().item()
                out["bank_nn_ratio"] = out["bank_nn_dist"] / max(out["bank_nn_dist_test"], 1e-12)
        return out
