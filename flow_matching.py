"""
Conditional Flow Matching on MNIST in one file: the code of the blog post "Sailing the Seas of Flow Matching",
in the post's order and with its names, its bugs fixed (docs/errata.md), then what a reference adds.

    python flow_matching.py                  # train on MNIST, sample, save fm_out/samples.png
    python flow_matching.py --max-steps 300  # a trial run of a minute or two

Three parts, each fenced by a "# ====" line:
  1. The post. Saved as a file of its own, the text down to the "Beyond the post" line runs with only torch
     and torchvision: train(cfg, dataset, model) is the post's loop and sample(model, cfg) its sampler.
  2. Beyond the post: the U-Net, the training recipe, guidance, the CNF view, straight paths. fit() and
     generate() are what the command line runs: the post's train and sample with the recipe around them.
  3. Plumbing: data, pictures, checkpoints, Ctrl-C, progress, the command line.
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision import datasets, transforms


def arg(default, help: str):
    """A CFG field whose help is also its --flag's help."""
    return field(default=default, metadata={"help": help})


# ----------------------------------------------------------------------------- Preparing for the Journey
@dataclass
class CFG:
    """Every setting. The post's fields come first (the defaults are the command line's; the post's values are
    in the help); the fields after them belong to parts 2 and 3, and part 1 does not read them."""
    device: str = arg("auto", "auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps")
    batch_size: int = arg(32, "examples per optimizer step (post: 256)")
    lr: float = arg(2e-3, "learning rate of AdamW (and Muon, scaled to match); the schedule's peak (post: 2e-4)")
    epochs: int = arg(3, "passes over the training set (post: 5)")
    num_workers: int = arg(0, "DataLoader worker processes of train(), the post's loop (post: 2, never passed on)")
    # Flow matching params (the post's t_eps was never used, and is not needed: erratum 3)
    sigma_min: float = arg(1e-2, "endpoint noise: the path ends at x1 + sigma_min x0; in [0, 1)")
    # Sampling params
    sample_steps: int = arg(20, "ODE solver steps from t=0 to t=1 (post: 50)")
    n_samples: int = arg(64, "examples to sample")
    out_dir: str = arg("fm_out", "folder for checkpoint.pt and the pictures")
    solver: str = arg("euler", "euler | midpoint | rk4: 1, 2 or 4 network calls a step (post: euler, though "
                               "its CFG promised RK4: erratum 2)")
    seed: int = arg(0, "seed for the weights, the data order, the training noise and the sampling noise")
    data_dir: str = arg("./data", "torchvision's root, or a folder holding the idx files (.gz or not)")
    data_shape: tuple = arg((1, 28, 28), "shape of one example; (C, H, W) means images in [-1, 1]")
    # Beyond the post (part 2): the network, the training recipe, guidance
    arch: str = arg("unet", "unet | post (the post's VelocityNet, its bug fixed)")
    t_dist: str = arg("logit-normal", "training times t: logit-normal | uniform (post)")
    schedule: str = arg("cosine", "learning rate: cosine (warm-up, decay to lr/10) | constant (post)")
    ema: float = arg(0.999, "decay of the weight average that is sampled; 0: none (post)")
    time_shift: str = arg("auto", "solver times t = u / (u + shift (1 - u)), u even: auto (3 for euler and "
                                  "midpoint, 1 for rk4) | a number; 1: even steps (post)")
    precision: str = arg("auto", "training arithmetic: auto (bf16 on GPUs from Ampere on and CPUs with AMX, "
                                 "else fp32) | fp32 | bf16")
    num_classes: int = arg(0, "0: unconditional (post); 10: a model that draws the class asked for")
    label_drop: float = arg(0.1, "share of training labels replaced by the null label (for guidance)")
    guidance: float = arg(1.0, "guidance scale w in v = v(null) + w (v(y) - v(null)); 1: plain conditional")
    optimizer: str = arg("muon", "muon (Muon for the hidden convolutions, AdamW for the rest) | adamw (post)")
    coupling: str = arg("ot", "noise meets data in training: ot (minibatch OT, by class) | independent (post)")
    # Plumbing (part 3)
    dataset: str = arg("mnist", "mnist | fashion-mnist")
    max_steps: int = arg(0, "stop after this many optimizer steps; the schedule fits them (0: all epochs)")
    checkpoint_every: float = arg(300.0, "seconds between checkpoints (one is also written every epoch)")


