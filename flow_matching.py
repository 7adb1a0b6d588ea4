"""
Conditional Flow Matching on MNIST in one file: the code of the blog post "Sailing the Seas of Flow
Matching", in the post's order and with its names, its bugs fixed (README.md: Errata). Three parts:
  1. The post: from here to the "Beyond the post" line, the whole algorithm, each equation in a docstring.
  2. Beyond the post: the U-Net, the training recipe, guidance, the flow as a CNF (likelihood, inversion).
  3. Plumbing: data, pictures, checkpoints, Ctrl-C, progress, the command line.

    python flow_matching.py                  # train on MNIST in ./data, sample, save fm_out/samples.png
    python flow_matching.py --recipe post    # the post's own settings
    python flow_matching.py --max-steps 200  # a quick run
    python flow_matching.py --resume         # continue fm_out/checkpoint.pt after Ctrl-C
    python flow_matching.py --sample-only --solver rk4 --sample-steps 10

As a library, on data of any shape (the README trains a small MLP on 2-D points):

    model = train(cfg, dataset)   # dataset items: (x of shape cfg.data_shape, label)
    x = sample(model, cfg)        # (cfg.n_samples, *cfg.data_shape); images come back as pixels in [0, 1]
"""
import argparse
import contextlib
import copy
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from torchvision import datasets
from torchvision.datasets.utils import extract_archive
from torchvision.utils import make_grid, save_image


def arg(default, help: str):
    """A CFG field whose help is also its --flag's help."""
    return field(default=default, metadata={"help": help})


# ----------------------------------------------------------------------------- Preparing for the Journey
@dataclass
class CFG:
    device: str = arg("auto", "auto | cpu | cuda | mps (auto: cuda, then mps, then cpu)")
    batch_size: int = arg(32, "examples per optimizer step (post: 256)")
    lr: float = arg(2e-3, "AdamW learning rate, the peak of the schedule (post: 2e-4)")
    epochs: int = arg(4, "passes over the training set (post: 5)")
    num_workers: int = arg(0, "DataLoader worker processes (post: 2, never passed on); the data is in memory, "
                              "so 0 is fastest")
    # Flow matching params (the post's t_eps was never used, and is not needed: README, erratum 3)
    sigma_min: float = arg(1e-2, "endpoint noise: the path ends at x1 + sigma_min x0; in [0, 1)")
    # Sampling params
    sample_steps: int = arg(20, "ODE solver steps from t=0 to t=1 (post: 50)")
    n_samples: int = arg(64, "examples to sample")
    out_dir: str = arg("fm_out", "folder for checkpoint.pt and the pictures")
    solver: str = arg("euler", "euler | midpoint | rk4: 1, 2 or 4 network calls a step (post: euler, "
                               "though its CFG promised RK4: README, erratum 2)")
    # Beyond the post (part 2): the network and the training recipe
    arch: str = arg("unet", "unet | post (the post's VelocityNet, its bug fixed)")
    t_dist: str = arg("logit-normal", "training times t: logit-normal | uniform (post)")
    schedule: str = arg("cosine", "learning rate: cosine (warm-up, decay to lr/10) | constant (post)")
    ema: float = arg(0.999, "decay of the weight average that is sampled; 0: none (post)")
    time_shift: str = arg("auto", "solver times t = u / (u + shift (1 - u)), u even: auto (3 for euler "
                                  "and midpoint, 1 for rk4) | a number; 1: even steps (post)")
    precision: str = arg("auto", "training arithmetic: auto (bf16 on CUDA and on CPUs with AMX) | fp32 | bf16")
    num_classes: int = arg(0, "0: unconditional (post); 10: a model that draws the class asked for")
    label_drop: float = arg(0.1, "share of training labels replaced by the null label (for guidance)")
    guidance: float = arg(1.0, "guidance scale w in v = v(null) + w (v(y) - v(null)); 1: plain conditional")
    # Plumbing (part 3)
    seed: int = arg(0, "seed for weights, data order, training noise and sampling noise")
    dataset: str = arg("mnist", "mnist | fashion-mnist")
    data_dir: str = arg("./data", "torchvision root, or a folder holding the four idx files (.gz or not)")
    data_shape: tuple = arg((1, 28, 28), "shape of one example; (C, H, W) means images in [-1, 1]")
    max_steps: int = arg(0, "stop after this many optimizer steps; the schedule fits them (0: all epochs)")
    checkpoint_every: float = arg(300.0, "seconds between checkpoints (one is also written every epoch)")


