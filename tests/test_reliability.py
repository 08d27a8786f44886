"""Reliability, round 3 (issue 23): each class of bad input the round found, tested at its root. Every test names
its class; each failed on the code before the fix."""

import os
import subprocess
from types import SimpleNamespace

import pytest
import torch
from safetensors import SafetensorError

import attention
import data
import evaluate
import model
import robust
import run
import train_mixmatch
import train_vit
from conftest import VIT_TINY, error_line

# -----------------------------------------------------------------------------
# class 3: inputs that lie about their own sanity

@pytest.mark.parametrize("main, arg", [
    (train_vit.main, "--lr=inf"), (train_vit.main, "--weight_decay=nan"), (train_vit.main, "--dro_step=inf"),
    (train_vit.main, "--augment_kw=crop_p=inf"), (train_mixmatch.main, "--T=inf"), (train_mixmatch.main, "--lr=-inf"),
    (evaluate.main, "--threshold_tolerance=nan")])
def test_class3_non_finite_numbers_are_refused_at_parse_time(main, arg):
    # inf passes every "> 0" check and nan fails none: both used to run (T=inf made every guess uniform, exit 0)
    message = error_line(main, [arg])
    assert message.endswith(f"={arg.split('=')[-1]} is not a finite number"), message


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_class3_non_finite_weights_are_refused_on_loading(tmp_path, tiny_data, bad):
    net = model.ViT(model.ViTConfig(img_size=32, dim=32, depth=1, heads=2, num_classes=2))
    with torch.no_grad():
        net.blocks[0].mlp.fc1.weight[0, 0] = bad
    ckpt = str(tmp_path / "diverged.safetensors")
    model.save_checkpoint(ckpt, net)
    message = error_line(evaluate.main, ["--ckpt", ckpt, "--data", tiny_data])  # was scored: accuracy 0.80, exit 0
    assert "1 weight tensors hold inf or nan (first: blocks.0.mlp.fc1.weight)" in message
    with pytest.raises(model.UserError, match="hold inf or nan"):  # a pretrained backbone file, the same
        model.load_pretrained(ckpt)


@pytest.mark.parametrize("arch, config, tags, base", [
    ("small", {"net": "small", "pretrained": ""}, ["cnn"], None),  # was: base_model false, a vision-transformer tag
    ("wrn50_2", {"net": "wrn50_2", "pretrained": "torchvision"}, ["cnn", "wide-resnet"], None),
    ("vit", {"init": "dino", "pretrained": "facebook/dino-vits8"}, ["vision-transformer"], "facebook/dino-vits8"),
    ("vit", {"init": "scratch", "pretrained": "facebook/dino-vits8"}, ["vision-transformer"], None)])
def test_class3_model_card_follows_the_real_architecture(tiny_data, tmp_path, arch, config, tags, base):
    yaml = pytest.importorskip("yaml")
    if arch == "vit":
        net = model.ViT(model.ViTConfig(img_size=32, dim=32, depth=1, heads=2, num_classes=2))
    else:
        net = model.SmallCNN(img_size=32, num_classes=2, width=4) if arch == "small" else None
    if net is None:  # the card is read from the checkpoint's metadata; the Wide-ResNet itself is too big to build here
        card = evaluate.model_card({"ckpt": "x", "split": "test", "data": "d", "n": 1, "accuracy": 1.0, "f1": 1.0},
                                   {"config": config}, {"classes": ["a", "b"], "splits": {}}, arch)
    else:
        ckpt = str(tmp_path / "run" / "best.safetensors")
        (tmp_path / "run").mkdir()
        model.save_checkpoint(ckpt, net, meta={"config": config})
        evaluate.main(["--ckpt", ckpt, "--data", tiny_data, "--out", str(tmp_path / "eval"), "--card", "--n_boot=0"])
        card = (tmp_path / "eval" / "README.md").read_text()
    front = yaml.safe_load(str(card).split("---")[1])
    assert [t for t in front["tags"] if t in ("cnn", "wide-resnet", "vision-transformer")] == tags
    assert front.get("base_model") == base


# -----------------------------------------------------------------------------
# class 5: messages

