"""evaluate.py: the CLI round trip (report, plot, predictions, card, submission, Hub push) and its error paths."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate as ev
import model
from conftest import ROOT, error_line


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), *args], capture_output=True, text=True,
                          cwd=ROOT)


@pytest.fixture(scope="module")
def tiny(tiny_data, tmp_path_factory):
    """The shared tiny data set and an untrained 2-class checkpoint for it (scores need not be good here)."""
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    net = model.ViT(model.ViTConfig(img_size=32, dim=32, depth=1, heads=2, num_classes=2))
    ckpt = str(root / "tiny.safetensors")
    model.save_checkpoint(ckpt, net, meta={"data": {"image_size": [32, 32]}})
    return root, tiny_data, ckpt


def test_cli_round_trip(tiny):
    root, data_dir, ckpt = tiny
    out, sub = root / "eval", root / "submission.txt"
    proc = run_cli("--ckpt", ckpt, "--data", data_dir, "--split", "test", "--out", str(out), "--submit", str(sub),
                   "--n_boot", "100", "--card")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    for key in ("accuracy", "group_accuracy", "fair_score", "fair_score_ci", "f1", "confusion", "group_confusion",
                "worst_group_accuracy", "worst_group_accuracy_ci", "equalized_odds_difference", "groups", "curves"):
        assert key in report
    assert list(report["group_accuracy"]) == ["women", "men"]
    assert report["thresholds"]["fitted_on"] == "val" and "fair_score" in report["thresholded"]
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "fair" in proc.stdout and "worst group" in proc.stdout and "EO difference" in proc.stdout
    # the submission: one -1/1 per test sample, in order, the argmax of the model's logits
    lines = sub.read_text().splitlines()
    x, y, g = data.load_split(data_dir, "test")
    net = model.load_checkpoint(ckpt)[0].eval()
    with torch.no_grad():
        logits = net(data.prepare(x, 32))
    pred = logits.argmax(1)
    assert lines == ["1" if p == 1 else "-1" for p in pred.tolist()]
    assert report["accuracy"] == pytest.approx((pred == y).float().mean().item())
    # predictions.csv: a row per sample in split order, with p(class 1) and both decisions
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [int(r["index"]) for r in rows] == list(range(len(y)))
    assert [int(r["label"]) for r in rows] == y.tolist() and [int(r["group"]) for r in rows] == g.tolist()
    assert [int(r["pred"]) for r in rows] == pred.tolist()
    p1 = torch.softmax(logits, 1)[:, 1]
    assert [float(r["p_1"]) for r in rows] == pytest.approx(p1.tolist(), abs=1e-6)
    t = [report["thresholds"][n] for n in ("women", "men")]
    assert [int(r["pred_thresholded"]) for r in rows] == (p1 > torch.tensor(t)[g]).long().tolist()
    # the model card: YAML metadata with the results, then the bias section filled from the report
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "model-index" in card and "worst_group_accuracy" in card
    assert "## Bias, risks and limitations" in card and report["worst_group"] in card
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    # a later --submit reuses the saved thresholds without refitting
    sub2 = root / "thresholded.txt"
    ev.main(["--ckpt", ckpt, "--data", data_dir, "--submit", str(sub2), "--submit_thresholds",
             f"--thresholds={out / 'report.json'}", "--n_boot=0"])
    decided = (p1 > torch.tensor(t)[g]).long().tolist()
    assert sub2.read_text().splitlines() == ["1" if d == 1 else "-1" for d in decided]


def test_cli_images_of_any_size(tiny, tmp_path):
    _, _, ckpt = tiny
    rng = np.random.default_rng(0)
    for name, shape in (("a.png", (48, 64, 3)), ("b.jpg", (32, 32, 3))):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "c.png").write_bytes(b"corrupt")
    out = tmp_path / "preds.csv"
    ev.main(["--ckpt", ckpt, "--images", str(tmp_path), "--out", str(out)])
    rows = list(csv.DictReader(out.open()))
    assert [r["file"] for r in rows] == ["a.png", "b.jpg"] and all(r["label"] == "-1" for r in rows)
    # b.jpg is already 32x32: its prediction is the model's on the decoded image itself
    x = torch.from_numpy(np.array(Image.open(tmp_path / "b.jpg").convert("RGB"))).permute(2, 0, 1)[None]
    with torch.no_grad():
        p1 = torch.softmax(model.load_checkpoint(ckpt)[0].eval()(data.prepare(x, 32)), 1)[0, 1].item()
    assert float(rows[1]["p_1"]) == pytest.approx(p1, abs=1e-6)


def test_push_to_hub_uploads_safetensors_and_reads_back(tiny, tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    root, data_dir, ckpt = tiny
    hub = {}
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, exist_ok: None)
    upload = lambda self, path_or_fileobj, path_in_repo, repo_id: hub.update({path_in_repo: path_or_fileobj})
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_file", upload)
    ev.main(["--ckpt", ckpt, "--data", data_dir, "--out", str(tmp_path / "out"), "--push_to_hub=me/tiny",
             "--n_boot=0"])
    assert sorted(hub) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads(open(hub["config.json"]).read())["classes"] == data.read_meta(data_dir)["classes"]
    # read back: the Hub download (monkeypatched) serves the uploaded model.safetensors
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename: hub[filename])
    net, meta, _ = model.load_checkpoint("me/tiny")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                 model.load_checkpoint(ckpt)[0].state_dict().values()))
    backbone = model.load_pretrained("me/tiny")  # the same weights as a pretrained backbone (no head)
    assert torch.equal(backbone.pos_embed, net.pos_embed)


def test_push_to_hub_offline_is_one_line(tiny, tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    root, data_dir, ckpt = tiny

    def offline(self, repo_id, exist_ok):
        raise huggingface_hub.errors.OfflineModeIsEnabled("offline")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", offline)
    message = error_line(ev.main, ["--ckpt", ckpt, "--data", data_dir, "--out", str(tmp_path / "out"),
                                   "--push_to_hub=me/x", "--n_boot=0"])
    assert message.startswith("error: cannot push to the Hub repo me/x (OfflineModeIsEnabled)")


def test_cli_errors(tiny, tmp_path):
    root, data_dir, ckpt = tiny
    nope = str(tmp_path / "nope.safetensors")
    assert "no checkpoint file" in error_line(ev.main, ["--ckpt", nope, "--data", data_dir])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    assert "not a checkpoint of ours" in error_line(ev.main, ["--ckpt", str(junk), "--data", data_dir])
    assert "split 'dev' is not in" in error_line(ev.main, ["--ckpt", ckpt, "--data", data_dir, "--split", "dev"])
    error_line(ev.main, ["--ckpt", ckpt, "--data", str(tmp_path / "nodata")])  # whatever data.read_meta says
    other = str(tmp_path / "three.safetensors")  # a checkpoint for another task: 3 classes
    model.save_checkpoint(other, model.ViT(model.ViTConfig(img_size=32, dim=32, depth=1, heads=2, num_classes=3)))
    assert "predicts 3 classes" in error_line(ev.main, ["--ckpt", other, "--data", data_dir])
    big = str(tmp_path / "big.safetensors")  # trained on 80x80 images, asked to score 32x32 ones
    model.save_checkpoint(big, model.load_checkpoint(ckpt)[0], meta={"data": {"image_size": [80, 80]}})
    assert "image_size [80, 80] vs [32, 32]" in error_line(ev.main, ["--ckpt", big, "--data", data_dir])
    other_task = str(tmp_path / "task.safetensors")  # same shape, another criterion and class names
    model.save_checkpoint(other_task, model.load_checkpoint(ckpt)[0],
                          meta={"data": {"classes": ["no mask", "mask"], "criterion": "Mask"}})
    message = error_line(ev.main, ["--ckpt", other_task, "--data", data_dir])
    assert "another task" in message and "classes ['no mask', 'mask'] vs" in message and "criterion Mask vs" in message
    assert not (tmp_path / "out").exists()


def test_cli_without_group_labels(tiny, tmp_path, capsys):
    _, _, ckpt = tiny
    no_groups = str(tmp_path / "nogroups")
    data.main(["synthetic", "--n=100", "--size=32", "--group=none", f"--out_dir={no_groups}"])
    ev.main(["--ckpt", ckpt, "--data", no_groups, "--out", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "accuracy" in report and "fair_score" not in report
    out = capsys.readouterr().out
    assert "does not hold two groups: overall metrics only" in out and "accuracy" in out


# -----------------------------------------------------------------------------
# k groups: --group_by regroups by stored attributes; thresholds per group; the frontier

def test_group_by_intersections_equals_fairlearn(tiny, tmp_path, capsys):
    fm = pytest.importorskip("fairlearn.metrics")
    root, data_dir, ckpt = tiny
    out = tmp_path / "by"
    ev.main(["--ckpt", ckpt, "--data", data_dir, "--out", str(out), "--group_by=Male,Long_Hair", "--n_boot=200"])
    report = json.loads((out / "report.json").read_text())
    names = ["women & not Long_Hair", "women & Long_Hair", "men & not Long_Hair", "men & Long_Hair"]
    assert report["group_names"] == names and report["group_by"] == "Male,Long_Hair"
    attrs, attr_names = data.load_attrs(data_dir, "test")
    male, long_hair = attrs[:, attr_names.index("Male")], attrs[:, attr_names.index("Long_Hair")]
    g = 2 * male.astype(int) + long_hair
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    y, pred = np.array([int(r["label"]) for r in rows]), np.array([int(r["pred"]) for r in rows])
    assert [int(r["group"]) for r in rows] == g.tolist()  # the regrouped ids, mixed radix
    frame = fm.MetricFrame(metrics={"accuracy": lambda a, b: float((a == b).mean()), "tpr": fm.true_positive_rate},
                           y_true=y, y_pred=pred, sensitive_features=np.array(names)[g])
    for name in report["group_accuracy"]:
        assert report["group_accuracy"][name] == pytest.approx(frame.by_group.loc[name, "accuracy"], abs=1e-12)
        assert report["groups"][name]["tpr"] == pytest.approx(frame.by_group.loc[name, "tpr"], abs=1e-12)
    for k in ("demographic_parity_difference", "equalized_odds_difference"):
        assert report[k] == pytest.approx(getattr(fm, k)(y, pred, sensitive_features=g), abs=1e-12), k
    acc = list(report["group_accuracy"].values())
    assert report["fair_score"] == pytest.approx(np.mean(acc) - (max(acc) - min(acc)))
    # the test split holds 40 faces: every group is too small to read, and the printout says so instead of ranking
    assert sorted(report["small_groups"]) == sorted(report["group_accuracy"])
    assert "too small to read (n < 30), not ranked" in capsys.readouterr().out
    # thresholds for all four groups, fitted on val's regrouped faces; the frontier with both points
    assert set(names) <= set(report["thresholds"]) and report["thresholds"]["objective"] == "fair"
    t = np.array([report["thresholds"][n] for n in names])
    assert [int(r["pred_thresholded"]) for r in rows] == (np.array([float(r["p_1"]) for r in rows]) > t[g]).tolist()
    front = report["frontier"]
    assert front["points"] and len(front["argmax"]) == 2 and len(front["thresholded"]) == 2
    best = max(m - gap for m, gap in front["points"])
    assert front["argmax"][0] - front["argmax"][1] <= best + 1e-12  # no operating point beats the frontier
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_constrained_threshold_objective_holds_on_val(tiny, tmp_path):
    root, data_dir, ckpt = tiny
    out = tmp_path / "eo"
    ev.main(["--ckpt", ckpt, "--data", data_dir, "--split=val", "--out", str(out), "--n_boot=0",
             "--threshold_objective=equalized_odds", "--threshold_tolerance=0.1"])
    report = json.loads((out / "report.json").read_text())
    assert report["thresholds"]["objective"] == "equalized_odds" and report["thresholds"]["tolerance"] == 0.1
    assert report["thresholded"]["equalized_odds_difference"] <= 0.1 + 1e-12  # fitted and scored on val


def test_thresholds_from_another_report_are_checked(tiny, tmp_path):
    root, data_dir, ckpt = tiny
    args = ["--ckpt", ckpt, "--data", data_dir, "--n_boot=0"]
    bad = tmp_path / "report.json"
    for thresholds, message in [
            ({"women": 0.4, "men": 1.7, "fitted_on": "val"}, "thresholds are probabilities in [0, 1]"),
            ({"women": 0.4, "men": 0.5, "tone 3": 0.5, "fitted_on": "val"}, "is for other groups or classes"),
            ({"a": 0.4, "b": 0.5, "fitted_on": "val"}, "no per-group thresholds for women, men")]:
        bad.write_text(json.dumps({"thresholds": thresholds}))
        assert message in error_line(ev.main, [*args, f"--thresholds={bad}"])
    bad.write_text(json.dumps({"classes": ["no", "yes"], "thresholds": {"women": 0.4, "men": 0.5}}))
    assert "is for other groups or classes" in error_line(ev.main, [*args, f"--thresholds={bad}"])
    assert "Nope" in error_line(ev.main, [*args, "--group_by=Male,Nope"])  # before any prediction