def pick_device(name: str) -> torch.device:
    """The post's choice, CUDA when there is a GPU, extended to Apple's MPS; or the device named."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return torch.device(name)


def mnist(cfg: CFG) -> datasets.MNIST:
    """The post's data: MNIST's 60,000 training digits, each (1, 28, 28) scaled by x * 2 - 1 into [-1, 1]
    (written as Normalize, which, unlike the post's lambda, worker processes can pickle on macOS and Windows)."""
    to_pixels = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    return datasets.MNIST(cfg.data_dir, train=True, download=True, transform=to_pixels)


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
    """The navigator v_theta(x, t): the wind at position x (B, 1, 28, 28) and time t (B,), by three 3x3
    convolutions, with the time embedding added to the hidden features."""

    def __init__(self, ch: int = 64, tdim: int = 128):
        super().__init__()
        self.time = SinusoidalTimeEmbedding(tdim)
        self.mlp = nn.Linear(tdim, ch)

        self.net = nn.Sequential(
            nn.Conv2d(1, ch, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(ch, ch, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(ch, 1, 3, padding=1),
        )

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t_emb = self.mlp(self.time(t))[:, :, None, None]  # (B, ch, 1, 1)
        # Erratum: the post returned self.net(x) + t_emb, which broadcast to (B, ch, 28, 28); the time belongs
        # to the hidden features, so it is added after the first convolution.
        return self.net[1:](self.net[0](x) + t_emb)  # (B, 1, 28, 28)


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


def flow_matching_loss(model, x1: Tensor, sigma_min: float = 0.01, t: Tensor | None = None,
                       x0: Tensor | None = None) -> Tensor:
    """L_CFM = E_{t, x1, x0} || v_theta(x_t, t) - (x1 - (1 - sigma_min) x0) ||^2, averaged over the batch and
    the D coordinates (so L_CFM / D). t ~ U[0, 1] and x0 ~ N(0, I) unless given, as in sample_ot_path."""
    t, xt, u = sample_ot_path(x1, sigma_min, t, x0)
    v = model(xt, t)
    if v.shape != u.shape:  # erratum: the post's (B, 64, 28, 28) output broadcast silently against u
        raise ValueError(f"model returned {tuple(v.shape)} for inputs of shape {tuple(u.shape)}")
    return ((v - u) ** 2).mean()


def train(cfg: CFG, dataset=None, model: nn.Module | None = None) -> nn.Module:
    """The post's loop: for each batch x1, one AdamW step on L_CFM. dataset: (x, label) pairs with x of shape
    cfg.data_shape (None: the post's MNIST); model: any nn.Module mapping x (B, *cfg.data_shape) and t (B,) to
    a velocity of x's shape (None: the post's VelocityNet). Returns the trained model, in eval mode."""
    torch.manual_seed(cfg.seed)  # the same seed gives the same weights, data order and noise
    device = pick_device(cfg.device)
    data = mnist(cfg) if dataset is None else dataset
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.num_workers)

    model = (VelocityNet() if model is None else model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)

    for _ in range(cfg.epochs):
        for x1, _ in loader:
            x1 = x1.to(device)
            loss = flow_matching_loss(model, x1, cfg.sigma_min)
            opt.zero_grad()
            loss.backward()
            opt.step()

    return model.eval()


# ----------------------------------------------------------------------------- Generation is navigation: the ODE
# The post's "Quick Differential Equations Aside": dX_t/dt = u_t(X_t), X_0 = x0, with the learned v_theta as u_t.
# Each solver takes one step of length dt (a negative dt runs time backwards); integrate strings them together.
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


def integrate(v, x: Tensor, steps: int, solver: str = "euler", grid: list[float] | None = None,
              path: list | None = None) -> Tensor:
    """The flow: solve dX/dt = v(X, t) from X = x at grid[0] to grid[steps] by `steps` steps of `solver`.
    grid defaults to the post's even times 0, 1/steps, ..., 1; a grid from 1 down to 0 runs the flow backwards,
    which inverts it. v takes x and t (B,). `path`, a list, gets X at each time."""
    grid = [i / steps for i in range(steps + 1)] if grid is None else grid
    if len(grid) != steps + 1:
        raise ValueError(f"{steps} steps need {steps + 1} times, got {len(grid)}")
    for t0, t1 in zip(grid, grid[1:]):
        if path is not None:
            path.append(x)
        t = torch.full((x.shape[0],), t0, dtype=x.dtype, device=x.device)  # (B,)
        x = SOLVERS[solver](v, x, t, t1 - t0)
    if path is not None:
        path.append(x)
    return x


def noise(cfg: CFG, n: int) -> Tensor:
    """Ships leaving Europe: x0 ~ N(0, I), (n, *cfg.data_shape), drawn on the CPU from cfg.seed alone, so the
    same seed gives the same noise on every device."""
    return torch.randn(n, *cfg.data_shape, generator=torch.Generator().manual_seed(cfg.seed))


@torch.no_grad()
def sample(model, cfg: CFG, x0: Tensor | None = None, grid: list[float] | None = None) -> Tensor:
    """Generation is navigation: ships x0 ~ N(0, I) (cfg.n_samples, from cfg.seed, unless given) follow the
    learned wind dX/dt = v_theta(X, t) from t=0 to t=1, cfg.sample_steps steps of cfg.solver on the even grid
    (or `grid`). model: any v(x, t). Returns (N, *cfg.data_shape) on the CPU: images as pixels in [0, 1], as in
    the post; other data as it is."""
    x0 = noise(cfg, cfg.n_samples).to(pick_device(cfg.device)) if x0 is None else x0
    x = integrate(model, x0, cfg.sample_steps, cfg.solver, grid)
    return ((x.clamp(-1, 1) + 1) / 2 if len(cfg.data_shape) == 3 else x).float().cpu()


# ============================================================================= Beyond the post
# What a reference adds to the post, each piece small, with its reason (docs/ has the measurements). Parts 2
# and 3 use part 1 and never the other way round: what they add comes into part 1 as arguments.
import copy
import math
from dataclasses import replace
from functools import partial

import torch.nn.functional as F
from torch.utils.data import TensorDataset


# ----------------------------------------------------------------------------- The default network: a U-Net
class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32. Under bf16 autocast it would run in bf16, where on a CPU it is several
    times slower in the channels-last layout (docs/measurements.md); fp32 statistics are also more accurate."""

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
    digits (erratum 10). This U-Net sees the whole digit at 7x7. It works on 2x2 patches, in by a stride-2
    convolution, out as 4 channels at 14x14 that a pixel shuffle lays back into 28x28: on a CPU a convolution
    with one channel at 28x28 runs at a tenth of the speed of the others (docs/measurements.md). Skips are added."""

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 96), tdim: int = 128, num_classes: int = 0):
        super().__init__()
        c1, c2, c3 = widths  # channels of the patches (14x14), of the 14x14 blocks, at 7x7
        self.time = nn.Sequential(SinusoidalTimeEmbedding(32), nn.Linear(32, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.label = LabelEmbedding(num_classes, tdim)
        self.inp = nn.Conv2d(1, c1, 2, stride=2)  # one vector for each 2x2 patch
        self.enc1 = ResBlock(c1, c2, tdim)
        self.down = nn.Conv2d(c2, c2, 3, stride=2, padding=1)
        self.enc2 = ResBlock(c2, c3, tdim)
        self.mid = ResBlock(c3, c3, tdim)
        self.dec2 = ResBlock(c3, c2, tdim)
        self.dec1 = ResBlock(c2, c1, tdim)
        self.out = nn.Sequential(GroupNorm32(8, c1), nn.SiLU(), nn.Conv2d(c1, 4, 3, padding=1), nn.PixelShuffle(2))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        temb = self.time(t) + self.label(y, x)  # (B, tdim)
        h1 = self.enc1(self.inp(x), temb)  # (B, c2, 14, 14)
        h2 = self.enc2(self.down(h1), temb)  # (B, c3, 7, 7)
        h = self.dec2(self.mid(h2, temb) + h2, temb)  # (B, c2, 7, 7)
        h = self.dec1(F.interpolate(h, scale_factor=2.0) + h1, temb)  # (B, c1, 14, 14)
        return self.out(h)  # (B, 4, 14, 14) -> (B, 1, 28, 28)


ARCHS = {"unet": UNet, "post": VelocityNet}


# ----------------------------------------------------------------------------- The training recipe
# Where on the path to train. The post draws t ~ U[0, 1]; the logit-normal t = sigmoid(N(0, 1)) trains more
# in the middle of the path, where the velocity is hardest to predict (SD3, Esser et al. 2024).
T_DISTS = {"uniform": lambda n, device: torch.rand(n, device=device),
           "logit-normal": lambda n, device: torch.sigmoid(torch.randn(n, device=device))}


def learning_rate(cfg: CFG, step: int, total: int) -> float:
    """cfg.lr at `step` (0, ..., total - 1): constant (post), or a linear warm-up over min(100, total // 20 + 1)
    steps and a cosine decay to cfg.lr / 10 at the last step."""
    warmup = min(100, total // 20 + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / (total - 1 - warmup)) if total - 1 > warmup else 1.0
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """ema <- d ema + (1 - d) model, d = min(decay, (1 + n) / (10 + n)) at update n: the warm-up forgets the
    random initial weights, which a plain 0.999 still holds 45% of after 800 steps. Sampling the average
    gives smoother samples than the last weights. One fused call for all the weights (a GPU's launches)."""
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - d)
    for e, b in zip(ema.buffers(), model.buffers()):  # e.g. BatchNorm's statistics, in a model of yours
        e.copy_(b)


# ----------------------------------------------------------------------------- The optimizer: Muon for the convolutions
def orthogonalize(g: Tensor, steps: int = 5) -> Tensor:
    """About U V^T for g = U S V^T (m, n), or for each matrix of a batch g (k, m, n): g's directions, each of
    length 1. Five Newton-Schulz steps X <- a X + b (X X^T) X + c (X X^T)^2 X from X = g / |g| (each matrix by its
    own Frobenius norm) map each singular value s to a s + b s^3 + c s^5; these coefficients take every s in
    [1/500, 1] into [0.68, 1.21] (Jordan et al. 2024). A step is X <- P X, P = a + b G + c G^2 a polynomial in
    G = X X^T, so the steps run on (m, m) matrices alone: G <- P G P (P and G commute), Q <- P Q, and X = Q X_0
    at the end; two products with the long side n, not ten."""
    if g.shape[-2] > g.shape[-1]:
        return orthogonalize(g.mT, steps).mT  # the Gram matrix of the shorter side
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (torch.linalg.matrix_norm(g, keepdim=True) + 1e-7)
    eye = torch.eye(x.shape[-2], dtype=x.dtype, device=x.device)
    gram, q = x @ x.mT, eye
    for _ in range(steps):
        p = a * eye + b * gram + c * gram @ gram
        gram, q = p @ gram @ p, p @ q
    return q @ x


def orthogonalize_each(gs: list[Tensor]) -> list[Tensor]:
    """[orthogonalize(g) for g in gs], g 2-D, in one batch for the matrices whose shorter side has the same length
    m: their Gram matrices are all (m, m). Zero columns pad each to the batch's widest; they change neither G nor
    the columns kept. Orthogonalized one by one, the U-Net's 15 convolution weights cost more in calls than in
    arithmetic on a CPU (docs/measurements.md); on a GPU, where each call is a launch, probably more so."""
    tall = [len(g) > g.shape[1] for g in gs]
    wide = [g.T if t else g for g, t in zip(gs, tall)]  # the shorter side first, as in orthogonalize
    out = [None] * len(gs)
    for m in {len(g) for g in wide}:
        same = [i for i, g in enumerate(wide) if len(g) == m]
        n = max(wide[i].shape[1] for i in same)
        done = orthogonalize(torch.stack([F.pad(wide[i], (0, n - wide[i].shape[1])) for i in same]))
        for i, d in zip(same, done):
            d = d[:, :wide[i].shape[1]]
            out[i] = d.T if tall[i] else d
    return out


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024): SGD with Nesterov momentum whose step, each kernel seen as an (out, in k k) matrix,
    is orthogonalized. Adam scales each weight by its own gradient history; Muon's argument: a kernel's momentum
    is dominated by a few directions, and moving along all of them alike trains the rare ones too. Scaled by
    0.2 sqrt(max(out, in k k)), the step has about AdamW's size, so Muon shares AdamW's lr and schedule (Liu et
    al. 2025). For matrices only: the first and last layers and the vectors stay with AdamW (MuonAndAdamW)."""

    def __init__(self, params, lr: float, momentum: float = 0.95, weight_decay: float = 0.01):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            ws = [w for w in group["params"] if w.grad is not None]  # torch._foreach_*: one call for the list
            if not ws:
                continue
            grads = [w.grad for w in ws]
            bufs = [self.state[w].setdefault("momentum", torch.zeros_like(w)) for w in ws]
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, grads)
            nesterov = torch._foreach_add(grads, bufs, alpha=mu)  # g + mu buf: the momentum one step on, if g held
            updates = orthogonalize_each([g.reshape(len(g), -1) for g in nesterov])
            torch._foreach_mul_(ws, 1 - lr * group["weight_decay"])  # decoupled weight decay, as AdamW's
            for w, update in zip(ws, updates):
                w.add_(update.view(w.shape), alpha=-lr * 0.2 * max(update.shape) ** 0.5)


class MuonAndAdamW:
    """One optimizer of two parts: Muon for the hidden convolutions (4-D weights at least 16 wide each way: not
    the first, which sees 1 channel, nor the last, which makes 4), AdamW for the rest. Fused AdamW on a CPU: one
    kernel for all its tensors instead of a loop of small ones (docs/measurements.md)."""

    def __init__(self, model: nn.Module, lr: float):
        hidden = [w for w in model.parameters() if w.ndim == 4 and min(len(w), w[0].numel()) >= 16]
        rest = [w for w in model.parameters() if all(w is not h for h in hidden)]
        fused = True if rest and rest[0].device.type == "cpu" else None
        self.parts = [torch.optim.AdamW(rest, lr=lr, fused=fused)] + ([Muon(hidden, lr=lr)] if hidden else [])

    @property
    def param_groups(self) -> list[dict]:
        return [group for part in self.parts for group in part.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none)

    def step(self) -> None:
        for part in self.parts:
            part.step()

    def state_dict(self) -> dict:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state: dict) -> None:
        for part, part_state in zip(self.parts, state["parts"], strict=True):
            part.load_state_dict(part_state)


OPTIMIZERS = {"muon": MuonAndAdamW, "adamw": lambda model, lr: torch.optim.AdamW(model.parameters(), lr=lr)}


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
        return partial(model, y=y)
    both = torch.cat([y, torch.full_like(y, cfg.num_classes)])

    def v(x: Tensor, t: Tensor) -> Tensor:
        v_y, v_null = model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return v_null + cfg.guidance * (v_y - v_null)
    return v


# ----------------------------------------------------------------------------- The command line's loop and sampler
def fit(cfg: CFG, dataset=None, model: nn.Module | None = None, resume: dict | None = None) -> nn.Module:
    """The post's train() with the recipe around its loop: t ~ cfg.t_dist, the learning-rate schedule, the
    weight average (returned, in eval mode, to sample from), labels for guidance, bf16 where the hardware has it;
    and, from TrainingRun (part 3), the device, a data order that a resumed run continues exactly, progress,
    checkpoints, Ctrl-C and a stop when the loss is not finite. dataset: None loads cfg.dataset; model: None
    builds cfg.arch; resume: a checkpoint (load_checkpoint) to continue. A dataset of (x1, label, x0) triples
    trains on those pairs (reflow) instead of fresh noise."""
    with TrainingRun(cfg, dataset, model, resume) as run:
        for x1, y, x0 in run.batches():  # x1 (B, *data_shape), labels y (B,), on the device; x0: reflow's pairs
            for group in run.opt.param_groups:
                group["lr"] = learning_rate(cfg, run.step, run.last)
            labels = drop_labels(y, cfg)  # None for an unconditional model
            v = run.model if labels is None else partial(run.model, y=labels)
            t = T_DISTS[cfg.t_dist](len(x1), x1.device)
            if x0 is None and cfg.coupling == "ot":
                x0 = ot_couple(torch.randn_like(x1), x1, y if cfg.num_classes else None)
            with run.autocast():
                loss = flow_matching_loss(v, x1, cfg.sigma_min, t, x0)
            run.opt.zero_grad(set_to_none=True)
            loss.backward()
            run.opt.step()
            update_ema(run.ema, run.model, cfg.ema, run.step)
            run.end_step(loss)
    return run.result()


# The solver's time grid. Shorter steps near the noise help Euler and midpoint (docs/measurements.md). RK4
# evaluates v at t = 1, where the field is steepest; it keeps even steps, so its last step is not stretched.
TIME_SHIFTS = {"euler": 3.0, "midpoint": 3.0, "rk4": 1.0}


def time_grid(steps: int, shift: float = 1.0) -> list[float]:
    """0 = t_0 < t_1 < ... < t_steps = 1: u = i / steps mapped by t = u / (u + shift (1 - u)), SD3's time
    shift (Esser et al. 2024). shift 1 gives even steps, the post's dt = 1 / steps; shift > 1 makes the
    steps near the noise (t = 0) shorter and those near the data longer."""
    return [u / (u + shift * (1 - u)) for u in (i / steps for i in range(steps + 1))]


def grid_of(cfg: CFG) -> list[float]:
    """The solver times cfg asks for: cfg.sample_steps steps, shifted by cfg.time_shift."""
    return time_grid(cfg.sample_steps, TIME_SHIFTS[cfg.solver] if cfg.time_shift == "auto" else float(cfg.time_shift))


@torch.inference_mode()
def generate(model: nn.Module, cfg: CFG, labels: Tensor | None = None) -> Tensor:
    """The post's sample() with the recipe's grid (grid_of) and guidance (labels (N,) for a conditional model,
    cfg.guidance), in chunks of CHUNK samples so that memory stays bounded on every device. The noise is the
    same as sample()'s: N = cfg.n_samples or len(labels) ships from cfg.seed."""
    validate(cfg)
    x0 = noise(cfg, cfg.n_samples if labels is None else len(labels))
    ys = [None] * len(x0.split(CHUNK)) if labels is None else labels.split(CHUNK)
    return torch.cat([sample(guided(model, y, cfg), cfg, on_device(x, model), grid_of(cfg))
                      for x, y in zip(x0.split(CHUNK), ys)])


CHUNK = 64  # samples per pass: they stay in a CPU's caches, and a GPU's memory stays bounded (guidance doubles it)


# ----------------------------------------------------------------------------- Straight paths: OT coupling and reflow
# The conditional paths are straight, but the learned flow is not: paths from noises drawn apart from their data
# cross, and the marginal field averages them into curves (erratum 18; straightness()). Two ways to uncross them.
def assignment(cost: list[list[float]]) -> list[int]:
    """The exact minimum-cost assignment of an n x n cost matrix: row i goes to column perm[i], sum cost[i][perm[i]]
    least (the Hungarian algorithm, Kuhn 1955, in the O(n^3) form with potentials u, v of Jonker-Volgenant). In
    Python: 6 ms for a batch of 32, too slow past a batch of about 128 (TorchCFM calls POT's C++ solver)."""
    n, inf = len(cost), float("inf")
    u, v, match, way = [0.0] * (n + 1), [0.0] * (n + 1), [0] * (n + 1), [0] * (n + 1)  # match[j]: row of column j
    for i in range(1, n + 1):  # add row i, then grow the alternating tree to a free column
        match[0], j0, best, used = i, 0, [inf] * (n + 1), [False] * (n + 1)
        while match[j0]:
            used[j0], i0, delta, j1 = True, match[j0], inf, 0
            for j in range(1, n + 1):
                if not used[j]:
                    reduced = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if reduced < best[j]:
                        best[j], way[j] = reduced, j0
                    if best[j] < delta:
                        delta, j1 = best[j], j
            for j in range(n + 1):
                if used[j]:
                    u[match[j]] += delta
                    v[j] -= delta
                else:
                    best[j] -= delta
            j0 = j1
        while j0:  # flip the path: each column on it takes the row of the one before
            match[j0], j0 = match[way[j0]], way[j0]
    perm = [0] * n
    for j in range(1, n + 1):
        perm[match[j] - 1] = j - 1
    return perm


def ot_couple(x0: Tensor, x1: Tensor, y: Tensor | None = None) -> Tensor:
    """Minibatch optimal transport (OT-CFM, Tong et al. 2023): x0 reordered so that x0[i] is x1[i]'s partner in
    the pairing of least total squared distance, so that paths cross less. With labels y, within each class:
    pairing across classes would teach a class-conditional model to carry one class's noise to another's data
    (TorchCFM #117; C2OT). The noises keep their N(0, I) marginal: each is used once."""
    cost = torch.cdist(x1.flatten(1).float(), x0.flatten(1).float()) ** 2  # (B, B)
    index = torch.arange(len(x1), device=x1.device)
    groups = [index] if y is None else [index[y == c] for c in y.unique()]
    partner = torch.empty_like(index)
    for g in groups:
        partner[g] = g[assignment(cost[g][:, g].tolist())]
    return x0[partner]


def reflow_pairs(teacher: nn.Module, cfg: CFG, n_pairs: int, ends: list[Tensor] | None = None) -> TensorDataset:
    """Reflow's data: n_pairs noises x0 and where the teacher carries them, x1 (RK4, cfg.sample_steps even steps;
    a conditional teacher: balanced labels, guided by cfg.guidance), as fit()'s (x1, label, x0) triples. ends: a
    list that receives the x1 a chunk at a time, so that a caller keeps them if interrupted; it may already hold
    the first ones, made before from the same noise, which are not made again."""
    x0 = noise(replace(cfg, seed=cfg.seed + 1), n_pairs)  # not the noise generate() draws from cfg.seed
    labels = torch.arange(n_pairs) % cfg.num_classes if cfg.num_classes else torch.zeros(n_pairs, dtype=torch.long)
    ends = [] if ends is None else ends
    with torch.inference_mode():
        for i in range(sum(map(len, ends)), n_pairs, CHUNK):  # after those made before
            x, y = x0[i:i + CHUNK], labels[i:i + CHUNK]
            ends.append(integrate(guided(teacher, y.to(device_of(teacher)) if cfg.num_classes else None, cfg),
                                  on_device(x, teacher), cfg.sample_steps, "rk4").float().cpu())
    return TensorDataset(torch.cat(ends), labels, x0)


def reflow(teacher: nn.Module, cfg: CFG, n_pairs: int, model: nn.Module | None = None,
           pairs: TensorDataset | None = None) -> nn.Module:
    """Rectified flow's reflow (Liu et al. 2022): reflow_pairs(teacher, cfg, n_pairs), or the `pairs` it made
    before (n_pairs then unused), become the straight paths that fit() trains a new model on (by default from the
    teacher's weights), with t ~ U[0, 1]: sampling in a step or two asks for the field at t = 0, where the
    logit-normal t rarely trains. The teacher's flow never crosses itself, so these pairs cross far less than
    independent ones: the new flow is straighter."""
    if model is None:
        model = copy.deepcopy(teacher).train().requires_grad_(True)
    return fit(replace(cfg, t_dist="uniform"), reflow_pairs(teacher, cfg, n_pairs) if pairs is None else pairs, model)


# ----------------------------------------------------------------------------- The flow is a CNF: inversion, likelihood
def encode(model: nn.Module, x: Tensor, cfg: CFG, labels: Tensor | None = None) -> Tensor:
    """The flow run backwards, X_1 = x at t=1 to X_0 at t=0: the noise that generate() would carry to x (x in
    the model's space, e.g. images in [-1, 1]). integrate(..., X_0) decodes it, up to the solver's error."""
    with torch.inference_mode():
        return integrate(guided(model, labels, cfg), x, cfg.sample_steps, cfg.solver, grid_of(cfg)[::-1])


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
                    grid_of(cfg)[::-1])
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
    """Spherical interpolation from a to b, along the arc instead of the chord: between two noises it stays where
    N(0, I) has its mass (|x| ~ sqrt(d)), where the chord would pass through unusually small noise. Real images
    that encode() carried back are smaller than such noise (docs/measurements.md): between those it keeps about
    their own norm."""
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
    x1 = integrate(model, on_device(noise(cfg, n), model), steps, "rk4", path=path)
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
                        optimizer="adamw", coupling="independent", ema=0.0, sigma_min=0.01, sample_steps=50,
                        solver="euler", time_shift="1", precision="fp32")}


