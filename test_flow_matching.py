"""The post's mathematics as properties, each checked through flow_matching.py's own functions against an
independent derivation: Gaussian conditioning, closed-form fields and flows, exact ODE solutions.

Notation as in the post: x0 ~ N(0, I) noise, x1 data, a_t = 1 - (1 - sigma_min) t,
psi_t(x0) = a_t x0 + t x1 the OT conditional flow, u = x1 - (1 - sigma_min) x0 its velocity,
u_t(x) = E[u | x_t = x] the marginal field, v the model.

    pytest                          # derandomized under CI=true, random examples otherwise
    pytest --hypothesis-seed=3      # another set of examples
"""
import gzip
import math
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st
from torch.func import jacrev, jvp

import evaluate
import flow_matching as fm

settings.register_profile("ci", deadline=None, max_examples=10, derandomize=True, database=None)
settings.register_profile("dev", deadline=None, max_examples=10)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

HERE = Path(__file__).resolve().parent
seeds = st.integers(0, 2**31 - 1)
sigmas = st.floats(1e-3, 0.5)  # sigma_min in (0, 0.5]
times = st.floats(0.0, 1.0)
shapes = st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)  # per-example shape, batch apart
N_MC = 20_000  # Monte Carlo samples: standard errors of ~1% of a unit-variance quantity


def within_se(samples: torch.Tensor, k: float = 6.0) -> torch.Tensor:
    """|mean| <= k standard errors, elementwise over the trailing dims (samples along dim 0). k = 6 makes a
    false alarm a 1-in-10^9 event per coordinate, so that no seed flakes."""
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])
    return mean.abs() <= k * se + 1e-12


def beyond_se(samples: torch.Tensor, k: float = 8.0) -> torch.Tensor:
    """|mean| > k standard errors: a test's power, shown on a model that is wrong on purpose."""
    return ~within_se(samples, k)


class Field(nn.Module):
    """A closed-form velocity field f(x, t) as a model; f(x, t, y) if it takes labels."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x, t, y=None):
        return self.f(x, t) if y is None else self.f(x, t, y)


class Recorder(nn.Module):
    """Wraps a field and keeps every (x, t) it is asked about: what the loss or the sampler feeds the model."""

    def __init__(self, f=lambda x, t: torch.zeros_like(x)):
        super().__init__()
        self.f, self.seen = f, []

    def forward(self, x, t):
        self.seen.append((x.detach().clone(), t.detach().clone()))
        return self.f(x, t)


# ------------------------------------------------------------------ Gaussian data: the field in closed form
# Data x1 ~ N(mu, s^2 I). Given t, x_t = a_t x0 + t x1 and u = x1 - (1 - sigma_min) x0 are jointly Gaussian
# per coordinate, with E[x_t] = t mu, Var[x_t] = a_t^2 + t^2 s^2, E[u] = mu and Cov[u, x_t] = t s^2 -
# (1 - sigma_min) a_t. Gaussian conditioning gives the marginal field
#   u_t(x) = E[u | x_t = x] = mu + (t s^2 - (1 - sigma_min) a_t) / (a_t^2 + t^2 s^2) (x - t mu),
# and its flow from x0 is psi_t(x0) = t mu + sqrt(a_t^2 + t^2 s^2) x0 (differentiate to check).
def gaussian_field(x, t, mu, s, sigma_min):
    """u_t(x) above; x: (N, d), t: (N,)."""
    t = t[:, None]
    a = 1 - (1 - sigma_min) * t
    return mu + (t * s**2 - (1 - sigma_min) * a) / (a**2 + t**2 * s**2) * (x - t * mu)


def gaussian_flow(x0, t, mu, s, sigma_min):
    a = 1 - (1 - sigma_min) * t
    return t * mu + math.sqrt(a**2 + t**2 * s**2) * x0


gaussians = st.fixed_dictionaries({"d": st.integers(1, 3), "mu": st.floats(-2, 2), "s": st.floats(0.2, 2.0),
                                   "sigma_min": sigmas, "seed": seeds})


@st.composite
def mixtures(draw):
    """A Gaussian mixture in 1-D or 2-D: K = 2 or 3 components with means in [-2, 2], stds in [0.2, 1]."""
    d, k = draw(st.integers(1, 2)), draw(st.integers(2, 3))
    floats = lambda lo, hi, n: torch.tensor(draw(st.lists(st.floats(lo, hi), min_size=n, max_size=n)),
                                           dtype=torch.float64)
    weights = floats(0.2, 1.0, k)
    return {"means": floats(-2, 2, k * d).view(k, d), "stds": floats(0.2, 1.0, k), "weights": weights / weights.sum(),
            "sigma_min": draw(sigmas), "seed": draw(seeds)}


def mixture_data(p, n=N_MC):
    """n draws of x1 from the mixture p (float64)."""
    g = torch.Generator().manual_seed(p["seed"])
    k = torch.multinomial(p["weights"], n, replacement=True, generator=g)
    return p["means"][k] + p["stds"][k, None] * torch.randn(n, p["means"].shape[1], generator=g, dtype=torch.float64)


def mixture_field(p):
    """fm.mixture_path's field u_t(x), x (N, d) and t (N,), for the mixture p."""
    return lambda x, t: fm.mixture_path(x, t, p["means"], p["stds"], p["weights"], p["sigma_min"])[1]


# ------------------------------------------------------------------ 1. The conditional path
@given(shape=shapes, batch=st.integers(1, 6), sigma_min=sigmas, seed=seeds)
def test_path_endpoints(shape, batch, sigma_min, seed):
    """psi_0(x0) = x0 and psi_1(x0) = x1 + sigma_min x0 (so x1 exactly when sigma_min = 0)."""
    g = torch.Generator().manual_seed(seed)
    x0, x1 = torch.randn(batch, *shape, generator=g), torch.randn(batch, *shape, generator=g)
    for s in (sigma_min, 0.0):
        _, at0, _ = fm.sample_ot_path(x1, s, t=torch.zeros(batch), x0=x0)
        _, at1, _ = fm.sample_ot_path(x1, s, t=torch.ones(batch), x0=x0)
        torch.testing.assert_close(at0, x0)
        torch.testing.assert_close(at1, x1 + s * x0)


