"""evaluate.py: metrics on hand-computed cases, threshold fitting, and the CLI round trip and error paths."""

import csv
import itertools
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# women: pred 1,0,1 vs label 1,1,1 -> 2/3; men: 1,0 vs 0,0 -> 1/2; the unknown-group sample counts only overall
PRED = np.array([1, 0, 1, 1, 0, 0])
LABEL = np.array([1, 1, 1, 0, 0, 0])
GROUP = np.array([0, 0, 0, 1, 1, -1])


def test_group_accuracies_and_fair_score_by_hand():
    acc = ev.group_accuracies(PRED, LABEL, GROUP)
    assert list(acc) == [0, 1]
    assert acc[0] == pytest.approx(2 / 3) and acc[1] == pytest.approx(1 / 2)
    assert ev.fair_score(acc) == pytest.approx(0.5 * (2 / 3 + 1 / 2) - (2 / 3 - 1 / 2))  # 5/12
    assert ev.fair_score({0: 0.9, 1: 0.7}) == pytest.approx(0.8 - 0.2)
    assert ev.fair_score({0: 0.7, 1: 0.9}) == pytest.approx(0.8 - 0.2)  # the gap is absolute
    # torch tensors are accepted as well
    assert ev.group_accuracies(torch.tensor(PRED), torch.tensor(LABEL), torch.tensor(GROUP)) == acc


def test_compute_metrics_names_groups_in_order():
    scores = np.eye(2)[PRED] * 3.0  # logits whose argmax is PRED
    m = ev.compute_metrics(scores, LABEL, GROUP, n_boot=50)
    assert m["group_accuracy"] == {"women": pytest.approx(2 / 3), "men": pytest.approx(1 / 2)}
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["fair_score"] == pytest.approx(5 / 12)
    assert m["group_confusion"]["women"] == [[0, 0], [1, 2]]
    assert m["group_confusion"]["men"] == [[1, 1], [0, 0]]
    assert m["confusion"] == [[2, 1], [1, 2]]
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    json.dumps(m)  # JSON-able as it goes into report.json and log.jsonl
    assert "fair_score" not in ev.compute_metrics(scores, LABEL, np.full(6, -1), fair=False)


@pytest.mark.parametrize("groups", [[0, 0, 0], [0, 1, 2], [-1, -1, -1]])
def test_fair_score_needs_exactly_two_groups(groups):
    acc = ev.group_accuracies(np.zeros(3), np.zeros(3), np.array(groups))
    with pytest.raises(ValueError, match="exactly two groups"):
        ev.fair_score(acc)


def test_confusion_and_f1():
    cm = ev.confusion([0, 1, 1, 1, 0, 2], [0, 1, 0, 1, 1, 2], num_classes=3)
    assert cm.tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 1]]
    assert ev.f1([[5, 0], [0, 0]]) == 0.0  # no positives at all: 0, not a division error
    per_class = [2 / 4, 4 / 6, 1.0]  # 2tp / (2tp + fp + fn) per class
    assert ev.f1(cm) == pytest.approx(np.mean(per_class))


def test_bootstrap_ci_matches_resampling_indices():
    rng = np.random.default_rng(0)
    n = 400
    group = rng.integers(-1, 2, n)
    label = rng.integers(0, 2, n)
    pred = np.where(rng.random(n) < np.where(group == 1, 0.9, 0.7), label, 1 - label)
    ci = ev.bootstrap_ci(pred, label, group, n_boot=4000, seed=1)
    assert ci == ev.bootstrap_ci(pred, label, group, n_boot=4000, seed=1)  # seeded
    point = ev.fair_score(ev.group_accuracies(pred, label, group))
    assert ci["fair_score"][0] < point < ci["fair_score"][1]
    # the plain bootstrap over resampled indices gives the same interval up to Monte Carlo noise
    naive = []
    for _ in range(2000):
        i = rng.integers(0, n, n)
        naive.append(ev.fair_score(ev.group_accuracies(pred[i], label[i], group[i])))
    assert np.allclose(ci["fair_score"], np.percentile(naive, [2.5, 97.5]), atol=0.02)
    lo, hi = ci["group_accuracy"][1]
    assert lo < ev.group_accuracies(pred, label, group)[1] < hi


def _logits(p):
    """Two logits whose softmax gives p(class 1) = p."""
    return np.stack([np.zeros_like(p), np.log(p / (1 - p))], 1)


def test_thresholds_default_is_argmax():
    scores = np.random.default_rng(0).normal(size=(100, 2))
    group = np.random.default_rng(1).integers(0, 2, 100)
    assert (ev.decide(scores, group, [0.5, 0.5]) == ev.decide(scores)).all()