# ----------------------------------------------------------------------------- The Navigator's Code
class SinusoidalTimeEmbedding(nn.Module):
    """The ship's clock: t (B,) -> [sin(t f), cos(t f)] (B, dim), dim/2 frequencies f from e^0 to e^6.
    Nearby times get nearby features, so the learned wind changes smoothly with t."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2:  # erratum: an odd dim gave dim - 1 features
            raise ValueError(f"dim must be even (sin and cos halves), got {dim}")
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        freqs = torch.exp(torch.linspace(0, 6, self.dim // 2, device=t.device))
        args = t[:, None].float() * freqs[None, :]  # (B, dim/2)
        return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)  # (B, dim)


class VelocityNet(nn.Module):
    """The navigator v_theta(x, t): the wind at position x (B, 1, 28, 28) and time t (B,), three 3x3
    convolutions (--arch post). Erratum: the post added the time embedding to the 1-channel output, so v
    broadcast to (B, 64, 28, 28); it belongs to the hidden features. Labels y (B,): part 2, guidance."""

    def __init__(self, ch: int = 64, tdim: int = 128, num_classes: int = 0):
        super().__init__()
        self.time = SinusoidalTimeEmbedding(tdim)
        self.mlp = nn.Linear(tdim, ch)
        self.label = LabelEmbedding(num_classes, ch)
        self.inp = nn.Conv2d(1, ch, 3, padding=1)
        self.net = nn.Sequential(nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(ch, 1, 3, padding=1))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        h = self.inp(x) + (self.mlp(self.time(t)) + self.label(y, x))[:, :, None, None]  # (B, ch, 28, 28)
        # self.label(y, x): 0 for an unconditional net; x only gives the batch size and device
        return self.net(h)  # (B, 1, 28, 28)


def sample_ot_path(x1: Tensor, sigma_min: float = 0.01, t: Tensor | None = None, x0: Tensor | None = None):
    """A ship stopped mid-voyage on the OT conditional path (post: Conditional Flow Matching):
        x_t = psi_t(x0) = (1 - (1 - sigma_min) t) x0 + t x1,   u = d/dt psi_t(x0) = x1 - (1 - sigma_min) x0,
    x0 ~ N(0, I) and t ~ U[0, 1] drawn unless given. x1: (B, ...) data. Returns t (B,), x_t, u like x1."""
    t = torch.rand(x1.shape[0], device=x1.device) if t is None else t
    x0 = torch.randn_like(x1) if x0 is None else x0
    tb = t.view(-1, *[1] * (x1.dim() - 1))  # (B, 1, ...): one time per example, broadcast over the rest
    xt = (1 - (1 - sigma_min) * tb) * x0 + tb * x1
    u = x1 - (1 - sigma_min) * x0
    return t, xt, u


def flow_matching_loss(model: nn.Module, x1: Tensor, sigma_min: float = 0.01, t_dist: str = "uniform",
                       y: Tensor | None = None) -> Tensor:
    """L_CFM = E_{t, x1, x0} || v_theta(x_t, t) - (x1 - (1 - sigma_min) x0) ||^2, averaged over the batch and
    the D coordinates (so L_CFM / D); t ~ T_DISTS[t_dist] (post: uniform; CFG's default is part 2's
    logit-normal). y: labels for a conditional model."""
    t, xt, u = sample_ot_path(x1, sigma_min, t=T_DISTS[t_dist](x1.shape[0], x1.device))
    v = model(xt, t) if y is None else model(xt, t, y)
    if v.shape != u.shape:  # erratum: the post's (B, 64, 28, 28) output broadcast silently against u
        raise ValueError(f"model returned {tuple(v.shape)} for inputs of shape {tuple(u.shape)}")
    return F.mse_loss(v, u)


def train(cfg: CFG, dataset=None, model: nn.Module | None = None, resume: dict | None = None) -> nn.Module:
    """The post's loop: for each batch x1, regress v_theta on the OT target with AdamW (L_CFM above).
    model: any nn.Module mapping x (B, *cfg.data_shape) and t (B,) to a velocity of x's shape; None builds
    cfg.arch. dataset: (x, label) pairs; None loads cfg.dataset. resume: a checkpoint (load_checkpoint).
    Returns the weight average (part 2) to sample from, in eval mode. The schedule, the average and the
    labels for guidance are part 2; the device, data order, checkpoints, Ctrl-C and progress are
    TrainingRun's, part 3."""
    with TrainingRun(cfg, dataset, model, resume) as run:
        for x1, y in run.batches():  # x1: (B, *data_shape) and its labels y (B,), on the device
            run.opt.param_groups[0]["lr"] = learning_rate(cfg, run.step, run.last)  # part 2: warm-up, decay
            with run.autocast():
                loss = flow_matching_loss(run.model, x1, cfg.sigma_min, cfg.t_dist, drop_labels(y, cfg))
            run.opt.zero_grad(set_to_none=True)
            loss.backward()
            run.opt.step()
            update_ema(run.ema, run.model, cfg.ema, run.step)  # part 2: we sample the average of the weights
            run.end_step(loss)  # progress, a stop at NaN, checkpoints, Ctrl-C
    return run.result()


# ----------------------------------------------------------------------------- Generation is navigation: the ODE
# The post's "Quick Differential Equations Aside": dX_t/dt = u_t(X_t), X_0 = x0, here with the learned v_theta
# as u_t. Each solver takes one step of length dt (a negative dt runs time backwards); integrate strings the
# steps together; sample uses it.
def euler_step(v, x: Tensor, t: Tensor, dt: float) -> Tensor:
    """X_{t+dt} = X_t + dt v(X_t, t): the post's sampler; global error O(dt)."""
    return x + dt * v(x, t)


def midpoint_step(v, x: Tensor, t: Tensor, dt: float) -> Tensor:
    """Half an Euler step to the middle, then the whole step with the wind there; global error O(dt^2)."""
    return x + dt * v(x + dt / 2 * v(x, t), t + dt / 2)


def rk4_step(v, x: Tensor, t: Tensor, dt: float) -> Tensor:
    """Classic Runge-Kutta, four winds per step; global error O(dt^4). (The post's CFG promised RK4.)"""
    k1 = v(x, t)
    k2 = v(x + dt / 2 * k1, t + dt / 2)
    k3 = v(x + dt / 2 * k2, t + dt / 2)
    k4 = v(x + dt * k3, t + dt)
    return x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


SOLVERS = {"euler": euler_step, "midpoint": midpoint_step, "rk4": rk4_step}


def integrate(v, x: Tensor, steps: int, solver: str = "euler", shift: float = 1.0, path: list | None = None,
              reverse: bool = False) -> Tensor:
    """The flow: solve dX/dt = v(X, t) from X_0 = x at t=0 to t=1, in `steps` steps of `solver` at the times
    time_grid(steps, shift) (part 2; shift 1: even, the post's), and return X_1, where v carries x. reverse:
    from X_1 = x at t=1 back to t=0, which inverts the flow. v takes x and t (B,). `path` gets X at each time."""
    grid = time_grid(steps, shift)[::-1] if reverse else time_grid(steps, shift)
    for t0, t1 in zip(grid, grid[1:]):
        if path is not None:
            path.append(x)
        t = torch.full((x.shape[0],), t0, dtype=x.dtype, device=x.device)  # (B,)
        x = SOLVERS[solver](v, x, t, t1 - t0)
    if path is not None:
        path.append(x)
    return x


@torch.inference_mode()
def sample(model: nn.Module, cfg: CFG, labels: Tensor | None = None) -> Tensor:
    """Generation is navigation: release ships x0 ~ N(0, I) of the data's shape and follow the learned
    wind, dX/dt = v_theta(X, t), from t=0 to t=1: cfg.sample_steps steps of cfg.solver at the times
    time_grid(steps, shift_of(cfg)) (part 2; the post's even grid is --time-shift 1). Same cfg.seed, same
    samples. labels: class ids (N,) for a conditional model, guided by cfg.guidance (part 2). Returns
    (N, *cfg.data_shape), N = cfg.n_samples or len(labels), on the CPU: images as pixels in [0, 1] as in
    the post, other data as is."""
    validate(cfg)
    x0 = noise(cfg, cfg.n_samples if labels is None else len(labels), device_of(model))
    chunk = 64 if x0.device.type == "cpu" else len(x0)  # on a CPU, 64 images at a time stay in its caches
    ys = labels.split(chunk) if labels is not None else [None] * math.ceil(len(x0) / chunk)
    x = torch.cat([integrate(guided(model, y, cfg), x, cfg.sample_steps, cfg.solver, shift_of(cfg))
                   for x, y in zip(x0.split(chunk), ys)])
    return ((x.clamp(-1, 1) + 1) / 2 if len(cfg.data_shape) == 3 else x).float().cpu()


# ============================================================================= Beyond the post
# What a reference needs and the post lacks, each piece small; the README measures why.

