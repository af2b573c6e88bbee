"""The shared probability paths (onestep.paths), ODE solvers (onestep.solvers) and staged-training base
(onestep.generators.staged): endpoints, time derivatives, unit conversions, solver orders, the exactness
of the exponential integrator, and the stage switch of both staged generators."""

import contextlib
import io
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from onestep.data.datamodule import OneStepDataModule
from onestep.generators.characteristic import CharacteristicGenerator
from onestep.generators.flow_matching import FlowMatching
from onestep.generators.lmppm import LMPPM
from onestep.paths import PATHS, make_path
from onestep.solvers import euler_step, exponential_step, fixed_step, heun_step, solve, trajectory

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


# ---------------------------------------------------------------------------------------------- paths
@pytest.mark.parametrize("name", PATHS)
def test_path_starts_at_the_noise_and_ends_at_the_data(name):
    path, x0, x1 = make_path(name), torch.randn(6, 3), torch.randn(6, 3)
    assert torch.equal(path.interpolate(x0, x1, 0.0), x0)
    assert torch.equal(path.interpolate(x0, x1, 1.0), x1)
    assert torch.equal(path.interpolate(x0, x1, torch.zeros(6)), x0)  # per-sample times broadcast too


@pytest.mark.parametrize("name", PATHS)
def test_velocity_target_is_the_time_derivative_of_x_t(name):
    path = make_path(name)
    x0, x1 = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    t, h = torch.linspace(0.05, 0.95, 8, dtype=torch.float64), 1e-6
    finite_difference = (path.interpolate(x0, x1, t + h) - path.interpolate(x0, x1, t - h)) / (2 * h)
    assert torch.allclose(path.velocity_target(x0, x1, t), finite_difference, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", PATHS)
def test_output_units_convert_to_the_velocity_and_the_data_prediction(name):
    path = make_path(name)
    x0, x1 = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    t = torch.linspace(0.05, 0.95, 8, dtype=torch.float64)
    tc = t[:, None]
    out = path.output_target(x0, x1, tc)
    velocity = path.velocity_target(x0, x1, t)
    assert torch.allclose(path.velocity_from_output(out, t), velocity)  # v = kappa F
    assert torch.allclose(path.output_from_velocity(velocity, t), out)
    x_t = path.interpolate(x0, x1, t)
    # one point's conditional velocity is a point mass's exact velocity: both predictions give that point
    assert torch.allclose(path.denoise_velocity(x_t, velocity, t), x1)
    assert torch.allclose(path.denoise_output(x_t, out, t), x1)
    if name == "linear":  # the linear path's targets are the textbook ones, bit for bit
        assert torch.equal(path.velocity_target(x0, x1, t), x1 - x0) and torch.equal(out, x1 - x0)


# ---------------------------------------------------------------------------------------------- solvers
def _linear_ode_error(method: str, steps: int) -> float:
    """|x(1) - exp(-1 - 1/2) x0| for dx/dt = -(1 + t) x, whose solution is x0 exp(-t - t^2/2)."""
    x0 = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    times = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    x1 = solve(fixed_step(method, lambda x, t: -(1 + t) * x), x0, times)
    return float((x1 - x0 * math.exp(-1.5)).abs().max())


@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2)])
def test_fixed_step_solvers_converge_at_their_order(method, order):
    ratios = [_linear_ode_error(method, n) / _linear_ode_error(method, 2 * n) for n in (32, 64)]
    for ratio in ratios:  # doubling the steps divides the error by 2 ** order
        assert abs(ratio - 2**order) < 0.1 * 2**order, ratios


def test_steps_take_per_sample_times_and_trajectories_keep_every_state():
    velocity = lambda x, t: t.reshape(-1, 1) * torch.ones_like(x)  # noqa: E731 - dx/dt = t
    x = torch.zeros(3, 2, dtype=torch.float64)
    s, t = torch.tensor([0.0, 0.5, 0.2], dtype=torch.float64), torch.tensor([1.0, 0.5, 0.6], dtype=torch.float64)
    assert torch.allclose(euler_step(velocity, x, s, t), ((t - s) * s)[:, None].expand(3, 2))
    assert torch.allclose(heun_step(velocity, x, s, t), ((t * t - s * s) / 2)[:, None].expand(3, 2))  # exact
    times = [0.0, 0.25, 0.5, 1.0]
    states = trajectory(fixed_step("heun", velocity), x, times)
    assert len(states) == 4 and states[0] is x
    assert torch.equal(states[-1], solve(fixed_step("heun", velocity), x, times))
    assert torch.allclose(states[2], torch.full_like(x, 0.125))
    with pytest.raises(ValueError, match="method must be one of"):
        fixed_step("rk4", velocity)


