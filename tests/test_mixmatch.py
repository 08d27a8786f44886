"""MixMatch pieces (sharpen, label guessing, mixup, losses, ramp-up, EMA, labelled subset), the CNN backbones
model.py registers for it, and a tiny end-to-end run whose checkpoint evaluate.py scores."""
import json
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import evaluate
import model
import train_mixmatch as tm

REPO = Path(__file__).resolve().parents[1]


def test_sharpen_temperature_limits_and_normalisation():
    p = torch.softmax(torch.randn(8, 5), 1)
    assert torch.allclose(tm.sharpen(p, 1.0), p, atol=1e-6)  # T = 1: identity
    q = tm.sharpen(p, 0.5)
    assert torch.allclose(q.sum(1), torch.ones(8), atol=1e-6)  # rows sum to 1 (over classes, not the batch)
    assert torch.allclose(q, p**2 / (p**2).sum(1, keepdim=True), atol=1e-6)
    assert (q.max(1).values > p.max(1).values).all()  # lower entropy, same argmax
    assert torch.equal(q.argmax(1), p.argmax(1))
    assert torch.allclose(tm.sharpen(p, 1e-4), F.one_hot(p.argmax(1), 5).float())  # T -> 0: one-hot, no NaN


def test_mix_keeps_shapes_and_each_row_mostly_itself():
    torch.manual_seed(0)
    n = 64
    p = torch.eye(n)  # row i is "itself" in column i
    x = torch.randn(n, 3, 4, 4)
    mx, mp = tm.mix(x, p, 0.75)
    assert mx.shape == x.shape and mp.shape == p.shape
    own = mp.diagonal()
    assert (own >= 0.5).all()  # lambda' = max(lambda, 1 - lambda)
    assert (own < 1).sum() > n // 2  # rows really are mixed (a row paired with itself keeps weight 1)
    assert torch.allclose(mp.sum(1), torch.ones(n))


def test_mix_mixes_inputs_and_targets_identically():
    torch.manual_seed(1)
    p = torch.softmax(torch.randn(32, 4), 1)
    x = p[:, :, None, None].expand(32, 4, 5, 5).clone()  # each image carries its own target in its pixels
    mx, mp = tm.mix(x, p, 0.75)
    assert not torch.allclose(mp, p)
    assert torch.allclose(mx, mp[:, :, None, None].expand_as(mx), atol=1e-6)  # same partners, same lambdas


def test_guess_labels_averages_softmax_over_the_k_views():
    torch.manual_seed(0)
    net = nn.Linear(6, 3)
    views = [torch.randn(10, 6) for _ in range(2)]
    mean = (net(views[0]).softmax(1) + net(views[1]).softmax(1)) / 2
    assert torch.allclose(tm.guess_labels(net, views, T=1.0), mean, atol=1e-6)
    assert torch.allclose(tm.guess_labels(net, views, T=0.5), tm.sharpen(mean, 0.5), atol=1e-6)
    assert not tm.guess_labels(net, views, T=0.5).requires_grad


def test_guess_pass_leaves_batchnorm_running_stats_alone():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    bn = net[1]
    before = bn.running_mean.clone(), bn.running_var.clone()
    tm.guess_labels(net, [torch.randn(16, 4) + 3, torch.randn(16, 4) - 1], T=0.5)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert bn.momentum == 0.1  # restored for the training forward
    net(torch.randn(16, 4) + 3)
    assert not torch.equal(bn.running_mean, before[0])


def test_losses():
    logits, y = torch.randn(8, 3), torch.randint(0, 3, (8,))
    assert torch.allclose(tm.soft_cross_entropy(logits, F.one_hot(y, 3).float()), F.cross_entropy(logits, y))
    assert tm.l2_loss(logits, logits.softmax(1)).item() == pytest.approx(0.0, abs=1e-7)
    target = F.one_hot(y, 3).float()
    assert tm.l2_loss(logits, target).item() == pytest.approx(((logits.softmax(1) - target) ** 2).mean().item())


def test_rampup_is_linear_then_flat():
    assert [tm.rampup_weight(s, 100) for s in (0, 25, 50, 100, 400)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert tm.rampup_weight(0, 0) == 1.0


def test_ema_update_parameters_and_buffers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).requires_grad_(False)
    net[1].running_mean.fill_(2.0)
    e0 = [t.clone() for t in ema.parameters()]
    tm.ema_update(ema, net, decay=0.9, step=1000)  # warm-up (1001/1010) above 0.9: the decay itself
    for e, old, p in zip(ema.parameters(), e0, net.parameters()):
        assert torch.allclose(e, 0.9 * old + 0.1 * p, atol=1e-6)
    assert torch.equal(ema[1].running_mean, net[1].running_mean)  # buffers copied
    e1 = [t.clone() for t in ema.parameters()]
    tm.ema_update(ema, net, decay=0.999, step=0)  # step 0: decay min(0.999, 1/10) = 0.1
    for e, old, p in zip(ema.parameters(), e1, net.parameters()):
        assert torch.allclose(e, 0.1 * old + 0.9 * p, atol=1e-6)


