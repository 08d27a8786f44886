"""run.py: the run plumbing the scripts share (device choice, the atomic writer, the seed tables, the run folder)."""

import os

import pytest
import torch

import run


def test_pick_device():
    assert run.pick_device("cpu").type == "cpu"
    assert run.pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(run.UserError, match="is not a device"):
        run.pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(run.UserError, match="--device=cuda but torch sees no CUDA device"):
            run.pick_device("cuda")


def test_write_atomic_leaves_no_partial_file(tmp_path):
    path = tmp_path / "a.txt"
    run.write_text(path, "old")

    def fail(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(run.UserError, match=f"cannot write {path}: disk full"):  # one line naming the file
        run.write_atomic(path, fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_mean_std_is_the_sample_std_over_seeds():
    assert run.mean_std([1.0, 2.0, 4.0]) == f"{7 / 3:.4f} ± {torch.tensor([1.0, 2.0, 4.0]).std().item():.4f}"
    assert run.mean_std([0.5]) == "0.5000 ± 0.0000"  # one seed: no spread, not nan


def test_write_table(tmp_path, capsys):
    path = tmp_path / "t" / "table.md"
    text = run.write_table(str(path), ["Intro.", "Command: `x`"], ["method", "acc"], [["ERM", 0.5], ["mean", "a"]])
    assert text == "Intro.\n\nCommand: `x`\n\n| method | acc |\n|---|---|\n| ERM | 0.5000 |\n| mean | a |\n"
    assert path.read_text() == text and capsys.readouterr().out == text + "\n"


def test_run_dir_refuses_an_earlier_run_and_a_live_lock(tmp_path):
    (tmp_path / "log.jsonl").write_text("")
    with pytest.raises(run.UserError, match="holds an earlier run"):
        with run.run_dir(str(tmp_path)):
            pass
    with run.run_dir(str(tmp_path), force=True):
        assert (tmp_path / ".lock").read_text() == str(os.getpid())
        with pytest.raises(run.UserError, match=f"another run \\(pid {os.getpid()}\\)"):
            with run.run_dir(str(tmp_path), resume=True):
                pass
    assert not (tmp_path / ".lock").exists()


@pytest.mark.parametrize("native, device, amp, warned", [(False, "cpu", "bf16", True), (True, "cpu", "bf16", False),
                                                         (False, "cpu", "none", False), (False, "cuda", "bf16", False)])
def test_bf16_on_a_cpu_that_emulates_it_is_named_before_the_work(monkeypatch, capsys, native, device, amp, warned):
    monkeypatch.setattr(run, "native_bf16", lambda: native)
    run.warn_slow_bf16(torch.device(device), amp)
    err = capsys.readouterr().err
    assert ("no native bf16) is emulated and runs about 20x slower than --amp=none" in err) == warned, err
