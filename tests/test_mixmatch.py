"""train_mixmatch.py: the MixMatch pieces (sharpen, label guessing, mixup, losses, ramp-up, EMA, labelled subset,
batch streams), its config, the CNN backbones model.py registers for it, and tiny CPU runs (checkpoints evaluate.py
scores, exact resume, the table's layout, DDP)."""

import json
import os
import subprocess
import sys
import urllib.error

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import evaluate
import metrics
import model
import train_mixmatch as tm
from conftest import ROOT, error_line

SMALL = ["--config=cpu_small", "--n_labeled=20", "--steps=6", "--eval_every=3", "--batch_size=16", "--small_width=8",
         "--img_size=32"]


def run(data_dir, out_dir, *args):
    tm.main([*SMALL, f"--data={data_dir}", f"--out_dir={out_dir}", *args])


def read_log(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- MixMatch pieces

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
    mx, mp, lam, perm = tm.mix(x, p, 0.75)
    assert mx.shape == x.shape and mp.shape == p.shape
    own = mp.diagonal()
    assert (own >= 0.5).all()  # lambda' = max(lambda, 1 - lambda)
    assert (own < 1).sum() > n // 2  # rows really are mixed (a row paired with itself keeps weight 1)
    assert torch.allclose(mp.sum(1), torch.ones(n))
    moved = perm != torch.arange(n)  # the returned lambda' and partners are the ones used
    assert torch.allclose(own[moved], lam[moved]) and torch.allclose(mp[moved, perm[moved]], 1 - lam[moved])


def test_mix_mixes_inputs_and_targets_identically():
    torch.manual_seed(1)
    p = torch.softmax(torch.randn(32, 4), 1)
    x = p[:, :, None, None].expand(32, 4, 5, 5).clone()  # each image carries its own target in its pixels
    mx, mp, _, _ = tm.mix(x, p, 0.75)
    assert not torch.allclose(mp, p)
    assert torch.allclose(mx, mp[:, :, None, None].expand_as(mx), atol=1e-6)  # same partners, same lambdas


def test_guess_labels_averages_softmax_over_the_k_views():
    torch.manual_seed(0)
    net = nn.Linear(6, 3)
    views = [torch.randn(10, 6) for _ in range(2)]
    mean = (net(views[0]).softmax(1) + net(views[1]).softmax(1)) / 2
    guess, sharpened = tm.guess_labels(net, views, T=0.5)
    assert torch.allclose(guess, mean, atol=1e-6) and torch.allclose(sharpened, tm.sharpen(mean, 0.5), atol=1e-6)
    assert torch.allclose(tm.guess_labels(net, views, T=1.0)[1], mean, atol=1e-6)
    assert not guess.requires_grad and not sharpened.requires_grad


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
    assert tm.l2_loss(logits, logits.softmax(1)).item() == pytest.approx(0.0, abs=1e-7)  # zero at target = softmax
    # bounded by 2 / num_classes (a one-hot target, all mass on another class), reached at saturated logits
    worst = tm.l2_loss(torch.tensor([[0.0, 0.0, 100.0]]), torch.tensor([[1.0, 0.0, 0.0]]))
    assert worst.item() == pytest.approx(2 / 3)


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
    with pytest.raises(ValueError, match="class 2 has 50 train images, fewer than the 60"):
        tm.labeled_subset(labels, 180, 3, seed=0)


def test_batches_fill_from_a_set_smaller_than_a_batch():
    it = tm.Batches(torch.arange(10, 15), 8, torch.Generator().manual_seed(0))
    seq = torch.cat([next(it) for _ in range(5)])  # 40 draws = 8 full passes over the 5 indices
    assert len(seq) == 40 and torch.bincount(seq - 10).tolist() == [8] * 5
    assert sorted(seq[:5].tolist()) == list(range(10, 15))  # each pass is a permutation


def test_batches_continue_exactly_from_generator_state_and_queue():
    gen = torch.Generator().manual_seed(0)
    it = tm.Batches(torch.arange(7), 3, gen)
    for _ in range(4):  # 12 drawn from two passes of 7: the queue holds 2 of the second pass
        next(it)
    saved = gen.get_state(), it.queue.clone()
    ahead = [next(it) for _ in range(5)]
    again = tm.Batches(torch.arange(7), 3, torch.Generator().set_state(saved[0]), saved[1])
    assert len(saved[1]) == 2 and all(torch.equal(a, next(again)) for a in ahead)


# ----------------------------------------------------------------------------- config

def test_config_preset_then_overrides():
    cfg = tm.parse_config(["--lr=0.5", "--config=cpu_small", "--mixup=false", "--data=d", "--resume"])
    assert cfg["net"] == "small" and cfg["pretrained"] == ""
    assert cfg["lr"] == 0.5 and cfg["mixup"] is False  # explicit value beats the preset
    assert cfg["data_dir"] == "d" and cfg["resume"] is True
    default = tm.parse_config([])
    assert default["select"] == "accuracy" and default["device"] == "auto" and default["augment"] == "weak"
    # cpu_small's augmentation is the list its README numbers were measured with: crop (64-100% area) + flip
    kw = data.augment_settings(cfg["augment"], cfg["augment_kw"])
    assert kw == dict(crop_scale=(0.64, 1.0), rotate_p=0.0, erase_p=0.0, color_p=0.0, blur_p=0.0)


@pytest.mark.parametrize("arg, message", [
    ("--nope=1", "error: unknown key --nope (see --help)"),
    ("--steps=ten", "error: --steps=ten is not an int (default 4096)"),
    ("--mode=semi", "error: --mode=semi is not one of: mixmatch, supervised, full"),
    ("--net=resnet", "error: --net=resnet is not one of: vit, wrn50_2, small"),
    ("--arch=resnet", "error: --arch=resnet is not one of: vit_small_patch8, vit_tiny"),  # train_vit.py's meaning
    ("--net=wrn50_2", "error: --pretrained=facebook/dino-vits8: net=wrn50_2 takes torchvision (its ImageNet "
                      "weights) or nothing (random init); --config=wrn50_2 sets it"),
    ("--select=best", "error: --select=best is not one of: " + ", ".join(metrics.SELECT)),
    ("--config=nope", "error: unknown preset --config=nope (presets: cpu_small, wrn50_2)"),
    ("--augment_kw=blur_kernel=3.5", "error: --augment_kw blur_kernel=3.5 is not an int (default 5)"),
])
def test_config_errors_name_the_problem(arg, message):
    assert error_line(tm.main, [arg]) == message


def test_data_errors_are_one_line_before_training(tiny_data, tmp_path):
    message = error_line(tm.main, ["--data=/nonexistent"])
    assert message.startswith("error: /nonexistent is not a data.py output (no meta.json)")
    message = error_line(tm.main, [f"--data={tiny_data}", "--n_labeled=100000"])
    assert message.startswith("error: --n_labeled=100000: class 0 has ") and message.endswith(
        "train images, fewer than the 50000 labelled ones asked")
    assert error_line(tm.main, [f"--data={tiny_data}", "--n_labeled=20", "--device=cpu", f"--out_dir={tmp_path}",
                     "--pretrained=/nonexistent/model.safetensors"]) == \
        "error: /nonexistent/model.safetensors: no such file or folder"
    assert not os.listdir(tmp_path)  # nothing was written


def test_select_fair_needs_both_groups_in_val(tmp_path_factory, tmp_path):
    gender = str(tmp_path_factory.mktemp("data") / "gender")  # MixMatch's usual task: no group labels at all
    data.main(["synthetic", "--n=120", "--size=32", "--target=Male", "--group=none", f"--out_dir={gender}"])
    assert error_line(tm.main, [f"--data={gender}", "--select=fair"]) == \
        f"error: select=fair needs two or more groups in the val split of {gender}; use --select=accuracy"
    run(gender, tmp_path, "--steps=2", "--eval_every=2", "--n_labeled=10")  # select=accuracy: trains, no fair score
    log = read_log(tmp_path)
    assert [r.get("step") for r in log] == [2, None]
    assert "fair_score" not in log[0] and "fair_score" not in log[1]["test"]


def test_small_and_wrn_archs_round_trip_through_the_registry(tmp_path, monkeypatch):
    """save_checkpoint -> load_checkpoint rebuilds each arch from its metadata and gives the same outputs. The WRN's
    torchvision body is swapped for resnet18 (the same wrapper code: fc head, arch name, config_dict), which saves
    writing and reading 270 MB of Wide-ResNet-50-2 weights."""
    import torchvision

    torch.manual_seed(0)
    small = model.SmallCNN(img_size=40, num_classes=3, width=8)
    small.train()(torch.randn(8, 3, 40, 40) + 1)  # BN running statistics away from their init
    monkeypatch.setattr(torchvision.models, "wide_resnet50_2", lambda weights: torchvision.models.resnet18())
    wrn = model.WideResNet50(img_size=32, num_classes=5)
    for net, config in ((small, {"img_size": 40, "num_classes": 3, "width": 8}),
                        (wrn, {"img_size": 32, "num_classes": 5})):
        path = tmp_path / f"{net.arch}.safetensors"
        model.save_checkpoint(path, net, {"note": "x"})
        back, meta, state = model.load_checkpoint(path)
        assert type(back) is type(net) and back.config_dict() == config and meta == {"note": "x"} and state is None
        x = torch.randn(2, 3, config["img_size"], config["img_size"])
        assert torch.equal(back.eval()(x), net.eval()(x)) and back(x).shape == (2, config["num_classes"])


def test_wrn_offline_gives_one_clear_line(monkeypatch):
    import torchvision

    def offline(**_):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.models, "wide_resnet50_2", offline)
    with pytest.raises(model.UserError, match="--pretrained= "):
        model.WideResNet50(pretrained=True)


