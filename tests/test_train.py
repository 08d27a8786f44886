"""train_vit.py: config parsing, the recipe's pieces, and tiny CPU runs (checkpoints, determinism, resume, DDP)."""

import math
import os
import subprocess
import sys

import pytest
import torch

import model
import run
import train_vit
from conftest import ROOT, error_line, read_log, run_vit, weights
from conftest import VIT_TINY as TINY


@pytest.fixture(scope="module")
def reference_run(tiny_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "ref")
    run_vit(tiny_data, out)
    return out


# -----------------------------------------------------------------------------
# config

def test_config_overrides_presets_and_types():
    cfg = train_vit.parse_config(["--lr=0.1", "--config=demo", "--epochs=3", "--resume=true", "--data=d"])
    assert cfg["lr"] == 0.1 and cfg["epochs"] == 3 and cfg["resume"] is True and cfg["data_dir"] == "d"
    assert cfg["init"] == "scratch" and cfg["img_size"] == 80  # from the demo preset, whatever the argument order
    assert train_vit.parse_config([])["opt"] == "sing"
    recipe = train_vit.parse_config(["--config=recipe"])
    assert (recipe["init"], recipe["img_size"], recipe["lr"], recipe["weight_decay"], recipe["batch_size"],
            recipe["epochs"], recipe["warmup"], recipe["loss"], recipe["smoothing"]) == \
        ("dino", 224, 5e-4, 5e-3, 64, 10, 0.05, "bce_smooth", 0.1)


@pytest.mark.parametrize("arg, message", [
    ("--nope=1", "unknown key --nope"),
    ("--out-dir=x", "did you mean --out_dir?"),
    ("--epochs=2.5", "--epochs=2.5 is not an int"),
    ("--lr=fast", "--lr=fast is not a float"),
    ("--group_weights=1,x", "--group_weights=x is not a float"),
    ("--augment=strong", "--augment=strong is not one of: full, weak, none"),
    ("--resume=maybe", "is not a bool"),
    ("--loss=mse", "--loss=mse is not one of"),
    ("--config=fast", "unknown preset"),
    ("epochs=2", "expected --key=value"),
])
def test_config_errors(arg, message):
    assert message in error_line(train_vit.main, [arg])


# -----------------------------------------------------------------------------
# the recipe's pieces

def test_schedule_matches_transformers_cosine_with_warmup():
    transformers = pytest.importorskip("transformers")
    c = train_vit.SimpleNamespace(lr=5e-4, warmup=0.05)
    total = 200
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=5e-4)
    sched = transformers.get_cosine_schedule_with_warmup(opt, 0.05 * total, total)
    for it in range(total):
        assert train_vit.lr_at(c, it, total) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        sched.step()
    assert train_vit.lr_at(c, 0, total) == 0 and train_vit.lr_at(c, 10, total) == pytest.approx(5e-4)


def test_bce_smooth_loss_by_hand():
    c = lambda **kw: train_vit.SimpleNamespace(**{"loss": "bce_smooth", "smoothing": 0.1, "group_weights": "", **kw})
    objective = lambda **kw: train_vit.Objective(c(**kw), None, None, 2, 2, "cpu")
    logits, y, g = torch.tensor([[2.0, -1.0], [0.5, 0.5]]), torch.tensor([0, 1]), torch.tensor([0, 1])
    bce = lambda z, t: -(t * math.log(1 / (1 + math.exp(-z))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-z))))
    expected = bce(2.0, 0.9) + bce(-1.0, 0.1) + bce(0.5, 0.1) + bce(0.5, 0.9)  # summed, 0.9 / 0.1 targets
    assert objective()(logits, y, g).item() == pytest.approx(expected, rel=1e-6)
    # a weight per (label, group) cell: sample 0 is cell (0, 0), sample 1 is cell (1, 1)
    weighted = objective(group_weights="2,1,1,0")(logits, y, g)
    assert weighted.item() == pytest.approx(2 * (bce(2.0, 0.9) + bce(-1.0, 0.1)), rel=1e-6)
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
    assert objective(loss="focal", focal_gamma=0.0)(logits, y, g).item() == pytest.approx(ce.item(), rel=1e-6)
    assert objective(loss="ce")(logits, y, g).item() == pytest.approx(ce.item(), rel=1e-6)
    assert objective().state_dict() == {} and objective().log(["women", "men"]) == {}  # no state but Group DRO's


