"""Fairness metrics of a classifier's predictions, for any number of groups: numpy and torch, nothing else.

The challenge's metric: fair = 0.5 * (acc_women + acc_men) - |acc_women - acc_men|.
Groups follow data.py: 0 = women, 1 = men, -1 = unknown (left out of per-group numbers, kept in overall ones).
Names follow fairlearn where fairlearn has the metric (selection rate, TPR, FPR, demographic parity and equalized odds
differences), and the label x group cells are those of the group-robustness literature (worst-group accuracy).
Offers: group_accuracies, fair_score, confusion, f1, rates, auroc, roc_curve, calibration, gaps, cell_accuracies,
bootstrap_ci, positive_prob, decide, fit_group_thresholds, has_both_groups, SELECT and selection_score (the one
best-checkpoint rule), and compute_metrics (all of them for one split, as report.json and log.jsonl hold them).
"""

import numpy as np
import torch

GROUP_NAMES = ("women", "men")  # index = group id


def _np(x):
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


# -----------------------------------------------------------------------------
# metrics on predictions (pred, label, group: 1-D int arrays or tensors of equal length)

def group_accuracies(pred, label, group):
    """{group id: accuracy} for every known group (id >= 0) present, in increasing id order (0 = women, 1 = men)."""
    pred, label, group = _np(pred), _np(label), _np(group)
    return {int(g): float((pred[group == g] == label[group == g]).mean()) for g in np.unique(group[group >= 0])}


def _fair(acc_women, acc_men):
    # elementwise, so the bootstrap and the threshold search can score whole arrays of accuracy pairs at once
    return 0.5 * (acc_women + acc_men) - np.abs(acc_women - acc_men)


def fair_score(acc):
    """The challenge metric from group_accuracies' dict; defined only for exactly the two groups 0 and 1."""
    if sorted(acc) != [0, 1]:
        raise ValueError(f"the fair score needs exactly two groups (0 = women, 1 = men); got groups {sorted(acc)}")
    return float(_fair(acc[0], acc[1]))


