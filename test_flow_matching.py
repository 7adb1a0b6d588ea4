"""The post's mathematics, stated as properties and checked on flow_matching.py's own code.

Notation as in the post: x0 ~ N(0, I) noise, x1 data, a_t = 1 - (1 - sigma_min) t,
psi_t(x0) = a_t x0 + t x1 the OT conditional flow, u = x1 - (1 - sigma_min) x0 its velocity.

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
from torch.func import functional_call, grad, jvp, vmap

import flow_matching as fm

settings.register_profile("ci", deadline=None, max_examples=12, derandomize=True, database=None)
settings.register_profile("dev", deadline=None, max_examples=12)
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


# ------------------------------------------------------------------ 1-3: the conditional path and the loss
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
    """d/dt psi_t(x0) = x1 - (1 - sigma_min) x0 = u at every t: by jvp, by finite differences, and u does
    not depend on t."""
    g = torch.Generator().manual_seed(seed)
    x0, x1 = torch.randn(batch, *shape, generator=g, dtype=torch.float64), torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    tt = torch.full((batch,), t, dtype=torch.float64)
    psi = lambda tt: fm.sample_ot_path(x1, sigma_min, t=tt, x0=x0)[1]
    _, dpsi_dt = jvp(psi, (tt,), (torch.ones_like(tt),))
    _, _, u = fm.sample_ot_path(x1, sigma_min, t=tt, x0=x0)
    _, _, u_other = fm.sample_ot_path(x1, sigma_min, t=torch.rand(batch, generator=g, dtype=torch.float64), x0=x0)
    h = 1e-6
    fd = (psi(tt + h) - psi(tt - h)) / (2 * h)
    torch.testing.assert_close(dpsi_dt, u)
    torch.testing.assert_close(fd, u, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(u_other, u)
    torch.testing.assert_close(u, x1 - (1 - sigma_min) * x0)


class Oracle(nn.Module):
    """Returns a fixed tensor (plus an offset): the 'model' that knows the target of the sampled pair."""

    def __init__(self, out, offset=0.0):
        super().__init__()
        self.out, self.offset = out, offset

    def forward(self, x, t):
        return self.out + self.offset


@given(batch=st.integers(1, 8), sigma_min=sigmas, offset=st.floats(0.01, 3.0), seed=seeds)
def test_loss_is_the_regression_to_the_target(batch, sigma_min, offset, seed):
    """L_CFM = mean || v - u ||^2: zero for v = u, offset^2 for v = u + offset, and a model whose output
    shape differs from x raises instead of broadcasting."""
    x1 = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    _, _, u = fm.sample_ot_path(x1, sigma_min)
    for off, expected in ((0.0, 0.0), (offset, offset ** 2)):
        torch.manual_seed(seed)  # the loss draws the same (t, x0) as the line above
        loss = fm.flow_matching_loss(Oracle(u, off), x1, sigma_min)
        assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="model returned"):
        fm.flow_matching_loss(Oracle(u.repeat(1, 64, 1, 1)), x1, sigma_min)


class TimeRecorder(nn.Module):
    def forward(self, x, t):
        self.t = t
        return torch.zeros_like(x)


@pytest.mark.parametrize("t_dist", fm.T_DISTS)
@given(seed=seeds)
def test_the_loss_draws_t_from_its_distribution(t_dist, seed):
    """The loss evaluates v at times in [0, 1] drawn from t_dist: uniform t has mean 1/2 and variance 1/12;
    logit-normal t has logit(t) ~ N(0, 1), mean 0 and variance 1; each within 6 standard errors."""
    torch.manual_seed(seed)
    model = TimeRecorder()
    fm.flow_matching_loss(model, torch.zeros(N_MC, 1), 0.01, t_dist)
    t = model.t.double()
    assert t.shape == (N_MC,) and ((0 <= t) & (t <= 1)).all()
    z, var = (t - 0.5, 1 / 12) if t_dist == "uniform" else (torch.logit(t), 1.0)
    assert within_se(z) and within_se(z**2 - var)


# ------------------------------------------------------------------ 4-6: FM = CFM on Gaussian data
# Data x1 ~ N(mu, s^2 I). Given t, x_t = a_t x0 + t x1 and u = x1 - (1 - sigma_min) x0 are jointly
# Gaussian per coordinate, with E[x_t] = t mu, Var[x_t] = a_t^2 + t^2 s^2, E[u] = mu and
# Cov[u, x_t] = t s^2 - (1 - sigma_min) a_t. The marginal field is the conditional mean of the target,
#   u_t(x) = E[u | x_t = x] = mu + (t s^2 - (1 - sigma_min) a_t) / (a_t^2 + t^2 s^2) (x - t mu),
# and its flow from x0 is psi_t(x0) = t mu + sqrt(a_t^2 + t^2 s^2) x0 (differentiate to check).
def marginal_field(x, t, mu, s, sigma_min):
    """u_t(x) above; x: (N, d), t: (N,)."""
    t = t[:, None]
    a = 1 - (1 - sigma_min) * t
    return mu + (t * s**2 - (1 - sigma_min) * a) / (a**2 + t**2 * s**2) * (x - t * mu)


def marginal_flow(x0, t, mu, s, sigma_min):
    a = 1 - (1 - sigma_min) * t
    return t * mu + math.sqrt(a**2 + t**2 * s**2) * x0


gaussians = st.fixed_dictionaries({"d": st.integers(1, 4), "mu": st.floats(-2, 2), "s": st.floats(0.2, 2.0),
                                   "sigma_min": sigmas, "seed": seeds})


def gaussian_batch(d, mu, s, sigma_min, seed):
    g = torch.Generator().manual_seed(seed)
    x1 = mu + s * torch.randn(N_MC, d, generator=g, dtype=torch.float64)
    t = torch.rand(N_MC, generator=g, dtype=torch.float64)
    x0 = torch.randn(N_MC, d, generator=g, dtype=torch.float64)
    t, xt, u = fm.sample_ot_path(x1, sigma_min, t=t, x0=x0)
    return t, xt, u, marginal_field(xt, t, mu, s, sigma_min)


@given(p=gaussians)
def test_marginal_field_is_the_conditional_mean_of_the_target(p):
    """u_t(x) = E[u | x_t = x]: the residual u - u_t(x_t) has mean zero and is uncorrelated with x_t, the
    two normal equations of regressing u on x_t."""
    t, xt, u, ut = gaussian_batch(**p)
    resid = u - ut  # (N, d)
    assert within_se(resid).all()
    assert within_se(resid * (xt - t[:, None] * p["mu"])).all()


def random_mlp(d, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d + 1, 8), nn.Tanh(), nn.Linear(8, d)).double()


def field_of(net):
    return lambda x, t: net(torch.cat([x, t[:, None]], 1))


@given(p=gaussians, seed_a=seeds, seed_b=seeds)
def test_cfm_and_fm_losses_differ_by_the_same_constant_for_every_model(p, seed_a, seed_b):
    """L_CFM(theta) - L_FM(theta) is a constant C independent of theta: per sample, with the same draws for
    two models A and B, the difference of the two differences has mean zero."""
    t, xt, u, ut = gaussian_batch(**p)
    gaps = []
    for seed in (seed_a, seed_b + 1):
        v = field_of(random_mlp(p["d"], seed))(xt, t).detach()
        gaps.append(((v - u) ** 2).sum(1) - ((v - ut) ** 2).sum(1))  # per-sample L_CFM - L_FM
    assert within_se(gaps[0] - gaps[1])


@given(p=gaussians, seed=seeds)
def test_cfm_and_fm_gradients_agree(p, seed):
    """grad_theta L_CFM = grad_theta L_FM: the per-sample difference 2 (dv/dtheta)^T (u_t(x_t) - u) has
    mean zero for every parameter."""
    t, xt, u, ut = gaussian_batch(**p)
    net = random_mlp(p["d"], seed)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def gap(params, x, tt, target, marginal):  # one sample's L_CFM - L_FM
        v = functional_call(net, params, (torch.cat([x, tt[None]])[None],))[0]
        return ((v - target) ** 2).sum() - ((v - marginal) ** 2).sum()

    per_sample = vmap(grad(gap), in_dims=(None, 0, 0, 0, 0))(params, xt, t, u, ut)
    for name, g in per_sample.items():
        assert within_se(g.flatten(1)).all(), name


@given(p=gaussians)
def test_marginal_field_transports_noise_to_data(p):
    """Integrating u_t from x0 ~ N(0, I) with RK4 lands on N(mu, (s^2 + sigma_min^2) I) and on the exact
    flow psi_1(x0) = mu + sqrt(s^2 + sigma_min^2) x0."""
    d, mu, s, sigma_min = p["d"], p["mu"], p["s"], p["sigma_min"]
    x0 = torch.randn(N_MC, d, generator=torch.Generator().manual_seed(p["seed"]), dtype=torch.float64)
    x1 = fm.integrate(lambda x, t: marginal_field(x, t, mu, s, sigma_min), x0, 200, "rk4")
    torch.testing.assert_close(x1, marginal_flow(x0, 1.0, mu, s, sigma_min), rtol=1e-5, atol=1e-5)
    var = s**2 + sigma_min**2
    assert within_se(x1 - mu).all()  # mean mu
    assert within_se((x1 - mu) ** 2 - var).all()  # variance s^2 + sigma_min^2


def order_of(solver, v, x0, exact, steps, shift=1.0):
    """log2 of the ratio of global errors for `steps` and 2 `steps`: the observed order. The global error is
    the largest over the grid of the coarse run, so that no sign change of the error at one time hides it
    (the fine grid holds every time of the coarse one: both map the same u = i / steps)."""
    errors, grid = [], fm.time_grid(steps, shift)
    for n in (steps, 2 * steps):
        path = []
        fm.integrate(v, x0, n, solver, shift, path=path)
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
    v = lambda x, t: marginal_field(x, t, mu, s, sigma_min)
    order, steps = ORDERS[solver]
    observed = order_of(solver, v, x0, lambda t: marginal_flow(x0, t, mu, s, sigma_min), steps)
    assert observed >= order - 0.3
    assert solver == "midpoint" or observed <= order + 0.3


@pytest.mark.parametrize("solver", ORDERS)
@given(k=st.floats(0.5, 3.0), shift=st.sampled_from([1.0, 3.0]) | st.floats(0.5, 4.0), seed=seeds)
def test_solver_order_on_a_time_dependent_ode(solver, k, shift, seed):
    """On dx/dt = k t x, whose solution is x0 exp(k t^2 / 2), the observed order of Euler, midpoint and RK4
    is 1, 2 and 4 within 0.3, on even steps and on shifted ones (a smooth change of time keeps the order)."""
    x0 = 0.5 + torch.rand(16, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    v = lambda x, t: k * t[:, None] * x
    order, _ = ORDERS[solver]
    # A shifted grid's longest step is up to 4x the even one, so start from more steps: over k in [0.5, 3] and
    # shift in [0.5, 4] the observed order is then within 0.05, 0.09 and 0.15 of 1, 2 and 4 (measured).
    steps = {"euler": 128, "midpoint": 64, "rk4": 64}[solver]
    exact = lambda t: x0 * math.exp(k * t * t / 2)
    assert order_of(solver, v, x0, exact, steps, shift) == pytest.approx(order, abs=0.3)


@given(steps=st.integers(1, 200), shift=st.floats(0.1, 10.0))
def test_time_grid_runs_from_noise_to_data(steps, shift):
    """The solver's times start at exactly 0 and end at exactly 1, increase, are even for shift 1 (the post's
    dt = 1 / steps), and for shift > 1 lie at or before the even ones (shorter steps near the noise)."""
    grid, even = fm.time_grid(steps, shift), [i / steps for i in range(steps + 1)]
    assert len(grid) == steps + 1 and grid[0] == 0.0 and grid[-1] == 1.0
    assert all(a < b for a, b in zip(grid, grid[1:]))
    assert fm.time_grid(steps, 1.0) == even
    if shift > 1:
        assert all(t <= u for t, u in zip(grid, even))
    if shift > 1.01 and steps > 1:  # one step is the whole interval; a shift of 1 + 1e-16 may round to even
        assert grid[1] < 1 / steps


# ------------------------------------------------------------------ 7-9: the networks, the sampler, training
@given(dim=st.integers(1, 64).map(lambda n: 2 * n), batch=st.integers(1, 16), t=times, dt=st.floats(1e-6, 1e-2))
def test_time_embedding_is_bounded_and_smooth(dim, batch, t, dt):
    """emb(t) has shape (B, dim), entries in [-1, 1], and |emb(t + dt) - emb(t)| <= e^6 dt (the largest
    frequency bounds the derivative of sin and cos)."""
    emb = fm.SinusoidalTimeEmbedding(dim)
    tt = torch.full((batch,), t, dtype=torch.float64)
    e, e2 = emb(tt), emb(tt + dt)
    assert e.shape == (batch, dim) and torch.isfinite(e).all() and e.abs().max() <= 1
    assert (e2 - e).abs().max() <= math.exp(6) * dt * (1 + 1e-4) + 1e-6  # float32 rounding


@pytest.mark.parametrize("arch", fm.ARCHS)
@given(batch=st.integers(1, 5), seed=seeds)
@settings(max_examples=4)
def test_networks_map_images_to_velocities_of_the_same_shape(arch, batch, seed):
    """v_theta maps x: (B, 1, 28, 28) and t: (B,) to (B, 1, 28, 28), for any B, finite."""
    torch.manual_seed(seed)
    v = fm.ARCHS[arch]()(torch.randn(batch, 1, 28, 28), torch.rand(batch))
    assert v.shape == (batch, 1, 28, 28) and torch.isfinite(v).all()


@pytest.mark.parametrize("solver", fm.SOLVERS)
@given(n=st.integers(1, 6), steps=st.integers(1, 4), seed=seeds)
@settings(max_examples=4)
def test_sample_shape_range_and_determinism(solver, n, steps, seed):
    """sample returns (n, 1, 28, 28) in [0, 1] on the CPU; the same seed gives the same images, another
    seed others."""
    torch.manual_seed(0)
    model = fm.VelocityNet()
    cfg = fm.CFG(device="cpu", n_samples=n, sample_steps=steps, solver=solver, seed=seed)
    x = fm.sample(model, cfg)
    assert x.shape == (n, 1, 28, 28) and x.device.type == "cpu" and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x, fm.sample(model, cfg))
    assert not torch.equal(x, fm.sample(model, fm.CFG(device="cpu", n_samples=n, sample_steps=steps,
                                                          solver=solver, seed=seed + 1)))


def patterns(n_per_class=16, seed=0):
    """A data set a small model fits in a few dozen steps: 4 fixed smooth blob images in [-1, 1] (random
    4x4 grids upsampled, like strokes rather than pixel noise), repeated."""
    coarse = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
    base = torch.nn.functional.interpolate(coarse, size=28, mode="bilinear").clamp(-1, 1)
    return torch.utils.data.TensorDataset(base.repeat(n_per_class, 1, 1, 1), torch.arange(4).repeat(n_per_class))


def eval_loss(model, data, seed=123):
    torch.manual_seed(seed)
    with torch.no_grad():
        return fm.flow_matching_loss(model.float(), data.tensors[0][:64]).item()


@pytest.mark.parametrize("arch", fm.ARCHS)
def test_training_lowers_the_loss(arch, tmp_path):
    """train(cfg, dataset) returns a model whose CFM loss on the training patterns is clearly below that
    of the same network at initialisation, after 40 steps."""
    data = patterns()
    cfg = fm.CFG(device="cpu", arch=arch, epochs=20, batch_size=16, max_steps=40, lr=2e-3, ema=0.0,
                 out_dir=str(tmp_path))
    torch.manual_seed(cfg.seed)
    before = eval_loss(fm.ARCHS[arch](), data)
    model = fm.train(cfg, data)
    assert isinstance(model, nn.Module) and not model.training
    assert eval_loss(model, data) < 0.6 * before
    assert fm.load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == 40


@pytest.mark.parametrize("t_dist", fm.T_DISTS)
def test_training_draws_t_from_cfg_t_dist(t_dist, tmp_path, monkeypatch):
    """train() draws the times of each step from cfg.t_dist, batch_size of them per step."""
    calls = []
    for name, draw in fm.T_DISTS.items():
        monkeypatch.setitem(fm.T_DISTS, name, lambda n, device, name=name, draw=draw:
                            calls.append((name, n)) or draw(n, device))
    cfg = fm.CFG(device="cpu", arch="post", t_dist=t_dist, batch_size=4, max_steps=3, out_dir=str(tmp_path))
    fm.train(cfg, patterns())
    assert calls == [(t_dist, 4)] * 3


@given(decay=st.floats(0.5, 0.9999), steps=st.integers(1, 300), seed=seeds)
def test_weight_average_forgets_the_initial_weights(decay, steps, seed):
    """After n updates toward fixed weights w, the average holds a fraction prod_k min(decay, (1+k)/(10+k))
    of its initial weights: the warm-up makes it 1 / C(n+9, 9) at most, where a plain 0.999 keeps 0.999^n."""
    torch.manual_seed(seed)
    ema, model = nn.Linear(3, 2).double(), nn.Linear(3, 2).double()
    start = [p.detach().clone() for p in ema.parameters()]
    for step in range(steps):
        fm.update_ema(ema, model, decay, step)
    kept = math.prod(min(decay, (1 + k) / (10 + k)) for k in range(steps))
    assert kept <= 1 / math.comb(steps + 9, 9) * (1 + 1e-9)
    for e, p, s in zip(ema.parameters(), model.parameters(), start):
        torch.testing.assert_close(e, kept * s + (1 - kept) * p, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ 10: torchvision's MNIST loading code
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
    root/<Class>/raw, through torchvision's own class: images scaled to [-1, 1], labels intact."""
    folder = tmp_path if layout == "plain" else tmp_path / fm.DATASETS[name].__name__ / "raw"
    images, labels = write_idx(folder, gz=gz)["train"]
    ds = fm.load_dataset(name, str(tmp_path))
    assert len(ds) == len(images)
    for i in (0, len(ds) - 1):
        x, y = ds[i]
        assert x.shape == (1, 28, 28) and y == labels[i]
        torch.testing.assert_close(x[0], images[i].float() / 127.5 - 1)