# ============================================================================= Plumbing
import argparse
import contextlib
import hashlib
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import asdict, fields
from pathlib import Path

from torchvision.datasets.mnist import read_image_file, read_label_file
from torchvision.datasets.utils import extract_archive
from torchvision.utils import make_grid, save_image


# ----------------------------------------------------------------------------- Training, around the recipe's loop
class TrainingRun:
    """Everything fit() does besides the loop: the device and arithmetic, the data on the device in an order
    that a resumed run continues exactly, the optimizer, the weight average, progress, checkpoints (every epoch,
    every cfg.checkpoint_every seconds, on Ctrl-C) and a clear stop when the loss is not finite."""

    def __init__(self, cfg: CFG, dataset, model: nn.Module | None, resume: dict | None):
        validate(cfg)
        self.cfg, self.device = cfg, pick_device(cfg.device)
        self.path = writable_dir(cfg.out_dir) / "checkpoint.pt"  # fail now, not after an hour of training
        data = as_tensors(load_dataset(cfg.dataset, cfg.data_dir) if dataset is None else dataset, cfg)
        self.data = [d.to(self.device) for d in data]  # x, labels (and x0): indexed on the device, not collated
        self.pairs = pairs_id(data[0]) if len(data) == 3 else 0  # reflow's; main() keeps them beside the checkpoint
        torch.manual_seed(cfg.seed)
        self.model = place(build_model(cfg) if model is None else model, self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.opt = OPTIMIZERS[cfg.optimizer](self.model, cfg.lr)
        self.bf16 = use_bf16(cfg.precision, *hardware(self.device))
        self.steps_per_epoch = math.ceil(len(self.data[0]) / cfg.batch_size)
        total = cfg.epochs * self.steps_per_epoch
        self.last = min(total, cfg.max_steps) if cfg.max_steps else total  # the schedule ends here
        self.step = restore(resume, self.model, self.ema, self.opt, cfg, self.device) if resume else 0
        self.progress = Progress(self.last, self.step, cfg.batch_size)
        self.losses, self.saved_at = [], time.monotonic()
        self.interrupted = self._stack = None

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        self.interrupted = self._stack.enter_context(sigint_flag())
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def batches(self):
        """(x1, y, x0) batches until step `last`, x0 None unless the data holds pairs; each epoch's order depends
        only on (seed, epoch), so a resumed run skips the batches already seen and sees exactly those an
        uninterrupted run would."""
        n, size = len(self.data[0]), self.cfg.batch_size
        while self.step < self.last:
            epoch, done = divmod(self.step, self.steps_per_epoch)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed + epoch)).to(self.device)
            for i in range(done * size, n, size):
                x1, y, *x0 = (d[order[i:i + size]] for d in self.data)
                yield on_device(x1, self.model), y, on_device(x0[0], self.model) if x0 else None
                if self.step == self.last:
                    break
            self.save()  # every epoch, and at the end

    def autocast(self):
        return torch.autocast(self.device.type, torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def end_step(self, loss: Tensor) -> None:
        self.step += 1
        self.losses.append(loss.detach())  # read at the next progress line: no wait for the device every step
        if self.progress.due() or self.step == self.last:
            self.progress.log(self.step, (self.step - 1) // self.steps_per_epoch, self.mean_loss())
            self.losses = []
        if self.interrupted() or time.monotonic() - self.saved_at > self.cfg.checkpoint_every:
            self.save()
        if self.interrupted():
            raise Interrupted(self.step, self.path)

    def mean_loss(self) -> float:
        """The mean of the losses since the last progress line; a stop, naming the step, if one is not finite."""
        losses = torch.stack(self.losses).float() if self.losses else torch.zeros(1)
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            kept = f"{self.path} keeps the last good state" if self.path.exists() else "nothing was saved"
            raise UserError(f"the loss became {losses[bad[0, 0]].item()} at step "
                            f"{self.step - len(losses) + 1 + bad[0, 0].item()}; stopped ({kept}); try a lower --lr")
        return losses.mean().item()

    def save(self) -> None:
        self.mean_loss()  # never save weights that a loss of inf or nan has reached
        state = checkpoint(self.cfg, self.model, self.ema, self.opt, self.step, self.device)
        state["pairs"] = self.pairs  # 0: trained on the data set, not on reflow pairs
        atomic_save(self.path, lambda f: torch.save(state, f))
        self.saved_at = time.monotonic()

    def result(self) -> nn.Module:
        return (self.ema if self.cfg.ema > 0 else self.model).eval()


def as_tensors(dataset, cfg: CFG) -> tuple[Tensor, ...]:
    """A dataset of (x, label) pairs, or (x, label, x0) triples, as tensors: x (N, *cfg.data_shape), labels (N,)
    and x0 like x."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) in (2, 3):
        data = dataset.tensors
    else:
        data = [torch.stack([torch.as_tensor(x) for x, *_ in dataset]), torch.as_tensor([y for _, y, *_ in dataset])]
    if tuple(data[0].shape[1:]) != tuple(cfg.data_shape):
        raise UserError(f"the data's examples have shape {tuple(data[0].shape[1:])}, but cfg.data_shape is "
                        f"{tuple(cfg.data_shape)}: set CFG(data_shape={tuple(data[0].shape[1:])})")
    return tuple(data)


def build_model(cfg: CFG) -> nn.Module:
    if tuple(cfg.data_shape) != (1, 28, 28):
        raise UserError(f"--arch {cfg.arch} draws (1, 28, 28) images, not {tuple(cfg.data_shape)}: pass "
                        f"fit() a model for your data")
    return VelocityNet() if cfg.arch == "post" else ARCHS[cfg.arch](num_classes=cfg.num_classes)  # validate(): no labels


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """The model on the device; on a CPU in the channels-last layout (NHWC), where convolutions run faster.
    On a GPU GroupNorm would convert the layout back and forth around every convolution."""
    return model.to(device, memory_format=torch.channels_last if device.type == "cpu" else torch.preserve_format)


def on_device(x: Tensor, model: nn.Module) -> Tensor:
    """x on the model's device, in the layout place() gave the model."""
    device = device_of(model)
    x = x.to(device)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cpu" and x.dim() == 4 else x


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def hardware(device: torch.device) -> tuple[str, tuple[int, int], bool]:
    """What use_bf16 decides on: the device type, a CUDA GPU's compute capability, whether the CPU has AMX."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)
    amx = device.type == "cpu" and getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return device.type, capability, amx


def use_bf16(precision: str, device_type: str, cuda_capability: tuple[int, int] = (0, 0), cpu_amx: bool = False) -> bool:
    """bf16 autocast for --precision auto where the hardware multiplies bf16 natively: CUDA GPUs of compute
    capability 8.0 (Ampere) and later, and CPUs with AMX (Intel Sapphire Rapids and later). Elsewhere it is
    emulated and slower than fp32: a T4 (7.5), whose torch.cuda.is_bf16_supported() is true all the same; MPS."""
    if precision != "auto":
        return precision == "bf16"
    return cuda_capability >= (8, 0) if device_type == "cuda" else device_type == "cpu" and cpu_amx


def check_device(name: str, cuda_count: int, mps: bool) -> None:
    """Reject a --device that this machine lacks (cuda_count CUDA GPUs; mps: whether Apple's MPS is there)."""
    match = re.fullmatch(r"auto|cpu|mps|cuda(?::(\d+))?", name)
    if not match:
        raise UserError(f"--device {name}: choose from auto, cpu, cuda, cuda:N, mps")
    if name.startswith("cuda") and not cuda_count:
        raise UserError(f"--device {name}: torch sees no CUDA GPU here; use --device auto or cpu")
    if match[1] is not None and int(match[1]) >= cuda_count:
        raise UserError(f"--device {name}: this machine has {cuda_count} CUDA GPU(s), cuda:0 to cuda:{cuda_count - 1}")
    if name == "mps" and not mps:
        raise UserError("--device mps: Apple's MPS backend is not available here; use --device auto or cpu")


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
              ("num_classes", cfg.arch != "post" or not cfg.num_classes, "--arch post is the post's network, which "
               "takes no labels: use --arch unet"),
              ("batch_size", cfg.coupling != "ot" or cfg.batch_size <= 128, "must be 128 or less with --coupling ot, "
               "whose assignment solver takes O(batch^3) steps of Python")]
    checks += [(name, getattr(cfg, name) in choices, f"choose from {', '.join(choices)}")
               for name, choices in CHOICES.items()]
    for name, ok, why in checks:
        if not ok:
            raise UserError(f"--{flag(name)} {getattr(cfg, name)}: {why}")
    check_device(cfg.device, torch.cuda.device_count() if torch.cuda.is_available() else 0,
                 torch.backends.mps.is_available())


# ----------------------------------------------------------------------------- Data
DATASETS = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}
CHOICES = {"solver": SOLVERS, "t_dist": T_DISTS, "arch": ARCHS, "dataset": DATASETS, "schedule": ("cosine", "constant"),
           "precision": ("auto", "fp32", "bf16"), "coupling": ("independent", "ot"), "optimizer": OPTIMIZERS}


def load_dataset(name: str, data_dir: str, train: bool = True) -> TensorDataset:
    """torchvision's MNIST or FashionMNIST as (image (1, 28, 28) in [-1, 1], label) pairs, read by torchvision's
    own idx readers from data_dir or torchvision's data_dir/<Class>/raw (.gz or not); else downloaded there."""
    cls, split = DATASETS[name], "train" if train else "t10k"
    folders = [Path(data_dir), Path(data_dir, cls.__name__, "raw")]
    found = [next((p for d in folders for p in (d / stem, d / f"{stem}.gz") if p.is_file()), None)
             for stem in (f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte")]
    try:
        images, labels = (download(cls, name, data_dir, train) if None in found else
                          (read_idx(found[0], read_image_file), read_idx(found[1], read_label_file)))
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
    except (OSError, RuntimeError, ValueError, AssertionError, EOFError) as e:
        raise UserError(f"could not read the {name} idx files in {data_dir} (truncated or corrupt? "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); replace them") from e
    # The post's transform, x * 2 - 1, once for the whole uint8 tensor: torchvision's per-image PIL
    # decoding would cost half of a training step (erratum 6).
    return TensorDataset(images.unsqueeze(1).float() / 127.5 - 1, labels)


def read_idx(path: Path, reader) -> Tensor:
    if path.suffix != ".gz":
        return reader(str(path))
    with tempfile.TemporaryDirectory() as tmp:
        return reader(extract_archive(str(path), tmp))


def download(cls, name: str, data_dir: str, train: bool) -> tuple[Tensor, Tensor]:
    """torchvision's download into data_dir; after a failure, no empty folders it made are left behind."""
    print(f"{name} not found in {data_dir}; downloading it there")
    new_root = Path(data_dir).absolute()  # the highest folder that does not exist yet
    while new_root.parent != new_root and not new_root.parent.exists():  # a missing drive is its own parent
        new_root = new_root.parent
    existed = new_root.exists()
    try:
        data = cls(data_dir, train=train, download=True)
    except (OSError, RuntimeError, ValueError) as e:
        if not existed and new_root.parent != new_root:  # never a drive's root
            shutil.rmtree(new_root, ignore_errors=True)
        raise UserError(f"no {name} in {data_dir} and the download failed; offline, put its idx files "
                        f"(train-images-idx3-ubyte and the others, .gz or not) in {data_dir} and run again (for "
                        f"Fashion-MNIST on Debian: apt-get install dataset-fashion-mnist, then --data-dir "
                        f"/usr/share/datasets/fashion-mnist)") from e
    return data.data, data.targets


# ----------------------------------------------------------------------------- Pictures
def save_grid(x: Tensor, path: Path, nrow: int = 8) -> None:
    """A grid of images x (N, C, H, W) in [0, 1], with torchvision's make_grid and save_image."""
    atomic_save(path, lambda f: save_image(make_grid(x, nrow=nrow), f, format="png"))


def pixels(x: Tensor) -> Tensor:
    return (x.float().cpu().clamp(-1, 1) + 1) / 2


def nearest_columns(grid: list[float], cols: int) -> list[int]:
    """The indices of the solver times nearest to `cols` evenly spaced times from 0 to 1."""
    return [min(range(len(grid)), key=lambda j: abs(grid[j] - i / (cols - 1))) for i in range(cols)]


def class_labels(cfg: CFG, per_class: int = 8) -> Tensor | None:
    """0, ..., 0, 1, ..., 1, ...: one row of `per_class` samples per class, or None for an unconditional model."""
    return torch.arange(cfg.num_classes).repeat_interleave(per_class) if cfg.num_classes else None


@torch.inference_mode()
def save_trajectory(model: nn.Module, cfg: CFG, path: Path, labels: Tensor | None = None, cols: int = 9) -> None:
    """One sample per row (6, or one per label), at the `cols` solver times nearest to evenly spaced ones,
    from t=0 (noise) to t=1 (image)."""
    states, grid = [], grid_of(cfg)
    x0 = on_device(noise(cfg, 6 if labels is None else len(labels)), model)
    integrate(guided(model, labels, cfg), x0, cfg.sample_steps, cfg.solver, grid, path=states)
    strip = torch.stack([states[j] for j in nearest_columns(grid, cols)], 1).flatten(0, 1)  # row by row
    save_grid(pixels(strip), path, nrow=cols)


@torch.inference_mode()
def save_interpolations(model: nn.Module, cfg: CFG, path: Path, test_images: Tensor, cols: int = 10) -> None:
    """Two rows: two noises joined by slerp and decoded (digits turning into each other); then two real test
    images encoded to their noises, joined by slerp and decoded (the ends come back as the real images)."""
    a, b = on_device(noise(cfg, 2), model)
    ea, eb = encode(model, on_device(test_images[:2], model), cfg)
    alphas = [i / (cols - 1) for i in range(cols)]
    rows = [torch.stack([slerp(p, q, al) for al in alphas]) for p, q in ((a, b), (ea, eb))]
    save_grid(pixels(integrate(model, torch.cat(rows), cfg.sample_steps, cfg.solver, grid_of(cfg))), path, nrow=cols)


@torch.inference_mode()
def save_straightness(model: nn.Module, cfg: CFG, path: Path, rows: int = 6, cols: int = 9) -> dict:
    """Where each sample is headed, seen from time t: the straight-line guess x_t + (1 - t) v(x_t, t) at
    `cols` - 1 times along the path (columns), for `rows` samples, then the sample itself. Were the flow straight,
    every guess would be the final image; the early guesses are blurred averages, because it curves."""
    states, grid = [], grid_of(cfg)
    x1 = integrate(model, on_device(noise(cfg, rows), model), cfg.sample_steps, cfg.solver, grid, path=states)
    guesses = [states[j] + (1 - grid[j]) * model(states[j], x1.new_full((rows,), grid[j]))
               for j in nearest_columns(grid, cols)[:-1]]
    save_grid(pixels(torch.stack(guesses + [x1], 1).flatten(0, 1)), path, nrow=cols)
    return straightness(model, cfg)


def save_guidance(model: nn.Module, cfg: CFG, path: Path, scales=(0.0, 1.0, 1.5, 2.0, 3.0)) -> None:
    """One row per guidance scale w, one column per class, the same noise in every row: how w trades variety
    for the class asked for."""
    labels = torch.arange(cfg.num_classes)
    rows = [generate(model, replace(cfg, guidance=w), labels) for w in scales]
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


class MLP(nn.Module):
    """A field for points in d dimensions, v(x (B, d), t (B,)) -> (B, d): the 2-D toy's network."""

    def __init__(self, d: int = 2, width: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d + 1, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, d))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(torch.cat([x, t[:, None]], 1))


def two_blobs(n: int, seed: int = 0) -> TensorDataset:
    """The README's 2-D toy: 1/3 of the points around (-2, 0), 2/3 around (2, 0), standard deviation 0.3."""
    g = torch.Generator().manual_seed(seed)
    right = torch.rand(n, generator=g) < 2 / 3
    x = torch.randn(n, 2, generator=g) * 0.3 + torch.where(right, 2.0, -2.0)[:, None] * torch.tensor([1.0, 0.0])
    return TensorDataset(x, right.long())


def straight_paths_2d(n: int = 4000, seed: int = 0) -> dict:
    """The 2-D toy trained three ways, each by fit() with one MLP recipe: independent coupling (the post's), OT
    coupling, and one reflow of the first on n pairs. Returns {name: model}."""
    cfg = CFG(data_shape=(2,), epochs=20, lr=3e-3, ema=0.0, coupling="independent", device="cpu", seed=seed)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        cfg, data = replace(cfg, out_dir=tmp), two_blobs(n, seed)
        independent = fit(cfg, data, MLP())
        models = {"independent": independent, "OT coupling": fit(replace(cfg, coupling="ot"), data, MLP()),
                  "one reflow": reflow(independent, replace(cfg, sample_steps=50), n)}
    return models


def save_straight_paths(models: dict, path: Path, n_paths: int = 32, size: int = 240) -> dict:
    """One panel per model of points in 2-D: the same n_paths noises (green) carried by the model's flow (RK4 x 50,
    white) to their ends (red), x from -4 to 4 and y from -4 to 4. Returns each model's one-step error: how far one
    Euler step from the noise lands from the flow's end, over the distance travelled."""
    x0 = torch.randn(n_paths, 2, generator=torch.Generator().manual_seed(1))
    panels, misses = [], {}
    for name, model in models.items():
        with torch.inference_mode():
            states = []
            x1 = integrate(model, x0, 50, "rk4", path=states)
            misses[name] = ((x0 + model(x0, torch.zeros(n_paths)) - x1).norm(dim=1) / (x1 - x0).norm(dim=1)).mean().item()
        img = torch.zeros(3, size, size)
        dense = torch.stack(states)  # (51, n_paths, 2), each path drawn dot by dot, 8 dots a step
        dense = torch.cat([torch.lerp(dense[:-1], dense[1:], w) for w in torch.linspace(0, 1, 8)[:, None, None, None]], 1)
        dot = torch.tensor([[i, j] for i in (-1, 0, 1) for j in (-1, 0, 1)]) * 8 / size  # 3 x 3 pixels
        ends = [((x[:, None] + dot).reshape(-1, 2), colour) for x, colour in ((x0, [0.2, 1, 0.2]), (x1, [1, 0.3, 0.3]))]
        for points, colour in [(dense.reshape(-1, 2), [1.0, 1.0, 1.0])] + ends:
            px = ((points + 4) / 8 * (size - 1)).round().long().clamp(0, size - 1)
            img[:, size - 1 - px[:, 1], px[:, 0]] = torch.tensor(colour)[:, None]
        panels.append(img)
    atomic_save(path, lambda f: save_image(make_grid(panels, nrow=len(panels), padding=4, pad_value=0.5), f,
                                           format="png"))
    return misses


# ----------------------------------------------------------------------------- Checkpoints
CHECKPOINT_FORMAT = 2  # 2: the RNG state of the device trained on, by its type


def checkpoint(cfg: CFG, model, ema, opt, step: int, device: torch.device) -> dict:
    """Everything a bit-identical resume needs; only tensors and plain types (torch.load weights_only). The
    random state: the CPU's, and that of the one GPU trained on (the noise of training is drawn there)."""
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        rng["mps"] = torch.mps.get_rng_state()
    return {"format": CHECKPOINT_FORMAT, "cfg": asdict(cfg), "step": step, "model": model.state_dict(),
            "ema": ema.state_dict(), "opt": opt.state_dict(), "rng": rng}


def load_checkpoint(path: str) -> dict:
    """A checkpoint as a dict, its cfg with device "auto": a checkpoint trained on one machine loads on the
    device that this one has (a flag typed now still wins)."""
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
    if ckpt.get("format") != CHECKPOINT_FORMAT or unknown:
        raise UserError(f"{path} was written by another version of flow_matching.py" +
                        (f" (unknown settings: {', '.join(sorted(unknown))})" if unknown else ""))
    old = {"optimizer": "adamw", "coupling": "independent"}  # written before these settings existed
    cfg = old | ckpt["cfg"] | {"device": "auto", "data_shape": tuple(ckpt["cfg"]["data_shape"])}
    return ckpt | {"path": path, "cfg": cfg}


PAIRS_FILE = "reflow_pairs.pt"  # beside the checkpoint of a --reflow run
PARTIAL_PAIRS_FILE = "reflow_pairs.partial.pt"  # the pairs made before a Ctrl-C, until all are made


def pairs_id(x1: Tensor) -> list:
    """How many reflow pairs, and the sum of their ends: enough to tell one run's pairs from another's."""
    return [len(x1), x1.double().sum().item()]


def keep_pairs(pairs: TensorDataset, out: Path) -> None:
    """Reflow's pairs beside the checkpoint that trains on them: --resume needs them, and they are costly to make."""
    atomic_save(out / PAIRS_FILE, lambda f: torch.save(pairs.tensors, f))


def make_pairs(teacher: nn.Module, cfg: CFG, n_pairs: int, out: Path) -> TensorDataset:
    """reflow_pairs(teacher, cfg, n_pairs), which take minutes to an hour, kept in out/PAIRS_FILE, and kept if
    interrupted: on Ctrl-C the ends made so far go to out/PARTIAL_PAIRS_FILE, and the same --reflow command
    continues after them. They are used only if made by the same teacher with the same settings, so the pairs
    are those of an uninterrupted run."""
    path, ends = out / PARTIAL_PAIRS_FILE, []
    # What the pairs depend on: the noise (n_pairs, seed), the solver's steps, guidance and the teacher's weights.
    # Not the device: on another one the rest are made there, which changes their rounding only.
    made_by = [n_pairs, cfg.seed, cfg.sample_steps, cfg.guidance, fingerprint(teacher)]
    try:
        kept = torch.load(path, map_location="cpu", weights_only=True)
        if kept["made_by"] == made_by:
            ends = [kept["ends"]]
            print(f"reflow: continuing after the {len(kept['ends'])} pairs kept in {path}")
        else:
            print(f"reflow: the pairs kept in {path} came from another teacher or other settings; they will be "
                  f"replaced")
    except Exception:  # none kept, or unreadable: make them all
        pass
    try:
        pairs = reflow_pairs(teacher, cfg, n_pairs, ends)
        keep_pairs(pairs, out)
    except KeyboardInterrupt:  # while making them, or while keeping them all
        if ends:
            atomic_save(path, lambda f: torch.save({"made_by": made_by, "ends": torch.cat(ends)}, f))
        raise PairsInterrupted(sum(map(len, ends)), n_pairs, path) from None
    path.unlink(missing_ok=True)
    return pairs


def fingerprint(model: nn.Module) -> str:
    """A hash of the model's weights, bit for bit and in order: which teacher made the pairs kept."""
    h = hashlib.sha256()
    for name, w in model.state_dict().items():
        h.update(name.encode())
        h.update(bytes(w.detach().cpu().contiguous().reshape(-1).view(torch.uint8).tolist()))
    return h.hexdigest()


def load_pairs(ckpt: dict) -> TensorDataset:
    """The pairs that the --reflow run of this checkpoint kept beside it, to resume its training on."""
    path = Path(ckpt["path"]).with_name(PAIRS_FILE)
    if ckpt["pairs"] is True:  # written before --reflow kept its pairs
        raise UserError(f"--resume: {ckpt['path']} trained on reflow pairs that were not kept; run --reflow again")
    try:
        pairs = TensorDataset(*torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:
        raise UserError(f"--resume: {ckpt['path']} trained on reflow pairs, kept in {path}, which is missing or "
                        f"unreadable ({type(e).__name__}); run --reflow again") from e
    (n, total), (m, found) = ckpt["pairs"], pairs_id(pairs.tensors[0])
    if n != m or not math.isclose(total, found, rel_tol=1e-9, abs_tol=1e-6):  # summed on another device, maybe
        raise UserError(f"--resume: {path} holds other pairs ({m}) than the {n} that {ckpt['path']} trained on; "
                        f"run --reflow again")
    return pairs


def load_weights(model: nn.Module, state: dict, path: str, cfg: CFG) -> None:
    ours = model.state_dict()
    if state.keys() != ours.keys() or any(state[k].shape != v.shape for k, v in ours.items()):
        raise UserError(f"{path} holds another network than this version's --arch {cfg.arch} with --num-classes "
                        f"{cfg.num_classes} (other tensor names or shapes); use the flow_matching.py that wrote it")
    model.load_state_dict(state)


def restore(ckpt: dict, model, ema, opt, cfg: CFG, device: torch.device) -> int:
    """Load weights, optimizer and random states from a checkpoint dict; return its step. A GPU's random state
    is restored on the same kind of device only; elsewhere the run goes on, no longer bit-identical."""
    load_weights(model, ckpt["model"], ckpt["path"], cfg)
    load_weights(ema, ckpt["ema"], ckpt["path"], cfg)
    opt.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if device.type == "cuda" and "cuda" in ckpt["rng"]:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    elif device.type == "mps" and "mps" in ckpt["rng"]:
        torch.mps.set_rng_state(ckpt["rng"]["mps"])
    return ckpt["step"]


def load_model(ckpt: dict, cfg: CFG) -> nn.Module:
    """The network a checkpoint samples: its weight average (with ema 0 that is a copy of the weights)."""
    model = place(build_model(cfg), pick_device(cfg.device))
    load_weights(model, ckpt["ema"], ckpt["path"], cfg)
    return model.eval()


UMASK = os.umask(0o022)
os.umask(UMASK)


def atomic_save(path: Path, write, tries: int = 5) -> None:
    """write(file) to a temporary file beside `path`, then rename it over `path`: a crash at any moment
    leaves either the old file or the new one, never half of one. On Windows the rename fails while another
    program (a viewer, an antivirus) has `path` open, so it is tried again a few times."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes it private; a normal file respects the umask
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        for attempt in range(tries):
            try:
                os.replace(tmp, path)
                break
            except PermissionError as e:
                if attempt == tries - 1:
                    raise UserError(f"could not replace {path} ({e.strerror}): is another program holding it "
                                    f"open?") from e
                time.sleep(0.1 * 2 ** attempt)
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

    def due(self) -> bool:
        return time.monotonic() - self.t_line >= self.every

    def log(self, step: int, epoch: int, loss: float) -> None:
        now = time.monotonic()
        rate = (step - self.start) / max(now - self.t0, 1e-9)  # steps/s since this run started
        print(f"epoch {epoch + 1} step {step}/{self.last} loss {loss:.4f} {rate * self.batch_size:.0f} img/s, "
              f"{(self.last - step) / rate:.0f}s left", flush=True)
        self.t_line = now


class Interrupted(KeyboardInterrupt):
    def __init__(self, step: int, path: Path):
        super().__init__(step, path)
        self.step, self.path = step, path


class PairsInterrupted(KeyboardInterrupt):
    def __init__(self, done: int, n_pairs: int, path: Path):
        super().__init__(done, n_pairs, path)
        self.done, self.n_pairs, self.path = done, n_pairs, path


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


def quoted(path) -> str:
    """A path as a shell of this system reads it back (spaces, quotes)."""
    return subprocess.list2cmdline([str(path)]) if os.name == "nt" else shlex.quote(str(path))


# ----------------------------------------------------------------------------- The command line
DESCRIPTION = """Train a flow-matching model on MNIST digits (or Fashion-MNIST clothes), then draw new ones from
noise by solving an ODE. Writes samples.png, trajectory.png and checkpoint.pt to --out-dir (fm_out); --reflow also
the pairs it trains on, reflow_pairs.pt, for --resume.

  python flow_matching.py                        train (3 epochs), then sample 64 digits
  python flow_matching.py --max-steps 300        a trial run of a minute or two
  python flow_matching.py --resume               continue after Ctrl-C
  python flow_matching.py --sample-only --solver midpoint --sample-steps 10
  python flow_matching.py --num-classes 10       a model that draws the class asked for (--labels)
  python flow_matching.py --recipe post          the blog post's own settings and network"""
GROUPS = {  # --help's groups, in order; the flags of each, by CFG field or by name
    "the post's settings": ["batch_size", "lr", "epochs", "sigma_min", "sample_steps", "solver", "n_samples",
                            "num_workers", "seed"],
    "beyond the post: network, recipe, guidance": ["arch", "t_dist", "schedule", "optimizer", "ema", "time_shift",
                                                   "precision", "num_classes", "label_drop", "guidance", "coupling"],
    "data": ["dataset", "data_dir"],
}
METAVARS = {int: "N", float: "X", "out_dir": "DIR", "data_dir": "DIR", "device": "NAME", "time_shift": "SHIFT"}
SAMPLING = {"device", "sample_steps", "solver", "n_samples", "out_dir", "time_shift", "guidance", "seed",
            "dataset", "data_dir"}  # the settings --sample-only uses; the others are the checkpoint's


def flag(name: str) -> str:
    return name.replace("_", "-")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the whole usage first; one line says more
        self.exit(2, f"error: {message} (see --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help as written, with no flag name broken at its hyphen across two lines."""

    def _split_lines(self, text, width):
        return textwrap.wrap(text, width, break_on_hyphens=False)


def parse_args(argv=None) -> argparse.Namespace:
    """Every CFG field but data_shape is a flag. Only the flags typed end up in the namespace, so that they
    override the recipe or the checkpoint's config as well as CFG's defaults."""
    p = OneLineParser(description=DESCRIPTION, formatter_class=HelpFormatter, argument_default=argparse.SUPPRESS,
                      usage="python flow_matching.py [options]")
    run = p.add_argument_group("running it")
    run.add_argument("--recipe", choices=list(RECIPES), help="start from the post's settings instead of the defaults")
    run.add_argument("--resume", action="store_true", help="continue training from --checkpoint")
    run.add_argument("--sample-only", action="store_true", help="sample from --checkpoint without training")
    run.add_argument("--checkpoint", metavar="PATH", help="to resume or sample from [default: checkpoint.pt in --out-dir]")
    run.add_argument("--labels", metavar="Y,Y,...", help="draw these classes (a model trained with --num-classes)")
    run.add_argument("--figures", action="store_true", help="also save interpolation, straightness, probability "
                     "path, 2-D straight paths and (conditional models) guidance figures")
    run.add_argument("--nll", type=int, metavar="N", help="also print the bits/dim of N test images (RK4)")
    run.add_argument("--reflow", type=int, metavar="N", help="train a straighter model on N noise-to-sample pairs "
                     "of the --checkpoint model, --epochs passes over them (kept in --out-dir for --resume)")
    cfg_fields = {f.name: f for f in fields(CFG)}
    groups = {"running it": ["max_steps", "out_dir", "device", "checkpoint_every"], **GROUPS}
    for title, names in groups.items():
        group = run if title == "running it" else p.add_argument_group(title)
        for name in names:
            f = cfg_fields[name]
            choices = CHOICES.get(name)
            group.add_argument(f"--{flag(name)}", type=type(f.default), choices=choices and list(choices),
                               metavar=None if choices else METAVARS.get(name, METAVARS.get(type(f.default))),
                               help=f"{f.metadata['help']} [default: {f.default}]")
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
    ckpt_path, labels, nll, figures, n_pairs = (args.pop(k, None) for k in ("checkpoint", "labels", "nll", "figures",
                                                                            "reflow"))
    out_ckpt = str(Path(args.get("out_dir", CFG.out_dir), "checkpoint.pt"))
    if n_pairs is not None:
        if n_pairs <= 0:
            raise UserError(f"--reflow {n_pairs}: must be greater than 0 (noise-to-sample pairs)")
        if not ckpt_path:
            raise UserError("--reflow needs --checkpoint TEACHER, the trained model whose flow it straightens")
        if resume or sample_only or recipe:
            raise UserError(f"--reflow trains a new model from its teacher's settings: drop --"
                            f"{'resume' if resume else 'sample-only' if sample_only else 'recipe'}"
                            + " (an interrupted reflow resumes with --resume --checkpoint OUT/checkpoint.pt)" * resume)
        if Path(ckpt_path).resolve() == Path(out_ckpt).resolve():
            raise UserError(f"--reflow would overwrite its teacher {ckpt_path}: choose another --out-dir")
    ckpt_path = ckpt_path or out_ckpt
    if resume and sample_only:
        raise UserError("--resume trains and --sample-only does not: choose one")
    if recipe and (resume or sample_only):
        raise UserError("--recipe starts a new run; a checkpoint already holds its settings")
    if resume and (fixed := [k for k in ("batch_size", "seed", "dataset") if k in args]):
        raise UserError(f"--{flag(fixed[0])}: a resumed run keeps its checkpoint's, or its data order would change")
    if resume and "optimizer" in args:
        raise UserError("--optimizer: a resumed run keeps its checkpoint's, whose state it continues")
    if sample_only and args.keys() - SAMPLING:
        raise UserError(f"--{flag(sorted(args.keys() - SAMPLING)[0])} is a training setting; --sample-only uses "
                        f"the checkpoint's")
    if nll is not None and nll <= 0:
        raise UserError(f"--nll {nll}: must be greater than 0")
    if resume or sample_only or n_pairs:
        ckpt = load_checkpoint(ckpt_path)
        cfg = CFG(**{**ckpt["cfg"], **args})  # the checkpoint's config, then the flags typed now
    else:
        ckpt, cfg = None, CFG(**{**RECIPES.get(recipe, {}), **args})
        if recipe:
            print(f"recipe {recipe}: " + ", ".join(f"--{flag(k)} {v}" for k, v in RECIPES[recipe].items() if k not in args))
    validate(cfg)
    labels = parse_labels(labels, cfg) if labels else class_labels(cfg)
    out = writable_dir(cfg.out_dir)
    t0, pairs = time.monotonic(), None  # pairs: a reflow's (x1, label, x0), kept in out/PAIRS_FILE
    if sample_only:
        model = load_model(ckpt, cfg)
    elif n_pairs:
        print(f"reflow: {n_pairs} pairs from {ckpt_path}, then training on them, writing to {out}/")
        teacher = load_model(ckpt, cfg)
        pairs = make_pairs(teacher, cfg, n_pairs, out)
        model = reflow(teacher, cfg, n_pairs, pairs=pairs)
    else:
        if resume and ckpt.get("pairs"):  # a reflow's checkpoint; its cfg has reflow's t ~ U[0, 1]
            pairs = load_pairs(ckpt)
            if Path(ckpt["path"]).parent.resolve() != out.resolve():
                keep_pairs(pairs, out)  # beside the checkpoint this run writes, for its own --resume
        data = cfg.dataset if pairs is None else f"{len(pairs)} reflow pairs"
        print(f"training {cfg.arch} on {data} ({pick_device(cfg.device)}), writing to {out}/")
        model = fit(cfg, pairs, resume=ckpt)
    x = generate(model, cfg, labels)
    save_grid(x, out / "samples.png", nrow=8)
    save_trajectory(model, cfg, out / "trajectory.png", None if labels is None else labels.unique())
    written = ["samples.png", "trajectory.png"] + ([] if sample_only else ["checkpoint.pt"])
    written += [PAIRS_FILE] if pairs is not None else []
    if figures:
        test = load_dataset(cfg.dataset, cfg.data_dir, train=False).tensors[0]
        save_interpolations(model, cfg, out / "interpolation.png", test)
        s = save_straightness(model, cfg, out / "straightness.png")
        save_probability_path(out / "probability_path.png")
        misses = save_straight_paths(straight_paths_2d(), out / "straight_paths.png")
        written += ["interpolation.png", "straightness.png", "probability_path.png", "straight_paths.png"]
        if n_pairs:
            save_straightness(teacher, cfg, out / "straightness_teacher.png")
            written.append("straightness_teacher.png")
        if cfg.num_classes:
            save_guidance(model, cfg, out / "guidance.png")
            written.append("guidance.png")
        print(f"straightness {s['straightness']:.3f} (0: straight lines); one Euler step misses the endpoint by "
              f"{100 * s['one_euler_step_error']:.0f}% of the distance travelled. 2-D toy, one step's miss: "
              + ", ".join(f"{name} {100 * miss:.0f}%" for name, miss in misses.items()))
    what = "sampled" if sample_only else "trained and sampled"
    print(f"{what} in {time.monotonic() - t0:.0f}s: {len(x)} images by {cfg.solver} x {cfg.sample_steps} -> "
          + ", ".join(str(out / w) for w in written))
    if nll:
        report_nll(model, cfg, nll)


def report_nll(model: nn.Module, cfg: CFG, n: int) -> None:
    """Bits/dim of the first n test images: mean, standard error, time per image. A likelihood needs an accurate
    solve, so this is RK4 with cfg.sample_steps steps on even ones (Euler's error flatters it)."""
    cfg = replace(cfg, solver="rk4", time_shift="1")
    x = load_dataset(cfg.dataset, cfg.data_dir, train=False).tensors[0][:n]
    t0 = time.monotonic()
    bpd = torch.cat([bits_per_dim(model, on_device(chunk, model), cfg, seed=i).cpu()
                     for i, chunk in enumerate(x.split(100))]).double()  # float64 on the CPU: MPS has none
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
              f"--resume --checkpoint {quoted(e.path)}", file=sys.stderr)
        return 130
    except PairsInterrupted as e:
        kept = f"the {e.done} made are kept in {e.path}; the same command makes the rest" if e.done else "none was made"
        print(f"\ninterrupted while making reflow pairs ({e.done} of {e.n_pairs}): {kept}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted; the last checkpoint written, if any, is intact", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