def confusion(pred, label, num_classes=2):
    """[num_classes, num_classes] counts, rows = true label, columns = prediction."""
    pred, label = _np(pred).astype(np.int64), _np(label).astype(np.int64)
    return np.bincount(label * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def f1(cm):
    """F1 from a confusion matrix: of class 1 for two classes, macro-averaged over classes otherwise."""
    cm = np.asarray(cm)
    tp = np.diag(cm)
    denom = 2 * tp + (cm.sum(0) - tp) + (cm.sum(1) - tp)  # 2tp + fp + fn
    per_class = np.divide(2 * tp, denom, out=np.zeros(len(cm)), where=denom > 0)
    return float(per_class[1] if len(cm) == 2 else per_class.mean())


def rates(pred, label):
    """fairlearn's base rates of binary predictions (class 1 = positive): selection rate, TPR, FPR, FNR and PPV
    (precision). A rate whose denominator is empty is 0, as fairlearn gives (scikit-learn's normalised confusion
    matrix and zero_division)."""
    (tn, fp), (fn, tp) = confusion(pred, label, 2)
    ratio = lambda a, b: float(a / b) if b else 0.0
    return {"selection_rate": ratio(tp + fp, tn + fp + fn + tp), "tpr": ratio(tp, tp + fn), "fpr": ratio(fp, fp + tn),
            "fnr": ratio(fn, tp + fn), "ppv": ratio(tp, tp + fp)}


def auroc(p, label):
    """Area under the ROC curve of scores p for class 1 against class 0: the Mann-Whitney statistic with ties counted
    half (average ranks), as scikit-learn's roc_auc_score; nan when one of the two classes is absent."""
    p, label = _np(p).astype(np.float64), _np(label)
    n_pos, n_neg = int((label == 1).sum()), int((label == 0).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    values, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    rank = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # average 1-based rank of each score among ties
    return float((rank[label == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(p, label):
    """(fpr, tpr) at every distinct threshold of p, from (0, 0) to (1, 1), for plotting."""
    p, label = _np(p), _np(label)
    order = np.argsort(-p, kind="stable")
    p, label = p[order], label[order]
    last = np.r_[np.flatnonzero(np.diff(p)), len(p) - 1]  # the end of each run of equal scores
    tp, fp = np.cumsum(label == 1)[last], np.cumsum(label == 0)[last]
    return np.r_[0, fp] / max(fp[-1], 1), np.r_[0, tp] / max(tp[-1], 1)


def calibration(confidence, correct, bins=15):
    """Expected calibration error (Guo et al. 2017) of the top-label confidence over `bins` equal-width bins of
    [0, 1], and the reliability diagram behind it: (ece, [(mean confidence, accuracy, n) per non-empty bin])."""
    confidence, correct = _np(confidence).astype(np.float64), _np(correct).astype(np.float64)
    b = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)  # bin k holds (k/bins, (k+1)/bins]
    n = np.bincount(b, minlength=bins)
    conf, acc = (np.bincount(b, w, minlength=bins) for w in (confidence, correct))
    nz = n > 0
    ece = float(np.abs(conf[nz] - acc[nz]).sum() / max(len(confidence), 1))
    return ece, [(float(c / k), float(a / k), int(k)) for c, a, k in zip(conf[nz], acc[nz], n[nz])]


def gaps(by_group):
    """fairlearn's between-group differences (max - min over groups, fairlearn's default method) of per-group rates:
    demographic parity difference and ratio (selection rate), equalized odds difference (the larger of the TPR and
    FPR differences; `_mean`: their mean), equal opportunity difference (TPR) and the accuracy difference."""
    col = lambda k: np.array([m[k] for m in by_group.values()])
    diff = lambda k: float(col(k).max() - col(k).min())
    sr = col("selection_rate")
    return {"demographic_parity_difference": diff("selection_rate"),
            "demographic_parity_ratio": float(sr.min() / sr.max()) if sr.max() > 0 else float("nan"),
            "equalized_odds_difference": max(diff("tpr"), diff("fpr")),
            "equalized_odds_difference_mean": (diff("tpr") + diff("fpr")) / 2,
            "equal_opportunity_difference": diff("tpr"), "accuracy_difference": diff("accuracy")}


def cell_accuracies(pred, label, group):
    """{(label, group): accuracy} over the label x group cells present (known groups only), the cells of the
    group-robustness literature (Group DRO, JTT: e.g. Blond_Hair x Male on CelebA)."""
    pred, label, group = _np(pred), _np(label), _np(group)
    cells = np.unique(np.stack([label, group], 1)[group >= 0], axis=0)
    return {(int(y), int(g)): float((pred[(label == y) & (group == g)] == y).mean()) for y, g in cells}


def bootstrap_ci(pred, label, group, num_classes=2, n_boot=1000, seed=0, level=0.95):
    """Percentile bootstrap CIs of the fair score, each group's accuracy, the worst cell's accuracy and (two classes)
    the demographic parity and equalized odds differences.

    Every one of these depends only on how many resampled items fall in each (group, label, prediction) cell, and
    resampling N items with replacement gives multinomial(N, empirical cell frequencies) counts exactly, so we draw
    the counts directly: the same distribution as resampling indices, in O(n_boot) memory instead of O(n_boot * N).
    """
    pred, label, group = _np(pred).astype(np.int64), _np(label).astype(np.int64), _np(group).astype(np.int64)
    G, C = int(group.max(initial=-1)) + 1, num_classes
    cell = np.where(group >= 0, (group * C + label) * C + pred, G * C * C)  # the last cell: unknown group
    freq = np.bincount(cell, minlength=G * C * C + 1) / len(cell)
    counts = np.random.default_rng(seed).multinomial(len(cell), freq, size=n_boot)[:, :-1].reshape(n_boot, G, C, C)
    q = [50 * (1 - level), 50 * (1 + level)]
    ci = lambda v: np.nanpercentile(v, q).tolist()
    present = [g for g in range(G) if (group == g).any()]
    with np.errstate(invalid="ignore", divide="ignore"):  # a resample may miss a group or cell: nan, ignored
        acc = {g: np.trace(counts[:, g], axis1=1, axis2=2) / counts[:, g].sum((1, 2)) for g in present}
        per_cell = [counts[:, g, y, y] / counts[:, g, y].sum(1) for y, g in cell_accuracies(pred, label, group)]
        out = {"group_accuracy": {g: ci(a) for g, a in acc.items()},
               "worst_group_accuracy": ci(np.nanmin(np.stack(per_cell), 0)) if per_cell else None}
        if present == [0, 1]:
            out["fair_score"] = ci(_fair(acc[0], acc[1]))
        if C == 2 and len(present) > 1:
            rate = lambda a, b: np.nan_to_num(a / b)  # an empty denominator gives 0, as in rates()
            c = counts[:, present]
            sr = rate(c[..., 1].sum(-1), c.sum((-1, -2)))
            tpr, fpr = rate(c[:, :, 1, 1], c[:, :, 1].sum(-1)), rate(c[:, :, 0, 1], c[:, :, 0].sum(-1))
            spread = lambda v: v.max(1) - v.min(1)
            out["demographic_parity_difference"] = ci(spread(sr))
            out["equalized_odds_difference"] = ci(np.maximum(spread(tpr), spread(fpr)))
    return out


# -----------------------------------------------------------------------------
# decisions from scores (logits [N, C]) and per-group thresholds on the positive-class probability

def positive_prob(scores):
    return torch.softmax(torch.as_tensor(scores, dtype=torch.float32), dim=1)[:, 1].numpy()


def decide(scores, group=None, thresholds=None):
    """argmax, or with thresholds ([t_women, t_men]) class 1 iff p(class 1) > t of the sample's group.

    Unknown groups use 0.5; p > 0.5 is the argmax rule of two logits (a tie goes to class 0, as argmax does).
    """
    if thresholds is None:
        return _np(torch.as_tensor(scores).argmax(1))
    group = _np(group)
    t = np.where(group >= 0, np.asarray(thresholds, dtype=np.float64)[np.clip(group, 0, 1)], 0.5)
    return (positive_prob(scores) > t).astype(np.int64)


def _accuracy_per_threshold(p, y):
    """Every decision a threshold can make on one group: (thresholds, accuracies), one per distinct accuracy.

    Candidates are the probabilities themselves (rule p > t) plus 0 and 0.5; among thresholds giving the same
    accuracy we keep the one closest to 0.5, the least surprising choice.
    """
    t = np.unique(np.concatenate([[0.0, 0.5], p]))
    neg, pos = np.sort(p[y == 0]), np.sort(p[y == 1])
    acc = (np.searchsorted(neg, t, "right") + len(pos) - np.searchsorted(pos, t, "right")) / len(p)
    order = np.argsort(np.abs(t - 0.5), kind="stable")
    acc, first = np.unique(acc[order], return_index=True)  # ascending accuracy
    return t[order][first], acc


def fit_group_thresholds(scores, label, group):
    """Per-group thresholds [t_women, t_men] on p(class 1) that maximise the fair score on these (val) scores.

    For a fixed a_women the fair score rises with a_men (slope 1.5) up to a_men = a_women and falls after it
    (slope -0.5), so the best partner of each women's accuracy is the nearest men's accuracy on either side:
    a sorted search instead of trying all pairs.
    """
    p, label, group = positive_prob(scores), _np(label), _np(group)
    if sorted(np.unique(group[group >= 0]).tolist()) != [0, 1]:
        raise ValueError("fitting group thresholds needs both groups (0 = women, 1 = men) in the data")
    (t0, a0), (t1, a1) = (_accuracy_per_threshold(p[group == g], label[group == g]) for g in (0, 1))
    j = np.searchsorted(a1, a0)  # a1[j] >= a0 > a1[j - 1]
    cand = np.stack([np.clip(j, 0, len(a1) - 1), np.clip(j - 1, 0, len(a1) - 1)])  # [2, len(a0)]
    score = _fair(a0[None], a1[cand])
    side, i = np.unravel_index(np.argmax(score), score.shape)
    return [float(t0[i]), float(t1[cand[side, i]])]


def has_both_groups(group):
    """Whether groups 0 and 1 both occur: what per-group accuracy and the fair score need (-1 = unknown is ignored)."""
    group = _np(group)
    return bool((group == 0).any() and (group == 1).any())


SELECT = ("fair", "worst_group", "accuracy")  # the validation metrics a run can keep its best checkpoint by
SELECT_KEY = {"fair": "fair_score", "worst_group": "worst_group_accuracy", "accuracy": "accuracy"}


def selection_score(metrics, select):
    """The one best-checkpoint rule of both training scripts: the validation metric named by select= (higher is
    better). fair and worst_group need validation data with both groups; the scripts check that before training."""
    return metrics[SELECT_KEY[select]]


def compute_metrics(scores, label, group, thresholds=None, fair=True, group_names=GROUP_NAMES, class_names=None,
                    n_boot=1000, seed=0, curves=False):
    """Every metric of one split as a JSON-able dict, under fairlearn's names where fairlearn has the metric.

    Overall: n, accuracy, F1, confusion, ECE (15 bins) and, for two classes, AUROC. With fair=True and at least two
    known groups: per group (`groups`: n, accuracy, selection rate, TPR, FPR, FNR, PPV, AUROC, ECE), the
    between-group gaps (gaps()), the label x group cells (`cell_accuracy`, `worst_group_accuracy` and its
    `worst_group` name, `mean_cell_accuracy`), the fair score for exactly two groups, and bootstrap CIs (n_boot > 0).
    curves=True adds the ROC curve and reliability diagram of everyone and of each group (`curves`) for plots.
    """
    scores, label, group = _np(scores).astype(np.float64), _np(label), _np(group)
    C = scores.shape[1]
    class_names = class_names or [str(c) for c in range(C)]
    prob = torch.softmax(torch.as_tensor(scores), 1).numpy()
    pred = decide(scores, group, thresholds)
    cm = confusion(pred, label, C)

    def summary(keep):
        m = {"n": int(keep.sum()), "accuracy": float((pred[keep] == label[keep]).mean())}
        if C == 2:
            m |= rates(pred[keep], label[keep]) | {"auroc": auroc(prob[keep, 1], label[keep])}
        m["ece"], _ = calibration(prob[keep].max(1), prob[keep].argmax(1) == label[keep])
        return m

    def curve(keep):  # ROC points and reliability bins, for report.png
        fpr, tpr = roc_curve(prob[keep, 1], label[keep]) if C == 2 else ([], [])
        _, bins = calibration(prob[keep].max(1), prob[keep].argmax(1) == label[keep])
        return {"roc_fpr": np.asarray(fpr).tolist(), "roc_tpr": np.asarray(tpr).tolist(), "reliability": bins}

    everyone = summary(np.ones(len(label), bool))
    m = {"n": len(label), "accuracy": everyone["accuracy"], "f1": f1(cm), "ece": everyone["ece"],
         **({"auroc": everyone["auroc"]} if C == 2 else {}), "confusion": cm.tolist()}
    if curves:
        m["curves"] = {"all": curve(np.ones(len(label), bool))}
    known = np.unique(group[group >= 0]).tolist()
    if not fair or len(known) < 2:
        return m
    name = lambda g: group_names[g] if g < len(group_names) else str(g)
    by_group = {name(g): summary(group == g) for g in known}
    m["groups"] = by_group
    m["group_accuracy"] = {k: v["accuracy"] for k, v in by_group.items()}
    m["group_confusion"] = {name(g): confusion(pred[group == g], label[group == g], C).tolist() for g in known}
    if known == [0, 1]:
        m["fair_score"] = fair_score(group_accuracies(pred, label, group))
    if C == 2:
        m |= gaps(by_group)
    cells = {f"{class_names[y]} / {name(g)}": a for (y, g), a in cell_accuracies(pred, label, group).items()}
    m["cell_accuracy"] = cells
    m["worst_group"] = min(cells, key=cells.get)
    m["worst_group_accuracy"] = cells[m["worst_group"]]
    m["mean_cell_accuracy"] = float(np.mean(list(cells.values())))
    if n_boot:
        ci = bootstrap_ci(pred, label, group, C, n_boot, seed)
        m["group_accuracy_ci"] = {name(g): v for g, v in ci.pop("group_accuracy").items()}
        m |= {f"{k}_ci": v for k, v in ci.items()}
    if curves:
        m["curves"] |= {name(g): curve(group == g) for g in known}
    return m
