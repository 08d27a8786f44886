"""Fairness metrics of a classifier's predictions, for any number of groups: numpy and torch, nothing else.

The fair score over G groups: fair = mean_g acc_g - (max_g acc_g - min_g acc_g). For G = 2 it is the challenge's
metric, 0.5 * (acc_women + acc_men) - |acc_women - acc_men|. Groups follow data.py: ids 0..G-1 (two groups: 0 = women,
1 = men), -1 = unknown (left out of per-group numbers, kept in overall ones).
Names follow fairlearn where fairlearn has the metric (selection rate, TPR, FPR, demographic parity and equalized odds
differences), and the label x group cells are those of the group-robustness literature (worst-group accuracy).
Offers: group_accuracies, fair_score, confusion, f1, balanced_accuracy, macro_f1, rates, auroc, roc_curve,
calibration, gaps, cell_accuracies, bootstrap_ci, positive_prob, decide, fit_group_thresholds and frontier (per-group
thresholds), has_groups, SELECT and selection_score (the one best-checkpoint rule), and compute_metrics (all of them
for one split, as report.json and log.jsonl hold them).
"""

import numpy as np
import torch

GROUP_NAMES = ("women", "men")  # index = group id, for data without group names
SMALL_GROUP = 30  # a group or cell with fewer test samples is flagged as too small to read, not ranked


def _np(x):
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


# -----------------------------------------------------------------------------
# metrics on predictions (pred, label, group: 1-D int arrays or tensors of equal length)

def group_accuracies(pred, label, group):
    """{group id: accuracy} for every known group (id >= 0) present, in increasing id order (0 = women, 1 = men)."""
    pred, label, group = _np(pred), _np(label), _np(group)
    return {int(g): float((pred[group == g] == label[group == g]).mean()) for g in np.unique(group[group >= 0])}


def _fair(acc):
    """The fair score of accuracies [..., G] over the last axis: elementwise over the rest, so the bootstrap and the
    threshold search score whole arrays at once. mean - (max - min); for G = 2, 0.5 (a + b) - |a - b| exactly."""
    acc = np.asarray(acc, dtype=np.float64)
    return acc.mean(-1) - (acc.max(-1) - acc.min(-1))


def fair_score(acc):
    """The fair score from group_accuracies' dict: mean_g acc_g - (max_g acc_g - min_g acc_g), for 2 or more groups
    (for two it is the challenge's 0.5 * (acc_women + acc_men) - |acc_women - acc_men|)."""
    if len(acc) < 2:
        raise ValueError(f"the fair score needs two or more groups; got groups {sorted(acc)}")
    return float(_fair(list(acc.values())))


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


def balanced_accuracy(cm):
    """The mean recall over the classes present (rows with samples), as scikit-learn's balanced_accuracy_score: what
    an imbalanced task (1:18 masked faces) should be judged by, since the trivial model scores 1 / C on it."""
    cm = np.asarray(cm)
    n = cm.sum(1)
    return float(np.mean(np.diag(cm)[n > 0] / n[n > 0])) if (n > 0).any() else float("nan")