# ----------------------------------------------------------------------------- The default network: a U-Net
class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32. Under bf16 autocast it would run in bf16, where on a CPU it is several
    times slower in the channels-last layout (README: departures); fp32 statistics are also more accurate."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float())


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time (and label) embedding added in between, plus a skip."""

    def __init__(self, cin: int, cout: int, tdim: int):
        super().__init__()
        self.norm1, self.conv1 = GroupNorm32(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(tdim, cout)
        self.norm2, self.conv2 = GroupNorm32(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time(temb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class UNet(nn.Module):
    """The default navigator (--arch unet). The post's three convolutions see a 7x7 window: strokes, not
    digits (README: Errata). This U-Net sees the whole digit at 7x7 and spends its compute at 14x14 and 7x7,
    with one convolution at 28x28 each way; the 28x28 skip is added, not concatenated, to halve the last one."""

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128), tdim: int = 128, num_classes: int = 0):
        super().__init__()
        c1, c2, c3 = widths  # channels at 28x28, 14x14, 7x7
        self.time = nn.Sequential(SinusoidalTimeEmbedding(32), nn.Linear(32, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.label = LabelEmbedding(num_classes, tdim)
        self.inp = nn.Conv2d(1, c1, 3, padding=1)
        self.down1 = nn.Conv2d(c1, c1, 3, stride=2, padding=1)
        self.enc1 = ResBlock(c1, c2, tdim)
        self.down2 = nn.Conv2d(c2, c2, 3, stride=2, padding=1)
        self.enc2 = ResBlock(c2, c3, tdim)
        self.mid = ResBlock(c3, c3, tdim)
        self.dec2 = ResBlock(2 * c3, c2, tdim)
        self.dec1 = ResBlock(2 * c2, c1, tdim)
        self.out = nn.Sequential(GroupNorm32(8, c1), nn.SiLU(), nn.Conv2d(c1, 1, 3, padding=1))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        temb = self.time(t) + self.label(y, x)  # (B, tdim)
        h0 = self.inp(x)  # (B, c1, 28, 28)
        h1 = self.enc1(self.down1(h0), temb)  # (B, c2, 14, 14)
        h2 = self.enc2(self.down2(h1), temb)  # (B, c3, 7, 7)
        h = self.dec2(torch.cat([self.mid(h2, temb), h2], 1), temb)  # (B, c2, 7, 7)
        h = self.dec1(torch.cat([F.interpolate(h, scale_factor=2.0), h1], 1), temb)  # (B, c1, 14, 14)
        return self.out(F.interpolate(h, scale_factor=2.0) + h0)  # (B, 1, 28, 28)


ARCHS = {"unet": UNet, "post": VelocityNet}


# ----------------------------------------------------------------------------- The training recipe
# Where on the path to train. The post draws t ~ U[0, 1]; the logit-normal t = sigmoid(N(0, 1)) trains more
# in the middle of the path, where the velocity is hardest to predict (SD3, Esser et al. 2024; README).
T_DISTS = {"uniform": lambda n, device: torch.rand(n, device=device),
           "logit-normal": lambda n, device: torch.sigmoid(torch.randn(n, device=device))}


def learning_rate(cfg: CFG, step: int, total: int) -> float:
    """cfg.lr at `step` (0, ..., total - 1): constant (post), or a linear warm-up over min(100, total // 20 + 1)
    steps and a cosine decay to cfg.lr / 10 at the last step (README: departures)."""
    warmup = min(100, total // 20 + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """ema <- d ema + (1 - d) model, d = min(decay, (1 + n) / (10 + n)) at update n: the warm-up forgets the
    random initial weights, which a plain 0.999 still holds 45% of after 800 steps. Sampling the average
    gives smoother samples than the last weights (README: departures)."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - d)
    for e, b in zip(ema.buffers(), model.buffers()):  # e.g. BatchNorm's statistics, in a model of yours
        e.copy_(b)


# The solver's time grid. Shorter steps near the noise help Euler and midpoint (README: departures). RK4
# evaluates v at t = 1, where the field is steepest; it keeps even steps, so its last step is not stretched.
TIME_SHIFTS = {"euler": 3.0, "midpoint": 3.0, "rk4": 1.0}


def shift_of(cfg: CFG) -> float:
    return TIME_SHIFTS[cfg.solver] if cfg.time_shift == "auto" else float(cfg.time_shift)


def time_grid(steps: int, shift: float = 1.0) -> list[float]:
    """0 = t_0 < t_1 < ... < t_steps = 1: u = i / steps mapped by t = u / (u + shift (1 - u)), SD3's time
    shift (Esser et al. 2024). shift 1 gives even steps, the post's dt = 1 / steps; shift > 1 makes the
    steps near the noise (t = 0) shorter and those near the data longer."""
    return [u / (u + shift * (1 - u)) for u in (i / steps for i in range(steps + 1))]


# ----------------------------------------------------------------------------- Guidance: draw the class asked for
class LabelEmbedding(nn.Module):
    """y (B,) -> (B, dim), a learned vector per class added to the time embedding; index num_classes is
    the null label ("any class"), also used when y is None. num_classes = 0: no parameters, adds 0."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes + 1, dim) if num_classes else None

    def forward(self, y: Tensor | None, x: Tensor) -> Tensor | float:
        if self.embed is None:
            return 0.0
        return self.embed(torch.full((x.shape[0],), self.num_classes, device=x.device) if y is None else y)


def drop_labels(y: Tensor, cfg: CFG) -> Tensor | None:
    """The training labels for classifier-free guidance (Ho & Salimans 2022): None for an unconditional
    model; else each label is replaced by the null label with probability cfg.label_drop, so that one
    network learns both v(x, t, y) and v(x, t, null)."""
    if not cfg.num_classes:
        return None
    return torch.where(torch.rand(y.shape, device=y.device) < cfg.label_drop, cfg.num_classes, y)


def guided(model: nn.Module, y: Tensor | None, cfg: CFG):
    """The field to integrate: the model itself without labels; with labels y (B,),
        v = v(x, t, null) + w (v(x, t, y) - v(x, t, null)) = (1 - w) v(x, t, null) + w v(x, t, y),
    w = cfg.guidance: 0 unconditional, 1 conditional, > 1 pushed past the class average. MIT 6.S184 writes
    this w; Ho & Salimans and Meta's flow_matching write (1 + s) v(y) - s v(null), so s = w - 1. Both
    velocities come from one forward pass of 2B examples."""
    if y is None:
        return model
    y = y.to(device_of(model))
    if cfg.guidance == 1:
        return lambda x, t: model(x, t, y)
    both = torch.cat([y, torch.full_like(y, cfg.num_classes)])

    def v(x: Tensor, t: Tensor) -> Tensor:
        v_y, v_null = model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return v_null + cfg.guidance * (v_y - v_null)
    return v


# ----------------------------------------------------------------------------- The flow is a CNF: inversion, likelihood
def encode(model: nn.Module, x: Tensor, cfg: CFG, labels: Tensor | None = None) -> Tensor:
    """The flow run backwards, X_1 = x at t=1 to X_0 at t=0: the noise that sample() would carry to x (x in
    the model's space, e.g. images in [-1, 1]). integrate(..., X_0) decodes it, up to the solver's error."""
    with torch.inference_mode():
        return integrate(guided(model, labels, cfg), x, cfg.sample_steps, cfg.solver, shift_of(cfg), reverse=True)


def divergence(v: Tensor, x: Tensor, probe: Tensor | None = None) -> Tensor:
    """div_x v = tr(dv/dx) per example, (B,): exactly, by one backward pass per coordinate (small dims), or
    Hutchinson's unbiased estimate probe^T (dv/dx) probe with E[probe probe^T] = I (one backward pass)."""
    if probe is not None:
        return (torch.autograd.grad(v, x, probe, create_graph=False)[0] * probe).flatten(1).sum(1)
    vf, n = v.flatten(1), x[0].numel()
    rows = [torch.autograd.grad(vf[:, i].sum(), x, retain_graph=i < n - 1)[0].flatten(1)[:, i] for i in range(n)]
    return torch.stack(rows, 1).sum(1)


def log_likelihood(model: nn.Module, x: Tensor, cfg: CFG, exact: bool = False, seed: int = 0) -> Tensor:
    """log p_1(x) in nats, (N,), x in the model's space, by the instantaneous change of variables
    (Chen et al. 2018): d/dt log p_t(X_t) = -div v(X_t, t). Integrating [X, L] with d/dt [X, L] = [v, div v]
    from [x, 0] at t=1 back to t=0 gives log p_1(x) = log N(X_0; 0, I) + L_0. exact=False estimates the
    divergence with Hutchinson's trick, one Rademacher probe per example fixed through the solve (FFJORD,
    Grathwohl et al. 2019): an unbiased estimate of log p_1(x) up to the solver's error. A conditional model
    is asked for its null label, so this is its unconditional likelihood. Needs autograd: not inside
    torch.inference_mode()."""
    n, d = x.shape[0], x[0].numel()
    g = torch.Generator().manual_seed(seed + 1)  # not bits_per_dim's jitter stream
    probe = None if exact else (torch.randint(0, 2, x.shape, generator=g) * 2 - 1).to(x)

    def field(state: Tensor, t: Tensor) -> Tensor:  # state: (N, d + 1) = [X flattened, L]
        with torch.enable_grad():
            xt = state[:, :d].reshape(x.shape).detach().requires_grad_()
            v = model(xt, t)
            div = divergence(v, xt, probe)
        return torch.cat([v.detach().flatten(1), div.detach()[:, None]], 1)

    end = integrate(field, torch.cat([x.flatten(1), x.new_zeros(n, 1)], 1), cfg.sample_steps, cfg.solver,
                    shift_of(cfg), reverse=True)
    x0, logdet = end[:, :d], end[:, d]
    return -0.5 * (x0 ** 2).sum(1) - 0.5 * d * math.log(2 * math.pi) + logdet


def bits_per_dim(model: nn.Module, x: Tensor, cfg: CFG, seed: int = 0) -> Tensor:
    """-log2 P(image) / D, (N,), for 8-bit images x = k / 127.5 - 1 (k = 0..255) as the data loader makes
    them: uniform dequantization y = x + (U[0, 1) - 1/2) / 127.5 fills each pixel's bin of width 1/127.5,
    so log P(k) >= E[log p(y)] + D log(1/127.5) (Theis et al. 2016); bits/dim = -log p(y) / (D ln 2) + log2 127.5."""
    g = torch.Generator().manual_seed(seed)
    y = x + ((torch.rand(x.shape, generator=g) - 0.5) / 127.5).to(x)
    d = x[0].numel()
    return -log_likelihood(model, y, cfg, seed=seed) / (d * math.log(2)) + math.log2(127.5)


def slerp(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """Spherical interpolation between two noises: stays where N(0, I) has its mass (|x| ~ sqrt(d)),
    where a straight line between them would pass through unusually small noise."""
    omega = torch.arccos(((a * b).sum() / (a.norm() * b.norm())).clamp(-1, 1))
    if omega < 1e-4:  # (nearly) the same direction: the straight line is the arc
        return (1 - alpha) * a + alpha * b
    return (torch.sin((1 - alpha) * omega) * a + torch.sin(alpha * omega) * b) / torch.sin(omega)


@torch.inference_mode()
def straightness(model: nn.Module, cfg: CFG) -> dict:
    """How curved the learned flow is (a conditional model: its null label), along cfg.n_samples RK4 paths of
    cfg.sample_steps steps from noise:
    straightness S = E int_0^1 || (X_1 - X_0) - v(X_t, t) ||^2 dt / E || X_1 - X_0 ||^2 (0: straight lines,
    Liu et al. 2022, normalized) and the error of one Euler step, || X_0 + v(X_0, 0) - X_1 || / || X_1 - X_0 ||."""
    path, n, steps = [], cfg.n_samples, cfg.sample_steps
    x1 = integrate(model, noise(cfg, n, device_of(model)), steps, "rk4", 1.0, path=path)
    x0, chord = path[0], (x1 - path[0]).flatten(1)
    times = [i / steps for i in range(steps + 1)]
    gaps = [((chord - model(x, x.new_full((n,), t)).flatten(1)) ** 2).sum(1) for x, t in zip(path, times)]
    gap = torch.stack(gaps).mean(1)  # (steps + 1,): the squared gap at each time, averaged over the paths
    one_step = x0 + model(x0, x0.new_zeros(n))
    return {"straightness": ((gap[1:] + gap[:-1]).mean() / 2 / (chord ** 2).sum(1).mean()).item(),
            "one_euler_step_error": ((one_step - x1).flatten(1).norm(dim=1) / chord.norm(dim=1)).mean().item(),
            "gap_by_time": (gap / (chord ** 2).sum(1).mean()).tolist()}


# ----------------------------------------------------------------------------- The probability path, in closed form
def mixture_path(x: Tensor, t, means: Tensor, stds: Tensor, weights: Tensor, sigma_min: float = 0.01):
    """p_t(x) (N,) and the post's u_t^target(x) (N, d) on the OT path when the data is a Gaussian mixture
    sum_k w_k N(m_k, s_k^2 I);
    x: (N, d), t: a number or one time per point (N,), means (K, d), stds and weights (K,).
    Given component k, x_t = a_t x0 + t x1 (a_t = 1 - (1 - sigma_min) t) is N(t m_k, (a_t^2 + t^2 s_k^2) I),
    so p_t is the mixture of these, and u_t(x) = E[u | x_t = x] is the posterior-weighted sum of each
    component's linear field m_k + (t s_k^2 - (1 - sigma_min) a_t) / (a_t^2 + t^2 s_k^2) (x - t m_k)."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1)  # (N or 1, 1)
    a = 1 - (1 - sigma_min) * t
    var = a ** 2 + t ** 2 * stds ** 2  # (N or 1, K)
    d = x.shape[1]
    diff = x[:, None, :] - t[:, :, None] * means[None]  # (N, K, d)
    log_pk = torch.log(weights) - 0.5 * (diff ** 2).sum(-1) / var - 0.5 * d * torch.log(2 * math.pi * var)
    posterior = torch.softmax(log_pk, dim=1)  # (N, K)
    fields = means[None] + ((t * stds ** 2 - (1 - sigma_min) * a) / var)[:, :, None] * diff  # (N, K, d)
    return torch.logsumexp(log_pk, 1).exp(), (posterior[:, :, None] * fields).sum(1)


RECIPES = {"post": dict(arch="post", batch_size=256, lr=2e-4, schedule="constant", epochs=5, t_dist="uniform",
                        ema=0.0, sigma_min=0.01, sample_steps=50, solver="euler", time_shift="1", precision="fp32")}


# ============================================================================= Plumbing
# ----------------------------------------------------------------------------- Training, around the post's loop
class TrainingRun:
    """Everything train() does besides the post's loop: the device and arithmetic, AdamW and its schedule,
    the weight average, a data order that a resumed run continues exactly, progress, checkpoints (every
    epoch, every cfg.checkpoint_every seconds, on Ctrl-C) and a clear stop when the loss is not finite."""

    def __init__(self, cfg: CFG, dataset, model: nn.Module | None, resume: dict | None):
        validate(cfg)
        self.cfg, self.device = cfg, pick_device(cfg.device)
        self.path = writable_dir(cfg.out_dir) / "checkpoint.pt"  # fail now, not after an hour of training
        self.dataset = load_dataset(cfg.dataset, cfg.data_dir) if dataset is None else dataset
        check_data_shape(self.dataset, cfg)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg) if model is None else model
        self.model = model.to(self.device, memory_format=torch.channels_last)  # NHWC: faster convolutions
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr)
        self.bf16 = use_bf16(cfg.precision, self.device)
        self.steps_per_epoch = math.ceil(len(self.dataset) / cfg.batch_size)
        total = cfg.epochs * self.steps_per_epoch
        self.last = min(total, cfg.max_steps) if cfg.max_steps else total  # the schedule ends here
        self.step = restore(resume, self.model, self.ema, self.opt, cfg) if resume else 0
        self.progress = Progress(self.last, self.step, cfg.batch_size)
        self.saved_at = time.monotonic()
        self.interrupted = self._stack = None

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        self.interrupted = self._stack.enter_context(sigint_flag())
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def batches(self):
        """(x1, y) batches on the device until step `last`; each epoch's order depends only on (seed, epoch),
        so a resumed run skips the batches already seen and sees exactly those an uninterrupted run would."""
        while self.step < self.last:
            epoch, done = divmod(self.step, self.steps_per_epoch)
            order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
            loader = DataLoader(self.dataset, self.cfg.batch_size, sampler=order[done * self.cfg.batch_size:].tolist(),
                                num_workers=self.cfg.num_workers, generator=torch.Generator())
            for x1, y in loader:
                x1 = x1.to(self.device, memory_format=torch.channels_last if x1.dim() == 4 else torch.preserve_format)
                yield x1, torch.as_tensor(y).to(self.device)
                if self.step == self.last:
                    break
            self.save()  # every epoch, and at the end

    def autocast(self):
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16)

    def end_step(self, loss: Tensor) -> None:
        if not torch.isfinite(loss):
            kept = f"{self.path} keeps the last good state" if self.path.exists() else "nothing was saved"
            raise UserError(f"the loss became {loss.item()} at step {self.step + 1}; stopped ({kept}); "
                            f"try a lower --lr")
        self.step += 1
        self.progress.log(self.step, (self.step - 1) // self.steps_per_epoch, loss.item())
        if self.interrupted() or time.monotonic() - self.saved_at > self.cfg.checkpoint_every:
            self.save()
        if self.interrupted():
            raise Interrupted(self.step, self.path)

    def save(self) -> None:
        atomic_save(self.path, lambda f: torch.save(checkpoint(self.cfg, self.model, self.ema, self.opt, self.step), f))
        self.saved_at = time.monotonic()

    def result(self) -> nn.Module:
        return (self.ema if self.cfg.ema > 0 else self.model).eval()


def build_model(cfg: CFG) -> nn.Module:
    if cfg.arch in ARCHS and tuple(cfg.data_shape) != (1, 28, 28):
        raise UserError(f"--arch {cfg.arch} draws (1, 28, 28) images, not {tuple(cfg.data_shape)}: pass "
                        f"train() a model for your data")
    return ARCHS[cfg.arch](num_classes=cfg.num_classes)


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast where the hardware multiplies bf16 natively: CUDA GPUs from Ampere on, and CPUs with
    AMX (Intel Sapphire Rapids and later). Elsewhere bf16 is emulated and slower than fp32."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def noise(cfg: CFG, n: int, device: torch.device) -> Tensor:
    """x0 ~ N(0, I) of shape (n, *cfg.data_shape), from cfg.seed alone (the same on every device)."""
    x0 = torch.randn(n, *cfg.data_shape, generator=torch.Generator().manual_seed(cfg.seed))
    return x0.to(device, memory_format=torch.channels_last if x0.dim() == 4 else torch.preserve_format)


def check_data_shape(dataset, cfg: CFG) -> None:
    shape = tuple(dataset[0][0].shape)
    if shape != tuple(cfg.data_shape):
        raise UserError(f"the data's examples have shape {shape}, but cfg.data_shape is {tuple(cfg.data_shape)}: "
                        f"set CFG(data_shape={shape})")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: torch sees no CUDA GPU here; use --device cpu (or auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: Apple's MPS backend is not available here; use --device cpu (or auto)")
    return torch.device(name)


class UserError(Exception):
    """Something the user can fix (a flag, a file, a folder); cli() prints it as one line."""


def validate(cfg: CFG) -> None:
    """Reject values that would fail later, or silently do nothing, naming the flag."""
    for name in ["epochs", "batch_size", "lr", "sample_steps", "n_samples", "checkpoint_every"]:
        if not getattr(cfg, name) > 0:
            raise UserError(f"--{flag(name)} {getattr(cfg, name)}: must be greater than 0")
    try:
        shift_ok = cfg.time_shift == "auto" or 0 < float(cfg.time_shift) < math.inf
    except ValueError:
        shift_ok = False
    checks = [("sigma_min", 0 <= cfg.sigma_min < 1, "must be in [0, 1)"),
              ("ema", 0 <= cfg.ema < 1, "must be in [0, 1); 0 turns the average off"),
              ("max_steps", cfg.max_steps >= 0, "must be 0 (no limit) or more"),
              ("time_shift", shift_ok, "must be auto or a finite number greater than 0"),
              ("num_workers", cfg.num_workers >= 0, "must be 0 or more"),
              ("num_classes", cfg.num_classes >= 0, "must be 0 (unconditional) or more"),
              ("label_drop", 0 <= cfg.label_drop <= 1, "must be in [0, 1]"),
              ("guidance", math.isfinite(cfg.guidance), "must be a finite number"),
              ("device", cfg.device in ("auto", "cpu", "mps") or cfg.device.split(":")[0] == "cuda",
               "unknown device; choose from auto, cpu, cuda, cuda:N, mps")]
    checks += [(name, getattr(cfg, name) in choices, f"choose from {', '.join(choices)}")
               for name, choices in CHOICES.items()]
    for name, ok, why in checks:
        if not ok:
            raise UserError(f"--{flag(name)} {getattr(cfg, name)}: {why}")


# ----------------------------------------------------------------------------- Data
DATASETS = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}
IDX_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte"]
CHOICES = {"solver": SOLVERS, "t_dist": T_DISTS, "arch": ARCHS, "dataset": DATASETS,
           "schedule": ("cosine", "constant"), "precision": ("auto", "fp32", "bf16")}


def load_dataset(name: str, data_dir: str, train: bool = True) -> TensorDataset:
    """torchvision's MNIST or FashionMNIST as (image (1, 28, 28) in [-1, 1], label) pairs. The four idx
    files (.gz or not) may sit in data_dir itself or in torchvision's data_dir/<Class>/raw; else they are
    downloaded."""
    cls = DATASETS[name]
    folders = [Path(data_dir), Path(data_dir, cls.__name__, "raw")]
    found = {stem: next((p for d in folders for p in (d / stem, d / f"{stem}.gz") if p.is_file()), None)
             for stem in IDX_FILES}
    offline = (f"put the four idx files ({', '.join(IDX_FILES)}, .gz or not) in {data_dir} and "
               f"run again (for Fashion-MNIST on Debian: apt-get install dataset-fashion-mnist, then "
               f"--data-dir /usr/share/datasets/fashion-mnist)")
    new_root = Path(data_dir).absolute()  # the highest folder a failed download would leave behind
    while not new_root.parent.exists():
        new_root = new_root.parent
    existed = new_root.exists()
    try:
        if all(found.values()):  # stage them in torchvision's layout, then let torchvision read them
            with tempfile.TemporaryDirectory() as tmp:
                raw = Path(tmp, cls.__name__, "raw")
                raw.mkdir(parents=True)
                for stem, src in found.items():
                    if src.suffix == ".gz":
                        extract_archive(str(src), str(raw))
                    else:
                        (raw / stem).symlink_to(src.resolve())
                data = cls(tmp, train=train)
        else:
            print(f"{name} not found in {data_dir}; downloading it there")
            data = cls(data_dir, train=train, download=True)
    except (OSError, RuntimeError, ValueError, TypeError, AssertionError, EOFError) as e:
        if not all(found.values()):
            if not existed:  # leave no empty folders behind from a download that failed
                shutil.rmtree(new_root, ignore_errors=True)
            raise UserError(f"no {name} in {data_dir} and the download failed; offline, {offline}") from e
        raise UserError(f"could not read the {name} idx files in {data_dir} (truncated or corrupt? "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); replace them") from e
    # The post's transform, x * 2 - 1, once for the whole uint8 tensor: torchvision's per-image PIL
    # decoding would cost half of a training step (README: Errata).
    return TensorDataset(data.data.unsqueeze(1).float() / 127.5 - 1, data.targets)


# ----------------------------------------------------------------------------- Pictures
def save_grid(x: Tensor, path: Path, nrow: int = 8) -> None:
    """A grid of images x (N, C, H, W) in [0, 1], with torchvision's make_grid and save_image."""
    atomic_save(path, lambda f: save_image(make_grid(x, nrow=nrow), f, format="png"))


def class_labels(cfg: CFG, per_class: int = 8) -> Tensor | None:
    """0, ..., 0, 1, ..., 1, ...: one row of `per_class` samples per class, or None for an unconditional model."""
    return torch.arange(cfg.num_classes).repeat_interleave(per_class) if cfg.num_classes else None


@torch.inference_mode()
def save_trajectory(model: nn.Module, cfg: CFG, path: Path, labels: Tensor | None = None, cols: int = 9) -> None:
    """One sample per row (6, or one per label), at the `cols` solver times nearest to evenly spaced ones,
    from t=0 (noise) to t=1 (image)."""
    states, shift = [], shift_of(cfg)
    x0 = noise(cfg, 6 if labels is None else len(labels), device_of(model))
    integrate(guided(model, labels, cfg), x0, cfg.sample_steps, cfg.solver, shift, path=states)
    grid = time_grid(cfg.sample_steps, shift)
    nearest = [min(range(len(grid)), key=lambda j: abs(grid[j] - i / (cols - 1))) for i in range(cols)]
    strip = torch.stack([states[j] for j in nearest], 1).flatten(0, 1)  # (rows * cols, 1, 28, 28), row by row
    save_grid((strip.float().cpu().clamp(-1, 1) + 1) / 2, path, nrow=cols)


@torch.inference_mode()
def save_interpolations(model: nn.Module, cfg: CFG, path: Path, test_images: Tensor, cols: int = 10) -> None:
    """Two rows: two noises joined by slerp and decoded (digits turning into each other); then two real test
    images encoded to their noises, joined by slerp and decoded (the ends come back as the real images)."""
    device, v = device_of(model), guided(model, None, cfg)
    a, b = noise(cfg, 2, device)
    ea, eb = encode(model, test_images[:2].to(device), cfg)
    alphas = [i / (cols - 1) for i in range(cols)]
    rows = [torch.stack([slerp(p, q, al) for al in alphas]) for p, q in ((a, b), (ea, eb))]
    x = integrate(v, torch.cat(rows), cfg.sample_steps, cfg.solver, shift_of(cfg))
    save_grid((x.float().cpu().clamp(-1, 1) + 1) / 2, path, nrow=cols)


@torch.inference_mode()
def save_straightness(model: nn.Module, cfg: CFG, path: Path, rows: int = 6, cols: int = 9) -> dict:
    """Where each sample is headed, seen from time t: the straight-line guess x_t + (1 - t) v(x_t, t) at
    `cols` times along the path (columns), for `rows` samples, then the sample itself. Were the flow straight,
    every guess would be the final image; the early guesses are blurred averages, because it curves."""
    states, n = [], rows
    grid = time_grid(cfg.sample_steps, shift_of(cfg))
    x1 = integrate(model, noise(cfg, n, device_of(model)), cfg.sample_steps, cfg.solver, shift_of(cfg), path=states)
    nearest = [min(range(len(grid)), key=lambda j: abs(grid[j] - i / (cols - 1))) for i in range(cols - 1)]
    guesses = [states[j] + (1 - grid[j]) * model(states[j], x1.new_full((n,), grid[j])) for j in nearest]
    strip = torch.stack(guesses + [x1], 1).flatten(0, 1)
    save_grid((strip.float().cpu().clamp(-1, 1) + 1) / 2, path, nrow=cols)
    return straightness(model, cfg)


@torch.inference_mode()
def save_guidance(model: nn.Module, cfg: CFG, path: Path, scales=(0.0, 1.0, 1.5, 2.0, 3.0)) -> None:
    """One row per guidance scale w, one column per class, the same noise in every row: how w trades variety
    for the class asked for."""
    labels = torch.arange(cfg.num_classes)
    rows = [sample(model, replace(cfg, guidance=w), labels) for w in scales]
    save_grid(torch.cat(rows), path, nrow=cfg.num_classes)


def save_probability_path(path: Path, height: int = 240, width: int = 480, lines: int = 12) -> None:
    """The post's "Plotting the Probability Path", which it never plots: p_t(x) for 1-D data that is a mixture
    of two Gaussians (1/3 at -1.5, 2/3 at +1.5, std 0.3), time t = 0 (noise) to 1 (data) from left to right,
    x from -3 (bottom) to 3 (top), brighter where denser, and in white the flow lines of the marginal field
    from evenly spaced quantiles of the noise."""
    means, stds, weights = torch.tensor([[-1.5], [1.5]]), torch.tensor([0.3, 0.3]), torch.tensor([1 / 3, 2 / 3])
    xs = torch.linspace(3, -3, height)[:, None]  # the top row is x = 3
    dens = torch.stack([mixture_path(xs, j / (width - 1), means, stds, weights)[0] for j in range(width)], 1)
    level = (dens / dens.amax(0, keepdim=True)).sqrt()  # (height, width) in [0, 1], each time scaled to its peak
    stops = torch.tensor([[0.0, 0.0, 0.05], [0.45, 0.1, 0.5], [0.95, 0.45, 0.2], [1.0, 0.95, 0.6]])  # dark to bright
    pos = level * (len(stops) - 1)
    lo = pos.floor().long().clamp(max=len(stops) - 2)
    img = (stops[lo] + (pos - lo)[..., None] * (stops[lo + 1] - stops[lo])).permute(2, 0, 1)  # (3, height, width)
    field = lambda x, t: mixture_path(x, t, means, stds, weights)[1]
    start = torch.special.ndtri(torch.linspace(0.04, 0.96, lines))[:, None]  # quantiles of N(0, 1)
    traj = []
    integrate(field, start, width - 1, "rk4", path=traj)
    for j, x in enumerate(traj):
        img[:, ((3 - x[:, 0]) / 6 * (height - 1)).round().long().clamp(0, height - 1), j] = 1.0
    atomic_save(path, lambda f: save_image(img, f, format="png"))


# ----------------------------------------------------------------------------- Checkpoints
def checkpoint(cfg: CFG, model, ema, opt, step: int) -> dict:
    """Everything a bit-identical resume needs; only tensors and plain types (torch.load weights_only)."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {"cfg": asdict(cfg), "step": step, "model": model.state_dict(), "ema": ema.state_dict(),
            "opt": opt.state_dict(), "rng": rng}


def load_checkpoint(path: str) -> dict:
    if not Path(path).is_file():
        raise UserError(f"checkpoint {path} not found; train first (python flow_matching.py) or pass its path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, a text file, a pickle of something else: all unreadable alike
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}); it may be truncated: "
                        f"use another or train again") from e
    if not isinstance(ckpt, dict) or not {"cfg", "step", "model", "ema", "opt", "rng"} <= ckpt.keys():
        raise UserError(f"{path} is not a checkpoint written by flow_matching.py")
    unknown = set(ckpt["cfg"]) - {f.name for f in fields(CFG)}
    if unknown:
        raise UserError(f"{path} was written by another version of flow_matching.py (unknown settings: "
                        f"{', '.join(sorted(unknown))})")
    return ckpt | {"path": path, "cfg": ckpt["cfg"] | {"data_shape": tuple(ckpt["cfg"].get("data_shape", (1, 28, 28)))}}


def load_weights(model: nn.Module, state: dict, path: str, cfg: CFG) -> None:
    ours = model.state_dict()
    if state.keys() != ours.keys() or any(state[k].shape != v.shape for k, v in ours.items()):
        raise UserError(f"{path} holds another network than this version's --arch {cfg.arch} with --num-classes "
                        f"{cfg.num_classes} (other tensor names or shapes); use the flow_matching.py that wrote it")
    model.load_state_dict(state)


def restore(ckpt: dict, model, ema, opt, cfg: CFG) -> int:
    """Load weights, optimizer and RNG states from a checkpoint dict; return its step."""
    load_weights(model, ckpt["model"], ckpt["path"], cfg)
    load_weights(ema, ckpt["ema"], ckpt["path"], cfg)
    opt.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if "cuda" in ckpt["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt["step"]


def load_model(ckpt: dict, cfg: CFG) -> nn.Module:
    """The network a checkpoint samples: its weight average (with ema 0 that is a copy of the weights)."""
    model = build_model(cfg).to(pick_device(cfg.device), memory_format=torch.channels_last)
    load_weights(model, ckpt["ema"], ckpt["path"], cfg)
    return model.eval()


UMASK = os.umask(0o022)
os.umask(UMASK)


def atomic_save(path: Path, write) -> None:
    """write(file) to a temporary file beside `path`, then rename it over `path`: a crash at any moment
    leaves either the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes it private; a normal file respects the umask
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def writable_dir(path: str) -> Path:
    """Create `path` if needed and prove that a file can be written there."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise UserError(f"--out-dir {path} is not writable ({e.strerror}); choose another folder") from e
    return Path(path)


# ----------------------------------------------------------------------------- Progress, Ctrl-C
class Progress:
    """One line at most every `every` seconds: epoch, step/last, mean loss since the last line, examples/s, ETA."""

    def __init__(self, last: int, start: int, batch_size: int, every: float = 5.0):
        self.last, self.start, self.batch_size, self.every = last, start, batch_size, every
        self.t0 = self.t_line = time.monotonic()
        self.losses = []

    def log(self, step: int, epoch: int, loss: float) -> None:
        self.losses.append(loss)
        now = time.monotonic()
        if now - self.t_line < self.every and step != self.last:
            return
        rate = (step - self.start) / (now - self.t0)  # steps/s since this run started
        print(f"epoch {epoch + 1} step {step}/{self.last} loss {sum(self.losses) / len(self.losses):.4f} "
              f"{rate * self.batch_size:.0f} img/s, {(self.last - step) / rate:.0f}s left", flush=True)
        self.t_line, self.losses = now, []


class Interrupted(KeyboardInterrupt):
    def __init__(self, step: int, path: Path):
        super().__init__(step, path)
        self.step, self.path = step, path


@contextlib.contextmanager
def sigint_flag():
    """Within `with sigint_flag() as interrupted:`, the first Ctrl-C only makes interrupted() true (the
    training loop then finishes its step and saves); a second one interrupts at once, as usual."""
    hits = []
    in_main = threading.current_thread() is threading.main_thread()  # signals reach the main thread only

    def handle(signum, frame):
        hits.append(signum)
        signal.signal(signal.SIGINT, previous)

    previous = (signal.signal(signal.SIGINT, handle) or signal.default_int_handler) if in_main else None
    try:
        yield lambda: bool(hits)
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)


# ----------------------------------------------------------------------------- The command line
SAMPLING = {"device", "sample_steps", "solver", "n_samples", "out_dir", "time_shift", "guidance", "seed",
            "dataset", "data_dir"}  # the settings --sample-only uses; the others are the checkpoint's


def flag(name: str) -> str:
    return name.replace("_", "-")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the whole usage first; one line says more
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv=None) -> argparse.Namespace:
    """Every CFG field but data_shape is a flag. Only the flags typed end up in the namespace, so that they
    override the recipe or the checkpoint's config as well as CFG's defaults."""
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                      argument_default=argparse.SUPPRESS)
    for f in fields(CFG):
        if f.name != "data_shape":
            choices = CHOICES.get(f.name)
            p.add_argument(f"--{flag(f.name)}", type=type(f.default), choices=choices and list(choices),
                           metavar=None if choices else f.name.upper(), help=f"{f.metadata['help']} [default: {f.default}]")
    p.add_argument("--recipe", choices=list(RECIPES), help="start from these settings instead of CFG's defaults: "
                   "post = the post's CFG and code (flags typed override them)")
    p.add_argument("--checkpoint", metavar="PATH", help="the checkpoint to resume or sample from "
                   "[default: OUT_DIR/checkpoint.pt]")
    p.add_argument("--resume", action="store_true", help="continue training from --checkpoint")
    p.add_argument("--sample-only", action="store_true", help="sample from --checkpoint without training")
    p.add_argument("--labels", metavar="Y,Y,...", help="draw these classes (a model trained with --num-classes)")
    p.add_argument("--nll", type=int, metavar="N", help="also print the bits/dim of N test images (likelihood, by RK4 "
                   "with --sample-steps steps)")
    p.add_argument("--figures", action="store_true", help="also save interpolation.png, straightness.png, "
                   "probability_path.png and, for a conditional model, guidance.png")
    return p.parse_args(argv)


def parse_labels(text: str, cfg: CFG) -> Tensor:
    try:
        labels = torch.tensor([int(y) for y in text.split(",")])
    except ValueError:
        raise UserError(f"--labels {text}: expected class ids like 3,3,7") from None
    if not cfg.num_classes:
        raise UserError(f"--labels {text}: this model is unconditional (--num-classes 0)")
    if not ((0 <= labels) & (labels < cfg.num_classes)).all():
        raise UserError(f"--labels {text}: classes go from 0 to {cfg.num_classes - 1}")
    return labels


def main(argv=None) -> None:
    args = vars(parse_args(argv))
    recipe, resume, sample_only = args.pop("recipe", None), args.pop("resume", False), args.pop("sample_only", False)
    ckpt_path, labels, nll, figures = (args.pop(k, None) for k in ("checkpoint", "labels", "nll", "figures"))
    ckpt_path = ckpt_path or str(Path(args.get("out_dir", CFG.out_dir), "checkpoint.pt"))
    if resume and sample_only:
        raise UserError("--resume trains and --sample-only does not: choose one")
    if recipe and (resume or sample_only):
        raise UserError("--recipe starts a new run; a checkpoint already holds its settings")
    if resume and (fixed := [k for k in ("batch_size", "seed", "dataset") if k in args]):
        raise UserError(f"--{flag(fixed[0])}: a resumed run keeps its checkpoint's, or its data order would change")
    if sample_only and args.keys() - SAMPLING:
        raise UserError(f"--{flag(sorted(args.keys() - SAMPLING)[0])} is a training setting; --sample-only uses "
                        f"the checkpoint's")
    if resume or sample_only:
        ckpt = load_checkpoint(ckpt_path)
        cfg = CFG(**{**ckpt["cfg"], **args})  # the checkpoint's config, then the flags typed now
    else:
        ckpt, cfg = None, CFG(**{**RECIPES.get(recipe, {}), **args})
        if recipe:
            print(f"recipe {recipe}: " + ", ".join(f"--{flag(k)} {v}" for k, v in RECIPES[recipe].items() if k not in args))
    validate(cfg)
    labels = parse_labels(labels, cfg) if labels else class_labels(cfg)
    if nll is not None and nll <= 0:
        raise UserError(f"--nll {nll}: must be greater than 0")
    out = writable_dir(cfg.out_dir)
    t0 = time.monotonic()
    if sample_only:
        model = load_model(ckpt, cfg)
    else:
        print(f"training {cfg.arch} on {cfg.dataset} ({pick_device(cfg.device)}), writing to {out}/")
        model = train(cfg, resume=ckpt)
    x = sample(model, cfg, labels)
    save_grid(x, out / "samples.png", nrow=8)
    save_trajectory(model, cfg, out / "trajectory.png", None if labels is None else labels.unique())
    written = ["samples.png", "trajectory.png"] + ([] if sample_only else ["checkpoint.pt"])
    if figures:
        test = load_dataset(cfg.dataset, cfg.data_dir, train=False).tensors[0]
        save_interpolations(model, cfg, out / "interpolation.png", test)
        s = save_straightness(model, cfg, out / "straightness.png")
        save_probability_path(out / "probability_path.png")
        written += ["interpolation.png", "straightness.png", "probability_path.png"]
        if cfg.num_classes:
            save_guidance(model, cfg, out / "guidance.png")
            written.append("guidance.png")
        print(f"straightness {s['straightness']:.3f} (0: straight lines); one Euler step misses the endpoint by "
              f"{100 * s['one_euler_step_error']:.0f}% of the distance travelled")
    what = "sampled" if sample_only else "trained and sampled"
    print(f"{what} in {time.monotonic() - t0:.0f}s: {len(x)} images by {cfg.solver} x {cfg.sample_steps} -> "
          + ", ".join(str(out / w) for w in written))
    if nll:
        report_nll(model, cfg, nll)


def report_nll(model: nn.Module, cfg: CFG, n: int) -> None:
    """Bits/dim of the first n test images: mean, standard error, time per image. A likelihood needs an accurate
    solve, so this is RK4 with cfg.sample_steps steps on even ones (README: Euler's error flatters it)."""
    cfg = replace(cfg, solver="rk4", time_shift="1")
    x = load_dataset(cfg.dataset, cfg.data_dir, train=False).tensors[0][:n].to(device_of(model))
    t0 = time.monotonic()
    bpd = torch.cat([bits_per_dim(model, chunk, cfg, seed=i) for i, chunk in enumerate(x.split(100))]).double()
    se = bpd.std().item() / math.sqrt(len(bpd)) if len(bpd) > 1 else float("nan")
    print(f"bits/dim of {len(bpd)} {cfg.dataset} test images: {bpd.mean().item():.3f} +- {se:.3f} (standard error; "
          f"rk4 x {cfg.sample_steps}, Hutchinson), {(time.monotonic() - t0) / len(bpd):.2f}s per image")


def cli(argv=None) -> int:
    """main() for a person at a terminal: a problem they can fix is one line on stderr, not a traceback."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"\ninterrupted at step {e.step}; saved {e.path}. Resume with: python flow_matching.py "
              f"--resume --checkpoint {e.path}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted; the last checkpoint written, if any, is intact", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