@pytest.mark.parametrize("gz", [True, False])
def test_loading_a_corrupt_idx_file_is_a_clear_error(tmp_path, gz):
    """A truncated images file is a UserError naming the folder, not a traceback from deep in torchvision."""
    write_idx(tmp_path, gz=gz, truncate=True)
    with pytest.raises(fm.UserError, match="could not read the mnist idx files"):
        fm.load_dataset("mnist", str(tmp_path))


# ------------------------------------------------------------------ 11: regression tests for the errata
class PostVelocityNet(nn.Module):
    """The post's VelocityNet exactly as printed."""

    def __init__(self, ch=64, tdim=128):
        super().__init__()
        self.time = fm.SinusoidalTimeEmbedding(tdim)
        self.mlp = nn.Linear(tdim, ch)
        self.net = nn.Sequential(nn.Conv2d(1, ch, 3, padding=1), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
                                 nn.SiLU(), nn.Conv2d(ch, 1, 3, padding=1))

    def forward(self, x, t):
        t_emb = self.mlp(self.time(t))[:, :, None, None]
        return self.net(x) + t_emb


def test_erratum_broadcast_is_caught_and_fixed():
    """Erratum 1: the post's net returns (B, 64, 28, 28) for (B, 1, 28, 28); the loss now refuses it and the
    fixed VelocityNet trains and samples 1-channel images past the second Euler step."""
    x = torch.randn(4, 1, 28, 28)
    assert PostVelocityNet()(x, torch.rand(4)).shape == (4, 64, 28, 28)
    with pytest.raises(ValueError, match=r"\(4, 64, 28, 28\)"):
        fm.flow_matching_loss(PostVelocityNet(), x)
    assert fm.flow_matching_loss(fm.VelocityNet(), x).isfinite()
    cfg = fm.CFG(device="cpu", n_samples=4, sample_steps=3)
    assert fm.sample(fm.VelocityNet(), cfg).shape == (4, 1, 28, 28)