def test_cells_of_three_groups_stay_apart():
    # 2 classes x 3 groups: cell y * 3 + g, so (0, 2) and (1, 0) are different cells (2y + g merged them)
    labels, groups = torch.tensor([0, 0, 1, 1, 1, 0]), torch.tensor([2, 2, 0, 1, 1, 0])
    assert train_vit.cell_index(labels, groups, 3).tolist() == [2, 2, 3, 4, 4, 0]
    w = train_vit.inverse_cell_weights(labels, groups, 6, 3)
    assert w.tolist() == pytest.approx([6 / (4 * 1), 0, 6 / (4 * 2), 6 / (4 * 1), 6 / (4 * 2), 0])
    c = train_vit.SimpleNamespace(loss="group_dro", group_weights="", dro_adjust=0.0, dro_step=0.5)
    objective = train_vit.Objective(c, labels, groups, 2, 3, "cpu")
    assert objective.q.tolist() == pytest.approx([1 / 6] * 6)
    objective(torch.zeros(6, 2), labels, groups)  # equal losses: the four non-empty cells rise alike
    q = objective.q.tolist()
    assert q[1] == q[5] < q[0] == q[2] == q[3] == q[4]
    assert list(objective.log(["a", "b", "c"])["dro_weights"]) == ["0 / a", "0 / b", "0 / c", "1 / a", "1 / b", "1 / c"]


def test_group_weights_count_follows_the_data(tiny_data, tmp_path):
    message = error_line(train_vit.main, [f"--data={tiny_data}", f"--out_dir={tmp_path}", "--group_weights=1,2"])
    assert "--group_weights=1,2 needs 4 comma-separated values" in message  # 2 classes x 2 groups


def test_train_indices_balanced_and_groups():
    labels = torch.tensor([0] * 10 + [1] * 4 + [0] * 3 + [1] * 1)
    groups = torch.tensor([0] * 14 + [1] * 4)
    c = lambda **kw: train_vit.SimpleNamespace(**{"train_groups": "", "sampler": "random", "seed": 0, **kw})
    assert train_vit.train_indices(c(), labels, groups) is None
    women = train_vit.train_indices(c(train_groups="0"), labels, groups)
    assert (groups[women] == 0).all() and len(women) == 14
    idx = train_vit.train_indices(c(sampler="balanced"), labels, groups)
    cells = torch.bincount(2 * labels[idx] + groups[idx], minlength=4)
    assert cells.tolist() == [10, 10, 10, 10]  # every cell oversampled to the largest (label 0, women)
    assert set(idx[(labels[idx] == 1) & (groups[idx] == 1)].tolist()) == {17}


