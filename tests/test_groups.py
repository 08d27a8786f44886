"""k groups end to end, offline: a 3-group synthetic set (skin tone bins), the demo recipe for one epoch with the
default select=fair, the evaluator with per-group thresholds, and Group DRO over its 2 x 3 cells; every per-group
number checked against fairlearn."""

import csv
import json

import numpy as np
import pytest

import data
import evaluate
import train_vit
from conftest import read_log

fm = pytest.importorskip("fairlearn.metrics")


@pytest.fixture(scope="module")
def tones(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tones") / "data")
    data.main(["synthetic", "--n=400", "--size=80", "--skin_tones=3", "--group=Skin", "--noise=0", f"--out_dir={out}"])
    return out


def test_three_groups_train_evaluate_and_group_dro(tones, tmp_path):
    meta = data.read_meta(tones)
    names = meta["groups"]
    assert len(names) == 3
    demo = ["--config=demo", f"--data={tones}", "--epochs=1", "--batch_size=64", "--device=cpu"]
    train_vit.main([*demo, f"--out_dir={tmp_path / 'run'}"])  # select=fair, the default
    (record,) = read_log(tmp_path / "run")
    acc = list(record["group_accuracy"].values())
    assert list(record["group_accuracy"]) == names
    assert record["fair_score"] == pytest.approx(np.mean(acc) - (max(acc) - min(acc)))

    out = tmp_path / "eval"
    evaluate.main(["--ckpt", str(tmp_path / "run" / "best.safetensors"), f"--data={tones}", f"--out={out}",
                   "--n_boot=100"])
    report = json.loads((out / "report.json").read_text())
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    y, g = np.array([int(r["label"]) for r in rows]), np.array([int(r["group"]) for r in rows])
    for key, m in (("pred", report), ("pred_thresholded", report["thresholded"])):
        pred = np.array([int(r[key]) for r in rows])
        frame = fm.MetricFrame(metrics={"accuracy": lambda a, b: float((a == b).mean()), "tpr": fm.true_positive_rate,
                                        "fpr": fm.false_positive_rate, "selection_rate": fm.selection_rate},
                               y_true=y, y_pred=pred, sensitive_features=np.array(names)[g])
        for name in names:
            for k in ("tpr", "fpr", "selection_rate", "accuracy"):
                assert m["groups"][name][k] == pytest.approx(frame.by_group.loc[name, k], abs=1e-12), (key, name, k)
        for k in ("demographic_parity_difference", "demographic_parity_ratio", "equalized_odds_difference",
                  "equalized_odds_ratio"):
            assert m[k] == pytest.approx(getattr(fm, k)(y, pred, sensitive_features=g), abs=1e-12, nan_ok=True), k
        acc = frame.by_group["accuracy"]
        assert m["fair_score"] == pytest.approx(acc.mean() - (acc.max() - acc.min()), abs=1e-12)
    assert [n for n in names if n in report["thresholds"]] == names and report["frontier"]["points"]

    train_vit.main([*demo, f"--out_dir={tmp_path / 'dro'}", "--loss=group_dro", "--select=worst_group"])
    (record,) = read_log(tmp_path / "dro")
    weights = record["dro_weights"]
    assert len(weights) == 6 and sum(weights.values()) == pytest.approx(1.0)
    assert list(weights)[:3] == [f"0 / {n}" for n in names]