@pytest.mark.parametrize("solver, calls", [("euler", 1), ("midpoint", 2), ("rk4", 4)])
def test_erratum_rk4_is_available_and_costs_four_calls(solver, calls):
    """Erratum 2: the post's CFG promises RK4 but samples with Euler; every solver is selectable and makes
    the number of network calls per step its order of accuracy needs."""
    n = []
    fm.integrate(lambda x, t: n.append(1) or -x, torch.ones(2, 1), 5, solver)
    assert len(n) == 5 * calls


@given(sigma_min=st.floats(0.0, 0.999), seed=seeds)
def test_erratum_no_t_eps_needed_at_the_endpoints(sigma_min, seed):
    """Erratum 3: t_eps was unused, and is not needed: at t = 0 and t = 1 exactly, x_t, u and the loss
    are finite for every sigma_min in [0, 1)."""
    x1 = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    for t in (torch.zeros(3), torch.ones(3)):
        _, xt, u = fm.sample_ot_path(x1, sigma_min, t=t)
        assert torch.isfinite(xt).all() and torch.isfinite(u).all()


def test_erratum_odd_embedding_dim_is_refused():
    """Erratum 4: the post's embedding silently returns dim - 1 features for an odd dim."""
    assert fm.SinusoidalTimeEmbedding(8)(torch.rand(3)).shape == (3, 8)
    with pytest.raises(ValueError, match="even"):
        fm.SinusoidalTimeEmbedding(7)


