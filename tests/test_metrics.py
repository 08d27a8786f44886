"""metrics.py: metrics on hand-computed cases and against fairlearn and scikit-learn, CIs and threshold fitting."""

import itertools
import json

import numpy as np
import pytest
import torch

import metrics

# women: pred 1,0,1 vs label 1,1,1 -> 2/3; men: 1,0 vs 0,0 -> 1/2; the unknown-group sample counts only overall
PRED = np.array([1, 0, 1, 1, 0, 0])
LABEL = np.array([1, 1, 1, 0, 0, 0])
GROUP = np.array([0, 0, 0, 1, 1, -1])


def test_group_accuracies_and_fair_score_by_hand():
    acc = metrics.group_accuracies(PRED, LABEL, GROUP)
    assert list(acc) == [0, 1]
    assert acc[0] == pytest.approx(2 / 3) and acc[1] == pytest.approx(1 / 2)
    assert metrics.fair_score(acc) == pytest.approx(0.5 * (2 / 3 + 1 / 2) - (2 / 3 - 1 / 2))  # 5/12
    assert metrics.fair_score({0: 0.9, 1: 0.7}) == pytest.approx(0.8 - 0.2)
    assert metrics.fair_score({0: 0.7, 1: 0.9}) == pytest.approx(0.8 - 0.2)  # the gap is absolute
    # torch tensors are accepted as well
    assert metrics.group_accuracies(torch.tensor(PRED), torch.tensor(LABEL), torch.tensor(GROUP)) == acc


def test_compute_metrics_names_groups_in_order():
    scores = np.eye(2)[PRED] * 3.0  # logits whose argmax is PRED
    m = metrics.compute_metrics(scores, LABEL, GROUP, n_boot=50)
    assert m["group_accuracy"] == {"women": pytest.approx(2 / 3), "men": pytest.approx(1 / 2)}
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["fair_score"] == pytest.approx(5 / 12)
    assert m["group_confusion"]["women"] == [[0, 0], [1, 2]]
    assert m["group_confusion"]["men"] == [[1, 1], [0, 0]]
    assert m["confusion"] == [[2, 1], [1, 2]]
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    json.dumps(m)  # JSON-able as it goes into report.json and log.jsonl
    assert "fair_score" not in metrics.compute_metrics(scores, LABEL, np.full(6, -1), fair=False)


def test_fair_score_over_k_groups_by_hand():
    # mean of the accuracies minus their spread; for two groups exactly the challenge's formula
    assert metrics.fair_score({0: 0.9, 1: 0.7, 2: 0.8}) == pytest.approx(0.8 - 0.2)
    assert metrics.fair_score({0: 1.0, 1: 0.5, 2: 0.75, 3: 0.75}) == pytest.approx(0.75 - 0.5)
    a, b = 0.8123, 0.6789
    assert metrics.fair_score({0: a, 1: b}) == 0.5 * (a + b) - abs(a - b)  # bit for bit
    # pred 1,1 | 0,0 | 1,0 against label 1,1 | 1,1 | 1,1: group accuracies 1, 0, 1/2
    acc = metrics.group_accuracies([1, 1, 0, 0, 1, 0], [1] * 6, [0, 0, 1, 1, 2, 2])
    assert metrics.fair_score(acc) == pytest.approx(0.5 - 1.0)


@pytest.mark.parametrize("groups", [[0, 0, 0], [-1, -1, -1]])
def test_fair_score_needs_two_groups(groups):
    acc = metrics.group_accuracies(np.zeros(3), np.zeros(3), np.array(groups))
    with pytest.raises(ValueError, match="two or more groups"):
        metrics.fair_score(acc)


def test_confusion_and_f1():
    cm = metrics.confusion([0, 1, 1, 1, 0, 2], [0, 1, 0, 1, 1, 2], num_classes=3)
    assert cm.tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 1]]
    assert metrics.f1([[5, 0], [0, 0]]) == 0.0  # no positives at all: 0, not a division error
    per_class = [2 / 4, 4 / 6, 1.0]  # 2tp / (2tp + fp + fn) per class
    assert metrics.f1(cm) == pytest.approx(np.mean(per_class))


def test_bootstrap_ci_matches_resampling_indices():
    rng = np.random.default_rng(0)
    n = 400
    group = rng.integers(-1, 2, n)
    label = rng.integers(0, 2, n)
    pred = np.where(rng.random(n) < np.where(group == 1, 0.9, 0.7), label, 1 - label)
    ci = metrics.bootstrap_ci(pred, label, group, n_boot=4000, seed=1)
    assert ci == metrics.bootstrap_ci(pred, label, group, n_boot=4000, seed=1)  # seeded
    point = metrics.fair_score(metrics.group_accuracies(pred, label, group))
    assert ci["fair_score"][0] < point < ci["fair_score"][1]
    # the plain bootstrap over resampled indices gives the same interval up to Monte Carlo noise
    naive = []
    for _ in range(2000):
        i = rng.integers(0, n, n)
        naive.append(metrics.fair_score(metrics.group_accuracies(pred[i], label[i], group[i])))
    assert np.allclose(ci["fair_score"], np.percentile(naive, [2.5, 97.5]), atol=0.02)
    lo, hi = ci["group_accuracy"][1]
    assert lo < metrics.group_accuracies(pred, label, group)[1] < hi


