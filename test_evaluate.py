"""evaluate.py's measures as properties: the Frechet distance of moved features in closed form, the scores of
predictions known in advance, and the tool end to end on a checkpoint from another machine."""
import json
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import evaluate
import flow_matching as fm
from test_flow_matching import seeds, write_idx


@given(shift=st.floats(-3, 3), scale=st.floats(0.2, 3.0), seed=seeds)
@settings(max_examples=5)
def test_frechet_distance_of_moved_features(shift, scale, seed):
    """evaluate.frechet, |mu1 - mu2|^2 + Tr S1 + Tr S2 - 2 Tr (S1^1/2 S2 S1^1/2)^1/2 on the empirical moments, is 0
    for a feature set against itself, c^2 d for a shift by c in all d coordinates, (s - 1)^2 (|mu|^2 + Tr S)
    for a scaling by s (then S2 = s^2 S1 commutes with S1), and for two 2-D sets whose covariances do not
    commute, Tr (S1^1/2 S2 S1^1/2)^1/2 = sqrt(Tr S1 S2 + 2 sqrt(det S1 S2))."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(500, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 1
    assert evaluate.frechet(f, f) == pytest.approx(0, abs=1e-6)
    assert evaluate.frechet(f, f + shift) == pytest.approx(6 * shift**2, rel=1e-6, abs=1e-6)
    expected = (scale - 1) ** 2 * ((f.mean(0) ** 2).sum() + torch.cov(f.T).trace()).item()
    assert evaluate.frechet(f, scale * f) == pytest.approx(expected, rel=1e-6, abs=1e-6)
    g1, g2 = f[:, :2], f[:, 2:4] @ torch.tensor([[1.0, 0.7], [0.0, 0.4]], dtype=torch.float64)
    s1, s2 = torch.cov(g1.T), torch.cov(g2.T)
    cross = math.sqrt((s1 @ s2).trace() + 2 * math.sqrt(s1.det() * s2.det()))
    expected = ((g1.mean(0) - g2.mean(0)) ** 2).sum() + s1.trace() + s2.trace() - 2 * cross
    assert evaluate.frechet(g1, g2) == pytest.approx(expected.item(), rel=1e-6)


class Logits(nn.Module):
    """A stand-in classifier whose features are an image's first 10 pixels, read as its 10 logits."""

    def __init__(self):
        super().__init__()
        self.head = nn.Identity()

    def features(self, x):
        return x.flatten(1)[:, :10]


def images_read_as(classes: torch.Tensor, logit: float) -> torch.Tensor:
    """Images that Logits reads as `classes`, each with the logit `logit` for its class and 0 for the others."""
    x = torch.zeros(len(classes), 1, 28, 28)
    x.view(len(classes), -1)[torch.arange(len(classes)), classes] = logit
    return x


def test_scores_of_known_predictions():
    """evaluate.scores: conf is the mean top probability, e^L / (e^L + 9) for a logit L against nine zeros;
    KL of the histogram of classes read from uniform is 0 for classes 0..9 in turn and log 10 when every sample
    is read as one class; label is the share read as the class asked for; FD is 0 against the samples' own
    features."""
    classes, net = torch.arange(40) % 10, Logits()
    even = images_read_as(classes, 2.0)
    reference, _ = evaluate.features_and_probs(net, even)
    row = evaluate.scores(net, reference, even, classes)
    assert row["conf"] == pytest.approx(math.exp(2) / (math.exp(2) + 9)) and row["kl"] == pytest.approx(0, abs=1e-12)
    assert row["label"] == 1 and row["class_hist"] == pytest.approx([0.1] * 10) and row["fd"] == pytest.approx(0, abs=1e-6)
    one = evaluate.scores(net, reference, images_read_as(torch.full((40,), 3), 5.0), classes)
    assert one["kl"] == pytest.approx(math.log(10)) and one["label"] == pytest.approx(0.1) and one["fd"] > 1
    assert "label" not in evaluate.scores(net, reference, even, None)


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("idx")
    write_idx(folder, n_train=24)
    return folder


@pytest.fixture(scope="module")
def from_colab(idx_dir, tmp_path_factory):
    """A conditional U-Net after one step of fm.fit, its checkpoint edited to say it was trained on a CUDA GPU."""
    out = tmp_path_factory.mktemp("colab")
    torch.manual_seed(0)
    fm.fit(fm.CFG(num_classes=10, data_dir=str(idx_dir), out_dir=str(out), batch_size=8, max_steps=1, sample_steps=2))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.zeros(16, dtype=torch.uint8)
    torch.save(ckpt | {"cfg": ckpt["cfg"] | {"device": "cuda"}, "rng": ckpt["rng"] | {"cuda": cuda_rng}}, out / "colab.pt")
    return out / "colab.pt"


def test_evaluate_scores_each_setting_with_generate(from_colab, idx_dir, tmp_path, capsys, monkeypatch):
    """evaluate.py on a checkpoint trained on another machine (its cfg says cuda) loads it on this one and
    scores one row per setting asked for (--guidance 0,2), each drawn by fm.generate with that setting and the
    classes 0, 1, ..., 9, 0, ... in turn; the JSON holds the same rows; the classifier is trained once, cached
    beside the data, and loaded from there the next time."""
    monkeypatch.setenv("HOME", str(tmp_path))  # no classifier cached by an earlier run elsewhere
    calls, generate = [], fm.generate
    monkeypatch.setattr(fm, "generate", lambda model, cfg, labels=None: calls.append((cfg, labels)) or generate(model, cfg, labels))
    args = ["--checkpoint", str(from_colab), "--data-dir", str(idx_dir), "--n-samples", "20", "--sample-steps", "2"]
    evaluate.main(args + ["--guidance", "0,2", "--json", str(tmp_path / "e.json")])
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    assert [(r["guidance"], r["steps"], r["solver"]) for r in rows] == [(0.0, 2, "euler"), (2.0, 2, "euler")]
    assert [(cfg.guidance, cfg.sample_steps, cfg.n_samples) for cfg, _ in calls] == [(0.0, 2, 20), (2.0, 2, 20)]
    assert all(torch.equal(labels, torch.arange(20) % 10) for _, labels in calls)
    out = capsys.readouterr().out
    assert "training the mnist classifier" in out and (idx_dir / "flow_matching_lenet_mnist.pt").is_file()
    evaluate.main(args + ["--guidance", "1"])
    assert "training the" not in capsys.readouterr().out and len(calls) == 3


def test_evaluate_bad_lists_are_one_line(from_colab, idx_dir):
    """A --sample-steps or --guidance list that is not numbers is a UserError naming the flags."""
    with pytest.raises(fm.UserError, match="--sample-steps and --guidance"):
        evaluate.main(["--checkpoint", str(from_colab), "--data-dir", str(idx_dir), "--sample-steps", "two"])