def test_imbalance_warning_names_balanced_accuracy():
    c = lambda select: tm.SimpleNamespace(select=select)
    y = torch.tensor([0] * 12 + [1] * 2)
    assert tm.imbalance_warning(c("accuracy"), y, ["no mask", "mask"]) == (
        "warning: the train classes run 1:6 (no mask 12, mask 2); select=accuracy would favour the majority class: "
        "consider --select=balanced_accuracy")
    assert tm.imbalance_warning(c("accuracy"), torch.tensor([0] * 10 + [1] * 2), ["a", "b"]) == ""  # 1:5: not beyond
    assert tm.imbalance_warning(c("balanced_accuracy"), y, ["no mask", "mask"]) == ""


def test_imbalance_warning_is_printed_once_before_any_work(tiny_data, tmp_path, monkeypatch, capsys):
    labels, _ = data.load_labels(tiny_data, "train")
    counts = torch.bincount(labels)
    monkeypatch.setattr(tm, "IMBALANCE", 0.99 * counts.max().item() / counts.min().item())  # tiny_data: "imbalanced"
    run(tiny_data, tmp_path, f"--show={tmp_path / 'a.png'}")  # the cheapest path through the data checks
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and warnings[0].endswith("consider --select=balanced_accuracy")
    run(tiny_data, tmp_path, f"--show={tmp_path / 'a.png'}", "--select=balanced_accuracy")
    assert "warning: " not in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--show=a.png", "--mode=supervised"], "error: --mode=supervised: --show draws a MixMatch step: needs "
                                            "mode=mixmatch"),
    (["--show=a.png", "--mixup=false"], "error: --mixup=False: --show draws MixMatch's mixup: needs mixup=true"),
    (["--show_ckpt=x.safetensors"], "error: --show_ckpt=x.safetensors: the model of --show=PATH.png: pass --show too"),
])
def test_show_config_errors(args, message):
    assert error_line(tm.main, args) == message


