"""
Conditional Flow Matching on MNIST in one file: the code of the blog post "Sailing the Seas of Flow
Matching", section by section, with its bugs fixed (README.md lists them as errata).

    python flow_matching.py                  # train on MNIST (./data; 7 min on 2 CPU cores), sample, save
    python flow_matching.py --dataset fashion-mnist --data-dir /usr/share/datasets/fashion-mnist
    python flow_matching.py --max-steps 200  # a quick run
    python flow_matching.py --resume         # continue from fm_out/checkpoint.pt after Ctrl-C
    python flow_matching.py --sample-only --checkpoint fm_out/checkpoint.pt --solver rk4

As a library (what the tests and the benchmark do):

    cfg = CFG(device="cpu", epochs=1)
    model = train(cfg, dataset)   # dataset items: (image (1, 28, 28) in [-1, 1], label)
    x = sample(model, cfg)        # (cfg.n_samples, 1, 28, 28) in [0, 1], on the CPU
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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchvision import datasets
from torchvision.datasets.utils import extract_archive
from torchvision.utils import make_grid, save_image


def arg(default, help):
    """A config field whose help text is also its --flag's help."""
    return field(default=default, metadata={"help": help})


# ----------------------------------------------------------------------------- Preparing for the Journey
@dataclass
class CFG:
    device: str = arg("auto", "auto | cpu | cuda | mps (auto: cuda, then mps, then cpu)")
    batch_size: int = arg(32, "images per optimizer step (post: 256)")
    lr: float = arg(2e-3, "peak AdamW learning rate, after warm-up, before cosine decay (post: 2e-4)")
    epochs: int = arg(3, "passes over the training set (post: 5)")
    num_workers: int = arg(0, "DataLoader worker processes (the post sets 2 and never uses it)")
    # Flow matching params
    sigma_min: float = arg(1e-2, "endpoint noise: the path ends at x1 + sigma_min * x0, in [0, 1)")
    t_dist: str = arg("logit-normal", "training times t: logit-normal (sigmoid of N(0, 1), SD3) | uniform (post)")
    # Sampling params
    sample_steps: int = arg(20, "ODE solver steps from t=0 to t=1 (post: 50)")
    solver: str = arg("euler", "euler | midpoint | rk4 (network calls per step: 1, 2, 4)")
    time_shift: float = arg(0.0, "solver steps at t = u / (u + shift (1 - u)), u evenly spaced: > 1 packs them "
                                 "toward the noise; 1 = even (post); 0 = the solver's own (3, 3, 1)")
    n_samples: int = arg(64, "images to sample")
    out_dir: str = arg("fm_out", "folder for checkpoint.pt, samples.png, trajectory.png")
    # Not in the post
    arch: str = arg("unet", "unet (default, draws digits) | post (the post's 3-conv net, draws strokes)")
    ema: float = arg(0.999, "largest decay of the weight average we sample from (its warm-up stays below 0.999 "
                            "for 8,990 steps); 0 = off")
    seed: int = arg(0, "seed for weights, data order, training noise and sampling noise")
    dataset: str = arg("mnist", "mnist | fashion-mnist")
    data_dir: str = arg("./data", "torchvision root, or a folder holding the four idx files (.gz or not)")
    max_steps: int = arg(0, "stop after this many optimizer steps in all (0 = run every epoch)")
    checkpoint_every: float = arg(300.0, "seconds between checkpoints (one is also written every epoch)")


class UserError(Exception):
    """Something the user can fix (a flag, a file, a folder); main() prints it as one line."""