def test_class5_push_to_hub_without_a_network_is_one_line(tiny_data, tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    class ConnectError(Exception):  # as httpx's (newer huggingface_hub releases use httpx): not an OSError
        pass
    net = model.ViT(model.ViTConfig(img_size=32, dim=32, depth=1, heads=2, num_classes=2))
    ckpt = str(tmp_path / "tiny.safetensors")
    model.save_checkpoint(ckpt, net)

    def no_network(self, repo_id, exist_ok):  # what huggingface_hub raises with no route to the Hub
        raise ConnectError("[Errno 101] Network is unreachable")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", no_network)
    message = error_line(evaluate.main, ["--ckpt", ckpt, "--data", tiny_data, "--out", str(tmp_path / "out"),
                                         "--push_to_hub=me/x", "--n_boot=0"])
    assert message.startswith("error: cannot push to the Hub repo me/x (ConnectError)")  # was an httpx traceback


# -----------------------------------------------------------------------------
# class 4: long jobs that die late

def test_class4_a_table_checks_every_row_before_the_first_trains(tiny_data, tmp_path):
    # 320 train faces, the smallest label x group cell 16: subsampling keeps 64, fewer than a batch of 80. The table
    # used to train ERM, reweighting and oversampling first, then stop at the fourth row.
    out = tmp_path / "table"
    message = error_line(robust.main, ["--table=robust", *VIT_TINY, f"--data={tiny_data}", f"--out_dir={out}",
                                       "--batch_size=80", "--table_seeds=1"])
    assert message.startswith("error: robust table row 'subsampling (sampler=subsample)' (seed 0): --batch_size=80 is "
                              "larger than the 64 training samples")
    assert not [f for f in out.rglob("*") if f.is_file()]  # nothing trained (the checks made empty run folders)


def test_class4_a_sweep_checks_every_seed_before_the_first_trains(tiny_data, tmp_path):
    args = [*VIT_TINY, f"--data={tiny_data}", f"--sweep_dir={tmp_path}"]
    assert error_line(train_vit.main, [*args, "--sweep=0 1 0"]) == \
        'error: --sweep=0 1 0: seed 0 is listed twice; each seed is one run'
    (tmp_path / "seed1").mkdir()
    (tmp_path / "seed1" / "log.jsonl").write_text("{}\n")  # an earlier run of seed 1: refused before seed 0 trains
    message = error_line(train_vit.main, [*args, "--sweep=0 1"])
    assert message.startswith(f"error: --sweep seed 1: {tmp_path / 'seed1'} holds an earlier run")
    assert not [f for f in (tmp_path / "seed0").rglob("*") if f.is_file()]  # seed 0 did not train


def test_class5_show_out_png_is_the_file_and_augment_kw_suggests_a_form_that_works(tiny_data, tmp_path):
    grid = tmp_path / "grid.png"
    data.main(["show", tiny_data, f"--out={grid}", "--n_per_cell=1", "--n_aug=1"])
    assert grid.is_file() and grid.read_bytes()[:4] == b"\x89PNG"  # was a folder named grid.png
    message = error_line(data.main, ["show", tiny_data, "--augment_kw=crop_scale=0.5"])
    assert message.endswith("needs 2 comma-separated values, like (0.5,1.0)")  # was "like 0.5,1.0", which fails
    data.main(["show", tiny_data, "--augment_kw=crop_scale=(0.5,1.0)", f"--out={tmp_path / 'ok.png'}",
               "--n_per_cell=1", "--n_aug=1"])  # the suggested form works


# -----------------------------------------------------------------------------
# class 1: file-system faults in every CLI

def test_class1_outputs_that_cannot_be_written_are_one_line_before_the_work(tiny_data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    ckpt = str(tmp_path / "tiny.safetensors")
    model.save_checkpoint(ckpt, model.ViT(model.ViTConfig(img_size=32, dim=32, depth=1, heads=2, num_classes=2)))
    for main, args, what in [
            (train_vit.main, [*VIT_TINY, f"--data={tiny_data}", f"--out_dir={blocker}/run"], "the run"),
            (train_mixmatch.main, ["--config=cpu_small", f"--data={tiny_data}", "--img_size=32", "--n_labeled=40",
                                   f"--out_dir={blocker}/run"], "the run"),
            (evaluate.main, ["--ckpt", ckpt, "--data", tiny_data, f"--out={blocker}/eval"], "the report"),
            (evaluate.main, ["--ckpt", ckpt, "--data", tiny_data, f"--submit={blocker}/sub.txt"], "the submission"),
            (attention.main, ["--ckpt", ckpt, "--data", tiny_data, f"--out={blocker}/maps"], "the attention maps")]:
        message = error_line(main, args)
        assert message.startswith(f"error: cannot write {what} to {blocker}") and "is a file" in message, message
    assert error_line(train_vit.main, [f"--data={tiny_data}", "--out_dir="]).startswith("error: --out_dir=: ")


def test_class1_no_room_for_the_checkpoints_is_refused_before_training(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(run.shutil, "disk_usage", lambda p: SimpleNamespace(free=20_000))  # a 2 MB tmpfs, nearly full
    message = error_line(train_vit.main, [*VIT_TINY, f"--data={tiny_data}", f"--out_dir={tmp_path / 'run'}"])
    assert message.startswith(f"error: {tmp_path / 'run'} has 0.0 MiB free, and its checkpoints needs about")
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_class1_a_disk_that_fills_mid_run_names_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    real, calls = model.save_file, []

    def fills_up(tensors, path, metadata=None):  # epoch 1 writes best and last; epoch 2's writes find the disk full
        calls.append(path)
        if len(calls) > 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real(tensors, path, metadata=metadata)
    monkeypatch.setattr(model, "save_file", fills_up)
    out = tmp_path / "run"
    message = error_line(train_vit.main, [*VIT_TINY, f"--data={tiny_data}", f"--out_dir={out}"])
    assert message.startswith(f"error: cannot write {out}/") and "No space left on device" in message
    assert message.endswith(f"; the last good checkpoint is {out / 'last.safetensors'} (epoch 1)")
    monkeypatch.setattr(model, "save_file", real)
    assert model.load_checkpoint(str(out / "last.safetensors"))[1]["epoch"] == 1  # whole, and epoch 1's
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


# -----------------------------------------------------------------------------
# class 2: group files that lie (the CSV's names and blanks: tests/test_sources_groups.py and test_masks.py)

def test_class2_train_groups_that_leave_one_class_are_refused_before_training(tmp_path):
    out = str(tmp_path / "no_blond_men")
    data.main(["synthetic", "--n=200", "--size=16", "--noise=0", "--cells=0.5,0.2,0.3,0", f"--out_dir={out}"])
    message = error_line(train_vit.main, [*VIT_TINY, "--img_size=16", f"--data={out}", "--train_groups=1",
                                          f"--out_dir={tmp_path / 'run'}"])
    assert message.startswith("error: --train_groups=1 leaves one class in the train split "
                              "(not (Blond_Hair ^ Eyeglasses): ")  # was: trained on the men, with one class
    assert not (tmp_path / "run" / "log.jsonl").exists()


@pytest.mark.parametrize("owner", ["not_ours", "own_pid"])
def test_class5_a_lock_whose_pid_is_no_run_of_ours_is_taken_over(tmp_path, capsys, owner):
    # a live pid that is some other program (pids are reused), or this process's own pid in a lock it never took (a
    # container restarted after kill -9 hands out the same small pids): both used to block the run for good
    other = subprocess.Popen(["sleep", "60"]) if owner == "not_ours" else None
    try:
        pid = other.pid if other else os.getpid()
        (tmp_path / ".lock").write_text(str(pid))
        with run.run_dir(str(tmp_path)):
            assert (tmp_path / ".lock").read_text() == str(os.getpid())
        why = "is no run of this repo" if other else "is this process's own, left by a killed run"
        assert f"taking over {tmp_path / '.lock'}: its pid {pid} {why}" in capsys.readouterr().out
    finally:
        if other:
            other.kill()
            other.wait()


def test_class1_a_submission_into_a_missing_folder_is_written(tiny_data, tmp_path):
    ckpt = str(tmp_path / "tiny.safetensors")
    model.save_checkpoint(ckpt, model.ViT(model.ViTConfig(img_size=32, dim=32, depth=1, heads=2, num_classes=2)))
    sub = tmp_path / "new" / "folder" / "submission.txt"  # was a FileNotFoundError traceback
    evaluate.main(["--ckpt", ckpt, "--data", tiny_data, f"--submit={sub}", "--n_boot=0"])
    assert len(sub.read_text().splitlines()) == data.read_meta(tiny_data)["splits"]["test"]["n"]


def test_class1_a_disk_full_between_best_and_last_names_best(tiny_data, tmp_path, monkeypatch):
    real = model.save_file

    def fills_up(tensors, path, metadata=None):  # epoch 1: best.safetensors fits, last.safetensors does not
        if path.startswith(str(tmp_path / "run" / "last.safetensors")):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real(tensors, path, metadata=metadata)
    monkeypatch.setattr(model, "save_file", fills_up)
    message = error_line(train_vit.main, [*VIT_TINY, f"--data={tiny_data}", f"--out_dir={tmp_path / 'run'}"])
    # was "no checkpoint was written yet", beside a best.safetensors
    assert message.endswith(f"; the last good checkpoint is {tmp_path / 'run' / 'best.safetensors'} (the first "
                            "weights, with no state to resume from)")