def test_decayed_weights_are_conv_and_linear_kernels_only():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    net(torch.zeros(1, 3, 5, 5))
    assert [w.shape for w in tm.decayed_weights(net)] == [net[0].weight.shape, net[3].weight.shape]


def test_labeled_subset_is_balanced_and_reproducible():
    labels = torch.tensor([0] * 500 + [1] * 100 + [2] * 50)[torch.randperm(650)]
    a = tm.labeled_subset(labels, 30, 3, seed=0)
    assert len(a) == len(a.unique()) == 30
    assert torch.bincount(labels[a], minlength=3).tolist() == [10, 10, 10]
    assert torch.equal(a, tm.labeled_subset(labels, 30, 3, seed=0))
    assert not torch.equal(a, tm.labeled_subset(labels, 30, 3, seed=1))
    assert torch.bincount(labels[tm.labeled_subset(labels, 31, 3, seed=0)], minlength=3).tolist() == [11, 10, 10]
    with pytest.raises(ValueError, match="class 2"):
        tm.labeled_subset(labels, 180, 3, seed=0)


def test_batches_fill_from_a_set_smaller_than_a_batch():
    it = tm.batches(torch.arange(10, 15), 8, torch.Generator().manual_seed(0))
    seq = torch.cat([next(it) for _ in range(5)])  # 40 draws = 8 full passes over the 5 indices
    assert len(seq) == 40 and torch.bincount(seq - 10).tolist() == [8] * 5
    assert sorted(seq[:5].tolist()) == list(range(10, 15))  # each pass is a permutation


def test_parse_args_preset_then_overrides():
    defaults = {k: getattr(tm, k) for k in tm.config_keys}
    cfg = tm.parse_args(["--lr=0.5", "--config=cpu_small", "--mixup=false"], defaults)
    assert cfg["arch"] == "small" and cfg["lr"] == 0.5 and cfg["mixup"] is False  # explicit value beats the preset
    for bad in (["--nope=1"], ["--steps=ten"], ["--mode=semi"], ["--config=nope"]):
        with pytest.raises(SystemExit):
            tm.parse_args(bad, defaults)


def test_small_and_wrn_archs_round_trip_through_the_registry(tmp_path):
    net = model.SmallCNN(img_size=40, num_classes=3, width=8)
    assert net(torch.randn(2, 3, 40, 40)).shape == (2, 3)
    model.save_checkpoint(tmp_path / "s.safetensors", net, {"note": "x"})
    back, meta, _ = model.load_checkpoint(tmp_path / "s.safetensors")
    assert back.arch == "small" and back.config_dict() == {"img_size": 40, "num_classes": 3, "width": 8}
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), back.state_dict().values()))
    wrn = model.ARCHS["wrn50_2"]({"img_size": 32, "num_classes": 5})
    assert wrn.arch == "wrn50_2" and wrn.config_dict() == {"img_size": 32, "num_classes": 5}
    assert wrn.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_wrn_offline_gives_one_clear_line(monkeypatch):
    import torchvision

    def offline(**_):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.models, "wide_resnet50_2", offline)
    with pytest.raises(RuntimeError, match="pretrained=False"):
        model.WideResNet50(pretrained=True)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("ssl") / "syn"
    subprocess.run([sys.executable, "data.py", "synthetic", "--n", "600", "--out", str(out)], cwd=REPO, check=True,
                   capture_output=True)
    return out


def test_tiny_mixmatch_run_writes_a_checkpoint_evaluate_scores(tiny_data, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "train_mixmatch.py", "--config=cpu_small", f"--data={tiny_data}", f"--out_dir={run}",
           "--n_labeled=20", "--steps=6", "--eval_every=3", "--batch_size=16", "--small_width=8", "--img_size=32"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows[:-1]] == [3, 6] and "raw" in rows[0] and "fair_score" in rows[0]
    assert rows[-1]["test"]["n"] > 0
    assert (run / "curves.png").stat().st_size > 0 and (run / "last.safetensors").exists()
    net, meta, _ = model.load_checkpoint(run / "best.safetensors")
    assert net.arch == "small" and meta["n_labeled"] == 20 and len(meta["labeled_indices"]) == 20
    evaluate.main(["--ckpt", str(run / "best.safetensors"), "--data", str(tiny_data), "--out", str(tmp_path / "ev"),
                   "--n_boot", "10", "--device", "cpu"])
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["accuracy"] == pytest.approx(rows[-1]["test"]["accuracy"])  # evaluate.py sees the same model


def test_cli_errors_are_one_line(tiny_data):
    for args in (["--data=/nonexistent"], [f"--data={tiny_data}", "--arch=resnet"],
                 [f"--data={tiny_data}", "--n_labeled=20", "--vit_src=/nonexistent/model.safetensors"],
                 [f"--data={tiny_data}", "--n_labeled=100000"]):
        r = subprocess.run([sys.executable, "train_mixmatch.py", *args], cwd=REPO, capture_output=True, text=True)
        assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:")