# ----------------------------------------------------------------------------- tiny runs

@pytest.fixture(scope="module")
def reference_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ref"
    run(tiny_data, out)
    return out


def test_tiny_run_writes_checkpoints_evaluate_scores(tiny_data, reference_run, tmp_path):
    log = read_log(reference_run)
    assert [r.get("step") for r in log] == [3, 6, None] and "raw" in log[0] and "fair_score" in log[0]
    best_step = log[-1]["best_step"]
    best_row = next(r for r in log if r.get("step") == best_step)
    assert best_row["accuracy"] == max(r["accuracy"] for r in log[:-1])  # select=accuracy
    net, meta, state = model.load_checkpoint(reference_run / "best.safetensors")
    assert net.arch == "small" and meta["n_labeled"] == 20 and len(meta["labeled_indices"]) == 20 and state is None
    assert meta["step"] == best_step and meta["metrics"]["accuracy"] == best_row["accuracy"]
    _, meta, state = model.load_checkpoint(reference_run / "last.safetensors")  # what resume=true reads
    assert state["step"] == 6 and state["history"] == log[:-1] and state["losses"] == [] and state["optimizer"]["state"]
    evaluate.main([f"--ckpt={reference_run / 'best.safetensors'}", f"--data_dir={tiny_data}", f"--out_dir={tmp_path}",
                   "--n_boot=10", "--device=cpu"])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["accuracy"] == pytest.approx(log[-1]["test"]["accuracy"])  # evaluate.py sees the same model
    assert not [f for f in os.listdir(reference_run) if f.endswith(".tmp")]