def _logits(p):
    """Two logits whose softmax gives p(class 1) = p."""
    return np.stack([np.zeros_like(p), np.log(p / (1 - p))], 1)


def test_thresholds_default_is_argmax():
    scores = np.random.default_rng(0).normal(size=(100, 2))
    group = np.random.default_rng(1).integers(0, 2, 100)
    assert (metrics.decide(scores, group, [0.5, 0.5]) == metrics.decide(scores)).all()


def test_fit_group_thresholds_improves_fair_score():
    rng = np.random.default_rng(0)
    n = 2000
    group = rng.integers(0, 2, n)
    label = rng.integers(0, 2, n)
    # a calibrated score for women; for men the same score pushed up, so 0.5 makes many false positives
    p = np.clip(0.5 + (label - 0.5) * 0.4 + rng.normal(0, 0.15, n) + 0.25 * group, 0.01, 0.99)
    scores = _logits(p)
    base = metrics.compute_metrics(scores, label, group, n_boot=0)["fair_score"]
    t = metrics.fit_group_thresholds(scores, label, group)
    fitted = metrics.compute_metrics(scores, label, group, thresholds=t, n_boot=0)["fair_score"]
    assert fitted > base + 0.05
    assert abs(t[0] - 0.5) < 0.1 and t[1] > 0.6  # it moved the men's threshold, not the women's


def test_fit_group_thresholds_is_optimal_on_small_case():
    rng = np.random.default_rng(3)
    n = 40
    group, label = rng.integers(0, 2, n), rng.integers(0, 2, n)
    scores = _logits(rng.random(n))
    t = metrics.fit_group_thresholds(scores, label, group)
    fitted = metrics.fair_score(metrics.group_accuracies(metrics.decide(scores, group, t), label, group))
    p = metrics.positive_prob(scores)
    # exhaustive search over every pair of thresholds that change a decision
    cands = np.concatenate([[0.0], np.sort(p)])
    best = max(metrics.fair_score(metrics.group_accuracies((p > np.where(group == 0, a, b)).astype(int), label, group))
               for a, b in itertools.product(cands, cands))
    assert fitted == pytest.approx(best)


def test_fit_group_thresholds_needs_two_groups():
    with pytest.raises(ValueError, match="two or more groups"):
        metrics.fit_group_thresholds(np.zeros((4, 2)), np.array([0, 1, 0, 1]), np.zeros(4, dtype=int))


def test_has_groups_and_selection_rule():
    assert metrics.has_groups([0, 1, -1]) and metrics.has_groups([2, 4])
    assert not metrics.has_groups([0, 0, -1]) and not metrics.has_groups([]) and not metrics.has_groups([-1, 3, 3])
    m = {"accuracy": 0.9, "fair_score": 0.7}
    assert metrics.selection_score(m, "fair") == 0.7 and metrics.selection_score(m, "accuracy") == 0.9


def _three_groups(n, seed):
    """Scores of a model that is shifted differently per group: group 1 pushed up, group 2 down and rarer."""
    rng = np.random.default_rng(seed)
    group = rng.choice(3, n, p=[0.45, 0.4, 0.15])
    label = rng.integers(0, 2, n)
    p = np.clip(0.5 + (label - 0.5) * 0.4 + rng.normal(0, 0.15, n) + np.array([0, 0.2, -0.15])[group], 0.01, 0.99)
    return _logits(p), label, group


def test_decide_uses_each_groups_threshold():
    scores = _logits(np.array([0.3, 0.3, 0.3, 0.3, 0.7]))
    group = np.array([0, 1, 2, -1, 5])  # -1 and an id beyond the list: 0.5
    assert metrics.decide(scores, group, [0.2, 0.4, 0.25]).tolist() == [1, 0, 1, 0, 1]


def test_fit_group_thresholds_three_groups_is_exact():
    scores, label, group = _three_groups(36, seed=5)
    t = metrics.fit_group_thresholds(scores, label, group)
    assert len(t) == 3
    fitted = metrics.fair_score(metrics.group_accuracies(metrics.decide(scores, group, t), label, group))
    p = metrics.positive_prob(scores)
    cands = np.concatenate([[0.0], np.sort(p)])
    # exhaustive search over every triple of thresholds that change a decision
    best = max(metrics.fair_score(metrics.group_accuracies((p > np.array(ts)[group]).astype(int), label, group))
               for ts in itertools.product(cands, cands, cands))
    assert fitted == pytest.approx(best)
    base = metrics.fair_score(metrics.group_accuracies(metrics.decide(scores), label, group))
    assert fitted > base
    # a group id without samples gets 0.5 (argmax), and the list covers n_groups
    assert metrics.fit_group_thresholds(scores, label, np.where(group == 1, 3, group), n_groups=5)[1::3] == [0.5, 0.5]


