"""
How good are a checkpoint's samples? Scores them the way the team's bench does, from this repository alone.

    python evaluate.py --checkpoint fm_out/checkpoint.pt
    python evaluate.py --checkpoint fm_out/checkpoint.pt --guidance 0,1,2,3 --n-samples 2000

A small LeNet classifier is trained once on the dataset's own training split (about a minute on a CPU) and
cached beside the data (or in ~/.cache/flow_matching when that folder is read-only). Then, for each
sampling setting (comma lists of --solver, --sample-steps and --guidance make a table):
  FD       Frechet distance between Gaussians fitted to the classifier's 128 penultimate features of the
           samples and of the 10,000 test images (lower is better; the floor line shows real training
           images scored the same way). It is FID's recipe with a LeNet, so comparable only to itself.
  conf     the classifier's mean confidence on the samples (ambiguous or malformed ones lower it)
  KL       KL divergence of the classes it reads from uniform (0: every class equally often)
  label    for a conditional model: the share of samples read as the class asked for
Samples of a conditional model ask for the classes 0, 1, ..., 9, 0, 1, ... in turn.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import flow_matching as fm


class LeNet(nn.Module):
    """The bench's evaluator: two 5x5 convolutions, a 128-d feature layer, ten classes. x in [0, 1]."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 32, 5), nn.Conv2d(32, 64, 5)
        self.fc, self.head = nn.Linear(64 * 4 * 4, 128), nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.c1((x - 0.5) / 0.5)), 2)
        h = F.max_pool2d(F.relu(self.c2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))  # (N, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def classifier(cfg: fm.CFG, epochs: int = 3) -> tuple[LeNet, float]:
    """The LeNet for cfg.dataset: loaded from its cache, or trained (seed 0, Adam) on the training split and
    cached. Returns it with its accuracy on the test split."""
    name = f"flow_matching_lenet_{cfg.dataset}.pt"
    caches = [Path(cfg.data_dir, name), Path.home() / ".cache" / "flow_matching" / name]
    net = LeNet()
    test_x, test_y = pixels_and_labels(cfg, train=False)
    for path in caches:
        if path.is_file():
            net.load_state_dict(torch.load(path, weights_only=True))
            return net.eval(), accuracy(net.eval(), test_x, test_y)
    x, y = pixels_and_labels(cfg, train=True)
    print(f"training the {cfg.dataset} classifier on {len(x)} images (once; it is cached)", flush=True)
    torch.manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(128):
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    for path in caches:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fm.atomic_save(path, lambda f: torch.save(net.state_dict(), f))
            print(f"cached it in {path}")
            break
        except OSError:
            continue
    return net.eval(), accuracy(net.eval(), test_x, test_y)