def test_stop_and_resume_is_bit_identical(tiny_data, reference_run, tmp_path):
    run(tiny_data, tmp_path, "--stop_after=4")  # the "kill": after step 4, between the validations at 3 and 6
    _, _, state = model.load_checkpoint(tmp_path / "last.safetensors")
    assert state["step"] == 4 and len(state["losses"]) == 1 and len(read_log(tmp_path)) == 1
    run(tiny_data, tmp_path, "--resume")
    assert (tmp_path / "log.jsonl").read_text() == (reference_run / "log.jsonl").read_text()
    for name in ("best", "last"):  # the EMA model
        a, b = (model.load_checkpoint(d / f"{name}.safetensors") for d in (tmp_path, reference_run))
        assert same(a[0].state_dict(), b[0].state_dict())
    (_, _, a), (_, _, b) = (model.load_checkpoint(d / "last.safetensors") for d in (tmp_path, reference_run))
    assert same(a["model"], b["model"])  # the raw model
    assert all(same(a["optimizer"]["state"][i], b["optimizer"]["state"][i]) for i in b["optimizer"]["state"])
    assert all(torch.equal(x, y) for k in ("torch", "augment") for x, y in zip(a["rng"][k], b["rng"][k]))


def test_non_finite_loss_stops_with_one_line(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(tm, "l2_loss", lambda *a: torch.tensor(float("nan")))
    assert error_line(tm.main, [*SMALL, f"--data={tiny_data}", f"--out_dir={tmp_path}"]) == \
        "error: non-finite loss at step 1: no checkpoint was written yet"  # issue 23 class 3: said what is there


def spy(monkeypatch, name, calls):
    """Wrap tm.<name> so that every call appends (args, result) to calls."""
    real = getattr(tm, name)

    def wrapper(*args):
        calls.append((args, real(*args)))
        return calls[-1][1]

    monkeypatch.setattr(tm, name, wrapper)


def test_show_draws_the_first_training_step(tiny_data, tmp_path, monkeypatch):
    """--show draws with the functions the training step calls, on the same seeded streams: its batch, views,
    guesses, partners and lambda' are step 1's, bit for bit, and the picture gets exactly what mixmatch_rows returned.
    The lambda' histograms come from mixup_lambdas too, the function mix calls."""
    rows, lambdas, drawn = [], [], []
    spy(monkeypatch, "mixmatch_rows", rows)
    spy(monkeypatch, "mixup_lambdas", lambdas)
    spy(monkeypatch, "plot_step", drawn)
    run(tiny_data, tmp_path / "train", "--stop_after=1")  # training's step 1
    assert len(rows) == 1 and not drawn
    picture = tmp_path / "pictures" / "step.png"
    run(tiny_data, tmp_path / "unused", f"--show={picture}")
    assert len(rows) == 2 and len(drawn) == 1
    (train_args, train_rows), (show_args, show_rows) = rows
    for a, b in zip(train_args[2:], show_args[2:]):  # xl, pl and the K views
        assert all(torch.equal(x, y) for x, y in zip(a, b)) if isinstance(a, list) else torch.equal(a, b)
    for key in ("guess", "q", "x", "p", "lam", "perm"):
        assert torch.equal(getattr(train_rows, key), getattr(show_rows, key)), key
    assert drawn[0][0][-1] is show_rows and drawn[0][0][4] is show_args[2]  # the picture draws what the step used
    n_rows = 16 * 3  # batch_size x (1 + K)
    assert [(n, alpha) for (n, alpha, *_), _ in lambdas] == [(n_rows, 0.75), (n_rows, 0.75), (20000, 0.75 / 4),
                                                             (20000, 0.75), (20000, 3.0)]
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.listdir(picture.parent) == ["step.png"]
    assert not (tmp_path / "unused").exists()  # no training, no run folder


def test_show_ckpt_guesses_with_the_checkpoint(tiny_data, reference_run, tmp_path, monkeypatch):
    """The checkpoint only guesses: the batch, views, partners and lambda' stay step 1's."""
    rows = []
    spy(monkeypatch, "mixmatch_rows", rows)
    ckpt = reference_run / "best.safetensors"
    run(tiny_data, tmp_path, f"--show={tmp_path / 'a.png'}")
    run(tiny_data, tmp_path, f"--show={tmp_path / 'a.png'}", f"--show_ckpt={ckpt}")
    (initial_args, initial), (ckpt_args, guessed) = rows
    assert all(torch.equal(getattr(initial, k), getattr(guessed, k)) for k in ("lam", "perm"))
    assert torch.equal(initial_args[2], ckpt_args[2]) and not torch.equal(initial.guess, guessed.guess)
    guesser = ckpt_args[1]
    # all but BN's batch counter, which the guess pass moves (its running statistics stay: frozen_bn_stats)
    weights = lambda net: {k: v for k, v in net.state_dict().items() if "num_batches_tracked" not in k}
    assert same(weights(guesser), weights(model.load_checkpoint(ckpt)[0])) and guesser.training
    assert error_line(tm.main, [*SMALL, f"--data={tiny_data}", f"--show={tmp_path / 'b.png'}", f"--show_ckpt={ckpt}",
                                "--img_size=40"]) == \
        f"error: --show_ckpt={ckpt} takes 32-pixel inputs: pass --img_size=32"


def test_table_runs_every_row_and_seed_into_out_dir(tmp_path, monkeypatch):
    calls = []

    def fake_train(cfg):
        calls.append(cfg)
        return {"accuracy": 0.5 + 0.1 * cfg["seed"] + 0.2 * (not cfg["mixup"]), "f1": 0.5}

    monkeypatch.setattr(tm, "train", fake_train)
    tm.main(["--table", "--data=data/ssl", "--n_labeled=250", "--table_seeds=2", f"--out_dir={tmp_path}"])
    runs = [(c["out_dir"], c["mode"], c["mixup"], c["seed"], c["table"]) for c in calls]
    tags = [("supervised", "supervised", True), ("mixmatch", "mixmatch", True), ("mixmatch-nomixup", "mixmatch", False),
            ("full", "full", True)]
    assert runs == [(str(tmp_path / f"ssl_250_{tag}_s{s}"), mode, mixup, s, False) for s in (0, 1)
                    for tag, mode, mixup in tags]
    table = (tmp_path / "ssl_table.md").read_text().splitlines()
    assert "Command: `python train_mixmatch.py --data_dir=data/ssl" in table[2] and "--table=True" in table[2]
    rows = [line for line in table if line.startswith("| ") and "±" in line]
    assert [r.split(" | ")[0] for r in rows] == ["| supervised", "| mixmatch", "| mixmatch (no mixup)", "| full"]
    assert rows[2] == "| mixmatch (no mixup) | 0.7500 ± 0.0707 | 0.5000 ± 0.0000 |"  # seeds 0, 1: 0.7, 0.8


def test_ddp_two_gloo_ranks_train_like_one_process(tiny_data, tmp_path):
    """Two gloo ranks with 8 + 8 rows against one process with the global batch of 16: the same weights within
    float rounding. Without randomness that a rank draws for itself: augment=none (each rank has its own augmentation
    stream) and mixup=false (partners come from the rank's own rows); a ViT, which has no batch norm (per-rank batch
    statistics differ from the global batch's); SING, whose per-tensor normalisation keeps float-order differences
    at rounding size (Adam's first steps divide each gradient entry by its own size, so near-zero entries that round
    differently move by up to lr)."""
    args = [f"--data={tiny_data}", "--net=vit", "--pretrained=", "--arch=vit_tiny", "--img_size=32",
            "--augment=none", "--mixup=false", "--opt=sing", "--lr=1e-3", "--n_labeled=20", "--steps=4",
            "--eval_every=2", "--batch_size=16", "--device=cpu", "--amp=none"]
    tm.main([*args, f"--out_dir={tmp_path / 'one'}"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train_mixmatch.py"), *args, f"--out_dir={tmp_path / 'two'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (ema1, _, s1), (ema2, _, s2) = (model.load_checkpoint(tmp_path / d / "last.safetensors") for d in ("one", "two"))
    for a, b in ((ema1.state_dict(), ema2.state_dict()), (s1["model"], s2["model"])):
        assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a)
    assert len(s2["rng"]["torch"]) == 2  # each rank's RNG states, for resume
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [r["n"] for r in two[:-1]] == [40, 40]  # both ranks' validation shards, gathered
    assert [r["accuracy"] for r in one[:-1]] == [r["accuracy"] for r in two[:-1]]
    assert one[-1]["test"]["accuracy"] == two[-1]["test"]["accuracy"]
    for key in ("loss_x", "loss_u"):
        assert [r[key] for r in one[:-1]] == pytest.approx([r[key] for r in two[:-1]], rel=1e-5)