@pytest.mark.parametrize("objective", ["equal_opportunity", "equalized_odds"])
def test_constrained_thresholds_are_exact_and_within_tolerance(objective):
    scores, label, group = _three_groups(30, seed=11)
    tol = 0.2
    t = metrics.fit_group_thresholds(scores, label, group, objective=objective, tolerance=tol)
    p = metrics.positive_prob(scores)

    def spread_ok(pred):
        r = [metrics.rates(pred[group == g], label[group == g]) for g in range(3)]
        keys = ("tpr", "fpr") if objective == "equalized_odds" else ("tpr",)
        return all(max(x[k] for x in r) - min(x[k] for x in r) <= tol + 1e-12 for k in keys)

    pred = metrics.decide(scores, group, t)
    assert spread_ok(pred)
    cands = np.concatenate([[0.0], np.sort(p)])
    best = max(((p > np.array(ts)[group]).astype(int) == label).sum() for ts in itertools.product(cands, repeat=3)
                if spread_ok((p > np.array(ts)[group]).astype(int)))
    assert (pred == label).sum() == best


def test_frontier_is_pareto_and_holds_the_fair_optimum():
    scores, label, group = _three_groups(400, seed=2)
    front = metrics.frontier(scores, label, group)
    gaps, means = np.array([g for _, g in front]), np.array([m for m, _ in front])
    assert (np.diff(gaps) > 0).all() and (np.diff(means) > 0).all()  # a rising staircase: no point dominates another
    t = metrics.fit_group_thresholds(scores, label, group)
    acc = list(metrics.group_accuracies(metrics.decide(scores, group, t), label, group).values())
    best = max(m - g for m, g in front)
    assert np.mean(acc) - (max(acc) - min(acc)) == pytest.approx(best)


def test_k_group_metrics_flag_small_groups_and_cells():
    scores, label, group = _three_groups(300, seed=4)
    m = metrics.compute_metrics(scores, label, group, group_names=["a", "b", "c"], n_boot=200)
    acc = metrics.group_accuracies(metrics.decide(scores), label, group)
    assert m["fair_score"] == pytest.approx(metrics.fair_score(acc))
    lo, hi = m["fair_score_ci"]
    assert lo < m["fair_score"] < hi
    assert set(m["group_accuracy_ci"]) == {"a", "b", "c"}
    assert m["small_groups"] == [k for k, g in m["groups"].items() if g["n"] < 30]
    assert m["small_cells"] == [k for k, n in m["cell_n"].items() if n < 30] and m["small_cells"]
    assert sum(m["cell_n"].values()) == 300


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
    if name == "five_groups":  # FairFace-like: k groups of unequal sizes, one of them without positives
        group = rng.choice(5, n, p=[0.35, 0.25, 0.2, 0.15, 0.05])
        label = np.where(group == 3, 0, label)
    return scores, label, group


CASES = ["random", "men_without_positives", "all_predicted_class_0", "five_groups"]


