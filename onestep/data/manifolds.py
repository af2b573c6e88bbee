"""Synthetic data manifolds with a known noiseless support and a distance to it.

Every manifold draws points on its support (`sample_clean`), adds isotropic Gaussian noise for
training (`sample`), and measures the Euclidean distance of any point to the support (`distance`),
in raw units. Distances are analytic where a closed form exists (points, circles, arcs, torus,
sphere, squares) and numerical otherwise (spiral, helix: a dense parameter grid followed by a
golden-section refinement, accurate to about 1e-6).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "Manifold",
    "EightGaussians",
    "Moons2D",
    "Rings2D",
    "Spiral2D",
    "Checkerboard2D",
    "Helix3D",
    "Torus3D",
    "Sphere2",
    "EmbeddedManifold",
    "Sphere64",
    "Helix64",
    "MANIFOLDS",
    "get_manifold",
]

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _work_tensor(x: Tensor, ambient_dim: int, name: str) -> Tensor:
    """Validate `x` of shape (n, D) and return it as float64 (on CPU for devices without float64)."""
    if x.ndim != 2 or x.shape[1] != ambient_dim:
        raise ValueError(
            f"{name}.distance expects points of shape (n, {ambient_dim}), got {tuple(x.shape)}"
        )
    if x.device.type == "mps":
        x = x.cpu()
    return x.to(torch.float64)


def _out_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.is_floating_point() else torch.get_default_dtype()


def curve_distance(
    x: Tensor,
    curve: Callable[[Tensor], Tensor],
    t_min: float,
    t_max: float,
    n_grid: int = 8192,
    iters: int = 50,
    chunk: int = 1024,
) -> Tensor:
    """min over t in [t_min, t_max] of |x - curve(t)|, for float64 `x` of shape (n, D).

    The nearest point of a dense grid of `n_grid` parameters brackets the minimiser to
    [t_k - h, t_k + h]; golden-section search on |x - curve(t)|^2 then shrinks the bracket by
    0.618^iters. `curve` maps a float64 tensor of parameters (...,) to points (..., D).
    """
    t_grid = torch.linspace(t_min, t_max, n_grid, dtype=torch.float64, device=x.device)
    grid_points = curve(t_grid)
    h = (t_max - t_min) / (n_grid - 1)
    out = []
    for xc in x.split(chunk):
        nearest = torch.cdist(xc, grid_points).argmin(dim=1)
        t0 = t_grid[nearest]
        lo, hi = (t0 - h).clamp(t_min, t_max), (t0 + h).clamp(t_min, t_max)

        def sq_dist(t: Tensor, xc: Tensor = xc) -> Tensor:
            return (curve(t) - xc).pow(2).sum(dim=-1)

        c, d = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
        fc, fd = sq_dist(c), sq_dist(d)
        for _ in range(iters):
            left = fc < fd  # minimiser in [lo, d]: keep c as the new d
            hi = torch.where(left, d, hi)
            lo = torch.where(left, lo, c)
            t_new = torch.where(left, hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo))
            f_new = sq_dist(t_new)
            c, d = torch.where(left, t_new, d), torch.where(left, c, t_new)
            fc, fd = torch.where(left, f_new, fd), torch.where(left, fc, f_new)
        best = torch.minimum(torch.minimum(fc, fd), sq_dist(0.5 * (lo + hi)))
        best = torch.minimum(best, sq_dist(t0))
        out.append(best.clamp_min(0).sqrt())
    return torch.cat(out) if out else x.new_zeros(0)


def arc_distance(x: Tensor, center: tuple[float, float], radius: float, a0: float, a1: float) -> Tensor:
    """Distance from 2-D points to the circular arc center + radius (cos a, sin a), a in [a0, a1]."""
    c = torch.tensor(center, dtype=x.dtype, device=x.device)
    v = x - c
    angle = torch.atan2(v[:, 1], v[:, 0])
    mid, half = 0.5 * (a0 + a1), 0.5 * (a1 - a0)
    offset = torch.remainder(angle - mid + math.pi, 2 * math.pi) - math.pi  # in [-pi, pi)
    inside = offset.abs() <= half
    to_circle = (v.norm(dim=1) - radius).abs()
    ends = torch.tensor(
        [[math.cos(a0), math.sin(a0)], [math.cos(a1), math.sin(a1)]], dtype=x.dtype, device=x.device
    ) * radius
    to_ends = torch.cdist(v, ends).min(dim=1).values
    return torch.where(inside, to_circle, to_ends)


class Manifold:
    """A noiseless support in R^D with a training distribution `clean + noise_std * N(0, I)`."""

    name: str = "manifold"
    ambient_dim: int = 2
    intrinsic_dim: int = 1
    default_noise_std: float = 0.05

    def __init__(self, noise_std: float | None = None) -> None:
        self.noise_std = self.default_noise_std if noise_std is None else noise_std

    @property
    def noise_std(self) -> float:
        """Per-axis standard deviation of the Gaussian noise added by `sample`."""
        return self._noise_std

    @noise_std.setter
    def noise_std(self, value: float) -> None:
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"noise_std of manifold '{self.name}' must be a finite number >= 0, got {value}")
        self._noise_std = value

    def sample_clean(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """`n` points on the noiseless support, float32 (n, D)."""
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """The training distribution: `sample_clean(n) + noise_std * N(0, I)`, float32 (n, D)."""
        clean = self.sample_clean(n, generator)
        if self.noise_std == 0:
            return clean
        return clean + self.noise_std * torch.randn(clean.shape, generator=generator)

    def distance(self, x: Tensor) -> Tensor:
        """Euclidean distance of each row of `x` (n, D) to the noiseless support, shape (n,)."""
        xd = _work_tensor(x, self.ambient_dim, self.name)
        return self._distance(xd).to(device=x.device, dtype=_out_dtype(x))

    def _distance(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, ambient_dim={self.ambient_dim}, "
            f"intrinsic_dim={self.intrinsic_dim}, noise_std={self.noise_std})"
        )


def _rand(n: int, generator: torch.Generator | None) -> Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64)


class EightGaussians(Manifold):
    """torchcfm's 8 Gaussians: centres 5 * {(+-1, 0), (0, +-1), (+-1/sqrt2, +-1/sqrt2)}, each chosen
    with probability 1/8, per-axis noise std 0.1 ** 0.25 (covariance sqrt(0.1) I). Support: the centres."""

    name, ambient_dim, intrinsic_dim = "8gaussians", 2, 0
    default_noise_std = 0.1**0.25
    scale = 5.0

    @property
    def centers(self) -> Tensor:
        s = 1.0 / math.sqrt(2.0)
        unit = [(1, 0), (-1, 0), (0, 1), (0, -1), (s, s), (s, -s), (-s, s), (-s, -s)]
        return torch.tensor(unit, dtype=torch.float64) * self.scale

    def sample_clean(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        which = torch.randint(0, 8, (n,), generator=generator)
        return self.centers[which].float()

    def _distance(self, x: Tensor) -> Tensor:
        return torch.cdist(x, self.centers.to(x.device)).min(dim=1).values


class Moons2D(Manifold):
    """Two moons as sklearn's make_moons, then `3 * p - 1` (torchcfm). Outer arc (cos s, sin s),
    inner arc (1 - cos s, 0.5 - sin s), s ~ U[0, pi]; in raw units circles of radius 3 centred at
    (-1, -1) (angles [0, pi]) and (2, 0.5) (angles [pi, 2 pi]). Default noise 0.2 * 3 = 0.6."""

    name, ambient_dim, intrinsic_dim = "moons2d", 2, 1
    default_noise_std = 0.6
    radius = 3.0
    arcs = (((-1.0, -1.0), 0.0, math.pi), ((2.0, 0.5), math.pi, 2 * math.pi))

    def sample_clean(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        s = _rand(n, generator) * math.pi
        inner = torch.randint(0, 2, (n,), generator=generator).bool()
        x = torch.where(inner, 1 - torch.cos(s), torch.cos(s))
        y = torch.where(inner, 0.5 - torch.sin(s), torch.sin(s))
        return (torch.stack([x, y], dim=1) * 3 - 1).float()

    def _distance(self, x: Tensor) -> Tensor:
        d = [arc_distance(x, c, self.radius, a0, a1) for c, a0, a1 in self.arcs]
        return torch.minimum(d[0], d[1])


class Rings2D(Manifold):
    """Concentric circles of radii 1, 2, 3, 4 with equal mass per ring, uniform angle on each."""

    name, ambient_dim, intrinsic_dim = "rings2d", 2, 1
    default_noise_std = 0.05
    radii = (1.0, 2.0, 3.0, 4.0)

    def sample_clean(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        ring = torch.randint(0, len(self.radii), (n,), generator=generator)
        r = torch.tensor(self.radii, dtype=torch.float64)[ring]
        a = _rand(n, generator) * 2 * math.pi
        return torch.stack([r * torch.cos(a), r * torch.sin(a)], dim=1).float()

    def _distance(self, x: Tensor) -> Tensor:
        radii = torch.tensor(self.radii, dtype=x.dtype, device=x.device)
        return (x.norm(dim=1, keepdim=True) - radii).abs().min(dim=1).values


class Spiral2D(Manifold):
    """Archimedean spiral r = a * theta, theta in [pi/2, 4 pi], a = 1/pi (radius 0.5 to 4, arms 2
    apart), uniform in arc length s(theta) = a/2 (theta sqrt(1 + theta^2) + asinh theta)."""

    name, ambient_dim, intrinsic_dim = "spiral2d", 2, 1
    default_noise_std = 0.05
    a = 1.0 / math.pi
    theta_min, theta_max = 0.5 * math.pi, 4.0 * math.pi

    def curve(self, theta: Tensor) -> Tensor:
        r = self.a * theta
        return torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=-1)

    def arc_length(self, theta: Tensor) -> Tensor:
        return 0.5 * self.a * (theta * torch.sqrt(1 + theta**2) + torch.asinh(theta))

    def sample_clean(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        bounds = self.arc_length(torch.tensor([self.theta_min, self.theta_max], dtype=torch.float64))
        target = bounds[0] + (bounds[1] - bounds[0]) * _rand(n, generator)
        theta = torch.full_like(target, self.theta_max)
        for _ in range(40):  # Newton on a convex increasing s(theta), from the right: monotone
            theta = theta - (self.arc_length(theta) - target) / (self.a * torch.sqrt(1 + theta**2))
        return self.curve(theta.clamp(self.theta_min, self.theta_max)).float()

    def _distance(self, x: Tensor) -> Tensor:
        return curve_distance(x, self.curve, self.theta_min, self.theta_max)


class Checkerboard2D(Manifold):
    """4 x 4 checkerboard on [-4, 4]^2 (cells of side 2); the 8 cells with (i + j) even are filled
    uniformly. Distance: 0 inside a filled cell, else to the nearest filled cell (a box distance
    |max(|x - c| - 1, 0)|)."""

    name, ambient_dim, intrinsic_dim = "checker2d", 2, 2
    default_noise_std = 0.0

    @property
    def cell_centers(self) -> Tensor:
        cells = [(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0]
        return torch.tensor([(-3.0 + 2 * i, -3.0 + 2 * j) for i, j in cells], dtype=torch.float64)

    def sample_clean(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        centers = self.cell_centers
        cell = torch.randint(0, len(centers), (n,), generator=generator)
        offset = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 2 - 1
        return (centers[cell] + offset).float()

    def _distance(self, x: Tensor) -> Tensor:
        q = (x[:, None, :] - self.cell_centers.to(x.device)).abs() - 1.0
        return q.clamp_min(0).norm(dim=2).min(dim=1).values


class Helix3D(Manifold):
    """Helix (R cos t, R sin t, b t), t in [-2 pi, 2 pi], R = 2, b = 1/pi: two turns, height 4,
    turns 2 apart; constant speed so uniform t is uniform in arc length. Numerical distance."""

    name, ambient_dim, intrinsic_dim = "helix3d", 3, 1
    default_noise_std = 0.05
    radius, rise = 2.0, 1.0 / math.pi
    t_min, t_max = -2 * math.pi, 2 * math.pi

    def curve(self, t: Tensor) -> Tensor:
        return torch.stack([self.radius * torch.cos(t), self.radius * torch.sin(t), self.rise * t], dim=-1)

    def sample_clean(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        t = self.t_min + (self.t_max - self.t_min) * _rand(n, generator)
        return self.curve(t).float()

    def _distance(self, x: Tensor) -> Tensor:
        return curve_distance(x, self.curve, self.t_min, self.t_max)


class Torus3D(Manifold):
    """Torus surface ((R + r cos u) cos v, (R + r cos u) sin v, r sin u), R = 2, r = 0.7, uniform in
    area (u by rejection with weight (R + r cos u)). Distance |sqrt((rho - R)^2 + z^2) - r|."""

    name, ambient_dim, intrinsic_dim = "torus3d", 3, 2
    default_noise_std = 0.05
    major, minor = 2.0, 0.7

    def sample_clean(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        accepted: list[Tensor] = []
        count = 0
        while count < n:
            u = _rand(2 * (n - count) + 16, generator) * 2 * math.pi
            keep = _rand(len(u), generator) * (self.major + self.minor) <= self.major + self.minor * torch.cos(u)
            accepted.append(u[keep])
            count += int(keep.sum())
        u = torch.cat(accepted)[:n]
        v = _rand(n, generator) * 2 * math.pi
        ring = self.major + self.minor * torch.cos(u)
        return torch.stack([ring * torch.cos(v), ring * torch.sin(v), self.minor * torch.sin(u)], dim=1).float()

    def _distance(self, x: Tensor) -> Tensor:
        rho = x[:, :2].norm(dim=1)
        return (torch.sqrt((rho - self.major) ** 2 + x[:, 2] ** 2) - self.minor).abs()


class Sphere2(Manifold):
    """The 2-sphere of radius 2 in R^3, uniform (normalised Gaussians). Distance | |x| - radius |."""

    name, ambient_dim, intrinsic_dim = "sphere3d", 3, 2
    default_noise_std = 0.05
    radius = 2.0

    def sample_clean(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        g = torch.randn(n, 3, generator=generator, dtype=torch.float64)
        return (self.radius * g / g.norm(dim=1, keepdim=True)).float()

    def _distance(self, x: Tensor) -> Tensor:
        return (x.norm(dim=1) - self.radius).abs()


class EmbeddedManifold(Manifold):
    """A low-dimensional manifold mapped isometrically into R^D by a fixed orthonormal frame
    F (D x k) drawn from `frame_seed`: x = F y. Distance sqrt(d_base(F^T x)^2 + |x - F F^T x|^2)."""

    base_class: type[Manifold] = Sphere2
    ambient_dim = 64
    default_noise_std = 0.02
    frame_seed = 20240601

    def __init__(self, noise_std: float | None = None) -> None:
        self.base = self.base_class(noise_std=0.0)
        super().__init__(noise_std)
        gen = torch.Generator().manual_seed(self.frame_seed)
        gauss = torch.randn(self.ambient_dim, self.base.ambient_dim, generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(gauss)
        self.frame = q * torch.sign(torch.diagonal(r))  # sign-fixed, so the frame is unique

    def embed(self, y: Tensor) -> Tensor:
        """Map base coordinates (n, k) into R^D."""
        return y.to(self.frame) @ self.frame.T

    def sample_clean(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.embed(self.base.sample_clean(n, generator)).float()

    def _distance(self, x: Tensor) -> Tensor:
        frame = self.frame.to(x.device)
        coords = x @ frame
        off_subspace = (x - coords @ frame.T).norm(dim=1)
        return torch.sqrt(self.base._distance(coords) ** 2 + off_subspace**2)


class Sphere64(EmbeddedManifold):
    """The radius-2 sphere S^2 embedded in R^64 (default noise 0.02 per axis)."""

    name, intrinsic_dim = "sphere64", 2
    base_class = Sphere2


class Helix64(EmbeddedManifold):
    """The `helix3d` curve embedded in R^64 (default noise 0.02 per axis)."""

    name, intrinsic_dim = "helix64", 1
    base_class = Helix3D


MANIFOLDS: dict[str, type[Manifold]] = {
    cls.name: cls
    for cls in (
        EightGaussians, Moons2D, Rings2D, Spiral2D, Checkerboard2D, Helix3D, Torus3D, Sphere2, Sphere64, Helix64
    )
}


def get_manifold(name: str, **kwargs) -> Manifold:
    """Build the manifold registered under `name` (see `MANIFOLDS`), e.g. `get_manifold("torus3d", noise_std=0.1)`."""
    if name not in MANIFOLDS:
        raise ValueError(f"Unknown manifold '{name}'; known manifolds: {', '.join(MANIFOLDS)}")
    return MANIFOLDS[name](**kwargs)