def pixels_and_labels(cfg: fm.CFG, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    data = fm.load_dataset(cfg.dataset, cfg.data_dir, train=train)
    return (data.tensors[0] + 1) / 2, data.tensors[1]  # images back in [0, 1], as sample() returns them


@torch.inference_mode()
def accuracy(net: LeNet, x: torch.Tensor, y: torch.Tensor) -> float:
    return (torch.cat([net(c) for c in x.split(1000)]).argmax(1) == y).float().mean().item()


@torch.inference_mode()
def features_and_probs(net: LeNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    feats = torch.cat([net.features(c) for c in x.split(1000)])
    return feats.double(), F.softmax(net.head(feats), 1).double()


def frechet(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """|mu1 - mu2|^2 + Tr S1 + Tr S2 - 2 Tr (S1^1/2 S2 S1^1/2)^1/2, in float64 by symmetric eigendecompositions."""
    mu1, mu2, s1, s2 = f1.mean(0), f2.mean(0), torch.cov(f1.T), torch.cov(f2.T)
    w, v = torch.linalg.eigh(s1)
    root1 = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2) ** 2).sum().item() + (s1.trace() + s2.trace() - 2 * cross).item()


def scores(net: LeNet, reference: torch.Tensor, x: torch.Tensor, labels: torch.Tensor | None) -> dict:
    f, p = features_and_probs(net, x)
    hist = torch.bincount(p.argmax(1), minlength=10).double() / len(x)
    nz = hist > 0
    row = {"fd": frechet(f, reference), "conf": p.max(1).values.mean().item(),
           "kl": (hist[nz] * (hist[nz] * 10).log()).sum().item(), "class_hist": hist.tolist()}
    if labels is not None:
        row["label"] = (p.argmax(1) == labels).double().mean().item()
    return row


def parse_args(argv=None):
    p = fm.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="fm_out/checkpoint.pt", help="[default: fm_out/checkpoint.pt]")
    p.add_argument("--n-samples", type=int, default=2000, help="samples per setting [default: 2000]")
    p.add_argument("--solver", help="comma list [default: the checkpoint's]")
    p.add_argument("--sample-steps", help="comma list [default: the checkpoint's]")
    p.add_argument("--guidance", help="comma list of guidance scales w (conditional models) [default: the checkpoint's]")
    p.add_argument("--time-shift", help="auto or a number [default: the checkpoint's]")
    p.add_argument("--seed", type=int, help="sampling seed [default: the checkpoint's]")
    p.add_argument("--dataset", choices=list(fm.DATASETS), help="[default: the checkpoint's]")
    p.add_argument("--data-dir", help="[default: the checkpoint's]")
    p.add_argument("--device", help="[default: auto, whatever device the checkpoint was trained on]")
    p.add_argument("--json", metavar="PATH", help="also write the table here")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    ckpt = fm.load_checkpoint(args.checkpoint)
    base = {**ckpt["cfg"], "n_samples": args.n_samples, **{k: v for k, v in vars(args).items() if v is not None and
                                                            k in ("time_shift", "seed", "dataset", "data_dir", "device")}}
    cfg = fm.CFG(**base)
    fm.validate(cfg)
    try:
        grid = [(solver, int(steps), float(w)) for solver in (args.solver or cfg.solver).split(",")
                for steps in (args.sample_steps or str(cfg.sample_steps)).split(",")
                for w in (args.guidance or str(cfg.guidance)).split(",")]
    except ValueError as e:
        raise fm.UserError(f"--sample-steps and --guidance take comma lists of numbers ({e})") from None
    model = fm.load_model(ckpt, cfg)
    net, acc = classifier(cfg)
    test_x, _ = pixels_and_labels(cfg, train=False)
    reference, _ = features_and_probs(net, test_x)
    train_x, _ = pixels_and_labels(cfg, train=True)
    real = train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))[:args.n_samples]]
    floor = scores(net, reference, real, None)
    print(f"{cfg.dataset} classifier: test accuracy {acc:.4f}; floor: {len(real)} real training images score "
          f"FD {floor['fd']:.2f}, conf {floor['conf']:.3f}, KL {floor['kl']:.4f}")
    labels = torch.arange(args.n_samples) % cfg.num_classes if cfg.num_classes else None
    print(f"{'solver':<9}{'steps':>6}{'guidance':>9}{'FD':>9}{'conf':>7}{'KL':>8}" + ("   label" if labels is not None else "")
          + "   sampling s")
    rows = []
    for solver, steps, w in grid:
        run_cfg = fm.CFG(**{**base, "solver": solver, "sample_steps": steps, "guidance": w})
        t0 = time.monotonic()
        x = fm.generate(model, run_cfg, labels)
        row = {"solver": solver, "steps": steps, "guidance": w, **scores(net, reference, x, labels),
               "sample_s": round(time.monotonic() - t0, 1)}
        rows.append(row)
        print(f"{solver:<9}{steps:>6}{w:>9g}{row['fd']:>9.2f}{row['conf']:>7.3f}{row['kl']:>8.4f}"
              + (f"{row['label']:>8.3f}" if labels is not None else "") + f"{row['sample_s']:>10.1f}", flush=True)
    if args.json:
        out = {"checkpoint": args.checkpoint, "classifier_accuracy": acc, "floor": floor, "rows": rows}
        fm.atomic_save(Path(args.json), lambda f: f.write(json.dumps(out, indent=1).encode()))


if __name__ == "__main__":
    try:
        main()
    except fm.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