def test_param_groups_decay_weights_only():
    net = model.ViT(model.ViTConfig(img_size=32, dim=32, depth=1, heads=2, num_classes=2))
    decay, no_decay = train_vit.param_groups(net, 0.1)
    name = {id(p): n for n, p in net.named_parameters()}
    decay_names, no_decay_names = {name[id(p)] for p in decay["params"]}, {name[id(p)] for p in no_decay["params"]}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert decay_names | no_decay_names == set(name.values()) and not decay_names & no_decay_names
    assert {"blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "head.bias", "norm.weight"} <= no_decay_names
    assert {"blocks.0.attn.qkv.weight", "pos_embed", "cls_token", "patch_embed.proj.weight"} <= decay_names


# -----------------------------------------------------------------------------
# tiny runs

def test_tiny_run_writes_valid_checkpoints(reference_run):
    log = read_log(reference_run)
    assert [h["epoch"] for h in log] == [1, 2]
    for key in ("train_loss", "grad_norm", "accuracy", "group_accuracy", "fair_score", "fair_score_ci", "f1"):
        assert key in log[-1]
    net, meta, state = model.load_checkpoint(os.path.join(reference_run, "best.safetensors"))
    assert meta["metrics"]["fair_score"] == max(h["fair_score"] for h in log)
    assert meta["config"]["dim"] == 32 and meta["data"]["image_size"] == [32, 32] and state is None
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 2)
    _, meta, state = model.load_checkpoint(os.path.join(reference_run, "last.safetensors"))
    assert state["epoch"] == 1 and meta["epoch"] == 2 and len(state["history"]) == 2 and state["optimizer"]["state"]
    with open(os.path.join(reference_run, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in os.listdir(reference_run) if f.endswith(".tmp")]


def test_sweep_reproduces_the_single_run(tiny_data, reference_run, tmp_path):
    # seed 0 of the sweep is the reference run again: identical metrics and weights (determinism on CPU)
    train_vit.main([*TINY, f"--data={tiny_data}", "--sweep=0 1", f"--sweep_dir={tmp_path}"])
    assert read_log(tmp_path / "seed0") == read_log(reference_run)
    a, b = weights(tmp_path / "seed0" / "last.safetensors"), weights(os.path.join(reference_run, "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_log(tmp_path / "seed1") != read_log(reference_run)  # the seed matters
    table = (tmp_path / "sweep.md").read_text()
    assert "| 0 |" in table and "| 1 |" in table and "mean ± std" in table


def test_stop_and_resume_equals_uninterrupted(tiny_data, reference_run, tmp_path):
    run_vit(tiny_data, tmp_path, "--stop_after=1")  # the "kill": one epoch of the 2-epoch schedule
    assert len(read_log(tmp_path)) == 1
    run_vit(tiny_data, tmp_path, "--resume=True")
    assert read_log(tmp_path) == read_log(reference_run)
    a, b = weights(tmp_path / "last.safetensors"), weights(os.path.join(reference_run, "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_augment_kw_keeps_integer_parameters(tiny_data, tmp_path):
    # blur_kernel is an int: cast to 3.0 it would crash conv2d's padding on the first batch
    run_vit(tiny_data, tmp_path, "--epochs=1", "--augment_kw=blur_kernel=3,blur_p=1,crop_scale=(0.3,1.0)")
    assert len(read_log(tmp_path)) == 1
    message = error_line(train_vit.main, [*TINY, f"--data={tiny_data}", f"--out_dir={tmp_path / 'bad'}",
                                          "--augment_kw=blur_kernel=3.5"])
    assert message == "error: --augment_kw blur_kernel=3.5 is not an int (default 5)"


def test_non_finite_loss_stops_and_keeps_last_good(tiny_data, tmp_path, monkeypatch):
    run_vit(tiny_data, tmp_path, "--stop_after=1")
    good = (tmp_path / "last.safetensors").read_bytes()
    monkeypatch.setattr(train_vit.Objective, "__call__", lambda *a: torch.tensor(float("nan"), requires_grad=True))
    message = error_line(train_vit.main, [*TINY, f"--data={tiny_data}", f"--out_dir={tmp_path}", "--resume=True"])
    assert message.startswith("error: non-finite loss") and "epoch 2" in message
    assert message.endswith(f"stopped before the update: the last good checkpoint is {tmp_path / 'last.safetensors'} "
                            "(epoch 1)")
    assert (tmp_path / "last.safetensors").read_bytes() == good
    # in the first epoch nothing is saved yet, and the message says so (issue 23, class 3: it claimed a good epoch)
    message = error_line(train_vit.main, [*TINY, f"--data={tiny_data}", f"--out_dir={tmp_path / 'fresh'}"])
    assert message.endswith("stopped before the update: no checkpoint was written yet")


def test_signal_stops_between_steps_and_resume_finishes_the_run(tiny_data, reference_run, tmp_path, monkeypatch):
    # SIGTERM / Ctrl-C set run.STOP (run.run_dir's handler); here it "arrives" during epoch 2's first step
    real, calls = train_vit.Objective.__call__, []

    def loss_then_signal(*args):
        calls.append(1)
        if len(calls) == 21:  # 320 images / batch 16 = 20 steps per epoch: the first step of epoch 2
            run.STOP.set()
        return real(*args)

    monkeypatch.setattr(train_vit.Objective, "__call__", loss_then_signal)
    with pytest.raises(SystemExit) as e:  # a stop, not an error: the message without the "error: " prefix
        run_vit(tiny_data, tmp_path)
    assert str(e.value.code) == ("stopped by a signal in epoch 2: the last good checkpoint is "
                                 f"{tmp_path / 'last.safetensors'} (epoch 1); continue with --resume=true")
    assert len(read_log(tmp_path)) == 1 and not (tmp_path / ".lock").exists()
    monkeypatch.setattr(train_vit.Objective, "__call__", real)
    run_vit(tiny_data, tmp_path, "--resume=true")
    assert read_log(tmp_path) == read_log(reference_run)  # as if nothing had happened


def test_compiled_training_matches_eager_on_cpu(tiny_data, reference_run, tmp_path):
    """compile=true goes through inductor's CPU backend (gcc): the same losses and weights as the eager reference
    run up to float reassociation in the fused kernels (tolerance 1e-4 relative on losses, 1e-3 on weights)."""
    run_vit(tiny_data, tmp_path, "--compile=true")
    eager, compiled = read_log(reference_run), read_log(tmp_path)
    assert [h["train_loss"] for h in compiled] == pytest.approx([h["train_loss"] for h in eager], rel=1e-4)
    a, b = weights(tmp_path / "last.safetensors"), weights(os.path.join(reference_run, "last.safetensors"))
    assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-4) for k in a)


def test_bf16_autocast_step_on_cpu(tiny_data, reference_run, monkeypatch, tmp_path):
    """amp=bf16 on the CPU: the model's output is bf16, the loss is taken in fp32, SING steps on fp32 gradients
    into fp32 weights and the logged metrics are plain floats; the first epoch's loss is the fp32 run's within 5%."""
    seen, real_loss, real_forward = {}, train_vit.Objective.__call__, model.ViT.forward

    def loss_spy(self, logits, y, g):
        loss = real_loss(self, logits, y, g)
        seen.setdefault("loss", (logits.dtype, loss.dtype))
        return loss

    def forward_spy(self, x, *args, **kwargs):
        out = real_forward(self, x, *args, **kwargs)
        seen.setdefault("output", out.dtype)
        return out

    monkeypatch.setattr(train_vit.Objective, "__call__", loss_spy)
    monkeypatch.setattr(model.ViT, "forward", forward_spy)
    run_vit(tiny_data, tmp_path, "--amp=bf16", "--stop_after=1")
    assert seen == {"output": torch.bfloat16, "loss": (torch.float32, torch.float32)}
    net, _, state = model.load_checkpoint(str(tmp_path / "last.safetensors"))
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in net.parameters())
    assert all(v.dtype == torch.float32 for s in state["optimizer"]["state"].values() for v in s.values()
               if torch.is_tensor(v) and v.is_floating_point())
    log = read_log(tmp_path)[0]
    assert isinstance(log["accuracy"], float) and isinstance(log["fair_score"], float)
    assert log["train_loss"] == pytest.approx(read_log(reference_run)[0]["train_loss"], rel=0.05)


def test_ddp_two_gloo_ranks_train_like_one_process(tiny_data, tmp_path):
    # same global batch (16 = 2 x 8), no augmentation (each rank draws its own), rank-strided data shards
    args = [*TINY, f"--data={tiny_data}", "--augment=none"]
    train_vit.main([*args, f"--out_dir={tmp_path / 'one'}"])
    # PYTHONFAULTHANDLER: a rank that aborts in native code (seen once under heavy load: "terminate called without an
    # active exception") prints every thread's Python stack, so the stderr below says where it was
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train_vit.py"), *args, f"--out_dir={tmp_path / 'two'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = weights(tmp_path / "one" / "last.safetensors"), weights(tmp_path / "two" / "last.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [h["accuracy"] for h in one] == [h["accuracy"] for h in two]
    assert [h["n"] for h in two] == [40, 40]  # the two ranks' validation shards were gathered, not one rank's
    assert [h["train_loss"] for h in one] == pytest.approx([h["train_loss"] for h in two], rel=1e-4)