@pytest.mark.parametrize("name", PATHS)
def test_exponential_integrator_follows_a_point_mass_trajectory_exactly(name):
    # data = delta(mu): the exact velocity at (x, t) is that of the one path through x, and the
    # exponential-integrator step lands on that path at any step size (Euler does not, on the Föllmer path)
    path = make_path(name)
    mu = torch.tensor([[1.5, -2.0]], dtype=torch.float64).expand(4, 2)
    z = torch.randn(4, 2, dtype=torch.float64)

    def velocity(x, t):
        tc = t.reshape(-1, 1) if t.dim() else t
        noise = (x - path.beta(tc) * mu) / path.alpha(tc)
        return path.d_alpha(tc) * noise + path.d_beta(tc) * mu

    times = [0.1, 0.4, 0.95, 1.0]
    states = trajectory(lambda x, s, t: exponential_step(path, velocity, x, s, t), path.interpolate(z, mu, 0.1), times)
    for t, state in zip(times, states):
        assert torch.allclose(state, path.interpolate(z, mu, t), atol=1e-10)
    assert torch.allclose(states[-1], mu, atol=1e-12)  # the last step lands on the data prediction
    x = torch.randn(4, 2, dtype=torch.float64)
    assert torch.equal(path.exp_step(x, mu, 0.3, 0.3), x)  # no time, no move: bit for bit
    euler = euler_step(velocity, path.interpolate(z, mu, 0.1), 0.1, 0.4)
    exact = torch.allclose(euler, path.interpolate(z, mu, 0.4), atol=1e-10)
    assert exact == (name == "linear")  # the linear path's exponential step is its Euler step


class PointMassOutput(torch.nn.Module):
    """The exact network output F = v / kappa of the flow to a point mass at ``mu`` on ``path``."""

    def __init__(self, path, mu: torch.Tensor) -> None:
        super().__init__()
        self.path, self.mu = path, mu

    def forward(self, x, t):
        tc = t.reshape(-1, 1)
        noise = (x - self.path.beta(tc) * self.mu) / self.path.alpha(tc)
        velocity = self.path.d_alpha(tc) * noise + self.path.d_beta(tc) * self.mu
        return self.path.output_from_velocity(velocity, t)


@pytest.mark.parametrize("name", PATHS)
def test_flow_matching_exp_sampler_lands_on_a_point_mass_and_heun_is_refused_on_the_follmer_path(name):
    fm = FlowMatching(data_shape=(2,), path=name, sampler="exp", steps=4)
    mu = torch.tensor([1.5, -2.0])
    fm.net = PointMassOutput(fm.path, mu)
    with torch.no_grad():
        assert torch.allclose(fm.integrate(torch.randn(5, 2)), mu.expand(5, 2), atol=1e-5)
        if name == "linear":  # there the exponential step is the Euler step, bit for bit
            z = torch.randn(5, 2)
            assert torch.equal(fm.integrate(z, sampler="euler"), fm.integrate(z))
    if name == "follmer":
        with pytest.raises(ValueError, match="singular"):
            FlowMatching(data_shape=(2,), path=name, sampler="heun")
        with pytest.raises(ValueError, match="singular"):
            fm.integrate(torch.randn(5, 2), sampler="heun")


# ---------------------------------------------------------------------------------------------- staged base
class StageRecorder(Callback):
    """Per step, after the module's stage switch and before the optimiser: the stage, whether the EMA
    equals the trainable weights, and the EMA decay the coming optimiser step will use."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, bool, float]] = []

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        ema = pl_module._ensure_ema()
        params = pl_module._trainable()
        restarted = set(ema) == set(params) and all(torch.equal(ema[n], p) for n, p in params.items())
        decay = pl_module.ema_decay_at(trainer.global_step + 1)
        self.rows.append((int(pl_module.stage), restarted, decay))


VECTOR_NETS = dict(encoder={"name": "mlp", "hidden": [16]}, decoder={"name": "mlp", "hidden": [16]},
                   distance_net={"name": "mlp", "hidden": [16]})
STAGED = {
    "characteristic": (lambda: CharacteristicGenerator(data_shape=(2,), backbone={"name": "mlp", "hidden": [16]},
                                                       teacher_steps=3, grid_size=4, ema_decay=0.9),
                       "teacher."),
    "lmppm": (lambda: LMPPM(data_shape=(2,), latent_dim=2, ae_steps=3, ema_decay=0.9, **VECTOR_NETS),
              "encoder."),
}


@pytest.mark.parametrize("name", sorted(STAGED))
def test_staged_generators_switch_at_the_boundary_and_restart_the_ema(name):
    make, frozen_prefix = STAGED[name]
    torch.manual_seed(0)
    model, record = make(), StageRecorder()
    snapshot = {}

    class AtSwitch(Callback):  # the EMA of the stage-1 network just before the switch
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                snapshot.update({k: v.clone() for k, v in pl_module._ensure_ema().items()
                                 if k.startswith(frozen_prefix)})

    dm = OneStepDataModule("8gaussians", batch_size=32, n_train=256, n_val=64, n_test=64)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[record, AtSwitch()])
    with contextlib.redirect_stderr(io.StringIO()):
        trainer.fit(model, datamodule=dm)
    stages, restarted, decays = zip(*record.rows)
    assert stages == (1, 1, 1, 2, 2, 2)  # stage 2 starts at global step 3 = the boundary
    assert restarted == (True, False, False, True, False, False)  # the EMA restarts at the switch only
    assert decays[3] == pytest.approx(2 / 11) and decays[2] == pytest.approx(4 / 13)  # its warm-up too
    assert snapshot and all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters() if n in snapshot)