def test_erratum_data_survives_worker_processes(tmp_path):
    """Erratum 6: the post's transforms.Lambda cannot be pickled for DataLoader workers under spawn (macOS,
    Windows), and its num_workers never reaches the DataLoader; here the data set pickles and a run with a
    worker process trains."""
    write_idx(tmp_path)
    ds = fm.load_dataset("mnist", str(tmp_path))
    assert torch.equal(pickle.loads(pickle.dumps(ds))[3][0], ds[3][0])
    cfg = fm.CFG(device="cpu", arch="post", epochs=1, batch_size=4, num_workers=1, out_dir=str(tmp_path / "o"))
    assert fm.train(cfg, ds) is not None


def test_erratum_device_auto_considers_mps(monkeypatch):
    """Erratum 6: the post picks cuda or cpu; auto also picks Apple's MPS when there is no CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert fm.pick_device("auto").type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert fm.pick_device("auto").type == "cpu"


# ------------------------------------------------------------------ 12: the command line, reliability
def offline(*args, **kwargs):
    raise urllib.error.URLError("no network in this test")


def run_cli(argv, capsys):
    """fm.cli in this process: (exit code, stderr). argparse's own exits count too."""
    try:
        code = fm.cli(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("idx")
    write_idx(folder, n_train=24)
    return folder


@pytest.fixture(scope="module")
def trained(idx_dir, tmp_path_factory):
    """A checkpoint of the post's net after 3 steps on the tiny idx data."""
    out = tmp_path_factory.mktemp("out")
    assert fm.cli(["--arch", "post", "--data-dir", str(idx_dir), "--out-dir", str(out), "--batch-size", "8",
                   "--epochs", "1", "--n-samples", "4", "--sample-steps", "2", "--device", "cpu"]) == 0
    return out / "checkpoint.pt"


BAD = [  # (flags, what the message must name)
    (["--epochs", "0"], "--epochs 0"), (["--batch-size", "-1"], "--batch-size -1"), (["--lr", "0"], "--lr 0"),
    (["--sample-steps", "0"], "--sample-steps 0"), (["--n-samples", "0"], "--n-samples 0"),
    (["--sigma-min", "1.0"], "--sigma-min 1.0"), (["--sigma-min", "-0.1"], "--sigma-min -0.1"),
    (["--time-shift", "-1"], "--time-shift -1"), (["--time-shift", "inf"], "--time-shift inf"),
    (["--solver", "rk5"], "rk5"), (["--dataset", "cifar"], "cifar"), (["--device", "tpu"], "--device tpu"),
    (["--device", "cuda"], "--device cuda"), (["--epochs", "two"], "two"),
    (["--data-dir", "{tmp}/nowhere"], "nowhere"),
    (["--sample-only"], "--checkpoint"), (["--sample-only", "--checkpoint", "{tmp}/none.pt"], "none.pt"),
    (["--resume", "{tmp}/none.pt"], "none.pt"), (["--out-dir", "/proc/fm_out"], "/proc/fm_out"),
]


@pytest.mark.parametrize("flags, names", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_input_is_one_line_naming_it(flags, names, tmp_path, capsys, monkeypatch):
    """Each bad value exits non-zero with one line on stderr that names it, and no traceback."""
    monkeypatch.setattr(urllib.request, "urlopen", offline)  # the same answer with or without a network
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    flags = [f.format(tmp=tmp_path) for f in flags]
    code, err = run_cli(flags + ["--max-steps", "1", "--out-dir", str(tmp_path / "o")] * ("--out-dir" not in flags),
                        capsys)
    assert code not in (0, None) and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and names in err, err


@pytest.mark.parametrize("damage", ["missing", "truncated", "not a checkpoint", "other architecture", "other version"])
def test_bad_checkpoint_is_one_line(damage, trained, tmp_path, capsys):
    """A checkpoint that is missing, truncated, something else, of another network or of another version of
    the module: one clear line naming it."""
    bad = tmp_path / "bad.pt"
    if damage == "truncated":
        bad.write_bytes(trained.read_bytes()[:1000])
    elif damage == "not a checkpoint":
        torch.save({"weights": torch.zeros(3)}, bad)
    elif damage == "other architecture":
        bad.write_bytes(trained.read_bytes())
    elif damage == "other version":
        ckpt = torch.load(trained, weights_only=True)
        torch.save(ckpt | {"cfg": ckpt["cfg"] | {"warp_drive": 9}}, bad)
    flags = ["--sample-only", "--checkpoint", str(bad), "--out-dir", str(tmp_path)]
    code, err = run_cli(flags + ["--arch", "unet"] * (damage == "other architecture"), capsys)
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1 and str(bad) in err, err


def test_sample_only_writes_a_new_grid(trained, tmp_path, capsys):
    """--sample-only --checkpoint P --solver rk4 writes an 8-wide grid of n-samples images (a PNG made by
    save_image, which the post imported and never called)."""
    from PIL import Image
    code, _ = run_cli(["--sample-only", "--checkpoint", str(trained), "--solver", "rk4", "--n-samples", "16",
                       "--out-dir", str(tmp_path)], capsys)
    assert code == 0
    assert Image.open(tmp_path / "samples.png").size == (2 + 8 * 30, 2 + 2 * 30)  # make_grid: padding 2
    assert (tmp_path / "trajectory.png").stat().st_size > 0


def test_nan_loss_stops_and_names_the_step(idx_dir, tmp_path, capsys):
    """A loss that becomes NaN or infinite stops training with the step, and keeps no poisoned checkpoint."""
    code, err = run_cli(["--arch", "post", "--data-dir", str(idx_dir), "--out-dir", str(tmp_path),
                         "--lr", "1e30", "--batch-size", "4", "--device", "cpu"], capsys)
    assert code == 1 and "at step" in err and "Traceback" not in err
    assert not (tmp_path / "checkpoint.pt").exists()


def small_cfg(out, **kw):
    return fm.CFG(**{"device": "cpu", "arch": "post", "epochs": 2, "batch_size": 8, "out_dir": str(out), **kw})


@pytest.mark.parametrize("stop_at", [5, 7])  # 5 steps per epoch: an epoch boundary, and mid-epoch
def test_resume_is_bit_identical(stop_at, tmp_path):
    """Stopping after `stop_at` steps and resuming from the checkpoint ends with exactly the weights of an
    uninterrupted run (same seed, CPU): optimizer, data order and RNG states all come back."""
    data = patterns(n_per_class=10)  # 40 images / 8 = 5 steps per epoch
    whole = fm.train(small_cfg(tmp_path / "a"), data)
    fm.train(small_cfg(tmp_path / "b", max_steps=stop_at), data)
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


def start(args, out):
    return subprocess.Popen([sys.executable, str(HERE / "flow_matching.py"), *args, "--out-dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=out.parent)


def wait_for(path: Path, proc, timeout=60.0):
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < end, proc.communicate()
        time.sleep(0.05)


def test_ctrl_c_saves_and_resume_continues(idx_dir, tmp_path):
    """The first SIGINT finishes the step, saves, says how to resume and exits 130 without a traceback;
    --resume then continues from the saved step."""
    out = tmp_path / "out"
    args = ["--arch", "post", "--data-dir", str(idx_dir), "--batch-size", "4", "--epochs", "10000",
            "--checkpoint-every", "0.2", "--device", "cpu"]
    proc = start(args, out)
    wait_for(out / "checkpoint.pt", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and "--resume" in err, err
    saved = fm.load_checkpoint(str(out / "checkpoint.pt"))["step"]
    assert f"step {saved}" in err
    resumed = start(args + ["--resume", "--max-steps", str(saved + 3)], out)
    assert resumed.wait(timeout=120) == 0, resumed.communicate()
    assert fm.load_checkpoint(str(out / "checkpoint.pt"))["step"] == saved + 3


def test_a_killed_run_leaves_a_loadable_checkpoint(idx_dir, tmp_path):
    """SIGKILL at an arbitrary moment, while checkpoints are written back to back, never leaves a
    truncated checkpoint.pt."""
    out = tmp_path / "out"
    proc = start(["--arch", "post", "--data-dir", str(idx_dir), "--batch-size", "4", "--epochs", "10000",
                  "--checkpoint-every", "0.0001", "--device", "cpu"], out)
    wait_for(out / "checkpoint.pt", proc)
    time.sleep(1.0)
    proc.kill()
    proc.communicate()
    assert fm.load_checkpoint(str(out / "checkpoint.pt"))["step"] > 0


def test_help_and_a_bad_flag_as_a_process():
    """As a real process: --help exits 0 and lists every CFG field; a bad value exits 2 with one line."""
    script = [sys.executable, str(HERE / "flow_matching.py")]
    ok = subprocess.run(script + ["--help"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and all(f"--{fm.flag(f.name)}" in ok.stdout for f in fm.fields(fm.CFG))
    bad = subprocess.run(script + ["--solver", "rk5"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "rk5" in bad.stderr and not bad.stdout