# ----------------------------------------------------------------------------- The Navigator's Code
class SinusoidalTimeEmbedding(nn.Module):
    """t (B,) -> [sin(f t), cos(f t)] (B, dim), with dim/2 frequencies f from e^0 to e^6."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"dim must be even (sin and cos halves), got {dim}")  # erratum: odd dim
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(torch.linspace(0, 6, self.dim // 2, device=t.device))
        args = t[:, None].float() * freqs[None, :]  # (B, dim/2)
        return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)  # (B, dim)


class VelocityNet(nn.Module):
    """The post's navigator v_theta(x, t) (--arch post). Erratum: the post added the 64-channel time
    embedding to the 1-channel output, so v broadcast to (B, 64, 28, 28); here it enters the hidden layer.
    Three 3x3 convolutions see a 7x7 window: enough for strokes, not for digits (README)."""

    def __init__(self, ch: int = 64, tdim: int = 128):
        super().__init__()
        self.time = SinusoidalTimeEmbedding(tdim)
        self.mlp = nn.Linear(tdim, ch)
        self.inp = nn.Conv2d(1, ch, 3, padding=1)
        self.net = nn.Sequential(nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(ch, 1, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.inp(x) + self.mlp(self.time(t))[:, :, None, None]  # (B, ch, 28, 28)
        return self.net(h)  # (B, 1, 28, 28)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added in between, plus a skip connection."""

    def __init__(self, cin: int, cout: int, tdim: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(tdim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time(temb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class UNet(nn.Module):
    """The default navigator (--arch unet): a small U-Net that spends its compute at 14x14 and 7x7,
    where a 3x3 kernel sees a third and then all of the digit, and only one conv at 28x28 each way."""

    def __init__(self, widths: tuple[int, int, int] = (24, 48, 64), tdim: int = 128):
        super().__init__()
        c1, c2, c3 = widths  # channels at 28x28, 14x14, 7x7
        self.time = nn.Sequential(SinusoidalTimeEmbedding(32), nn.Linear(32, tdim), nn.SiLU(),
                                  nn.Linear(tdim, tdim))
        self.inp = nn.Conv2d(1, c1, 3, padding=1)
        self.down1 = nn.Conv2d(c1, c1, 3, stride=2, padding=1)
        self.enc1 = ResBlock(c1, c2, tdim)
        self.down2 = nn.Conv2d(c2, c2, 3, stride=2, padding=1)
        self.enc2 = ResBlock(c2, c3, tdim)
        self.mid = ResBlock(c3, c3, tdim)
        self.dec2 = ResBlock(2 * c3, c2, tdim)
        self.dec1 = ResBlock(2 * c2, c1, tdim)
        self.out = nn.Sequential(nn.GroupNorm(8, c1), nn.SiLU(), nn.Conv2d(c1, 1, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time(t)  # (B, tdim)
        h0 = self.inp(x)  # (B, c1, 28, 28)
        h1 = self.enc1(self.down1(h0), temb)  # (B, c2, 14, 14)
        h2 = self.enc2(self.down2(h1), temb)  # (B, c3, 7, 7)
        h = self.dec2(torch.cat([self.mid(h2, temb), h2], 1), temb)  # (B, c2, 7, 7)
        h = F.interpolate(h, scale_factor=2.0)  # (B, c2, 14, 14)
        h = self.dec1(torch.cat([h, h1], 1), temb)  # (B, c1, 14, 14)
        h = F.interpolate(h, scale_factor=2.0)  # (B, c1, 28, 28)
        return self.out(h + h0)  # (B, 1, 28, 28); adding the skip, not concatenating it, halves the last conv


ARCHS = {"unet": UNet, "post": VelocityNet}


def sample_ot_path(x1, sigma_min=0.01, t=None, x0=None):
    """A point on the OT conditional path and its constant velocity (post: Conditional Flow Matching):
    x_t = (1 - (1 - sigma_min) t) x0 + t x1,   u = x1 - (1 - sigma_min) x0,
    with x0 ~ N(0, I) and t ~ U[0, 1] drawn only when not given. x1: (B, ...); returns t (B,), x_t, u."""
    t = torch.rand(x1.shape[0], device=x1.device) if t is None else t
    x0 = torch.randn_like(x1) if x0 is None else x0
    tb = t.view(-1, *[1] * (x1.dim() - 1))  # (B, 1, 1, 1): broadcast over the pixels
    xt = (1 - (1 - sigma_min) * tb) * x0 + tb * x1
    u = x1 - (1 - sigma_min) * x0
    return t, xt, u


# Where on the path to train: the post draws t ~ U[0, 1]. The logit-normal trains more on the middle of the path,
# less near its ends; it is better for SD3 (Esser et al. 2024) and here (README: FD 87 against 110).
T_DISTS = {"uniform": lambda n, device: torch.rand(n, device=device),
           "logit-normal": lambda n, device: torch.sigmoid(torch.randn(n, device=device))}


def flow_matching_loss(model, x1, sigma_min=0.01, t_dist="uniform"):
    """L_CFM = E_{t, x1, x0} || v_theta(x_t, t) - (x1 - (1 - sigma_min) x0) ||^2, per pixel, t ~ T_DISTS[t_dist]."""
    t, xt, u = sample_ot_path(x1, sigma_min, t=T_DISTS[t_dist](x1.shape[0], x1.device))
    v = model(xt, t)
    if v.shape != u.shape:  # erratum: the post's (B, 64, 28, 28) output broadcast silently against u
        raise ValueError(f"model returned {tuple(v.shape)} for inputs of shape {tuple(u.shape)}")
    return F.mse_loss(v, u)


def train(cfg: CFG, dataset=None, resume: dict | None = None) -> nn.Module:
    """Fit v_theta to the OT target with AdamW; return the weights to sample from (the EMA ones unless
    cfg.ema == 0), in eval mode. Writes out_dir/checkpoint.pt every epoch, every cfg.checkpoint_every
    seconds and on Ctrl-C. `resume` is a checkpoint dict (load_checkpoint) to continue from."""
    validate(cfg)
    device = pick_device(cfg.device)
    ckpt_path = writable_dir(cfg.out_dir) / "checkpoint.pt"  # fail now, not after an hour of training
    dataset = load_dataset(cfg.dataset, cfg.data_dir) if dataset is None else dataset
    torch.manual_seed(cfg.seed)
    model = ARCHS[cfg.arch]().to(device, memory_format=torch.channels_last)  # NHWC: 6-11% faster here
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    steps_per_epoch = math.ceil(len(dataset) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    last = min(total, cfg.max_steps) if cfg.max_steps else total
    step = restore(resume, model, ema, opt, cfg.arch) if resume else 0
    progress = Progress(total, last, step, cfg.batch_size)
    saved_at = time.monotonic()

    def save():
        atomic_save(ckpt_path, lambda f: torch.save(checkpoint(cfg, model, ema, opt, step), f))

    with sigint_flag() as interrupted:
        while step < last:
            # The data order of an epoch depends only on (seed, epoch), so a resumed run can skip the
            # batches already seen and see exactly the ones an uninterrupted run would have.
            epoch, done = divmod(step, steps_per_epoch)
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed + epoch))
            loader = DataLoader(dataset, cfg.batch_size, sampler=order[done * cfg.batch_size:].tolist(),
                                num_workers=cfg.num_workers, generator=torch.Generator())
            for x1, _ in loader:
                x1 = x1.to(device, memory_format=torch.channels_last)  # (B, 1, 28, 28)
                for group in opt.param_groups:
                    group["lr"] = learning_rate(cfg.lr, step, total)
                with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                    loss = flow_matching_loss(model, x1, cfg.sigma_min, cfg.t_dist)
                if not torch.isfinite(loss):
                    kept = f"{ckpt_path} keeps the last good state" if ckpt_path.exists() else "nothing was saved"
                    raise UserError(f"the loss became {loss.item()} at step {step + 1}; stopped ({kept}); "
                                    f"try a lower --lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                update_ema(ema, model, cfg.ema, step)
                step += 1
                progress.log(epoch, step, loss.item())
                if interrupted() or time.monotonic() - saved_at > cfg.checkpoint_every:
                    save()
                    saved_at = time.monotonic()
                if interrupted():
                    raise Interrupted(step, ckpt_path)
                if step == last:
                    break
            save()  # every epoch, and at the end
    return (ema if cfg.ema > 0 else model).eval()


@torch.inference_mode()
def sample(model: nn.Module, cfg: CFG) -> torch.Tensor:
    """Generation is navigation: integrate dx/dt = v_theta(x, t) from noise x0 at t=0 to t=1 with
    cfg.solver (the post: Euler). Same cfg.seed, same images. Returns (n_samples, 1, 28, 28) in [0, 1]."""
    validate(cfg)
    # Chunks of 64: on a CPU, small batches stay in cache (1,263 vs 751 images/s at 2,000 at once).
    x = torch.cat([integrate(model, x0, cfg.sample_steps, cfg.solver, shift_of(cfg))
                   for x0 in noise(cfg, model).split(64)])
    return ((x.clamp(-1, 1) + 1) / 2).float().cpu()


# ----------------------------------------------------------------------------- Not in the post: solvers
def euler_step(v, x, t, dt):
    return x + dt * v(x, t)


def midpoint_step(v, x, t, dt):
    return x + dt * v(x + dt / 2 * v(x, t), t + dt / 2)


def rk4_step(v, x, t, dt):
    k1 = v(x, t)
    k2 = v(x + dt / 2 * k1, t + dt / 2)
    k3 = v(x + dt / 2 * k2, t + dt / 2)
    k4 = v(x + dt * k3, t + dt)
    return x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


SOLVERS = {"euler": euler_step, "midpoint": midpoint_step, "rk4": rk4_step}  # global error O(dt^1, ^2, ^4)
# Measured (README): shorter steps near the noise help Euler and midpoint. RK4 evaluates v at t = 1, where the
# field is steepest (slope -(1 - sigma_min) / sigma_min along pixels the data never varies, like the border),
# so it needs its last step short.
TIME_SHIFTS = {"euler": 3.0, "midpoint": 3.0, "rk4": 1.0}


def shift_of(cfg: CFG) -> float:
    return cfg.time_shift or TIME_SHIFTS[cfg.solver]


def time_grid(steps: int, shift: float = 1.0) -> list[float]:
    """0 = t_0 < t_1 < ... < t_steps = 1: evenly spaced u = i / steps mapped by t = u / (u + shift (1 - u)),
    the time shift of SD3 (Esser et al. 2024). shift > 1 makes the steps near the noise (t=0) shorter and
    those near the data longer; the README measures 3 against 1 (even steps, the post's)."""
    return [u / (u + shift * (1 - u)) for u in (i / steps for i in range(steps + 1))]


def integrate(v, x, steps: int, solver: str = "euler", shift: float = 1.0,
              path: list | None = None) -> torch.Tensor:
    """Solve dx/dt = v(x, t) from t=0 to t=1 in `steps` steps on time_grid(steps, shift); v takes x and t of
    shape (B,). Returns x at t=1; if `path` is a list, x at every grid time (t=0 included) is appended."""
    step_fn, grid = SOLVERS[solver], time_grid(steps, shift)
    for t0, t1 in zip(grid, grid[1:]):
        if path is not None:
            path.append(x)
        t = torch.full((x.shape[0],), t0, dtype=x.dtype, device=x.device)  # (B,)
        x = step_fn(v, x, t, t1 - t0)
    if path is not None:
        path.append(x)
    return x


def noise(cfg: CFG, model: nn.Module, n: int | None = None) -> torch.Tensor:
    """x0 ~ N(0, I) of shape (n, 1, 28, 28) from cfg.seed alone, on the model's device."""
    x0 = torch.randn(n or cfg.n_samples, 1, 28, 28, generator=torch.Generator().manual_seed(cfg.seed))
    return x0.to(next(model.parameters()).device, memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- Not in the post: training
def learning_rate(peak: float, step: int, total: int) -> float:
    """Linear warm-up over the first 100 steps (fewer in short runs), then cosine decay to peak / 10."""
    warmup = min(100, total // 20 + 1)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """ema <- d ema + (1 - d) model, with d = min(decay, (1 + n) / (10 + n)) so that early on the average
    forgets the random initial weights (a plain 0.999 still holds 45% of them after 800 steps). The warm-up
    reaches 0.999 only at n = 8,990, so at the default 5,625 steps it sets the decay all along."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - d)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: torch sees no CUDA GPU here; use --device cpu (or auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: Apple's MPS backend is not available here; use --device cpu (or auto)")
    return torch.device(name)


def validate(cfg: CFG) -> None:
    """Reject values that would fail later, or silently do nothing, naming the flag."""
    positive = ["epochs", "batch_size", "lr", "sample_steps", "n_samples", "checkpoint_every"]
    for name in positive:
        if not getattr(cfg, name) > 0:
            raise UserError(f"--{flag(name)} {getattr(cfg, name)}: must be greater than 0")
    checks = [("sigma_min", 0 <= cfg.sigma_min < 1, "must be in [0, 1)"),
              ("ema", 0 <= cfg.ema < 1, "must be in [0, 1); 0 turns the average off"),
              ("max_steps", cfg.max_steps >= 0, "must be 0 (no limit) or more"),
              ("time_shift", 0 <= cfg.time_shift < math.inf, "must be a finite number, 0 (the solver's own) or more"),
              ("num_workers", cfg.num_workers >= 0, "must be 0 or more"),
              ("solver", cfg.solver in SOLVERS, f"unknown solver; choose from {', '.join(SOLVERS)}"),
              ("t_dist", cfg.t_dist in T_DISTS, f"unknown distribution; choose from {', '.join(T_DISTS)}"),
              ("arch", cfg.arch in ARCHS, f"unknown architecture; choose from {', '.join(ARCHS)}"),
              ("dataset", cfg.dataset in DATASETS, f"unknown dataset; choose from {', '.join(DATASETS)}"),
              ("device", cfg.device in ("auto", "cpu", "mps") or cfg.device.split(":")[0] == "cuda",
               "unknown device; choose from auto, cpu, cuda, cuda:N, mps")]
    for name, ok, why in checks:
        if not ok:
            raise UserError(f"--{flag(name)} {getattr(cfg, name)}: {why}")


# ----------------------------------------------------------------------------- Not in the post: data
DATASETS = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}
IDX_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte"]


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
    # decoding took 52 ms per batch of 32 here, half a training step.
    return TensorDataset(data.data.unsqueeze(1).float() / 127.5 - 1, data.targets)


# ----------------------------------------------------------------------------- Not in the post: pictures
def save_samples(x: torch.Tensor, path: Path) -> None:
    """An 8-wide grid of x (N, 1, 28, 28) in [0, 1], with torchvision's make_grid and save_image."""
    atomic_save(path, lambda f: save_image(make_grid(x, nrow=8), f, format="png"))


@torch.inference_mode()
def save_trajectory(model: nn.Module, cfg: CFG, path: Path, rows: int = 6, cols: int = 9) -> None:
    """`rows` samples (one per row) at the `cols` grid times nearest to evenly spaced ones, from t=0 (noise)
    to t=1 (image)."""
    states, shift = [], shift_of(cfg)
    integrate(model, noise(cfg, model, rows), cfg.sample_steps, cfg.solver, shift, path=states)
    grid = time_grid(cfg.sample_steps, shift)
    nearest = [min(range(len(grid)), key=lambda j: abs(grid[j] - i / (cols - 1))) for i in range(cols)]
    picks = [states[j] for j in nearest]  # each (rows, 1, 28, 28)
    strip = torch.stack(picks, 1).flatten(0, 1)  # (rows * cols, 1, 28, 28), row-major by sample
    atomic_save(path, lambda f: save_image(make_grid((strip.clamp(-1, 1) + 1) / 2, nrow=cols), f, format="png"))


# ----------------------------------------------------------------------------- Not in the post: checkpoints
def checkpoint(cfg, model, ema, opt, step) -> dict:
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
    return ckpt


def load_weights(model: nn.Module, state: dict, path: str, arch: str) -> None:
    ours = model.state_dict()
    if state.keys() != ours.keys() or any(state[k].shape != v.shape for k, v in ours.items()):
        raise UserError(f"{path} holds another network than this version's --arch {arch} (other tensor names or "
                        f"shapes); pass the --arch it was trained with, or use the flow_matching.py that wrote it")
    model.load_state_dict(state)


def restore(ckpt: dict, model, ema, opt, arch: str) -> int:
    """Load weights, optimizer and RNG states from a checkpoint dict into an `arch` network; return its step."""
    path = ckpt.get("path", "checkpoint")
    load_weights(model, ckpt["model"], path, arch)
    load_weights(ema, ckpt["ema"], path, arch)
    opt.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if "cuda" in ckpt["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt["step"]


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


# ----------------------------------------------------------------------------- Plumbing: progress, Ctrl-C, command line
class Progress:
    """One line at most every `every` seconds: epoch, step/total, mean loss since the last line, img/s, ETA."""

    def __init__(self, total: int, last: int, start: int, batch_size: int, every: float = 5.0):
        self.total, self.last, self.start, self.batch_size, self.every = total, last, start, batch_size, every
        self.t0 = self.t_line = time.monotonic()
        self.losses = []

    def log(self, epoch: int, step: int, loss: float) -> None:
        self.losses.append(loss)
        now = time.monotonic()
        if now - self.t_line < self.every and step != self.last:
            return
        rate = (step - self.start) / (now - self.t0)  # steps/s since this run started
        print(f"epoch {epoch + 1} step {step}/{self.total} loss {sum(self.losses) / len(self.losses):.4f} "
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

    previous = signal.signal(signal.SIGINT, handle) if in_main else None
    try:
        yield lambda: bool(hits)
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)


def flag(name: str) -> str:
    return name.replace("_", "-")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the whole usage first; one line says more
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv=None) -> argparse.Namespace:
    """Every CFG field is a flag. Only the flags typed end up in the namespace, so that they can override
    the config saved in a checkpoint (--resume, --sample-only) as well as CFG's defaults."""
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                      argument_default=argparse.SUPPRESS)
    for f in fields(CFG):
        choices = {"solver": SOLVERS, "t_dist": T_DISTS, "arch": ARCHS, "dataset": DATASETS}.get(f.name)
        p.add_argument(f"--{flag(f.name)}", type=type(f.default), choices=choices and list(choices),
                       metavar=None if choices else f.name.upper(),
                       help=f"{f.metadata['help']} [default: {f.default}]")
    p.add_argument("--resume", nargs="?", const="", metavar="PATH",
                   help="continue training from PATH [default: OUT_DIR/checkpoint.pt]")
    p.add_argument("--sample-only", action="store_true", help="sample from --checkpoint without training")
    p.add_argument("--checkpoint", metavar="PATH", help="the checkpoint for --sample-only")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = vars(parse_args(argv))
    resume, sample_only, ckpt_path = args.pop("resume", None), args.pop("sample_only", False), args.pop("checkpoint", None)
    if sample_only and not ckpt_path:
        raise UserError("--sample-only needs --checkpoint PATH (e.g. fm_out/checkpoint.pt)")
    if resume is not None or sample_only:
        ckpt_path = ckpt_path if sample_only else resume or str(Path(args.get("out_dir", CFG.out_dir), "checkpoint.pt"))
        ckpt = load_checkpoint(ckpt_path) | {"path": ckpt_path}
        cfg = CFG(**{**ckpt["cfg"], **args})  # saved config, then the flags typed now
    else:
        ckpt, cfg = None, CFG(**args)
    validate(cfg)
    out = writable_dir(cfg.out_dir)
    t0 = time.monotonic()
    if sample_only:
        model = ARCHS[cfg.arch]().to(pick_device(cfg.device), memory_format=torch.channels_last)
        load_weights(model, ckpt["ema"] if cfg.ema > 0 else ckpt["model"], ckpt_path, cfg.arch)
        model.eval()
    else:
        print(f"training {cfg.arch} on {cfg.dataset} ({pick_device(cfg.device)}), writing to {out}/")
        model = train(cfg, resume=ckpt)
    x = sample(model, cfg)
    save_samples(x, out / "samples.png")
    save_trajectory(model, cfg, out / "trajectory.png")
    what = "sampled" if sample_only else "trained and sampled"
    print(f"{what} in {time.monotonic() - t0:.0f}s: {len(x)} images by {cfg.solver} x {cfg.sample_steps} -> "
          f"{out / 'samples.png'}, {out / 'trajectory.png'}" + ("" if sample_only else f", {out / 'checkpoint.pt'}"))


def cli(argv=None) -> int:
    """main() for a person at a terminal: a problem they can fix is one line on stderr, not a traceback."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"\ninterrupted at step {e.step}; saved {e.path}. Resume with: python flow_matching.py "
              f"--resume {e.path}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted; the last checkpoint written, if any, is intact", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
