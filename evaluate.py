"""Fairness evaluation of face-attribute classifiers, and a CLI that scores a checkpoint on a data split.

The challenge's metric: fair = 0.5 * (acc_women + acc_men) - |acc_women - acc_men|.
Groups follow data.py: 0 = women, 1 = men, -1 = unknown (left out of per-group numbers, kept in overall ones).
Library: group_accuracies, fair_score, confusion, f1, bootstrap_ci, fit_group_thresholds, decide, predict,
has_both_groups, selection_score, compute_metrics. CLI (configurator.py's --key=value):

    python evaluate.py --ckpt runs/seed3/best.safetensors --data data/celeba --split test --out runs/seed3/eval
    python evaluate.py --ckpt ... --data data/challenge --split test --submit submission.txt
"""

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

import configurator
import data
import model

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


def bootstrap_ci(pred, label, group, n_boot=1000, seed=0, level=0.95):
    """Percentile bootstrap CI of the fair score and of each group's accuracy.

    The statistic depends only on how many resampled items fall in each (group, correct) cell, and resampling N
    items with replacement gives multinomial(N, empirical cell frequencies) counts exactly, so we draw the counts
    directly: the same distribution as resampling indices, in O(n_boot) memory instead of O(n_boot * N).
    """
    pred, label, group = _np(pred), _np(label), _np(group)
    correct = (pred == label).astype(np.int64)
    cell = np.where(group >= 0, 2 * group + correct, 4)  # 4 = unknown group, still resampled
    if group.max(initial=-1) > 1:
        raise ValueError("bootstrap_ci supports groups 0 and 1 only")
    freq = np.bincount(cell, minlength=5) / len(cell)
    counts = np.random.default_rng(seed).multinomial(len(cell), freq, size=n_boot)
    with np.errstate(invalid="ignore", divide="ignore"):  # a resample may miss a group entirely: nan, ignored
        acc = [counts[:, 2 * g + 1] / (counts[:, 2 * g] + counts[:, 2 * g + 1]) for g in (0, 1)]
    q = [50 * (1 - level), 50 * (1 + level)]
    return {"fair_score": np.nanpercentile(_fair(*acc), q).tolist(),
            "group_accuracy": {g: np.nanpercentile(acc[g], q).tolist() for g in (0, 1)}}


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


SELECT = ("fair", "accuracy")  # the validation metrics a training run can keep its best checkpoint by


def selection_score(metrics, select):
    """The one best-checkpoint rule of both training scripts: the validation metric named by select= (higher is
    better). select=fair needs validation data with both groups; the scripts check that before training."""
    return metrics["fair_score"] if select == "fair" else metrics["accuracy"]


def compute_metrics(scores, label, group, thresholds=None, fair=True, group_names=GROUP_NAMES, n_boot=1000,
                    seed=0):
    """All metrics of one split as a JSON-able dict; fair=False for data without groups (accuracy, F1 only)."""
    scores, label, group = _np(scores), _np(label), _np(group)
    pred = decide(scores, group, thresholds)
    cm = confusion(pred, label, scores.shape[1])
    m = {"n": len(label), "accuracy": float((pred == label).mean()), "f1": f1(cm), "confusion": cm.tolist()}
    if fair:
        acc = group_accuracies(pred, label, group)
        m["fair_score"] = fair_score(acc)
        m["group_accuracy"] = {group_names[g]: a for g, a in acc.items()}
        m["group_confusion"] = {group_names[g]: confusion(pred[group == g], label[group == g], cm.shape[0]).tolist()
                                for g in acc}
        if n_boot:
            ci = bootstrap_ci(pred, label, group, n_boot, seed)
            m["fair_score_ci"] = ci["fair_score"]
            m["group_accuracy_ci"] = {group_names[g]: c for g, c in ci["group_accuracy"].items()}
    return m


# -----------------------------------------------------------------------------
# inference