def test_fit_group_thresholds_improves_fair_score():
    rng = np.random.default_rng(0)
    n = 2000
    group = rng.integers(0, 2, n)
    label = rng.integers(0, 2, n)
    # a calibrated score for women; for men the same score pushed up, so 0.5 makes many false positives
    p = np.clip(0.5 + (label - 0.5) * 0.4 + rng.normal(0, 0.15, n) + 0.25 * group, 0.01, 0.99)
    scores = _logits(p)
    base = ev.compute_metrics(scores, label, group, n_boot=0)["fair_score"]
    t = ev.fit_group_thresholds(scores, label, group)
    fitted = ev.compute_metrics(scores, label, group, thresholds=t, n_boot=0)["fair_score"]
    assert fitted > base + 0.05
    assert abs(t[0] - 0.5) < 0.1 and t[1] > 0.6  # it moved the men's threshold, not the women's


def test_fit_group_thresholds_is_optimal_on_small_case():
    rng = np.random.default_rng(3)
    n = 40
    group, label = rng.integers(0, 2, n), rng.integers(0, 2, n)
    scores = _logits(rng.random(n))
    t = ev.fit_group_thresholds(scores, label, group)
    fitted = ev.fair_score(ev.group_accuracies(ev.decide(scores, group, t), label, group))
    p = ev.positive_prob(scores)
    # exhaustive search over every pair of thresholds that change a decision
    cands = np.concatenate([[0.0], np.sort(p)])
    best = max(ev.fair_score(ev.group_accuracies((p > np.where(group == 0, a, b)).astype(int), label, group))
               for a, b in itertools.product(cands, cands))
    assert fitted == pytest.approx(best)


def test_fit_group_thresholds_needs_both_groups():
    with pytest.raises(ValueError, match="both groups"):
        ev.fit_group_thresholds(np.zeros((4, 2)), np.array([0, 1, 0, 1]), np.zeros(4, dtype=int))


# -----------------------------------------------------------------------------
# CLI (needs model.py and data.py)

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
    message = cli_error("--ckpt", ckpt, "--data", data_dir, "--out", str(tmp_path / "out"), "--push_to_hub=me/x",
                        "--n_boot=0")
    assert message.startswith("error: cannot push to the Hub repo me/x (OfflineModeIsEnabled)")


def cli_error(*args):
    with pytest.raises(SystemExit) as e:
        ev.main(list(args))
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_cli_errors(tiny, tmp_path):
    root, data_dir, ckpt = tiny
    assert "no checkpoint file" in cli_error("--ckpt", str(tmp_path / "nope.safetensors"), "--data", data_dir)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    assert "not a checkpoint of ours" in cli_error("--ckpt", str(junk), "--data", data_dir)
    assert "split 'dev' is not in" in cli_error("--ckpt", ckpt, "--data", data_dir, "--split", "dev")
    cli_error("--ckpt", ckpt, "--data", str(tmp_path / "nodata"))  # whatever data.read_meta says, on one line
    other = str(tmp_path / "three.safetensors")  # a checkpoint for another task: 3 classes
    model.save_checkpoint(other, model.ViT(model.ViTConfig(img_size=32, dim=32, depth=1, heads=2, num_classes=3)))
    assert "predicts 3 classes" in cli_error("--ckpt", other, "--data", data_dir)
    big = str(tmp_path / "big.safetensors")  # trained on 80x80 images, asked to score 32x32 ones
    model.save_checkpoint(big, model.load_checkpoint(ckpt)[0], meta={"data": {"image_size": [80, 80]}})
    assert "image_size [80, 80] vs [32, 32]" in cli_error("--ckpt", big, "--data", data_dir)
    other_task = str(tmp_path / "task.safetensors")  # same shape, another criterion and class names
    model.save_checkpoint(other_task, model.load_checkpoint(ckpt)[0],
                          meta={"data": {"classes": ["no mask", "mask"], "criterion": "Mask"}})
    message = cli_error("--ckpt", other_task, "--data", data_dir)
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
    assert "does not hold both groups: overall metrics only" in out and "accuracy" in out


def test_has_both_groups_and_selection_rule():
    assert ev.has_both_groups([0, 1, -1]) and not ev.has_both_groups([0, 0, -1]) and not ev.has_both_groups([])
    m = {"accuracy": 0.9, "fair_score": 0.7}
    assert ev.selection_score(m, "fair") == 0.7 and ev.selection_score(m, "accuracy") == 0.9


# -----------------------------------------------------------------------------
# fairlearn's metrics, against fairlearn itself (a test-only dependency) and by hand

def _case(name):
    """(scores [n, 2], labels, groups) for the comparisons: random, and the edge cases the docstrings name."""
    rng = np.random.default_rng(7)
    n = 300
    label, group = rng.integers(0, 2, n), rng.integers(0, 2, n)
    scores = rng.normal(size=(n, 2)) + np.stack([np.zeros(n), 0.8 * (2 * label - 1)], 1)
    if name == "men_without_positives":  # TPR of men has no denominator: fairlearn (and we) take it as 0
        label = np.where(group == 1, 0, label)
    if name == "all_predicted_class_0":  # selection rate 0 everywhere: DP difference 0, DP ratio nan (0 / 0)
        scores = np.stack([np.ones(n), np.zeros(n)], 1)
    return scores, label, group