def macro_f1(cm):
    """F1 averaged over the classes that occur as a label or a prediction, as scikit-learn's f1_score(average="macro")
    (a class without any true positive, predicted or not, counts 0)."""
    cm = np.asarray(cm)
    tp = np.diag(cm)
    seen = (cm.sum(0) + cm.sum(1)) > 0
    denom = 2 * tp + (cm.sum(0) - tp) + (cm.sum(1) - tp)
    return float(np.mean(2 * tp[seen] / denom[seen])) if seen.any() else float("nan")


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
    """fairlearn's between-group differences (max - min over groups, fairlearn's default method) and ratios (min / max;
    nan when max is 0) of per-group rates: demographic parity difference and ratio (selection rate), equalized odds
    difference (the larger of the TPR and FPR differences; `_mean`: their mean) and ratio (the smaller of the TPR and
    FPR ratios, nan when the TPR ratio is, as fairlearn's min() gives), equal opportunity difference (TPR) and the
    accuracy difference."""
    col = lambda k: np.array([m[k] for m in by_group.values()])
    diff = lambda k: float(col(k).max() - col(k).min())
    ratio = lambda k: float(col(k).min() / col(k).max()) if col(k).max() > 0 else float("nan")
    return {"demographic_parity_difference": diff("selection_rate"),
            "demographic_parity_ratio": ratio("selection_rate"),
            "equalized_odds_difference": max(diff("tpr"), diff("fpr")),
            "equalized_odds_ratio": min(ratio("tpr"), ratio("fpr")) if not np.isnan(ratio("tpr")) else float("nan"),
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
        if len(present) >= 2:
            out["fair_score"] = ci(_fair(np.stack([acc[g] for g in present], -1)))
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
    """argmax, or with thresholds (one per group id: [t_0, t_1, ...]) class 1 iff p(class 1) > t of the sample's group.

    Unknown groups (-1) and group ids beyond the list use 0.5; p > 0.5 is the argmax rule of two logits (a tie goes to
    class 0, as argmax does).
    """
    if thresholds is None:
        return _np(torch.as_tensor(scores).argmax(1))
    group, thresholds = _np(group).astype(np.int64), np.asarray(thresholds, dtype=np.float64)
    known = (group >= 0) & (group < len(thresholds))
    t = np.where(known, thresholds[np.where(known, group, 0)], 0.5)
    return (positive_prob(scores) > t).astype(np.int64)


def _operating_points(p, y):
    """Every decision a threshold can make on one group's probabilities p and labels y, as the rule p > t:
    (thresholds ascending, correct decisions, TPR, FPR), one row per candidate t (the p themselves, 0 and 0.5).
    TPR and FPR never rise with t; a rate with no denominator is 0, as in rates()."""
    t = np.unique(np.concatenate([[0.0, 0.5], p]))
    neg, pos = np.sort(p[y == 0]), np.sort(p[y == 1])
    tn = np.searchsorted(neg, t, "right")  # negatives with p <= t: decided 0, right
    tp = len(pos) - np.searchsorted(pos, t, "right")
    return t, tn + tp, tp / max(len(pos), 1), (len(neg) - tn) / max(len(neg), 1)


def _accuracy_levels(p, y):
    """One group's distinct accuracies, ascending, each with the threshold that gives it closest to 0.5 (the least
    surprising choice among equals): (thresholds, accuracies)."""
    t, correct, _, _ = _operating_points(p, y)
    order = np.argsort(np.abs(t - 0.5), kind="stable")
    acc, first = np.unique(correct[order] / len(p), return_index=True)
    return t[order][first], acc


def _fair_sweep(levels):
    """The exact fair-score search over G groups' accuracy levels [(thresholds, accuracies ascending), ...].

    Take the best thresholds' accuracies a*_g and their maximum M. Giving every group instead its best accuracy at
    most M keeps the maximum at M and raises no group's accuracy less, so it scores at least as well: the optimum is
    among the G-vectors "each group's best accuracy <= hi" for hi over every accuracy some group can reach, an
    O(H G) sweep. -> (accuracies [G, H] and threshold indices [G, H] of the valid hi, every group reaching one)."""
    his = np.unique(np.concatenate([a for _, a in levels]))
    idx = np.stack([np.searchsorted(a, his, "right") - 1 for _, a in levels])  # -1: the group has nothing <= hi
    valid = (idx >= 0).all(0)
    idx = idx[:, valid]
    return np.stack([a[i] for (_, a), i in zip(levels, idx)]), idx


def _range_argmax(values):
    """A sparse table over values [n]: query(lo, hi) -> the index of the first maximum of values[lo..hi], for arrays
    of inclusive ranges (lo <= hi), in O(1) per range after O(n log n) set-up."""
    table, span = [np.arange(len(values))], 1
    while 2 * span <= len(values):  # level k: the first maximum of values[i .. i + 2^k - 1]
        prev = table[-1]
        right = np.r_[prev[span:], np.repeat(prev[-1:], span)]  # the padding is never read by a valid range
        table.append(np.where(values[right] > values[prev], right, prev))
        span *= 2
    table = np.stack(table)

    def query(lo, hi):
        k = np.floor(np.log2(hi - lo + 1)).astype(np.int64)
        a, b = table[k, lo], table[k, hi - (1 << k) + 1]
        return np.where(values[b] > values[a], b, a)
    return query


RATE_EDGES = (2000, 400)  # lower window edges the constrained searches try at most: one rate, two rates (pairs)


def _edges(rates, cap):
    values = np.unique(np.concatenate(rates))
    return values if len(values) <= cap else np.quantile(values, np.linspace(0, 1, cap))


def _constrained(points, constrain_fpr, tolerance):
    """Per-group thresholds maximising the number of right decisions with every group's TPR (and with constrain_fpr
    its FPR) inside one window [lo, lo + tolerance]: the between-group difference of those rates is then at most
    the tolerance. For a window, the thresholds a group may use are a contiguous run (its rates never rise with t),
    so each group's best one is a range maximum; lo runs over every rate some group reaches, which makes the search
    exact (above RATE_EDGES distinct rates, over that many quantiles of them: then it may miss the best by a little).
    A window always fits: at its top threshold every group decides 0 everywhere (TPR = FPR = 0). -> the threshold
    index per group."""
    queries = [_range_argmax(correct) for _, correct, _, _ in points]

    def run(rate_of):  # -> [(first, last) index arrays over the lower edges], for one rate
        runs, edges = [], _edges([pt[rate_of] for pt in points], RATE_EDGES[constrain_fpr])
        for pt in points:
            r = -pt[rate_of]  # ascending in t
            runs.append((np.searchsorted(r, -(edges + tolerance) - 1e-12, "left"),
                         np.searchsorted(r, -edges + 1e-12, "right") - 1))
        return runs

    windows = run(2)
    if constrain_fpr:  # every pair of a TPR window and an FPR window: their runs' intersection
        fpr = run(3)
        windows = [(np.maximum(a0[:, None], b0[None]).ravel(), np.minimum(a1[:, None], b1[None]).ravel())
                   for (a0, a1), (b0, b1) in zip(windows, fpr)]
    ok = np.all([first <= last for first, last in windows], 0)
    best = [q(first[ok], last[ok]) for q, (first, last) in zip(queries, windows)]
    total = np.sum([pt[1][b] for pt, b in zip(points, best)], 0)
    w = int(np.argmax(total))
    return [int(b[w]) for b in best]


THRESHOLD_OBJECTIVES = ("fair", "equal_opportunity", "equalized_odds")


def fit_group_thresholds(scores, label, group, n_groups=None, objective="fair", tolerance=0.05):
    """Per-group thresholds [t_0, ..., t_{G-1}] on p(class 1), fitted on these (val) scores, for any number of groups.

    objective="fair": maximise the fair score (mean_g acc_g - (max_g acc_g - min_g acc_g)); an exact search
    (_fair_sweep). "equal_opportunity" / "equalized_odds": maximise accuracy over the known-group samples with the
    groups' TPR (and FPR) differences at most `tolerance`; an exact search over rate windows (_constrained).
    Groups absent here (ids below n_groups) get 0.5, the argmax rule."""
    p, label, group = positive_prob(scores), _np(label), _np(group)
    present = np.unique(group[group >= 0]).tolist()
    if len(present) < 2:
        raise ValueError("fitting group thresholds needs two or more groups in the data")
    thresholds = [0.5] * max(n_groups or 0, present[-1] + 1)
    if objective == "fair":
        levels = [_accuracy_levels(p[group == g], label[group == g]) for g in present]
        acc, idx = _fair_sweep(levels)
        score = _fair(acc.T)
        best = np.flatnonzero(score == score.max())
        pick = best[np.argmax(acc[:, best].mean(0))]  # among equal scores, the highest mean accuracy
        chosen = [levels[k][0][idx[k, pick]] for k in range(len(present))]
    else:
        points = [_operating_points(p[group == g], label[group == g]) for g in present]
        found = _constrained(points, objective == "equalized_odds", tolerance)
        chosen = [pt[0][i] for pt, i in zip(points, found)]
    for g, t in zip(present, chosen):
        thresholds[g] = float(t)
    return thresholds


def frontier(scores, label, group):
    """The fairness-accuracy frontier per-group thresholds reach on these scores: the Pareto-optimal (mean group
    accuracy, max - min group accuracy) points among those the fair search visits, by rising gap. [[mean, gap], ...]."""
    p, label, group = positive_prob(scores), _np(label), _np(group)
    present = np.unique(group[group >= 0]).tolist()
    acc, _ = _fair_sweep([_accuracy_levels(p[group == g], label[group == g]) for g in present])
    points = sorted(zip(acc.mean(0), acc.max(0) - acc.min(0)), key=lambda m_g: (m_g[1], -m_g[0]))
    front, best = [], -np.inf
    for mean, gap in points:
        if mean > best:
            front.append([float(mean), float(gap)])
            best = mean
    return front


def has_groups(group):
    """Whether two or more known groups occur: what per-group accuracy and the fair score need (-1 is ignored)."""
    group = _np(group)
    return len(np.unique(group[group >= 0])) >= 2


SELECT = ("fair", "worst_group", "accuracy", "balanced_accuracy", "macro_f1")  # what best.safetensors is chosen by
SELECT_KEY = {"fair": "fair_score", "worst_group": "worst_group_accuracy", "accuracy": "accuracy",
              "balanced_accuracy": "balanced_accuracy", "macro_f1": "macro_f1"}
NEEDS_GROUPS = ("fair", "worst_group")  # the select= choices that need two or more groups in the val split


def selection_score(metrics, select):
    """The one best-checkpoint rule of both training scripts: the validation metric named by select= (higher is
    better). fair and worst_group need validation data with two or more groups; the scripts check that before
    training."""
    return metrics[SELECT_KEY[select]]


def compute_metrics(scores, label, group, thresholds=None, fair=True, group_names=GROUP_NAMES, class_names=None,
                    n_boot=1000, seed=0, curves=False):
    """Every metric of one split as a JSON-able dict, under fairlearn's names where fairlearn has the metric.

    Overall: n, accuracy, balanced accuracy, macro-F1, F1, confusion, ECE (15 bins) and, for two classes, AUROC.
    With fair=True and at least two known groups: per group (`groups`: n, accuracy, balanced accuracy, macro-F1,
    selection rate, TPR, FPR, FNR, PPV, AUROC, ECE), the fair score, the between-group gaps (gaps()), the label x
    group cells (`cell_accuracy` with their sizes `cell_n`, `worst_group_accuracy` and its `worst_group` name,
    `mean_cell_accuracy`), the groups and cells with fewer than SMALL_GROUP samples (`small_groups`, `small_cells`:
    too small to read) and bootstrap CIs (n_boot > 0).
    curves=True adds the ROC curve and reliability diagram of everyone and of each group (`curves`) for plots.
    """
    scores, label, group = _np(scores).astype(np.float64), _np(label), _np(group)
    C = scores.shape[1]
    class_names = class_names or [str(c) for c in range(C)]
    prob = torch.softmax(torch.as_tensor(scores), 1).numpy()
    pred = decide(scores, group, thresholds)
    cm = confusion(pred, label, C)

    def summary(keep):
        group_cm = confusion(pred[keep], label[keep], C)
        m = {"n": int(keep.sum()), "accuracy": float((pred[keep] == label[keep]).mean()),
             "balanced_accuracy": balanced_accuracy(group_cm), "macro_f1": macro_f1(group_cm)}
        if C == 2:
            m |= rates(pred[keep], label[keep]) | {"auroc": auroc(prob[keep, 1], label[keep])}
        m["ece"], _ = calibration(prob[keep].max(1), prob[keep].argmax(1) == label[keep])
        return m

    def curve(keep):  # ROC points and reliability bins, for report.png
        fpr, tpr = roc_curve(prob[keep, 1], label[keep]) if C == 2 else ([], [])
        _, bins = calibration(prob[keep].max(1), prob[keep].argmax(1) == label[keep])
        return {"roc_fpr": np.asarray(fpr).tolist(), "roc_tpr": np.asarray(tpr).tolist(), "reliability": bins}

    everyone = summary(np.ones(len(label), bool))
    m = {"n": len(label), "accuracy": everyone["accuracy"], "balanced_accuracy": everyone["balanced_accuracy"],
         "macro_f1": everyone["macro_f1"], "f1": f1(cm), "ece": everyone["ece"],
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
    m["fair_score"] = fair_score(group_accuracies(pred, label, group))
    if C == 2:
        m |= gaps(by_group)
    by_cell = cell_accuracies(pred, label, group)
    cell_name = lambda y, g: f"{class_names[y]} / {name(g)}"
    cells = {cell_name(y, g): a for (y, g), a in by_cell.items()}
    m["cell_accuracy"] = cells
    m["cell_n"] = {cell_name(y, g): int(((label == y) & (group == g)).sum()) for y, g in by_cell}
    m["small_groups"] = [k for k, v in by_group.items() if v["n"] < SMALL_GROUP]
    m["small_cells"] = [k for k, n in m["cell_n"].items() if n < SMALL_GROUP]
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