@torch.no_grad()
def predict(model, loader, img_size, desc=None):
    """(logits [N, C] float32, labels [N], groups [N]) on the CPU, in loader order; bf16 autocast on CUDA."""
    model.eval()
    scores, labels, groups = [], [], []
    for x, y, g in tqdm(loader, desc=desc, disable=desc is None, leave=False):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            logits = model(data.prepare(x, img_size))
        scores.append(logits.float().cpu())
        labels.append(y.cpu())
        groups.append(g.cpu())
    return torch.cat(scores), torch.cat(labels), torch.cat(groups)


# -----------------------------------------------------------------------------
# CLI

def plot_report(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [("argmax", report)] + ([("thresholded", report["thresholded"])] if "thresholded" in report else [])
    names = list(report["group_accuracy"])
    fig, axes = plt.subplots(1, 1 + len(names), figsize=(4 * (1 + len(names)), 3.6))
    for k, (label, m) in enumerate(variants):
        acc = [m["group_accuracy"][n] for n in names]
        ci = np.array([m["group_accuracy_ci"][n] for n in names]).T
        x = np.arange(len(names)) + 0.4 * k
        lo, hi = m["fair_score_ci"]
        axes[0].bar(x, acc, width=0.4, yerr=np.abs(ci - np.array(acc)), capsize=4,
                    label=f"{label}: fair {m['fair_score']:.3f} [{lo:.3f}, {hi:.3f}]")
    axes[0].set_xticks(np.arange(len(names)) + 0.2 * (len(variants) - 1), names)
    axes[0].set_ylim(max(0.0, min(report["group_accuracy"].values()) - 0.2), 1.0)
    axes[0].set_ylabel("accuracy (95% CI)")
    axes[0].legend(fontsize=7, loc="lower right")
    for ax, n in zip(axes[1:], names):
        cm = np.array(report["group_confusion"][n])
        ax.imshow(cm, cmap="Blues")
        for (i, j), c in np.ndenumerate(cm):
            ax.text(j, i, str(c), ha="center", va="center", color="red")
        ax.set(title=f"{n} (argmax)", xlabel="predicted", ylabel="true", xticks=range(len(cm)), yticks=range(len(cm)))
    fig.suptitle(f"{report['ckpt']} on {report['data']}/{report['split']}", fontsize=8)
    fig.tight_layout()
    model.write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def print_table(report):
    names = list(report.get("group_accuracy", {}))
    print(f"{report['data']} / {report['split']}: n = {report['n']}, checkpoint {report['ckpt']}")
    print(f"{'':12s} {'accuracy':>9s} {'F1':>7s}" + "".join(f" {n:>7s}" for n in names) + ("    fair" if names else ""))
    variants = [("argmax", report)] + ([("thresholded", report["thresholded"])] if "thresholded" in report else [])
    for label, m in variants:
        row = f"{label:12s} {m['accuracy']:9.4f} {m['f1']:7.4f}" + "".join(f" {m['group_accuracy'][k]:7.4f}"
                                                                          for k in names)
        if names:
            row += f" {m['fair_score']:7.4f}  95% CI [{m['fair_score_ci'][0]:.4f}, {m['fair_score_ci'][1]:.4f}]"
        print(row)
    if "thresholded" in report:
        t = report["thresholded"]["thresholds"]
        print("thresholds on p(class 1), fitted on val: " + ", ".join(f"{n} {v:.3f}" for n, v in t.items()))


# the CLI's config: --key=value overrides (configurator.py's convention)
CLI = dict(
    ckpt="",  # a .safetensors checkpoint from train_vit.py / train_mixmatch.py (required)
    data_dir="",  # a data.py output folder (required)
    split="test",  # the split to score
    out_dir="",  # folder for report.json and report.png (empty: print only)
    submit="",  # write challenge-format predictions (-1/1 per line, split order) to this file
    batch_size=256,
    device="auto",  # auto = cuda if available, else cpu
    n_boot=1000,  # bootstrap resamples behind the 95% CIs
)


def main(argv=None):
    args = SimpleNamespace(**configurator.parse(sys.argv[1:] if argv is None else argv, CLI, __file__,
                                                aliases={"data": "data_dir", "out": "out_dir"},
                                                required=("ckpt", "data_dir")))
    if not os.path.isfile(args.ckpt):
        sys.exit(f"error: no checkpoint file {args.ckpt}")
    try:
        net, ck_meta, _ = model.load_checkpoint(args.ckpt)
        meta = data.read_meta(args.data_dir)
    except (ValueError, OSError, KeyError) as e:
        sys.exit(f"error: {e}")
    classes = meta["classes"]
    cfg = net.config_dict()
    if args.split not in meta["splits"]:
        sys.exit(f"error: split '{args.split}' is not in {args.data_dir} (it has: {', '.join(meta['splits'])})")
    if cfg["num_classes"] != len(classes):
        sys.exit(f"error: {args.ckpt} predicts {cfg['num_classes']} classes but {args.data_dir} has {len(classes)} "
                 f"({', '.join(classes)}): a checkpoint for another task or a backbone without a head")
    trained_size = ck_meta.get("data", {}).get("image_size")
    if trained_size is not None and list(trained_size) != list(meta["image_size"]):
        sys.exit(f"error: {args.ckpt} was trained on {trained_size} images, {args.data_dir} holds {meta['image_size']}")
    if args.submit and len(classes) != 2:
        sys.exit("error: the challenge format (-1/1) needs a 2-class data set")

    device = configurator.pick_device(args.device)
    net.to(device)
    img_size = cfg["img_size"]
    loader = lambda split: data.make_loader(args.data_dir, split, args.batch_size, train=False, device=device)
    scores, labels, groups = predict(net, loader(args.split), img_size, desc=f"predict {args.split}")
    has_labels = bool((labels >= 0).all())
    fair = has_both_groups(groups)
    if not has_labels and not args.submit:
        sys.exit(f"error: split '{args.split}' has no labels to score; use --submit to write predictions")
    if has_labels and not fair:
        print(f"split '{args.split}' of {args.data_dir} does not hold both groups: overall metrics only")

    report = None
    if has_labels:
        names = meta.get("groups") or GROUP_NAMES
        report = {"ckpt": args.ckpt, "data": args.data_dir, "split": args.split,
                  **compute_metrics(scores, labels, groups, fair=fair, group_names=names, n_boot=args.n_boot)}
        if fair and len(classes) == 2 and "val" in meta["splits"]:
            # post-processing: thresholds fitted on val (on val itself this score is optimistic), scored here
            val = (scores, labels, groups) if args.split == "val" else predict(net, loader("val"), img_size, "val")
            if bool((val[1] >= 0).all()) and has_both_groups(val[2]):
                t = fit_group_thresholds(*val)
                report["thresholded"] = {"thresholds": dict(zip(names, t)), "fitted_on": "val",
                                         **compute_metrics(scores, labels, groups, t, fair=True, group_names=names,
                                                           n_boot=args.n_boot)}
        print_table(report)

    if args.submit:
        lines = "".join("1\n" if c == 1 else "-1\n" for c in decide(scores).tolist())
        model.write_atomic(args.submit, lambda tmp: Path(tmp).write_text(lines))
        print(f"wrote {len(scores)} predictions to {args.submit}")
    if args.out_dir and report is not None:
        os.makedirs(args.out_dir, exist_ok=True)
        model.write_atomic(os.path.join(args.out_dir, "report.json"),
                           lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1) + "\n"))
        if fair:
            plot_report(report, os.path.join(args.out_dir, "report.png"))
        print(f"wrote {args.out_dir}/report.json" + (" and report.png" if fair else ""))


if __name__ == "__main__":
    main()
