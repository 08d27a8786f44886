"""tensorboard=true in both trainers (run.Events): the event files, read back with TensorBoard's own reader, hold
every numeric field of every log.jsonl record at the record's step, each step once across a kill and a resume; without
the package the flag is one error line."""

import json
import math
import os
import sys

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import run
import train_mixmatch
import train_vit
from conftest import VIT_TINY, error_line, run_vit

MIXMATCH_TINY = ["--config=cpu_small", "--n_labeled=20", "--steps=6", "--eval_every=3", "--batch_size=16",
                 "--small_width=8", "--img_size=32"]


def events(out_dir):
    """{(tag, step): [values]} of every scalar event in out_dir, as TensorBoard's Python reader sees them (it applies
    purge_step), every event kept (size_guidance 0: no reservoir sampling)."""
    acc = EventAccumulator(str(out_dir), size_guidance={"scalars": 0})
    acc.Reload()
    seen = {}
    for tag in acc.Tags()["scalars"]:
        for e in acc.Scalars(tag):
            seen.setdefault((tag, e.step), []).append(e.value)
    return seen


def numbers(record, prefix=""):
    """The numeric leaves of a JSON record under "/"-joined paths (this test's own flattening, not run.scalars)."""
    if isinstance(record, dict | list):
        items = record.items() if isinstance(record, dict) else enumerate(record)
        return {k: v for key, value in items for k, v in numbers(value, f"{prefix}{key}/").items()}
    return {prefix[:-1]: record} if type(record) in (int, float) else {}


def expected(out_dir, step_of):
    """{(tag, step): [the float32 value]} from out_dir/log.jsonl, step_of(record) giving each record's step."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {(tag, step_of(r)): [float(np.float32(v))] for r in records for tag, v in numbers(r).items()}


def same(got, want):
    """Equal keys (every tag at every step, once) and values, nan equal to nan."""
    return got.keys() == want.keys() and all(
        len(got[k]) == 1 and (got[k][0] == want[k][0] or math.isnan(got[k][0]) and math.isnan(want[k][0]))
        for k in want)


def test_train_vit_events_mirror_the_log(tiny_data, tmp_path):
    run_vit(tiny_data, tmp_path, "--tensorboard=true")
    got = events(tmp_path)
    assert same(got, expected(tmp_path, lambda r: r["epoch"]))
    for tag in ("train_loss", "lr", "grad_norm", "group_accuracy/women", "fair_score", "worst_group_accuracy",
                "fair_score_ci/0", "time_s"):
        assert (tag, 1) in got and (tag, 2) in got, tag


def test_train_mixmatch_events_mirror_the_log(tiny_data, tmp_path):
    args = [*MIXMATCH_TINY, f"--data={tiny_data}", f"--out_dir={tmp_path}", "--tensorboard=true"]
    train_mixmatch.main(args)
    got = events(tmp_path)
    assert same(got, expected(tmp_path, lambda r: r.get("step", 6)))  # the test line at the last step
    for tag in ("loss_x", "loss_u", "w_u", "raw/accuracy", "group_accuracy/men", "fair_score"):
        assert (tag, 3) in got and (tag, 6) in got, tag
    assert ("test/accuracy", 6) in got and ("best_step", 6) in got
    # resumed at its last step (as after a kill during the test pass): no new step, the test line again; the
    # validation at step 6 and the test line are still there, once each
    train_mixmatch.main([*args, "--resume=true"])
    assert same(events(tmp_path), expected(tmp_path, lambda r: r.get("step", 6)))


def test_killed_and_resumed_run_has_each_step_once(tiny_data, tmp_path):
    run_vit(tiny_data, tmp_path, "--tensorboard=true", "--stop_after=1")
    # what a session killed after logging epoch 2 but before saving it leaves behind: an event the resumed run redoes
    with run.Events(str(tmp_path), True) as orphan:
        orphan.add({"accuracy": 123.0}, 2)
    assert events(tmp_path)[("accuracy", 2)] == [123.0]
    run_vit(tiny_data, tmp_path, "--tensorboard=true", "--resume=true")
    got = events(tmp_path)
    assert same(got, expected(tmp_path, lambda r: r["epoch"]))  # the orphan is gone, epoch 1 is there once
    assert {step for _, step in got} == {1, 2} and len([f for f in os.listdir(tmp_path) if "tfevents" in f]) == 3


def test_events_are_written_by_rank_zero_only(tmp_path):
    with run.Events(str(tmp_path), False) as off:  # tensorboard=false, or a DDP rank other than 0
        off.add({"accuracy": 0.5}, 1)
    assert os.listdir(tmp_path) == []


def test_scalars_flatten_nested_records():
    record = {"loss": 1, "ok": True, "name": "women", "none": None, "ci": [0.1, 0.2],
              "groups": {"women": {"accuracy": 0.5, "n": 3}}}
    assert run.scalars(record) == {"loss": 1, "ci/0": 0.1, "ci/1": 0.2, "groups/women/accuracy": 0.5,
                                   "groups/women/n": 3}


def test_missing_tensorboard_is_one_line_before_any_work(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` now fails as without the package
    for main, args in ((train_vit.main, VIT_TINY), (train_mixmatch.main, MIXMATCH_TINY)):
        assert error_line(main, [*args, f"--data={tiny_data}", f"--out_dir={tmp_path}", "--tensorboard=true"]) == \
            "error: --tensorboard=true needs the tensorboard package: pip install tensorboard"
    assert os.listdir(tmp_path) == []