@pytest.mark.parametrize("case", CASES)
def test_group_metrics_equal_fairlearn(case):
    fm = pytest.importorskip("fairlearn.metrics")
    skm = pytest.importorskip("sklearn.metrics")
    scores, y, g = _case(case)
    names = ["women", "men"] if g.max() == 1 else [f"g{k}" for k in range(g.max() + 1)]
    pred, p = scores.argmax(1), metrics.positive_prob(scores)
    m = metrics.compute_metrics(scores, y, g, group_names=names, n_boot=0)
    frame = fm.MetricFrame(metrics={"selection_rate": fm.selection_rate, "tpr": fm.true_positive_rate,
                                    "fpr": fm.false_positive_rate, "fnr": fm.false_negative_rate,
                                    "accuracy": skm.accuracy_score},
                           y_true=y, y_pred=pred, sensitive_features=np.array(names)[g])
    assert sorted(m["groups"]) == sorted(frame.by_group.index)
    for name, row in m["groups"].items():
        k_of = g == names.index(name)
        for k in ("selection_rate", "tpr", "fpr", "fnr", "accuracy"):
            assert row[k] == pytest.approx(frame.by_group.loc[name, k], abs=1e-12), (name, k)
        assert row["ppv"] == pytest.approx(skm.precision_score(y[k_of], pred[k_of], zero_division=0), abs=1e-12)
        assert row["auroc"] == pytest.approx(skm.roc_auc_score(y[k_of], p[k_of]) if len(set(y[k_of])) == 2 else
                                             np.nan, abs=1e-12, nan_ok=True)
    expected = {
        "demographic_parity_difference": fm.demographic_parity_difference(y, pred, sensitive_features=g),
        "demographic_parity_ratio": fm.demographic_parity_ratio(y, pred, sensitive_features=g),
        "equalized_odds_difference": fm.equalized_odds_difference(y, pred, sensitive_features=g),
        "equalized_odds_difference_mean": fm.equalized_odds_difference(y, pred, sensitive_features=g, agg="mean"),
        "equalized_odds_ratio": fm.equalized_odds_ratio(y, pred, sensitive_features=g),
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
    m = metrics.compute_metrics(scores, LABEL, GROUP, class_names=["no", "yes"], n_boot=0)
    assert m["cell_accuracy"] == {"yes / women": pytest.approx(2 / 3), "no / men": pytest.approx(1 / 2)}
    assert m["worst_group"] == "no / men" and m["worst_group_accuracy"] == 0.5
    assert m["mean_cell_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # every confidence is softmax(3, 0) = 0.9526 (one bin) and 4 of 6 are right: ECE = |0.9526 - 4/6|
    conf = 1 / (1 + np.exp(-3.0))
    assert m["ece"] == pytest.approx(abs(conf - 4 / 6), abs=1e-12)
    ece, bins = metrics.calibration([0.55, 0.65, 0.95, 0.96], [1, 0, 1, 1], bins=10)
    assert bins == [(0.55, 1.0, 1), (0.65, 0.0, 1), (pytest.approx(0.955), 1.0, 2)]
    assert ece == pytest.approx((0.45 + 0.65 + 2 * 0.045) / 4)
    assert metrics.auroc([0.1, 0.4, 0.4, 0.8], [0, 0, 1, 1]) == pytest.approx((1 + 0.5 + 1 + 1) / 4)  # a tie is half
    assert np.isnan(metrics.auroc([0.1, 0.2], [1, 1]))


def test_bootstrap_cis_cover_the_gap_metrics():
    rng = np.random.default_rng(0)
    n = 2000
    y, g = rng.integers(0, 2, n), rng.integers(0, 2, n)
    pred = np.where(rng.random(n) < np.where(g == 1, 0.9, 0.75), y, 1 - y)
    m = metrics.compute_metrics(np.eye(2)[pred], y, g, n_boot=2000)
    for k in ("fair_score", "worst_group_accuracy", "equalized_odds_difference", "demographic_parity_difference"):
        lo, hi = m[f"{k}_ci"]
        assert lo < m[k] < hi, k


def test_balanced_accuracy_and_macro_f1_equal_scikit_learn():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    for C, n in ((2, 300), (3, 200)):
        label = np.where(rng.random(n) < 0.05, 1, 0) if C == 2 else rng.integers(0, C, n)  # 1:19 for two classes
        pred = np.where(rng.random(n) < 0.8, label, rng.integers(0, C, n))
        cm = metrics.confusion(pred, label, C)
        assert metrics.balanced_accuracy(cm) == pytest.approx(skm.balanced_accuracy_score(label, pred), abs=1e-12)
        assert metrics.macro_f1(cm) == pytest.approx(skm.f1_score(label, pred, average="macro"), abs=1e-12)
    # by hand: 18 no-mask right, 0 of 1 mask found: accuracy 0.947 but balanced (1 + 0) / 2
    cm = metrics.confusion(np.zeros(19, int), np.r_[np.zeros(18, int), 1], 2)
    assert metrics.balanced_accuracy(cm) == 0.5 and metrics.macro_f1(cm) == pytest.approx((36 / 37 + 0) / 2)
    # a class nobody has nor predicts does not count (scikit-learn's labels = those seen)
    assert metrics.macro_f1(metrics.confusion([0, 1, 1], [0, 1, 0], 3)) == pytest.approx((2 / 3 + 2 / 3) / 2)
    label = np.where(rng.random(400) < 0.1, 1, 0)
    pred, group = np.where(rng.random(400) < 0.85, label, 1 - label), rng.integers(0, 2, 400)
    m = metrics.compute_metrics(np.eye(2)[pred], label, group, n_boot=0)
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(label, pred), abs=1e-12)
    for g, name in enumerate(metrics.GROUP_NAMES):  # per group too
        y, p = label[group == g], pred[group == g]
        assert m["groups"][name]["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, p), abs=1e-12)
        assert m["groups"][name]["macro_f1"] == pytest.approx(skm.f1_score(y, p, average="macro"), abs=1e-12)
    assert metrics.selection_score(m, "balanced_accuracy") == m["balanced_accuracy"]
    assert metrics.selection_score(m, "macro_f1") == m["macro_f1"]