@given(shape=shapes, batch=st.integers(1, 6), sigma_min=sigmas, t=times, seed=seeds)
def test_velocity_is_constant_and_is_the_time_derivative(shape, batch, sigma_min, t, seed):
    """d/dt psi_t(x0) = u at every t, by jvp and by finite differences, and u does not depend on t. With the
    endpoints above this pins the path: psi_t = x0 + t (psi_1 - psi_0), u = x1 - (1 - sigma_min) x0."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    x1 = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    tt = torch.full((batch,), t, dtype=torch.float64)
    psi = lambda tt: fm.sample_ot_path(x1, sigma_min, t=tt, x0=x0)[1]
    _, dpsi_dt = jvp(psi, (tt,), (torch.ones_like(tt),))
    _, _, u = fm.sample_ot_path(x1, sigma_min, t=tt, x0=x0)
    _, _, u_other = fm.sample_ot_path(x1, sigma_min, t=torch.rand(batch, generator=g, dtype=torch.float64), x0=x0)
    h = 1e-6
    torch.testing.assert_close(dpsi_dt, u)
    torch.testing.assert_close((psi(tt + h) - psi(tt - h)) / (2 * h), u, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(u_other, u)


def moments_of_standard_normal(z: torch.Tensor) -> bool:
    """z (N, d) is N(0, I) by its moments: mean 0, covariance I, fourth moment 3 (a uniform or a scaled
    normal fails one of them), each within 6 standard errors."""
    cov = z[:, :, None] * z[:, None, :] - torch.eye(z.shape[1], dtype=z.dtype)
    return bool(within_se(z).all() and within_se(cov).all() and within_se(z**4 - 3).all())


@given(d=st.integers(1, 4), sigma_min=sigmas, seed=seeds)
def test_the_path_draws_standard_normal_noise_and_uniform_times(d, sigma_min, seed):
    """Unless given, sample_ot_path draws x0 ~ N(0, I) (x_t at t = 0 is x0) and t ~ U[0, 1]."""
    torch.manual_seed(seed)
    x1 = torch.randn(N_MC, d, dtype=torch.float64)
    _, x0, _ = fm.sample_ot_path(x1, sigma_min, t=torch.zeros(N_MC, dtype=torch.float64))
    assert moments_of_standard_normal(x0)
    t, _, _ = fm.sample_ot_path(x1, sigma_min)
    assert within_se(t.double() - 0.5) and within_se((t.double() - 0.5) ** 2 - 1 / 12)


# ------------------------------------------------------------------ 2. The loss and its minimiser
@given(batch=st.integers(1, 8), sigma_min=sigmas, offset=st.floats(0.01, 3.0), t_dist=st.sampled_from(list(fm.T_DISTS)),
       seed=seeds)
def test_loss_is_the_regression_to_the_target(batch, sigma_min, offset, t_dist, seed):
    """L_CFM = mean || v(x_t, t) - u ||^2. A model that knows the batch's data x1 can invert the path from what
    the loss gives it, x0 = (x_t - t x1) / a_t, and answer u = x1 - (1 - sigma_min) x0: its loss is 0, and
    offset^2 if it adds `offset`. A loss that fed it another point or time, or regressed on another target,
    would not be 0. An output whose shape differs from x is refused instead of broadcast."""
    x1 = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def knows_x1(x, t, off=0.0):
        tb = t.view(-1, 1, 1, 1)
        return x1 - (1 - sigma_min) * (x - tb * x1) / (1 - (1 - sigma_min) * tb) + off

    for off, expected in ((0.0, 0.0), (offset, offset**2)):
        loss = fm.flow_matching_loss(Field(lambda x, t: knows_x1(x, t, off)), x1, sigma_min, t_dist)
        assert loss.item() == pytest.approx(expected, rel=1e-6, abs=1e-9)
    with pytest.raises(ValueError, match="model returned"):
        fm.flow_matching_loss(Field(lambda x, t: x.repeat(1, 64, 1, 1)), x1, sigma_min)


DIRECTIONS = {"1": lambda x, t: torch.ones_like(x), "x": lambda x, t: x, "t x": lambda x, t: t[:, None] * x,
              "x^2": lambda x, t: x**2}


def loss_slopes(field, x1, sigma_min, t_dist, seed):
    """Per-example slopes of fm.flow_matching_loss at theta = 0 for the model field + sum_j theta_ij g_j, one
    column per direction g_j: (N, 4). Their mean is dL/dtheta_j; their spread gives its standard error."""
    n = x1.shape[0]
    theta = torch.zeros(n, len(DIRECTIONS), dtype=x1.dtype, requires_grad=True)
    model = Field(lambda x, t: field(x, t) + sum(theta[:, j, None] * g(x, t) for j, g in enumerate(DIRECTIONS.values())))
    torch.manual_seed(seed + 1)  # not the stream x1 came from: noise and data must be independent
    (slopes,) = torch.autograd.grad(fm.flow_matching_loss(model, x1, sigma_min, t_dist), theta)
    return slopes * n


@pytest.mark.parametrize("t_dist", fm.T_DISTS)
@given(p=gaussians.filter(lambda p: abs(p["mu"]) >= 0.5))  # with mu = 0, u_t and u_{1-t} can look alike
def test_the_marginal_field_minimises_the_loss(t_dist, p):
    """On Gaussian data the closed-form marginal field u_t is where fm.flow_matching_loss is flat: its slope in
    every direction g(x, t) has mean zero within its standard errors. The same field with time reversed,
    u_{1-t}(x), or with a constant added, is clearly not: so the loss feeds the model the right x_t and t,
    draws the right noise and regresses on the right target."""
    mu, s, sigma_min = p["mu"], p["s"], p["sigma_min"]
    x1 = mu + s * torch.randn(N_MC, p["d"], generator=torch.Generator().manual_seed(p["seed"]), dtype=torch.float64)
    field = lambda x, t: gaussian_field(x, t, mu, s, sigma_min)
    assert within_se(loss_slopes(field, x1, sigma_min, t_dist, p["seed"])).all()
    reversed_time = lambda x, t: gaussian_field(x, 1 - t, mu, s, sigma_min)
    assert beyond_se(loss_slopes(reversed_time, x1, sigma_min, t_dist, p["seed"])).any()
    shifted = lambda x, t: field(x, t) + 0.5
    assert beyond_se(loss_slopes(shifted, x1, sigma_min, t_dist, p["seed"])).any()


@given(p=mixtures(), t_dist=st.sampled_from(list(fm.T_DISTS)))
def test_the_mixture_field_minimises_the_loss(p, t_dist):
    """The same on a Gaussian mixture, where u_t(x) is non-linear: fm.mixture_path's field is where
    fm.flow_matching_loss is flat."""
    x1 = mixture_data(p)
    assert within_se(loss_slopes(mixture_field(p), x1, p["sigma_min"], t_dist, p["seed"])).all()


@pytest.mark.parametrize("t_dist", fm.T_DISTS)
@given(seed=seeds)
def test_the_loss_draws_t_from_its_distribution_and_pairs_it_with_x_t(t_dist, seed):
    """The loss evaluates v at times drawn from t_dist: uniform t has mean 1/2 and variance 1/12, logit-normal
    t has logit(t) ~ N(0, 1). Each time comes with its own point: for data x1 = 3, x_t = a_t x0 + 3 t, so
    (x_t - 3 t) / a_t must be N(0, 1) noise, which it is not if x_t and t are mismatched."""
    torch.manual_seed(seed)
    model = Recorder()
    fm.flow_matching_loss(model, torch.full((N_MC, 1), 3.0, dtype=torch.float64), 0.01, t_dist)
    (x, t), = model.seen
    assert t.shape == (N_MC,) and ((0 <= t) & (t <= 1)).all()
    z, var = (t - 0.5, 1 / 12) if t_dist == "uniform" else (torch.logit(t), 1.0)
    assert within_se(z) and within_se(z**2 - var)
    assert moments_of_standard_normal((x[:, 0] - 3 * t)[:, None] / (1 - 0.99 * t[:, None]))


# ------------------------------------------------------------------ 3. FM = CFM, on a Gaussian mixture
@given(p=mixtures())
def test_the_mixture_field_is_the_conditional_mean_of_the_target(p):
    """u_t(x) = E[u | x_t = x] for fm.mixture_path: the residual u - u_t(x_t), with (t, x_t, u) drawn by
    fm.sample_ot_path, has mean zero and is uncorrelated with functions of x_t and t (the normal equations
    of the regression that defines a conditional mean)."""
    x1 = mixture_data(p)
    torch.manual_seed(p["seed"] + 1)  # not the stream x1 came from: noise and data must be independent
    t, xt, u = fm.sample_ot_path(x1, p["sigma_min"], t=torch.rand(N_MC, dtype=torch.float64))
    resid = u - mixture_field(p)(xt, t)  # (N, d)
    for h in (torch.ones_like(xt), xt, torch.tanh(2 * xt), t[:, None] * xt, xt**2):
        assert within_se(resid * h).all()


def test_one_component_mixture_is_the_gaussian_field():
    """fm.mixture_path with one component agrees with the Gaussian conditioning above, and its density is
    N(t mu, a_t^2 + t^2 s^2)."""
    x = torch.linspace(-4, 4, 41, dtype=torch.float64)[:, None]
    for t in (0.0, 0.3, 0.9, 1.0):
        dens, field = fm.mixture_path(x, t, torch.tensor([[0.7]], dtype=torch.float64),
                                      torch.tensor([1.3], dtype=torch.float64), torch.ones(1, dtype=torch.float64), 0.05)
        torch.testing.assert_close(field, gaussian_field(x, torch.full((41,), t, dtype=torch.float64), 0.7, 1.3, 0.05))
        var = (1 - 0.95 * t) ** 2 + t**2 * 1.3**2
        torch.testing.assert_close(dens, torch.exp(-(x[:, 0] - 0.7 * t) ** 2 / (2 * var)) / math.sqrt(2 * math.pi * var))


def random_mlp(d, seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(d + 1, 8), nn.Tanh(), nn.Linear(8, d)).double()
    return Field(lambda x, t: net(torch.cat([x, t[:, None]], 1))), net


def cfm_and_fm_on_batches(p, nets, batches=40, size=500):
    """For each batch: fm.flow_matching_loss of each model (L_CFM; the same draws for all of them) and L_FM,
    the squared distance to the marginal field at the very points and times the loss used."""
    field, x1 = mixture_field(p), mixture_data(p, batches * size)
    rows = []
    for b, chunk in enumerate(x1.split(size)):
        row = []
        for model, _ in nets:
            recorder = Recorder(model)
            torch.manual_seed(p["seed"] + 1 + b)  # the same draws for every model; not x1's stream
            cfm = fm.flow_matching_loss(recorder, chunk, p["sigma_min"])
            (x, t), = recorder.seen
            row.append((cfm, ((model(x, t) - field(x, t)) ** 2).mean()))
        rows.append(row)
    return rows


@given(p=mixtures(), seed_a=seeds, seed_b=seeds)
@settings(max_examples=5)
def test_cfm_and_fm_losses_differ_by_the_same_constant_for_every_model(p, seed_a, seed_b):
    """L_CFM(theta) - L_FM(theta) is a constant C independent of theta (the post's proof): over batches, the
    difference between two models' gaps has mean zero."""
    rows = cfm_and_fm_on_batches(p, [random_mlp(p["means"].shape[1], seed_a), random_mlp(p["means"].shape[1], seed_b + 1)])
    gaps = torch.stack([(ca - fa) - (cb - fb) for (ca, fa), (cb, fb) in rows]).detach()
    assert within_se(gaps)


@given(p=mixtures(), seed=seeds)
@settings(max_examples=5)
def test_cfm_and_fm_gradients_agree(p, seed):
    """grad_theta L_CFM = grad_theta L_FM: over batches, the difference of the two gradients has mean zero in
    every parameter."""
    model, net = random_mlp(p["means"].shape[1], seed)
    diffs = []
    for ((cfm, fmloss),) in cfm_and_fm_on_batches(p, [(model, net)], batches=40):
        g_cfm = torch.autograd.grad(cfm, list(net.parameters()), retain_graph=True)
        g_fm = torch.autograd.grad(fmloss, list(net.parameters()))
        diffs.append(torch.cat([(a - b).flatten() for a, b in zip(g_cfm, g_fm)]))
    assert within_se(torch.stack(diffs)).all()


@given(p=mixtures())
@settings(max_examples=5)
def test_mixture_density_integrates_to_one_and_obeys_the_continuity_equation(p):
    """fm.mixture_path's p_t integrates to 1 at every t, and with u_t it satisfies the continuity equation
    dp/dt + div(p u) = 0 (finite differences, central in t and x): u_t generates p_t."""
    d, sigma_min = p["means"].shape[1], p["sigma_min"]
    axis = torch.linspace(-6, 6, 241 if d == 1 else 121, dtype=torch.float64)
    dx = (axis[1] - axis[0]).item()
    x = axis[:, None] if d == 1 else torch.cartesian_prod(axis, axis)
    path = lambda x, t: fm.mixture_path(x, t, p["means"], p["stds"], p["weights"], sigma_min)
    for t in (0.0, 0.25, 0.5, 0.75, 0.97):
        dens, _ = path(x, t)
        assert dens.sum().item() * dx**d == pytest.approx(1.0, abs=1e-3)
    for t in (0.2, 0.5, 0.8):
        h = 1e-4
        dp_dt = (path(x, t + h)[0] - path(x, t - h)[0]) / (2 * h)
        div = 0
        for i in range(d):
            e = torch.zeros(d, dtype=torch.float64)
            e[i] = h
            flux = lambda y: path(y, t)[0] * path(y, t)[1][:, i]
            div = div + (flux(x + e) - flux(x - e)) / (2 * h)
        assert (dp_dt + div).abs().max().item() < 1e-5 * (1 + dp_dt.abs().max().item())


# ------------------------------------------------------------------ 4. Sampling: the ODE and its solvers
@given(p=gaussians)
@settings(max_examples=6)
def test_sample_carries_noise_to_the_data_with_the_marginal_field(p):
    """fm.sample with the closed-form Gaussian field as the model (RK4, 40 steps) returns N(mu, (s^2 +
    sigma_min^2) I): mean, covariance and fourth moment within standard errors."""
    mu, s, sigma_min, d = p["mu"], p["s"], p["sigma_min"], p["d"]
    model = Field(lambda x, t: gaussian_field(x.double(), t.double(), mu, s, sigma_min))
    cfg = fm.CFG(device="cpu", data_shape=(d,), n_samples=4000, solver="rk4", sample_steps=40, seed=p["seed"])
    x = fm.sample(model, cfg).double()
    assert x.shape == (4000, d)
    assert moments_of_standard_normal((x - mu) / math.sqrt(s**2 + sigma_min**2))


@given(p=mixtures())
@settings(max_examples=4)
def test_sample_carries_noise_to_a_mixture(p):
    """fm.sample with fm.mixture_path's field as the model lands on the mixture (convolved with sigma_min):
    per coordinate, its first three moments sum_k w_k E[x^j | k] match within standard errors, so the
    mixture's weights come out right."""
    cfg = fm.CFG(device="cpu", data_shape=(p["means"].shape[1],), n_samples=2000, solver="rk4", sample_steps=25,
                 seed=p["seed"])
    x = fm.sample(Field(lambda x, t: mixture_field(p)(x.double(), t.double())), cfg).double()
    m, v = p["means"], (p["stds"] ** 2 + p["sigma_min"] ** 2)[:, None]
    w = p["weights"][:, None]
    exact = [(w * m).sum(0), (w * (m**2 + v)).sum(0), (w * (m**3 + 3 * m * v)).sum(0)]
    for j, e in enumerate(exact, 1):
        assert within_se(x**j - e).all(), j


@given(d=st.integers(1, 4), seed=seeds)
def test_sample_starts_from_standard_normal_noise(d, seed):
    """With a zero field nothing moves, so sample() returns its start noise: x0 ~ N(0, I), from cfg.seed
    alone; the same seed gives the same noise, another seed other noise."""
    cfg = fm.CFG(device="cpu", data_shape=(d,), n_samples=N_MC, seed=seed)
    x = fm.sample(Field(lambda x, t: torch.zeros_like(x)), cfg).double()
    assert moments_of_standard_normal(x)
    assert torch.equal(fm.sample(Field(lambda x, t: torch.zeros_like(x)), cfg).double(), x)
    cfg.seed += 1
    assert not torch.equal(fm.sample(Field(lambda x, t: torch.zeros_like(x)), cfg).double(), x)


def order_of(solver, v, x0, exact, steps, shift=1.0, reverse=False):
    """log2 of the ratio of global errors for `steps` and 2 `steps`: the observed order. The global error is
    the largest over the grid of the coarse run, so that no sign change of the error at one time hides it
    (the fine grid holds every time of the coarse one: both map the same u = i / steps)."""
    errors, grid = [], fm.time_grid(steps, shift)
    grid = grid[::-1] if reverse else grid
    for n in (steps, 2 * steps):
        path = []
        fm.integrate(v, x0, n, solver, shift, path=path, reverse=reverse)
        errors.append(max((path[i * n // steps] - exact(grid[i])).abs().max().item() for i in range(steps + 1)))
    return math.log2(errors[0] / errors[1])


ORDERS = {"euler": (1, 64), "midpoint": (2, 32), "rk4": (4, 16)}  # theoretical order, steps to start from


@pytest.mark.parametrize("solver", ORDERS)
@given(mu=st.floats(-2, 2), s=st.floats(0.5, 2.0), sigma_min=st.floats(0.1, 0.5), seed=seeds)
def test_solver_order_on_the_gaussian_flow(solver, mu, s, sigma_min, seed):
    """On the marginal field u_t the global error falls at least as steps^-p (p = 1, 2, 4; observed order
    from doubling the steps >= p - 0.3, in float64), and exactly so for Euler and RK4. Midpoint does
    better here: its steps^-2 term cancels on this flow (observed order 3.0 across the drawn range)."""
    x0 = torch.randn(16, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    v = lambda x, t: gaussian_field(x, t, mu, s, sigma_min)
    order, steps = ORDERS[solver]
    observed = order_of(solver, v, x0, lambda t: gaussian_flow(x0, t, mu, s, sigma_min), steps)
    assert observed >= order - 0.3
    assert solver == "midpoint" or observed <= order + 0.3


@pytest.mark.parametrize("solver", ORDERS)
@given(k=st.floats(0.5, 3.0), shift=st.sampled_from([1.0, 3.0]) | st.floats(0.5, 4.0), reverse=st.booleans(),
       seed=seeds)
def test_solver_order_on_a_time_dependent_ode(solver, k, shift, reverse, seed):
    """On dx/dt = k t x, whose solution is x(t) = x(0) exp(k t^2 / 2), the observed order of Euler, midpoint
    and RK4 is 1, 2 and 4 within 0.3: on even steps and on shifted ones (a smooth change of time keeps the
    order), forwards from t = 0 and backwards from t = 1."""
    x0 = 0.5 + torch.rand(16, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    v = lambda x, t: k * t[:, None] * x
    start = x0 * math.exp(k / 2) if reverse else x0  # x(1) when integrating backwards
    # A shifted grid's longest step is up to 4x the even one, so start from more steps: over k in [0.5, 3] and
    # shift in [0.5, 4] the observed order is then within 0.05, 0.09 and 0.15 of 1, 2 and 4 (measured).
    steps = {"euler": 128, "midpoint": 64, "rk4": 64}[solver]
    exact = lambda t: x0 * math.exp(k * t * t / 2)
    assert order_of(solver, v, start, exact, steps, shift, reverse) == pytest.approx(ORDERS[solver][0], abs=0.3)


@given(steps=st.integers(1, 200), shift=st.floats(0.1, 10.0))
def test_time_grid_runs_from_noise_to_data(steps, shift):
    """The solver's times start at exactly 0 and end at exactly 1 and increase; each t_i has the odds of
    u_i = i / steps divided by the shift, t / (1 - t) = (u / (1 - u)) / shift (SD3's shift), so shift 1 is
    the post's even grid and shift > 1 packs the steps toward the noise."""
    grid = fm.time_grid(steps, shift)
    assert len(grid) == steps + 1 and grid[0] == 0.0 and grid[-1] == 1.0
    assert all(a < b for a, b in zip(grid, grid[1:]))
    for i, t in enumerate(grid[1:-1], 1):
        assert t / (1 - t) == pytest.approx(i / (steps - i) / shift, rel=1e-9)
    assert fm.time_grid(steps, 1.0) == [i / steps for i in range(steps + 1)]


@pytest.mark.parametrize("solver, shift, expected_shift", [("euler", "auto", 3.0), ("midpoint", "auto", 3.0),
                                                           ("rk4", "auto", 1.0), ("euler", 2.0, 2.0), ("rk4", "1.5", 1.5)])
def test_sample_steps_on_the_documented_grid(solver, shift, expected_shift):
    """sample() evaluates the model at the step starts of time_grid(steps, shift), with time_shift "auto"
    meaning 3 for Euler and midpoint and 1 (even steps) for RK4 (CFG's help), and a number meaning itself;
    midpoint adds the middle of each step, RK4 the middle twice and the end."""
    model = Recorder()
    fm.sample(model, fm.CFG(device="cpu", data_shape=(1,), n_samples=2, sample_steps=5, solver=solver, time_shift=shift))
    grid = fm.time_grid(5, expected_shift)  # checked on its own by test_time_grid_runs_from_noise_to_data
    stages = {"euler": [0.0], "midpoint": [0.0, 0.5], "rk4": [0.0, 0.5, 0.5, 1.0]}[solver]
    expected = [a + c * (b - a) for a, b in zip(grid, grid[1:]) for c in stages]
    assert [t[0].item() for _, t in model.seen] == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------ 5. The flow is a CNF: inversion, likelihood
@pytest.mark.parametrize("solver", ORDERS)
@given(mu=st.floats(-2, 2), s=st.floats(0.5, 2.0), sigma_min=st.floats(0.1, 0.5), seed=seeds)
def test_encode_inverts_the_flow(solver, mu, s, sigma_min, seed):
    """fm.encode runs the flow backwards from x at t = 1: with the Gaussian field its path follows the exact
    inverse t mu + sqrt(a_t^2 + t^2 s^2) x0 back to x0 = (x - mu) / sqrt(s^2 + sigma_min^2), with a global
    error of order steps^-p; and decoding what was encoded gives back x, with an error that falls at least
    as fast (observed orders from doubling the steps >= p - 0.3)."""
    x = mu + s * torch.randn(16, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    model = Field(lambda x, t: gaussian_field(x, t, mu, s, sigma_min))
    order, steps = ORDERS[solver][0], {"euler": 64, "midpoint": 32, "rk4": 32}[solver]
    x0 = (x - mu) / math.sqrt(s**2 + sigma_min**2)
    assert order_of(solver, model, x, lambda t: gaussian_flow(x0, t, mu, s, sigma_min), steps, reverse=True) >= order - 0.3
    errors = []
    for n in (steps, 2 * steps):
        cfg = fm.CFG(device="cpu", solver=solver, sample_steps=n)  # time_shift auto: 3 for euler and midpoint
        encoded = fm.encode(model, x, cfg)
        torch.testing.assert_close(encoded, x0, rtol=0, atol=20 / n ** order)
        errors.append((fm.integrate(model, encoded, n, solver, fm.shift_of(cfg)) - x).abs().max().item())
    assert math.log2(errors[0] / errors[1]) >= order - 0.3
    labels = torch.zeros(len(x), dtype=torch.long)  # a conditional model is encoded with the labels' field
    conditional = fm.encode(Field(lambda x, t, y: gaussian_field(x, t, mu + y[:, None], s, sigma_min)), x, cfg, labels)
    torch.testing.assert_close(conditional, encoded)


@given(p=gaussians, exact=st.booleans())
@settings(max_examples=6)
def test_log_likelihood_of_gaussian_data(p, exact):
    """fm.log_likelihood with the closed-form field is log N(x; mu, (s^2 + sigma_min^2) I), the density the
    flow carries N(0, I) to, up to RK4's error: at most steps^-4 at 8, 16 and 32 steps (0.28 steps^-4 at most
    across the drawn range, measured; a ratio of successive errors is not used, as the error can change sign
    and make one ratio small by luck). The divergence is exact, or Hutchinson's estimate, itself exact here:
    for a field linear in x with the same slope in every coordinate, probe^T (dv/dx) probe = tr(dv/dx)."""
    mu, s, sigma_min, d = p["mu"], max(p["s"], 0.5), max(p["sigma_min"], 0.05), p["d"]
    x = mu + s * torch.randn(64, d, generator=torch.Generator().manual_seed(p["seed"]), dtype=torch.float64)
    model = Field(lambda x, t: gaussian_field(x, t, mu, s, sigma_min))
    var = s**2 + sigma_min**2
    truth = -0.5 * ((x - mu) ** 2).sum(1) / var - 0.5 * d * math.log(2 * math.pi * var)
    for n in (8, 16, 32):
        cfg = fm.CFG(device="cpu", solver="rk4", sample_steps=n, time_shift=1.0)
        assert (fm.log_likelihood(model, x, cfg, exact=exact) - truth).abs().max().item() <= n ** -4.0


@given(p=mixtures())
@settings(max_examples=5)
def test_log_likelihood_of_a_mixture(p):
    """On a Gaussian mixture the field is non-linear and its divergence changes along the path: fm.log_likelihood
    with fm.mixture_path's field, exact divergence, is the log of the mixture the flow carries N(0, I) to,
    sum_k w_k N(x; m_k, (s_k^2 + sigma_min^2) I), within 1e-3 nats at 64 RK4 steps."""
    sigma_min = max(p["sigma_min"], 0.05)
    q = p | {"sigma_min": sigma_min, "stds": p["stds"].clamp(min=0.4)}
    x = mixture_data(q, 32)
    var = q["stds"] ** 2 + sigma_min**2  # (K,)
    d = x.shape[1]
    log_pk = torch.log(q["weights"]) - 0.5 * ((x[:, None] - q["means"][None]) ** 2).sum(-1) / var - 0.5 * d * torch.log(2 * math.pi * var)
    cfg = fm.CFG(device="cpu", solver="rk4", sample_steps=64, time_shift=1.0)
    estimate = fm.log_likelihood(Field(mixture_field(q)), x, cfg, exact=True)
    torch.testing.assert_close(estimate, torch.logsumexp(log_pk, 1), atol=1e-3, rtol=0)


@given(d=st.integers(2, 6), seed=seeds)
def test_hutchinson_divergence_is_unbiased(d, seed):
    """For a non-linear field (a random MLP), fm.divergence with the identity's columns summed (exact=True)
    is tr(dv/dx) from torch.func.jacrev, and the mean of Hutchinson's estimate over 4,000 Rademacher probes
    is within standard errors of it."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, d)).double()
    x = torch.randn(3, d, dtype=torch.float64, requires_grad=True)
    exact = fm.divergence(net(x), x)
    traces = torch.stack([torch.trace(jacrev(net)(xi)) for xi in x.detach()])
    torch.testing.assert_close(exact, traces)
    probes = torch.randint(0, 2, (4000, 3, d), dtype=torch.float64) * 2 - 1
    xs = x.detach().repeat(4000, 1).requires_grad_()
    estimates = fm.divergence(net(xs), xs, probes.flatten(0, 1)).view(4000, 3)
    assert within_se(estimates - traces).all()


def test_log_likelihood_holds_one_probe_per_example_through_the_solve(monkeypatch):
    """Hutchinson's probes are drawn once per solve, Rademacher (+-1), one per example, and the same probe is
    used at every evaluation of the field (FFJORD's choice: one consistent estimate along each path)."""
    probes = []
    divergence = fm.divergence
    monkeypatch.setattr(fm, "divergence", lambda v, x, probe=None: probes.append(probe) or divergence(v, x, probe))
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    fm.log_likelihood(Field(lambda x, t: net(x)), torch.randn(5, 3, dtype=torch.float64),
                      fm.CFG(device="cpu", solver="rk4", sample_steps=3))
    assert len(probes) == 12 and probes[0].shape == (5, 3) and set(probes[0].unique().tolist()) <= {-1.0, 1.0}
    assert all(torch.equal(p, probes[0]) for p in probes)
    fm.log_likelihood(Field(lambda x, t: net(x)), torch.randn(4000, 3, dtype=torch.float64), fm.CFG(device="cpu",
                      sample_steps=1))
    assert within_se(probes[-1]).all() and len(probes[-1].unique(dim=0)) == 8  # balanced signs; rows differ


def test_hutchinson_log_likelihood_is_unbiased():
    """For a linear field v = A(t) x with A not symmetric and not diagonal, the Hutchinson estimate of
    log p_1(x) averaged over 2,000 probe draws is the exact-divergence value, within standard errors."""
    a = torch.tensor([[0.3, 1.2, -0.4], [-0.7, 0.1, 0.9], [0.5, -1.1, -0.2]], dtype=torch.float64)
    model = Field(lambda x, t: (1 + t[:, None]) * x @ a.T)
    x = torch.randn(1, 3, dtype=torch.float64).repeat(2000, 1)
    cfg = fm.CFG(device="cpu", solver="rk4", sample_steps=8)
    exact = fm.log_likelihood(model, x[:1], cfg, exact=True)
    estimates = torch.cat([fm.log_likelihood(model, x[:1], cfg, seed=i) for i in range(2000)])
    assert within_se((estimates - exact)[:, None]).all() and estimates.std() > 0.1


def test_bits_per_dim_jitters_each_pixel_across_its_whole_bin(monkeypatch):
    """Uniform dequantization: the density is evaluated at y = x + U with U uniform over the pixel's bin,
    [-1/2, 1/2) / 127.5 around each level (mean 0, variance 1/12 in bin units), every pixel independently."""
    seen = []
    monkeypatch.setattr(fm, "log_likelihood", lambda model, y, cfg, exact=False, seed=0: seen.append(y) or y.new_zeros(len(y)))
    x = torch.linspace(-1, 1, 256).repeat(40, 1).view(-1, 1, 16, 16).double()
    fm.bits_per_dim(Field(lambda x, t: x), x, fm.CFG(device="cpu"))
    u = ((seen[0] - x) * 127.5).flatten()
    assert -0.5 <= u.min() and u.max() < 0.5 and within_se(u[:, None]) and within_se(u[:, None] ** 2 - 1 / 12)
    per_image = u.view(len(x), -1)
    assert within_se((per_image[:, :-1] * per_image[:, 1:]).flatten()[:, None])  # neighbouring pixels
    assert within_se((per_image[:-1] * per_image[1:]).flatten()[:, None])  # the same pixel of neighbouring images


def test_bits_per_dim_of_a_known_density():
    """fm.bits_per_dim is -log2 p(y) / D + log2(127.5), y the pixels x jittered uniformly within their bin of
    width 1/127.5. With the zero field nothing moves, so p = N(0, I): for pixels x = 0.5 the mean over the
    jitter is (E[y^2] / 2 + log(2 pi) / 2) / ln 2 + log2(127.5), E[y^2] = 0.25 + 1 / (12 * 127.5^2)."""
    cfg = fm.CFG(device="cpu", solver="euler", sample_steps=2, data_shape=(1, 2, 2))
    x = torch.full((4000, 1, 2, 2), 0.5, dtype=torch.float64)
    bpd = fm.bits_per_dim(Field(lambda x, t: 0 * x), x, cfg)
    expected = (0.5 * (0.25 + 1 / (12 * 127.5**2)) + 0.5 * math.log(2 * math.pi)) / math.log(2) + math.log2(127.5)
    assert within_se(bpd - expected)


@given(mu=st.floats(-2, 2), s=st.floats(0.3, 2.0), sigma_min=st.floats(0.01, 0.5))
@settings(max_examples=5)
def test_straightness_of_known_flows(mu, s, sigma_min):
    """A constant field moves along straight lines: straightness 0 and one Euler step lands on the end. The
    Gaussian marginal flow t mu + sqrt(a_t^2 + t^2 s^2) x0 bends unless s = 1 - sigma_min: its straightness is
    E int ||psi_1 - psi_0 - d/dt psi_t||^2 dt / E ||psi_1 - psi_0||^2, here by quadrature of the exact flow."""
    cfg = fm.CFG(device="cpu", data_shape=(2,), n_samples=2000, sample_steps=200)
    flat = fm.straightness(Field(lambda x, t: torch.full_like(x, mu + 3)), cfg)
    assert flat["straightness"] == pytest.approx(0, abs=1e-9) and flat["one_euler_step_error"] == pytest.approx(0, abs=1e-5)
    model = Field(lambda x, t: gaussian_field(x.double(), t.double(), mu, s, sigma_min).float())
    measured = fm.straightness(model, cfg)["straightness"]
    x0 = fm.noise(cfg, 2000, torch.device("cpu")).double()
    ts = torch.linspace(0, 1, 2001, dtype=torch.float64)
    radius = lambda t: torch.sqrt((1 - (1 - sigma_min) * t) ** 2 + t**2 * s**2)
    speed = (radius(ts + 1e-6) - radius(ts - 1e-6)) / 2e-6  # d/dt of the radius; the flow's velocity is mu + radius' x0
    chord = mu + (radius(torch.tensor(1.0)) - 1) * x0
    gap = ((radius(torch.tensor(1.0)) - 1 - speed[:, None, None]) * x0) ** 2  # (times, N, d)
    expected = torch.trapezoid(gap.sum(-1).mean(1), ts) / (chord**2).sum(1).mean()
    assert measured == pytest.approx(expected.item(), rel=0.02, abs=1e-4)


@given(seed=seeds, alpha=st.floats(0, 1))
def test_slerp_moves_along_the_great_circle(seed, alpha):
    """slerp(a, b, alpha) is a at 0 and b at 1; for two orthogonal vectors of the same norm it keeps that norm
    and turns by the angle alpha pi / 2 from a."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    torch.testing.assert_close(fm.slerp(a, b, 0.0), a)
    torch.testing.assert_close(fm.slerp(a, b, 1.0), b)
    b = b - (a @ b) / (a @ a) * a
    b = b * a.norm() / b.norm()
    c = fm.slerp(a, b, alpha)
    assert c.norm().item() == pytest.approx(a.norm().item(), rel=1e-9)
    assert math.acos(max(-1.0, min(1.0, (c @ a / a.norm() ** 2).item()))) == pytest.approx(alpha * math.pi / 2, abs=1e-6)


# ------------------------------------------------------------------ 6. The networks and the time embedding
def test_time_embedding_is_the_posts():
    """emb(t) = [sin(t f), cos(t f)] with dim/2 frequencies f geometric from e^0 to e^6: at t = 0 it is
    [0, ..., 0, 1, ..., 1] and its slopes there are the frequencies (jvp); an odd dim is refused (erratum)."""
    emb = fm.SinusoidalTimeEmbedding(16)
    e0, slope = jvp(emb, (torch.zeros(1, dtype=torch.float64),), (torch.ones(1, dtype=torch.float64),))
    assert e0.shape == (1, 16)
    torch.testing.assert_close(e0[0], torch.cat([torch.zeros(8), torch.ones(8)]))
    freqs = slope[0, :8].double()
    assert freqs[0].item() == pytest.approx(1) and freqs[-1].item() == pytest.approx(math.exp(6), rel=1e-5)
    torch.testing.assert_close(freqs[1:] / freqs[:-1], torch.full((7,), math.exp(6 / 7), dtype=torch.float64),
                               rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="even"):
        fm.SinusoidalTimeEmbedding(7)


@pytest.mark.parametrize("arch", fm.ARCHS)
@pytest.mark.parametrize("num_classes", [0, 10])
def test_networks_map_images_to_velocities_of_the_same_shape(arch, num_classes):
    """v_theta maps x (B, 1, 28, 28), t (B,) and, for a conditional net, labels y (B,) or None (the null label)
    to (B, 1, 28, 28); a conditional net's output depends on y."""
    torch.manual_seed(0)
    net = fm.ARCHS[arch](num_classes=num_classes)
    x, t = torch.randn(3, 1, 28, 28), torch.rand(3)
    assert net(x, t).shape == (3, 1, 28, 28)
    if num_classes:
        a, b = net(x, t, torch.tensor([0, 1, 2])), net(x, t, torch.tensor([3, 4, 5]))
        assert a.shape == (3, 1, 28, 28) and not torch.allclose(a, b)
        torch.testing.assert_close(net(x, t), net(x, t, torch.full((3,), num_classes)))


# ------------------------------------------------------------------ 7. Training
def two_blobs(n=4000, seed=0):
    """2-D points: a third around (-2, 0), two thirds around (2, 0), std 0.3; labels say which."""
    g = torch.Generator().manual_seed(seed)
    side = (torch.rand(n, generator=g) < 2 / 3).long()
    return torch.utils.data.TensorDataset(torch.tensor([[-2.0, 0.0], [2.0, 0.0]])[side] + 0.3 * torch.randn(n, 2, generator=g), side)


class MLP(nn.Module):
    def __init__(self, d=2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d + 1, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, d))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None]], 1))


def test_training_learns_a_two_mode_distribution(tmp_path):
    """train() fits any model on data of any shape: a small MLP on 2-D points from two blobs (1/3 and 2/3).
    sample() then draws 4,000 points in the data's space with both blobs' weights within 0.05 and their
    means within 0.15 (the data: 0.333 / 0.667 at (-2, 0) and (2, 0)). Euler on a shifted grid, the default."""
    cfg = fm.CFG(device="cpu", data_shape=(2,), batch_size=128, epochs=12, n_samples=4000, out_dir=str(tmp_path),
                 precision="fp32")  # the same numbers on every CPU
    torch.manual_seed(0)
    model = fm.train(cfg, two_blobs(), model=MLP())
    x = fm.sample(model, cfg)
    right = x[:, 0] > 0
    assert x.shape == (4000, 2) and right.float().mean().item() == pytest.approx(2 / 3, abs=0.05)
    torch.testing.assert_close(x[right].mean(0), torch.tensor([2.0, 0.0]), atol=0.15, rtol=0)
    torch.testing.assert_close(x[~right].mean(0), torch.tensor([-2.0, 0.0]), atol=0.15, rtol=0)


def test_bf16_only_where_the_hardware_has_it(monkeypatch):
    """--precision auto trains in bf16 on CUDA GPUs that support it and on CPUs with AMX, else in fp32; bf16
    and fp32 are honoured as asked."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for amx in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert fm.use_bf16("auto", cpu) is amx
    for bf16 in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
        assert fm.use_bf16("auto", cuda) is bf16
    assert fm.use_bf16("bf16", cpu) and not fm.use_bf16("fp32", cuda) and not fm.use_bf16("auto", torch.device("mps"))


def test_train_refuses_data_of_another_shape(tmp_path):
    """Data whose examples do not have cfg.data_shape is a one-line UserError that names the shape to set."""
    with pytest.raises(fm.UserError, match=r"data_shape=\(2,\)"):
        fm.train(fm.CFG(device="cpu", out_dir=str(tmp_path)), two_blobs(8), model=MLP())


@pytest.mark.parametrize("t_dist", fm.T_DISTS)
def test_training_draws_t_from_cfg_t_dist(t_dist, tmp_path, monkeypatch):
    """train() draws the times of each step from cfg.t_dist, batch_size of them per step."""
    calls = []
    for name, draw in fm.T_DISTS.items():
        monkeypatch.setitem(fm.T_DISTS, name, lambda n, device, name=name, draw=draw:
                            calls.append((name, n)) or draw(n, device))
    cfg = fm.CFG(device="cpu", data_shape=(2,), t_dist=t_dist, batch_size=4, max_steps=3, out_dir=str(tmp_path))
    fm.train(cfg, two_blobs(16), model=MLP())
    assert calls == [(t_dist, 4)] * 3


@given(decay=st.floats(0.999, 0.99999), steps=st.integers(1, 200), seed=seeds)
def test_weight_average_forgets_the_initial_weights(decay, steps, seed):
    """fm.update_ema toward fixed weights w for n steps from 0 keeps 1 / C(n + 9, 9) of its start: the warm-up
    decay (1 + k) / (10 + k) telescopes to n! 9! / (n + 9)! while it is below `decay` (k < 8,990 here).
    Long after the warm-up each update keeps exactly `decay`, so n updates keep decay^n."""
    torch.manual_seed(seed)
    ema, model = nn.Linear(3, 2).double(), nn.Linear(3, 2).double()
    start = [p.detach().clone() for p in ema.parameters()]
    for step in range(steps):
        fm.update_ema(ema, model, decay, step)
    kept = 1 / math.comb(steps + 9, 9)
    for e, p, s in zip(ema.parameters(), model.parameters(), start):
        torch.testing.assert_close(e, kept * s + (1 - kept) * p, rtol=1e-9, atol=1e-12)
    late = nn.Linear(3, 2).double()
    late_start = [p.detach().clone() for p in late.parameters()]
    for step in range(10**6, 10**6 + steps):
        fm.update_ema(late, model, decay, step)
    for e, p, s in zip(late.parameters(), model.parameters(), late_start):
        torch.testing.assert_close(e, decay**steps * s + (1 - decay**steps) * p, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("ema", [0.0, 0.999])
def test_train_returns_the_weight_average(ema, tmp_path, monkeypatch):
    """train() updates the average after every step n = 0, 1, 2, ... and returns it (in eval mode) when
    cfg.ema > 0, and the trained model itself when cfg.ema = 0 (the post)."""
    calls = []
    update = fm.update_ema
    monkeypatch.setattr(fm, "update_ema", lambda avg, model, decay, step: calls.append((avg, model, step)) or
                        update(avg, model, decay, step))
    cfg = fm.CFG(device="cpu", data_shape=(2,), batch_size=8, max_steps=5, ema=ema, out_dir=str(tmp_path))
    returned = fm.train(cfg, two_blobs(40), model=MLP())
    assert [step for _, _, step in calls] == [0, 1, 2, 3, 4] and not returned.training
    assert returned is (calls[0][0] if ema else calls[0][1])


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_a_short_run_is_a_whole_schedule(schedule, tmp_path, monkeypatch):
    """The learning rate of every step, as the optimizer saw it: constant is cfg.lr throughout (the post);
    cosine warms up linearly over 4 steps here to lr, then falls as lr / 10 + 0.9 lr (1 + cos(pi p)) / 2 to
    lr / 10 on the last step --max-steps runs, p going from 0 to 1 over the decay (not over all epochs)."""
    seen = []
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: seen.append(self.param_groups[0]["lr"])
                        or step(self, *a, **k))
    cfg = fm.CFG(device="cpu", data_shape=(2,), batch_size=4, epochs=50, max_steps=60, lr=1e-3, schedule=schedule,
                 out_dir=str(tmp_path))
    fm.train(cfg, two_blobs(40), model=MLP())
    assert len(seen) == 60
    if schedule == "constant":
        assert seen == [1e-3] * 60
    else:
        assert seen[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # warm-up: 60 // 20 + 1 = 4 steps
        decay = [1e-4 + 0.9e-3 * (1 + math.cos(math.pi * (k - 4) / 55)) / 2 for k in range(4, 60)]  # p = (k - 4) / 55
        assert seen[4:] == pytest.approx(decay) and seen[-1] == pytest.approx(1e-4)
        peak = seen.index(max(seen))
        assert all(a <= b for a, b in zip(seen[:peak], seen[1:peak + 1]))
        assert all(a >= b for a, b in zip(seen[peak:], seen[peak + 1:]))


# ------------------------------------------------------------------ 8. Guidance: the class asked for
class TwoFields(nn.Module):
    """A conditional model with closed-form fields: label 0 and the null label (2) have different ones."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append(len(x))
        return torch.where((y == 2)[:, None], -x, x + t[:, None])


@given(w=st.floats(-1.0, 5.0), seed=seeds)
def test_guidance_scale_combines_the_two_fields(w, seed):
    """fm.guided(model, y, cfg) is v(x, t, null) + w (v(x, t, y) - v(x, t, null)): w = 0 gives the null label's
    field, w = 1 the label's, and any w one forward pass of 2B examples (the label's and the null's)."""
    g = torch.Generator().manual_seed(seed)
    x, t, y = torch.randn(5, 3, generator=g), torch.rand(5, generator=g), torch.zeros(5, dtype=torch.long)
    model = TwoFields()
    field = lambda w: fm.guided(model, y, fm.CFG(num_classes=2, guidance=w))(x, t)
    torch.testing.assert_close(field(0.0), -x)
    torch.testing.assert_close(field(1.0), x + t[:, None])
    model.calls.clear()
    torch.testing.assert_close(field(w), -x + w * (x + t[:, None] + x))
    assert model.calls == ([5] if w == 1 else [10])


def test_label_drop_replaces_labels_by_the_null_label(tmp_path, monkeypatch):
    """Training shows the model the null label (num_classes) with probability label_drop and the data's
    label otherwise: with label_drop = 1 it never sees a label, so the data's labels change nothing (the same
    weights, bit for bit); with 0.25 a quarter of the labels are null, within standard errors."""
    data = two_blobs(64)
    relabelled = torch.utils.data.TensorDataset(data.tensors[0], 1 - data.tensors[1])
    seen = []

    class Conditional(MLP):
        def __init__(self):
            super().__init__()
            self.label = nn.Embedding(3, 2)

        def forward(self, x, t, y):
            seen.append(y)
            return super().forward(x, t) + self.label(y)

    def fit(dataset, drop, epochs=1):
        torch.manual_seed(0)
        cfg = fm.CFG(device="cpu", data_shape=(2,), num_classes=2, label_drop=drop, batch_size=16, epochs=epochs,
                     out_dir=str(tmp_path))
        return fm.train(cfg, dataset, model=Conditional())

    a, b = fit(data, 1.0), fit(relabelled, 1.0)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    seen.clear()
    fit(data, 0.25, epochs=150)  # 9,600 labels
    y = torch.cat(seen)
    assert within_se((y == 2).double() - 0.25)
    y = torch.arange(6).repeat(1000)
    dropped = fm.drop_labels(y, fm.CFG(num_classes=6, label_drop=0.25))
    assert torch.equal(dropped[dropped != 6], y[dropped != 6]) and within_se(((dropped == 6).double() - 0.25)[:, None])


@pytest.mark.parametrize("arch", fm.ARCHS)
def test_an_unconditional_model_carries_no_guidance(arch):
    """With num_classes = 0 (the post) the networks have no label parameters, the same ones as with labels
    minus the embedding, and drop_labels draws no random numbers: training is what it was without guidance."""
    plain, conditional = fm.ARCHS[arch](), fm.ARCHS[arch](num_classes=10)
    extra = conditional.state_dict().keys() - plain.state_dict().keys()
    assert not any("label" in k for k in plain.state_dict()) and extra == {"label.embed.weight"}
    state = torch.get_rng_state()
    assert fm.drop_labels(torch.arange(8), fm.CFG()) is None and torch.equal(torch.get_rng_state(), state)


@given(w=st.floats(0.0, 4.0), mu=st.floats(0.5, 2.0), s=st.floats(0.3, 1.5), seed=seeds)
@settings(max_examples=6)
def test_guided_samples_land_where_the_formula_says(w, mu, s, seed):
    """Two classes of 1-D data, N(mu, s^2) (label 0) and N(-mu, s^2) (label 1), and for the null label the
    field of N(0, s^2), a stand-in of the same variance (their true average is a mixture). With equal variances
    every field is u_t(x) = m + c_t (x - t m) with the same c_t, so the guided field is the one of mean
    m_null + w (m_y - m_null): fm.sample with these closed-form fields lands on N(+-w mu, s^2 + sigma_min^2),
    past each class's mean by (w - 1) mu."""
    sigma_min = 0.01

    def field(x, t, y):  # the Gaussian field of mean m, m + c_t (x - t m)
        m = torch.where(y == 0, mu, torch.where(y == 1, -mu, 0.0)).to(x)[:, None]
        return m + gaussian_field(x - t[:, None] * m, t, 0.0, s, sigma_min)

    cfg = fm.CFG(device="cpu", data_shape=(1,), num_classes=2, guidance=w, solver="rk4", sample_steps=25, seed=seed)
    labels = torch.arange(4000) % 2  # 0, 1, 0, 1, ...: each sample must follow its own label
    x = fm.sample(Field(field), cfg, labels=labels).double()
    target = torch.where(labels == 0, w * mu, -w * mu)[:, None]
    assert within_se(x - target).all() and within_se((x - target) ** 2 - (s**2 + sigma_min**2)).all()


# ------------------------------------------------------------------ 9. torchvision's MNIST loading code
def write_idx(folder: Path, n_train=12, n_test=5, gz=True, seed=0, truncate=False):
    """The four MNIST idx files (magic, sizes, big-endian), images and labels drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
        data[split] = images, labels
        for kind, arr, header in (("images-idx3", images, struct.pack(">IIII", 0x803, n, 28, 28)),
                                  ("labels-idx1", labels, struct.pack(">II", 0x801, n))):
            blob = header + arr.numpy().tobytes()
            blob = blob[: len(blob) // 2] if truncate and kind.startswith("images") else blob
            name = folder / f"{split}-{kind}-ubyte"
            if gz:
                name.with_suffix(".gz").write_bytes(gzip.compress(blob))
            else:
                name.write_bytes(blob)
    return data


@pytest.mark.parametrize("layout", ["plain", "torchvision"])
@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_loading_reads_idx_folders(tmp_path, layout, gz, name):
    """The module reads the four idx files (.gz or not) from a plain folder or from torchvision's
    root/<Class>/raw, through torchvision's own class: pixels k scaled to k / 127.5 - 1 in [-1, 1] (the
    post's x * 2 - 1 of ToTensor's k / 255), labels intact, train and test split."""
    folder = tmp_path if layout == "plain" else tmp_path / fm.DATASETS[name].__name__ / "raw"
    data = write_idx(folder, gz=gz)
    for split, train in (("train", True), ("t10k", False)):
        images, labels = data[split]
        ds = fm.load_dataset(name, str(tmp_path), train=train)
        assert len(ds) == len(images)
        for i in (0, len(ds) - 1):
            x, y = ds[i]
            assert x.shape == (1, 28, 28) and y == labels[i]
            torch.testing.assert_close(x[0], images[i].float() / 255 * 2 - 1)


@pytest.mark.parametrize("gz", [True, False])
def test_loading_a_corrupt_idx_file_is_a_clear_error(tmp_path, gz):
    """A truncated images file is a UserError naming the folder, not a traceback from deep in torchvision."""
    write_idx(tmp_path, gz=gz, truncate=True)
    with pytest.raises(fm.UserError, match="could not read the mnist idx files"):
        fm.load_dataset("mnist", str(tmp_path))


# ------------------------------------------------------------------ 10. Regression tests for the errata
def test_erratum_broadcast_is_caught_and_fixed():
    """Erratum 1: the post's net returns (B, 64, 28, 28) for (B, 1, 28, 28) and its loss broadcasts that
    silently; the loss now refuses any output of another shape, and the fixed VelocityNet returns
    1-channel velocities that sample() can step with (the post's second Euler step crashed)."""
    with pytest.raises(ValueError, match=r"\(4, 64, 28, 28\)"):
        fm.flow_matching_loss(Field(lambda x, t: x.expand(-1, 64, -1, -1)), torch.randn(4, 1, 28, 28))
    cfg = fm.CFG(device="cpu", n_samples=4, sample_steps=3)
    x = fm.sample(fm.VelocityNet(), cfg)
    assert x.shape == (4, 1, 28, 28) and 0 <= x.min() and x.max() <= 1


def test_images_come_back_as_pixels_like_the_posts():
    """For (C, H, W) data sample() returns the post's (x.clamp(-1, 1) + 1) / 2: with the zero field x is the
    N(0, 1) noise, so a share Phi(-1) = 0.159 of the pixels is 0 and as many are 1, the rest (x + 1) / 2."""
    cfg = fm.CFG(device="cpu", data_shape=(1, 2, 2), n_samples=5000, sample_steps=1)
    x = fm.sample(Field(lambda x, t: torch.zeros_like(x)), cfg).double().flatten()
    phi = 0.5 * math.erfc(1 / math.sqrt(2))
    assert within_se(((x == 0).double() - phi)[:, None]) and within_se(((x == 1).double() - phi)[:, None])
    noise = fm.noise(cfg, 5000, torch.device("cpu")).double().flatten()
    torch.testing.assert_close(x, ((noise.clamp(-1, 1) + 1) / 2).float().double())


@pytest.mark.parametrize("solver, calls", [("euler", 1), ("midpoint", 2), ("rk4", 4)])
def test_erratum_rk4_is_available_and_costs_four_calls(solver, calls):
    """Erratum 2: the post's CFG promises RK4 but samples with Euler; every solver is selectable and makes
    the number of network calls per step its order of accuracy needs."""
    model = Recorder()
    fm.integrate(model, torch.ones(2, 1), 5, solver)
    assert len(model.seen) == 5 * calls


@given(sigma_min=st.floats(0.0, 0.999), seed=seeds)
def test_erratum_no_t_eps_needed_at_the_endpoints(sigma_min, seed):
    """Erratum 3: t_eps was unused, and is not needed: when the loss draws t = 0 or t = 1 exactly, the loss
    of a network and its gradients are finite for every sigma_min in [0, 1)."""
    torch.manual_seed(seed)
    net, x1 = fm.VelocityNet(ch=8, tdim=8), torch.randn(3, 1, 28, 28)
    for t in (0.0, 1.0):
        fm.T_DISTS["end"] = lambda n, device: torch.full((n,), t, device=device)
        try:
            loss = fm.flow_matching_loss(net, x1, sigma_min, "end")
        finally:
            del fm.T_DISTS["end"]
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_erratum_data_survives_worker_processes(tmp_path):
    """Erratum 6: the post's transforms.Lambda cannot be pickled for DataLoader workers under spawn (macOS,
    Windows), and its num_workers never reaches the DataLoader; here the data set pickles (what spawn needs)
    and a run with a worker process trains."""
    write_idx(tmp_path)
    ds = fm.load_dataset("mnist", str(tmp_path))
    assert torch.equal(pickle.loads(pickle.dumps(ds))[3][0], ds[3][0])
    cfg = fm.CFG(device="cpu", arch="post", epochs=1, batch_size=4, num_workers=1, out_dir=str(tmp_path / "o"))
    fm.train(cfg, ds)
    assert fm.load_checkpoint(str(tmp_path / "o" / "checkpoint.pt"))["step"] == 3  # 12 images, 4 a batch


def test_erratum_device_auto_considers_mps(monkeypatch):
    """Erratum 9: the post picks cuda or cpu; auto also picks Apple's MPS when there is no CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert fm.pick_device("auto").type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert fm.pick_device("auto").type == "cpu"


# ------------------------------------------------------------------ 11. The command line, reliability
def offline(*args, **kwargs):
    raise urllib.error.URLError("no network in this test")


def run_cli(argv, capsys):
    """fm.cli in this process: (exit code, stdout, stderr). argparse's own exits count too."""
    try:
        code = fm.cli(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("idx")
    write_idx(folder, n_train=24)
    return folder


def tiny_run(idx_dir, out, *flags):
    """The post's net for 3 steps on the tiny idx data: a checkpoint in out/checkpoint.pt."""
    assert fm.cli(["--arch", "post", "--data-dir", str(idx_dir), "--out-dir", str(out), "--batch-size", "8",
                   "--epochs", "1", "--n-samples", "4", "--sample-steps", "2", "--device", "cpu", *flags]) == 0
    return out / "checkpoint.pt"


@pytest.fixture(scope="module")
def trained(idx_dir, tmp_path_factory):
    return tiny_run(idx_dir, tmp_path_factory.mktemp("out"))


@pytest.fixture(scope="module")
def trained_conditional(idx_dir, tmp_path_factory):
    return tiny_run(idx_dir, tmp_path_factory.mktemp("cond"), "--num-classes", "10")


BAD = [  # (flags, what the message must name)
    (["--epochs", "0"], "--epochs 0"), (["--batch-size", "-1"], "--batch-size -1"), (["--lr", "0"], "--lr 0"),
    (["--sample-steps", "0"], "--sample-steps 0"), (["--n-samples", "0"], "--n-samples 0"),
    (["--sigma-min", "1.0"], "--sigma-min 1.0"), (["--sigma-min", "-0.1"], "--sigma-min -0.1"),
    (["--time-shift", "-1"], "--time-shift -1"), (["--time-shift", "inf"], "--time-shift inf"),
    (["--time-shift", "often"], "--time-shift often"), (["--label-drop", "2"], "--label-drop 2"),
    (["--solver", "rk5"], "rk5"), (["--dataset", "cifar"], "cifar"), (["--device", "tpu"], "--device tpu"),
    (["--device", "cuda"], "--device cuda"), (["--epochs", "two"], "two"), (["--recipe", "mine"], "mine"),
    (["--data-dir", "{tmp}/nowhere"], "nowhere"), (["--nll", "0"], "--nll 0"),
    (["--sample-only", "--checkpoint", "{tmp}/none.pt"], "none.pt"), (["--sample-only"], "checkpoint.pt"),
    (["--resume", "--checkpoint", "{tmp}/none.pt"], "none.pt"), (["--out-dir", "/proc/fm_out"], "/proc/fm_out"),
    (["--resume", "--sample-only"], "choose one"), (["--resume", "--batch-size", "8"], "--batch-size"), (["--recipe", "post", "--resume"], "--recipe"),
    (["--sample-only", "--lr", "0.1"], "--lr"), (["--labels", "3"], "unconditional"),
    (["--num-classes", "10", "--labels", "3,x"], "3,x"), (["--num-classes", "10", "--labels", "10"], "0 to 9"),
]


@pytest.mark.parametrize("flags, names", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_input_is_one_line_naming_it(flags, names, tmp_path, capsys, monkeypatch):
    """Each bad value exits non-zero with one line on stderr that names it, and no traceback."""
    monkeypatch.setattr(urllib.request, "urlopen", offline)  # the same answer with or without a network
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    flags = [f.format(tmp=tmp_path) for f in flags]
    extra = ["--max-steps", "1"] * ("--sample-only" not in flags) + ["--out-dir", str(tmp_path / "o")] * ("--out-dir" not in flags)
    code, _, err = run_cli(flags + extra, capsys)
    assert code not in (0, None) and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and names in err, err


@pytest.mark.parametrize("damage", ["missing", "truncated", "not a checkpoint", "other architecture", "other version"])
def test_bad_checkpoint_is_one_line(damage, trained, tmp_path, capsys):
    """A checkpoint that is missing, truncated, something else, of another network or of another version of
    the module: one clear line naming it."""
    bad = tmp_path / "bad.pt"
    ckpt = torch.load(trained, weights_only=True)
    if damage == "truncated":
        bad.write_bytes(trained.read_bytes()[:1000])
    elif damage == "not a checkpoint":
        torch.save({"weights": torch.zeros(3)}, bad)
    elif damage == "other architecture":
        torch.save(ckpt | {"cfg": ckpt["cfg"] | {"arch": "unet"}}, bad)
    elif damage == "other version":
        torch.save(ckpt | {"cfg": ckpt["cfg"] | {"warp_drive": 9}}, bad)
    code, _, err = run_cli(["--sample-only", "--checkpoint", str(bad), "--out-dir", str(tmp_path)], capsys)
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1 and str(bad) in err, err


def test_sample_only_writes_a_new_grid(trained, tmp_path, capsys):
    """--sample-only --checkpoint P --solver rk4 writes an 8-wide grid of n-samples images (save_image, which the
    post imported and never called) and the trajectory, and says so."""
    from PIL import Image
    code, out, _ = run_cli(["--sample-only", "--checkpoint", str(trained), "--solver", "rk4", "--n-samples", "16",
                            "--out-dir", str(tmp_path)], capsys)
    assert code == 0 and "sampled in" in out and "rk4 x 2" in out
    assert Image.open(tmp_path / "samples.png").size == (2 + 8 * 30, 2 + 2 * 30)  # make_grid: padding 2
    assert Image.open(tmp_path / "trajectory.png").size == (2 + 9 * 30, 2 + 6 * 30)


def test_a_conditional_model_draws_the_classes_asked_for(trained_conditional, idx_dir, tmp_path, capsys):
    """A model trained with --num-classes 10 samples one row per class by default, and --labels 3,3,7 draws
    exactly those three; the trajectory shows one sample per class asked for; --figures adds a row per
    guidance scale."""
    from PIL import Image
    code, _, _ = run_cli(["--sample-only", "--checkpoint", str(trained_conditional), "--out-dir", str(tmp_path / "a")],
                         capsys)
    assert code == 0 and Image.open(tmp_path / "a" / "samples.png").size == (2 + 8 * 30, 2 + 10 * 30)
    code, _, _ = run_cli(["--sample-only", "--checkpoint", str(trained_conditional), "--labels", "3,3,7",
                          "--out-dir", str(tmp_path / "b")], capsys)
    assert code == 0 and Image.open(tmp_path / "b" / "samples.png").size == (2 + 3 * 30, 2 + 30)
    assert Image.open(tmp_path / "b" / "trajectory.png").size == (2 + 9 * 30, 2 + 2 * 30)
    code, _, _ = run_cli(["--sample-only", "--checkpoint", str(trained_conditional), "--figures", "--sample-steps", "2",
                          "--data-dir", str(idx_dir), "--out-dir", str(tmp_path / "c")], capsys)
    assert code == 0 and Image.open(tmp_path / "c" / "guidance.png").size == (2 + 10 * 30, 2 + 5 * 30)


def test_recipe_post_sets_the_posts_settings_and_typed_flags_win(idx_dir, tmp_path, capsys):
    """--recipe post prints what it sets (the post's CFG and code) and a flag typed with it overrides it; the
    checkpoint records the result."""
    code, out, _ = run_cli(["--recipe", "post", "--batch-size", "8", "--max-steps", "2", "--data-dir", str(idx_dir),
                            "--out-dir", str(tmp_path), "--device", "cpu", "--n-samples", "2"], capsys)
    assert code == 0 and "recipe post:" in out and "--lr 0.0002" in out and "--batch-size" not in out.split("\n")[0]
    cfg = fm.load_checkpoint(str(tmp_path / "checkpoint.pt"))["cfg"]
    assert cfg | fm.RECIPES["post"] | {"batch_size": 8} == cfg


def test_figures_and_bits_per_dim(trained, idx_dir, tmp_path, capsys):
    """--figures writes the interpolation, straightness and probability-path pictures and prints the
    straightness; --nll N prints the bits/dim of N test images with a standard error."""
    code, out, err = run_cli(["--sample-only", "--checkpoint", str(trained), "--data-dir", str(idx_dir), "--figures",
                              "--nll", "3", "--out-dir", str(tmp_path)], capsys)
    assert code == 0, err
    for name in ("interpolation.png", "straightness.png", "probability_path.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "straightness" in out and "bits/dim of 3 mnist test images" in out and "+-" in out


def test_nan_loss_stops_and_names_the_step(idx_dir, tmp_path, capsys):
    """A loss that becomes NaN or infinite stops training with the step, and keeps no poisoned checkpoint."""
    code, _, err = run_cli(["--arch", "post", "--data-dir", str(idx_dir), "--out-dir", str(tmp_path),
                            "--lr", "1e30", "--batch-size", "4", "--device", "cpu"], capsys)
    assert code == 1 and "at step" in err and "Traceback" not in err
    assert not (tmp_path / "checkpoint.pt").exists()


def test_nan_after_a_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A loss that turns NaN at step 4, after checkpoints of every step: the error names step 4, and
    checkpoint.pt still holds step 3 with finite weights."""
    calls = []
    loss_fn = fm.flow_matching_loss
    monkeypatch.setattr(fm, "flow_matching_loss", lambda *a: calls.append(1) or loss_fn(*a) * (math.nan if len(calls) == 4 else 1))
    cfg = fm.CFG(device="cpu", data_shape=(2,), batch_size=8, epochs=2, checkpoint_every=1e-9, out_dir=str(tmp_path))
    with pytest.raises(fm.UserError, match="at step 4.*keeps the last good state"):
        fm.train(cfg, two_blobs(64), model=MLP())
    ckpt = fm.load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert ckpt["step"] == 3 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def small_cfg(out, **kw):
    return fm.CFG(**{"device": "cpu", "arch": "post", "epochs": 2, "batch_size": 8, "out_dir": str(out), **kw})


def patterns(n=40, seed=0):
    """40 smooth blob images in [-1, 1] (random 4x4 grids upsampled), 4 of them repeated, with labels."""
    coarse = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
    base = torch.nn.functional.interpolate(coarse, size=28, mode="bilinear").clamp(-1, 1)
    return torch.utils.data.TensorDataset(base.repeat(n // 4, 1, 1, 1), torch.arange(4).repeat(n // 4))


@pytest.mark.parametrize("stop_at", [5, 7])  # 5 steps per epoch: an epoch boundary, and mid-epoch
def test_resume_is_bit_identical(stop_at, tmp_path, monkeypatch):
    """A Ctrl-C (SIGINT) during step `stop_at` stops the run after that step with a checkpoint; resuming from it
    ends with exactly the weights of an uninterrupted run (same seed, CPU): optimizer, schedule, data order
    and RNG states all come back."""
    data = patterns()  # 40 images / 8 = 5 steps per epoch
    whole = fm.train(small_cfg(tmp_path / "a"), data)
    build = fm.build_model

    def build_and_interrupt(cfg):
        model, calls = build(cfg), []

        def count(*_):  # Ctrl-C while the network computes step `stop_at`
            calls.append(1)
            if len(calls) == stop_at:
                os.kill(os.getpid(), signal.SIGINT)
        model.register_forward_pre_hook(count)
        return model

    monkeypatch.setattr(fm, "build_model", build_and_interrupt)
    with pytest.raises(fm.Interrupted):
        fm.train(small_cfg(tmp_path / "b"), data)
    monkeypatch.undo()
    ckpt = fm.load_checkpoint(str(tmp_path / "b" / "checkpoint.pt"))
    assert ckpt["step"] == stop_at
    resumed = fm.train(small_cfg(tmp_path / "b"), data, resume=ckpt)
    for (name, p), q in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name


def test_a_crash_while_saving_keeps_the_previous_file(tmp_path):
    """atomic_save: a write that dies halfway leaves the old file whole and no temporary file behind."""
    path = tmp_path / "checkpoint.pt"
    fm.atomic_save(path, lambda f: torch.save({"step": 1}, f))

    def dies(f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fm.atomic_save(path, dies)
    assert torch.load(path, weights_only=True) == {"step": 1} and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_a_crash_while_training_saves_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """train() writes its checkpoints through atomic_save: when the second save dies half-way (a full disk, a
    kill), checkpoint.pt still holds the first, whole."""
    saves = []
    save = torch.save

    def half(obj, f):
        saves.append(1)
        if len(saves) == 2:
            f.write(b"half a checkpoint")
            raise OSError("disk full")
        save(obj, f)

    monkeypatch.setattr(fm.torch, "save", half)
    cfg = fm.CFG(device="cpu", data_shape=(2,), batch_size=8, epochs=3, out_dir=str(tmp_path))  # saves every epoch
    with pytest.raises(OSError):
        fm.train(cfg, two_blobs(16), model=MLP())
    monkeypatch.undo()
    assert fm.load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == 2


def start(args, out):
    return subprocess.Popen([sys.executable, str(HERE / "flow_matching.py"), *args, "--out-dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=out.parent)


def saved_step(path: Path, proc, above=0, timeout=300.0) -> int:
    """Wait (on a machine as busy as it likes) until `path` holds a checkpoint past step `above`."""
    end = time.monotonic() + timeout
    while True:
        assert proc.poll() is None and time.monotonic() < end, proc.communicate()
        if path.exists() and (step := fm.load_checkpoint(str(path))["step"]) > above:
            return step
        time.sleep(0.05)


def test_ctrl_c_saves_and_resume_continues(idx_dir, tmp_path):
    """The first SIGINT finishes the step, saves, says how to resume and exits 130 without a traceback;
    --resume then continues from the saved step."""
    out = tmp_path / "out"
    args = ["--arch", "post", "--data-dir", str(idx_dir), "--batch-size", "4", "--epochs", "10000",
            "--checkpoint-every", "0.2", "--device", "cpu"]
    proc = start(args, out)
    saved_step(out / "checkpoint.pt", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in err and "--resume" in err, err
    saved = fm.load_checkpoint(str(out / "checkpoint.pt"))["step"]
    assert f"step {saved}" in err
    resumed = start(["--resume", "--max-steps", str(saved + 3)], out)  # the rest is the checkpoint's
    assert resumed.wait(timeout=300) == 0, resumed.communicate()
    assert fm.load_checkpoint(str(out / "checkpoint.pt"))["step"] == saved + 3


def test_a_killed_run_leaves_a_loadable_checkpoint(idx_dir, tmp_path):
    """SIGKILL at an arbitrary moment, while checkpoints are written back to back, never leaves a
    truncated checkpoint.pt."""
    out = tmp_path / "out"
    proc = start(["--arch", "post", "--data-dir", str(idx_dir), "--batch-size", "4", "--epochs", "10000",
                  "--checkpoint-every", "0.0001", "--device", "cpu"], out)
    first = saved_step(out / "checkpoint.pt", proc)
    saved_step(out / "checkpoint.pt", proc, above=first + 5)  # several checkpoints written, one likely half-way
    proc.kill()
    proc.communicate()
    assert fm.load_checkpoint(str(out / "checkpoint.pt"))["step"] > first


@given(shift=st.floats(-3, 3), scale=st.floats(0.2, 3.0), seed=seeds)
@settings(max_examples=5)
def test_frechet_distance_of_moved_features(shift, scale, seed):
    """evaluate.frechet, |mu1 - mu2|^2 + Tr S1 + Tr S2 - 2 Tr (S1^1/2 S2 S1^1/2)^1/2 on the empirical moments, is 0
    for a feature set against itself, c^2 d for a shift by c in all d coordinates, and (s - 1)^2 (|mu|^2 + Tr S)
    for a scaling by s (then S2 = s^2 S1 commutes with S1)."""
    f = torch.randn(500, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) @ torch.randn(6, 6, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) + 1
    assert evaluate.frechet(f, f) == pytest.approx(0, abs=1e-6)
    assert evaluate.frechet(f, f + shift) == pytest.approx(6 * shift**2, rel=1e-6, abs=1e-6)
    expected = (scale - 1) ** 2 * ((f.mean(0) ** 2).sum() + torch.cov(f.T).trace()).item()
    assert evaluate.frechet(f, scale * f) == pytest.approx(expected, rel=1e-6, abs=1e-6)
    # Two 2-D sets whose covariances do not commute: Tr (S1^1/2 S2 S1^1/2)^1/2 = sqrt(Tr S1 S2 + 2 sqrt(det S1 S2))
    g1, g2 = f[:, :2], f[:, 2:4] @ torch.tensor([[1.0, 0.7], [0.0, 0.4]], dtype=torch.float64)
    s1, s2 = torch.cov(g1.T), torch.cov(g2.T)
    cross = math.sqrt((s1 @ s2).trace() + 2 * math.sqrt(s1.det() * s2.det()))
    expected = ((g1.mean(0) - g2.mean(0)) ** 2).sum() + s1.trace() + s2.trace() - 2 * cross
    assert evaluate.frechet(g1, g2) == pytest.approx(expected.item(), rel=1e-6)


def test_evaluate_scores_a_conditional_checkpoint(trained_conditional, idx_dir, tmp_path, capsys, monkeypatch):
    """python evaluate.py trains (once) and caches a classifier beside the data, then scores samples for each
    guidance scale asked for: FD, confidence, class KL and the share read as the class asked for."""
    import json
    monkeypatch.setenv("HOME", str(tmp_path))  # no classifier cached by an earlier run elsewhere
    evaluate.main(["--checkpoint", str(trained_conditional), "--data-dir", str(idx_dir), "--n-samples", "20",
                   "--sample-steps", "2", "--guidance", "0,2", "--json", str(tmp_path / "e.json")])
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    assert [r["guidance"] for r in rows] == [0.0, 2.0]
    assert all(math.isfinite(r["fd"]) and 0 <= r["label"] <= 1 and 0 < r["conf"] <= 1 and 0 <= r["kl"] <= math.log(10) + 1e-9
               and sum(r["class_hist"]) == pytest.approx(1) for r in rows)
    assert (idx_dir / "flow_matching_lenet_mnist.pt").is_file() and "label" in capsys.readouterr().out


def test_help_and_a_bad_flag_as_a_process():
    """As a real process: --help exits 0 and lists every CFG field; a bad value exits 2 with one line."""
    script = [sys.executable, str(HERE / "flow_matching.py")]
    ok = subprocess.run(script + ["--help"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and all(f"--{fm.flag(f.name)}" in ok.stdout for f in fm.fields(fm.CFG) if f.name != "data_shape")
    bad = subprocess.run(script + ["--solver", "rk5"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "rk5" in bad.stderr and not bad.stdout