@pytest.mark.parametrize("case", ["random", "men_without_positives", "all_predicted_class_0"])
def test_group_metrics_equal_fairlearn(case):
    fm = pytest.importorskip("fairlearn.metrics")
    skm = pytest.importorskip("sklearn.metrics")
    scores, y, g = _case(case)
    pred, p = scores.argmax(1), ev.positive_prob(scores)
    m = ev.compute_metrics(scores, y, g, n_boot=0)
    frame = fm.MetricFrame(metrics={"selection_rate": fm.selection_rate, "tpr": fm.true_positive_rate,
                                    "fpr": fm.false_positive_rate, "fnr": fm.false_negative_rate,
                                    "accuracy": skm.accuracy_score},
                           y_true=y, y_pred=pred, sensitive_features=np.array(["women", "men"])[g])
    for name, row in m["groups"].items():
        for k in ("selection_rate", "tpr", "fpr", "fnr", "accuracy"):
            assert row[k] == pytest.approx(frame.by_group.loc[name, k], abs=1e-12), (name, k)
        assert row["ppv"] == pytest.approx(skm.precision_score(y[g == (name == "men")], pred[g == (name == "men")],
                                                               zero_division=0), abs=1e-12)
        assert row["auroc"] == pytest.approx(skm.roc_auc_score(y[g == (name == "men")], p[g == (name == "men")])
                                             if case != "men_without_positives" or name == "women" else np.nan,
                                             abs=1e-12, nan_ok=True)
    expected = {
        "demographic_parity_difference": fm.demographic_parity_difference(y, pred, sensitive_features=g),
        "demographic_parity_ratio": fm.demographic_parity_ratio(y, pred, sensitive_features=g),
        "equalized_odds_difference": fm.equalized_odds_difference(y, pred, sensitive_features=g),
        "equalized_odds_difference_mean": fm.equalized_odds_difference(y, pred, sensitive_features=g, agg="mean"),
        "equal_opportunity_difference": fm.equal_opportunity_difference(y, pred, sensitive_features=g),
        "accuracy_difference": frame.difference()["accuracy"],
    }
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, abs=1e-12, nan_ok=True), k
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)
    if case == "all_predicted_class_0":
        assert m["demographic_parity_difference"] == 0 and np.isnan(m["demographic_parity_ratio"])
    if case == "men_without_positives":
        assert m["groups"]["men"]["tpr"] == 0 and m["equal_opportunity_difference"] == m["groups"]["women"]["tpr"]


def test_worst_group_ece_and_auroc_by_hand():
    # cells (label, group): (1, women) 2/3 right, (0, men) 1/2, (0, unknown) not a cell
    scores = np.eye(2)[PRED] * 3.0
    m = ev.compute_metrics(scores, LABEL, GROUP, class_names=["no", "yes"], n_boot=0)
    assert m["cell_accuracy"] == {"yes / women": pytest.approx(2 / 3), "no / men": pytest.approx(1 / 2)}
    assert m["worst_group"] == "no / men" and m["worst_group_accuracy"] == 0.5
    assert m["mean_cell_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # every confidence is softmax(3, 0) = 0.9526 (one bin) and 4 of 6 are right: ECE = |0.9526 - 4/6|
    conf = 1 / (1 + np.exp(-3.0))
    assert m["ece"] == pytest.approx(abs(conf - 4 / 6), abs=1e-12)
    ece, bins = ev.calibration([0.55, 0.65, 0.95, 0.96], [1, 0, 1, 1], bins=10)
    assert bins == [(0.55, 1.0, 1), (0.65, 0.0, 1), (pytest.approx(0.955), 1.0, 2)]
    assert ece == pytest.approx((0.45 + 0.65 + 2 * 0.045) / 4)
    assert ev.auroc([0.1, 0.4, 0.4, 0.8], [0, 0, 1, 1]) == pytest.approx((1 + 0.5 + 1 + 1) / 4)  # a tie is half
    assert np.isnan(ev.auroc([0.1, 0.2], [1, 1]))


def test_bootstrap_cis_cover_the_gap_metrics():
    rng = np.random.default_rng(0)
    n = 2000
    y, g = rng.integers(0, 2, n), rng.integers(0, 2, n)
    pred = np.where(rng.random(n) < np.where(g == 1, 0.9, 0.75), y, 1 - y)
    m = ev.compute_metrics(np.eye(2)[pred], y, g, n_boot=2000)
    for k in ("fair_score", "worst_group_accuracy", "equalized_odds_difference", "demographic_parity_difference"):
        lo, hi = m[f"{k}_ci"]
        assert lo < m[k] < hi, k
