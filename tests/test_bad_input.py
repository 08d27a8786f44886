"""Bad inputs to the training scripts, evaluate.py and attention.py: each ends in one `error:` line, before any
data or model is loaded where no data is needed, and leaves nothing behind that looks finished. (The data builders'
cases live in test_bad_input_data.py.) Most cases run in-process (a SystemExit whose message is one line is what
the CLI prints to stderr); test_cli_prints_one_line_and_no_traceback checks that through a real process."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import attention
import evaluate
import model
import train_mixmatch
import train_vit
from conftest import ROOT, VIT_TINY, error_line

VIT = [*VIT_TINY, "--epochs=1"]
MIXMATCH = ["--config=cpu_small", "--n_labeled=20", "--steps=2", "--eval_every=2", "--batch_size=16",
            "--small_width=8", "--img_size=32"]


@pytest.mark.parametrize("args, expected", [
    (["--lr=-0.001"], "error: --lr=-0.001: the learning rate must be > 0"),
    (["--opt=adamw", "--lr=-1"], "error: --lr=-1.0: the learning rate must be > 0"),
    (["--batch_size=0"], "error: --batch_size=0: must be >= 1"),
    (["--eval_batch_size=0"], "error: --eval_batch_size=0: must be >= 1"),
    (["--epochs=0"], "error: --epochs=0: must be >= 1"),
    (["--img_size=30"], "error: --img_size=30: must be a multiple of the patch size 8"),
    (["--train_groups=women"], "error: --train_groups=women: comma-separated group ids"),
    (["--augment_kw=crop_scale=0.5"], "error: --augment_kw crop_scale=0.5 needs 2 comma-separated values"),
    (["--augment_kw=blur_kernel=3.5"], "error: --augment_kw blur_kernel=3.5 is not an int (default 5)"),
    (["--augment_kw=blur=1"], "error: --augment_kw: 'blur=1' is not name=value with name one of:"),
    (["--warmup=1.5"], "error: --warmup=1.5: must be in [0, 1)"),
    (["--arch=vit_huge"], "error: --arch=vit_huge: one of"),
])
def test_train_vit_config_refused_before_any_work(args, expected, tmp_path):
    # data_dir does not even exist: these are refused before anything is read
    message = error_line(train_vit.main, [*VIT, f"--data={tmp_path / 'none'}", f"--out_dir={tmp_path / 'run'}", *args])
    assert message.startswith(expected), message
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")
def test_cuda_without_a_gpu(tiny_data, tmp_path):
    message = error_line(train_vit.main, [*VIT, "--device=cuda", f"--data={tiny_data}", f"--out_dir={tmp_path}"])
    assert message == "error: --device=cuda but torch sees no CUDA device here; use --device=cpu or auto"


def test_train_vit_data_checks(tiny_data, tmp_path):
    run = lambda *a: error_line(train_vit.main, [*VIT, f"--data={tiny_data}", f"--out_dir={tmp_path / 'run'}", *a])
    assert run("--batch_size=512") == ("error: --batch_size=512 is larger than the 320 training samples; "
                                      "lower it")
    one_class = tmp_path / "one_class"  # a data set whose train split holds one class
    shutil.copytree(tiny_data, one_class)
    meta = json.loads((one_class / "meta.json").read_text())
    meta["splits"]["train"]["cells"] = [c for c in meta["splits"]["train"]["cells"] if c["label"] == 0]
    (one_class / "meta.json").write_text(json.dumps(meta))
    message = error_line(train_vit.main, [*VIT, f"--data={one_class}", f"--out_dir={tmp_path / 'run'}"])
    assert message == f"error: {one_class} has 1 class in its train split: a classifier needs two"
    assert not (tmp_path / "run").exists()


def test_out_dir_with_an_earlier_run_is_refused_and_locked(tiny_data, tmp_path, capsys):
    args = [*VIT, f"--data={tiny_data}", f"--out_dir={tmp_path}"]
    train_vit.main(args)
    log = (tmp_path / "log.jsonl").read_text()
    message = error_line(train_vit.main, args)
    assert message.startswith(f"error: {tmp_path} holds an earlier run (last.safetensors, best.safetensors, "
                              "log.jsonl): pass --resume=true")
    assert (tmp_path / "log.jsonl").read_text() == log  # untouched
    # a second run while another run of this repo holds the lock (a live process whose command names train_vit.py)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "train_vit.py"])
    try:
        cmdline = lambda: open(f"/proc/{other.pid}/cmdline", "rb").read()
        for _ in range(200):  # until the child has exec'd: before that, its command line is this process's
            if b"train_vit.py" in cmdline():
                break
            time.sleep(0.05)
        (tmp_path / ".lock").write_text(str(other.pid))
        assert error_line(train_vit.main, [*args, "--force"]) == (
            f"error: another run (pid {other.pid}) is writing to {tmp_path}; wait for it, or choose another "
            f"--out_dir; if no run is writing there, delete {tmp_path / '.lock'}")
    finally:
        other.kill()
        other.wait()
    # a lock whose process is gone is taken over, with a message; --force replaces the run
    (tmp_path / ".lock").write_text("999999999")
    train_vit.main([*args, "--force"])
    assert "taking over" in capsys.readouterr().out and not (tmp_path / ".lock").exists()


def test_resume_checks_the_saved_config(tiny_data, tmp_path, capsys):
    args = [*VIT, "--epochs=2", f"--data={tiny_data}", f"--out_dir={tmp_path}"]
    train_vit.main([*args, "--stop_after=1"])
    message = error_line(train_vit.main, [*args, "--resume", "--dim=48", "--opt=adamw"])
    assert message == "error: cannot resume with a different dim (saved 32, now 48), opt (saved 'sing', now 'adamw')"
    train_vit.main([*args, "--resume", "--lr=0.001"])  # allowed, and said
    assert "resuming with changed config: lr 0.0005 -> 0.001" in capsys.readouterr().out
    _, _, state = model.load_checkpoint(str(tmp_path / "last.safetensors"))
    assert [c["lr"] for c in state["configs"]] == [5e-4, 1e-3]  # the history of configs is kept
    with open(tmp_path / "last.safetensors", "r+b") as f:  # a truncated file
        f.truncate(1000)
    message = error_line(train_vit.main, [*args, "--resume"])
    assert message.startswith(f"error: cannot resume from {tmp_path / 'last.safetensors'}") and "delete it" in message


@pytest.mark.parametrize("args, expected", [
    (["--steps=0"], "error: --steps=0: must be >= 1"),
    (["--eval_every=0"], "error: --eval_every=0: must be >= 1"),
    (["--n_labeled=-1"], "error: --n_labeled=-1: at least one labelled image per class"),
    (["--n_labeled=0"], "error: --n_labeled=0: at least one labelled image per class"),
    (["--lr=-0.1"], "error: --lr=-0.1: must be > 0"),
    (["--ema_decay=1"], "error: --ema_decay=1.0: must be in [0, 1)"),
])
def test_train_mixmatch_config_refused_before_any_work(args, expected, tmp_path):
    message = error_line(train_mixmatch.main, [*MIXMATCH, f"--data={tmp_path / 'none'}", f"--out_dir={tmp_path / 'r'}",
                                             *args])
    assert message.startswith(expected), message


def test_train_mixmatch_data_checks_and_earlier_run(tiny_data, tmp_path):
    run = lambda *a: error_line(train_mixmatch.main, [*MIXMATCH, f"--data={tiny_data}", f"--out_dir={tmp_path}", *a])
    assert run("--n_labeled=1") == "error: --n_labeled=1: at least one labelled image per class (2 classes)"
    train_mixmatch.main([*MIXMATCH, f"--data={tiny_data}", f"--out_dir={tmp_path}"])
    log = (tmp_path / "log.jsonl").read_text()
    assert run().startswith(f"error: {tmp_path} holds an earlier run")
    assert (tmp_path / "log.jsonl").read_text() == log  # no longer truncated at start


def test_checkpoints_that_do_not_fit(tiny_data, tmp_path):
    net = model.ViT(model.ViTConfig(img_size=32, dim=32, depth=1, heads=2, num_classes=2))
    good = str(tmp_path / "good.safetensors")
    model.save_checkpoint(good, net)
    unknown_key = str(tmp_path / "unknown.safetensors")  # a config key this code does not know
    tensors = load_file(good)
    with safe_open(good, "pt") as f:
        metadata = f.metadata()
    config = json.loads(metadata["model_config"])
    save_file(tensors, unknown_key, {**metadata, "model_config": json.dumps({**config, "bogus": 1})})
    headless = str(tmp_path / "headless.safetensors")  # the config has a head, the weights do not
    save_file({k: v for k, v in tensors.items() if not k.startswith("model.head.")}, headless, metadata)
    for ckpt in (unknown_key, headless):
        for main, argv in ((evaluate.main, ["--ckpt", ckpt, "--data", tiny_data]),
                           (attention.main, ["--ckpt", ckpt, "--data", tiny_data, "--out", str(tmp_path / "o")])):
            message = error_line(main, argv)
            assert "config or weights do not fit this code" in message, message
    assert not (tmp_path / "o").exists()


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_pickle_with_code_is_refused_in_one_line(tiny_data, tmp_path, capfd):
    evil = tmp_path / "pytorch_model.bin"
    torch.save({"weights": Evil()}, evil)
    message = error_line(attention.main, ["--ckpt", str(evil), "--images", str(tmp_path), "--out", str(tmp_path / "o")])
    assert message.startswith(f"error: {evil}: holds Python objects other than tensors")
    message = error_line(train_vit.main, [f"--pretrained={evil}", f"--data={tiny_data}", "--img_size=32",
                                        f"--out_dir={tmp_path / 'run'}"])
    assert message.startswith(f"error: {evil}: holds Python objects other than tensors")
    assert "pwned" not in capfd.readouterr().out  # and its code never ran


def test_cli_prints_one_line_and_no_traceback(tmp_path):
    for script, argv in (("train_vit.py", ["--lr=-1"]), ("train_mixmatch.py", ["--steps=0"]),
                         ("evaluate.py", ["--ckpt", str(tmp_path / "x.safetensors"), "--data", str(tmp_path)])):
        r = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], capture_output=True, text=True,
                           cwd=tmp_path, timeout=120)
        assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, (script, r.stderr)
