"""Score a checkpoint on a data split (or predict image files): inference, report, plots, model card, Hub push.

The metrics are metrics.py's; this file runs the model (predict, split_metrics: what the trainers report) and the
CLI (configurator.py's --key=value) that writes report.json, report.png, predictions.csv, a model card, a challenge
submission and a Hub upload:

    python evaluate.py --ckpt runs/seed3/best.safetensors --data data/celeba --split test --out runs/seed3/eval
    python evaluate.py --ckpt ... --data data/challenge --split test --submit submission.txt
    python evaluate.py --ckpt ... --data data/fairface --group_by=Male,Race --out runs/x/by_gender_race

Groups: the data set's own (ids 0..G-1, named in its meta.json), or --group_by stored attributes. The fair score over
G groups is mean_g acc_g - (max_g acc_g - min_g acc_g), the challenge's 0.5 (acc_women + acc_men) - |acc_women -
acc_men| when G = 2. Groups with fewer than 30 samples are reported but flagged as too small to read, not ranked.
Per-group thresholds on p(class 1) are fitted on val (for 2 classes) and scored beside the argmax: by default they
maximise the fair score (an exact search over every per-group operating point); --threshold_objective=
equal_opportunity | equalized_odds maximise accuracy with the groups' TPR (and FPR) within --threshold_tolerance.
report.png draws the fairness-accuracy frontier those thresholds reach, with the argmax and the fitted point.
"""

import csv
import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

import configurator
import data
import metrics
import model
import run
from configurator import UserError

# -----------------------------------------------------------------------------
# inference

@torch.no_grad()
def predict(net, loader, img_size, desc=None, world=1, amp="none"):
    """(logits [N, C] float32, labels [N], groups [N]) on the CPU, in loader order; amp="bf16": bf16 autocast (on
    any device). Under DDP (world > 1) each rank predicts its shard and every rank gets all of them, in rank order."""
    net.eval()
    device = next(net.parameters()).device
    scores, labels, groups = [], [], []
    for x, y, g in tqdm(loader, desc=desc, disable=desc is None, leave=False):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
            logits = net(data.prepare(x, img_size))
        scores.append(logits.float().cpu())
        labels.append(y.cpu())
        groups.append(g.cpu())
    out = [torch.cat(t) for t in (scores, labels, groups)]
    # gloo gathers CPU tensors, NCCL device ones: the tensors travel on the model's device
    return tuple(run.gather(t.to(device), world).cpu() for t in out) if world > 1 else tuple(out)


def split_metrics(net, loader, img_size, group_names=metrics.GROUP_NAMES, world=1, amp="none"):
    """compute_metrics of net over a whole split (each rank predicts its shard), without bootstrap CIs: what the
    trainers report on validation and test. Per-group numbers only where the split has two or more groups."""
    scores, labels, groups = predict(net, loader, img_size, world=world, amp=amp)
    return metrics.compute_metrics(scores, labels, groups, fair=metrics.has_groups(groups),
                                   group_names=group_names, n_boot=0)


# -----------------------------------------------------------------------------
# CLI

def plot_report(report, path):
    """report.png: accuracy per group (groups too small to read hatched) and per label x group cell, the fairness
    gaps (95% CIs where bootstrapped), the fairness-accuracy frontier of per-group thresholds, ROC curves and
    reliability diagrams per group, and each group's confusion matrix."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report.get("group_accuracy", {}))
    cells = report.get("cell_accuracy", {})
    fig = plt.figure(figsize=(20, 8.5 + 0.12 * max(0, len(cells) - 8)))  # room for the names of many cells
    grid = fig.add_gridspec(2, 4)
    acc_ax, cell_ax, gap_ax, front_ax, roc_ax, rel_ax = (fig.add_subplot(grid[k // 4, k % 4]) for k in range(6))
    cm_ax = fig.add_subplot(grid[1, 2:])
    small = set(report.get("small_groups", []))
    variants = [("argmax", report)] + ([("thresholded", report["thresholded"])] if "thresholded" in report else [])
    err = lambda value, ci: np.abs(np.array(ci, dtype=float).reshape(-1, 2).T - np.array(value, dtype=float))
    if names:  # horizontal bars, first group on top: the names stay readable for 2 groups or 20
        for k, (label, m) in enumerate(variants):
            acc = [m["group_accuracy"][n] for n in names]
            ci = [m["group_accuracy_ci"][n] for n in names] if "group_accuracy_ci" in m else None
            fair = f": fair {m['fair_score']:.3f}" if "fair_score" in m else ""
            acc_ax.barh(np.arange(len(names)) + 0.4 * k, acc, height=0.4, label=label + fair, capsize=3,
                        xerr=None if ci is None else err(acc, ci), color=f"C{k}",
                        hatch=["//" if n in small else "" for n in names])
        acc_ax.set_yticks(np.arange(len(names)) + 0.2 * (len(variants) - 1),
                          [f"{n} (n={report['groups'][n]['n']})" for n in names], fontsize=7)
        acc_ax.set_xlim(max(0.0, min(report["group_accuracy"].values()) - 0.2), 1.0)
        acc_ax.invert_yaxis()
        acc_ax.legend(fontsize=7, loc="lower left")
        cell_ax.barh(range(len(cells)), list(cells.values()),
                     color=["tab:red" if c == report["worst_group"] else "tab:blue" for c in cells])
        cell_ax.set_yticks(range(len(cells)), list(cells), fontsize=7 if len(cells) <= 8 else 5)
        cell_ax.invert_yaxis()
        cell_ax.set(title=f"label x group cells: worst {report['worst_group_accuracy']:.3f} (red), "
                          f"mean {report['mean_cell_accuracy']:.3f}", xlim=(0, 1))
        gap_keys = [k for k in ("demographic_parity_difference", "equalized_odds_difference",
                                "equal_opportunity_difference", "accuracy_difference") if k in report]
        values = [report[k] for k in gap_keys]
        ci = [report.get(f"{k}_ci", [v, v]) for k, v in zip(gap_keys, values)]
        gap_ax.barh(range(len(gap_keys)), values, xerr=err(values, ci) if gap_keys else None, capsize=4)
        gap_ax.set_yticks(range(len(gap_keys)), [k.replace("_", " ") for k in gap_keys], fontsize=7)
        gap_ax.set(title="between-group differences (0 = parity)", xlim=(0, None))
        title = f"accuracy {report['accuracy']:.3f}; per group (95% CI)"
        acc_ax.set(title=title + (f"; hatched: n < {metrics.SMALL_GROUP}" if small else ""), xlabel="accuracy")
        plot_frontier(front_ax, report.get("frontier"))
    else:  # no groups in this split: the top row has nothing to show
        for ax in (acc_ax, cell_ax, gap_ax, front_ax):
            ax.set_axis_off()
        acc_ax.text(0, 0.5, f"accuracy {report['accuracy']:.4f}\nF1 {report['f1']:.4f}\n(no group labels)",
                    fontsize=14, va="center")
    for name, curve in report.get("curves", {}).items():
        style = dict(color="black", linestyle="--") if name == "all" else dict(linestyle="-")
        stats = report if name == "all" else report["groups"][name]
        if curve["roc_fpr"]:
            roc_ax.plot(curve["roc_fpr"], curve["roc_tpr"], label=f"{name}: AUROC {stats['auroc']:.3f}", **style)
        conf, acc, _ = zip(*curve["reliability"]) if curve["reliability"] else ((), (), ())
        rel_ax.plot(conf, acc, marker="o", label=f"{name}: ECE {stats['ece']:.3f}", **style)
    roc_ax.plot([0, 1], [0, 1], color="grey", linewidth=0.5)
    roc_ax.set(title="ROC per group", xlabel="false positive rate", ylabel="true positive rate")
    rel_ax.plot([0, 1], [0, 1], color="grey", linewidth=0.5)
    rel_ax.set(title="reliability (15 bins of top-label confidence)", xlabel="confidence", ylabel="accuracy",
               xlim=(0, 1), ylim=(0, 1))
    for ax in (roc_ax, rel_ax):
        ax.legend(fontsize=7 if len(names) <= 4 else 5, loc="lower right")
    matrices = report.get("group_confusion") or {}
    if not 0 < len(matrices) <= 4:  # beyond 4 groups the matrices would be unreadable: report.json holds them
        matrices = {"all groups": report["confusion"]}
    C = len(report["confusion"])
    grid = np.full((C, len(matrices) * (C + 1) - 1), np.nan)  # the matrices side by side, a blank column between
    for k, (name, cm) in enumerate(matrices.items()):
        grid[:, k * (C + 1): k * (C + 1) + C] = cm
        for (i, j), c in np.ndenumerate(np.array(cm)):
            cm_ax.text(k * (C + 1) + j, i, str(c), ha="center", va="center", color="red")
        if len(matrices) > 1:
            cm_ax.text(k * (C + 1) + (C - 1) / 2, -0.65, name, ha="center", va="bottom")
    cm_ax.imshow(grid, cmap="Blues")
    cm_ax.set(xlabel="predicted (columns of each matrix)", ylabel="true", xticks=[], yticks=range(C))
    cm_ax.set_title("confusion (argmax)", pad=24)
    fig.suptitle(f"{report['ckpt']} on {report['data']}/{report['split']}", fontsize=8)
    fig.tight_layout()
    run.write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


def plot_frontier(ax, frontier):
    """Mean group accuracy against the between-group accuracy gap: the Pareto front per-group thresholds reach on
    this split, the argmax rule's point and the point of the thresholds in use (fitted on val)."""
    if not frontier:
        ax.set_axis_off()
        return
    mean, gap = zip(*frontier["points"])
    ax.step(gap, mean, where="post", color="grey", marker=".", label="frontier (thresholds fitted on this split)")
    ax.plot(*frontier["argmax"][::-1], "o", color="C0", markersize=9, label="argmax")
    if "thresholded" in frontier:
        ax.plot(*frontier["thresholded"][::-1], "*", color="C1", markersize=13, label="thresholds fitted on val")
    ax.set(title="fairness-accuracy frontier", xlabel="accuracy gap (max - min over groups)",
           ylabel="mean group accuracy")
    ax.legend(fontsize=7, loc="lower right")


def print_table(report):
    """The headline numbers; report.json holds everything."""
    names = list(report.get("group_accuracy", {}))
    print(f"{report['data']} / {report['split']}: n = {report['n']}, checkpoint {report['ckpt']}")
    ci = lambda m, k: f" [{m[k + '_ci'][0]:.3f}, {m[k + '_ci'][1]:.3f}]" if k + "_ci" in m else ""
    variants = [("argmax", report)] + ([("thresholded", report["thresholded"])] if "thresholded" in report else [])
    for label, m in variants:
        line = (f"{label:11s} accuracy {m['accuracy']:.4f}  balanced {m['balanced_accuracy']:.4f}  macro-F1 "
                f"{m['macro_f1']:.4f}  F1 {m['f1']:.4f}")
        line += f"  AUROC {m['auroc']:.4f}  ECE {m['ece']:.4f}" if label == "argmax" and "auroc" in m else ""
        print(line)
        if names:
            print(f"{'':11s} " + "  ".join(f"{n} {m['group_accuracy'][n]:.4f}" for n in names))
            print(f"{'':11s} balanced " + "  ".join(f"{n} {m['groups'][n]['balanced_accuracy']:.4f}" for n in names))
            if "fair_score" in m:
                print(f"{'':11s} fair {m['fair_score']:.4f}{ci(m, 'fair_score')}")
            print(f"{'':11s} worst group {m['worst_group_accuracy']:.4f}{ci(m, 'worst_group_accuracy')} "
                  f"({m['worst_group']})")
            if "equalized_odds_difference" in m:
                print(f"{'':11s} EO difference {m['equalized_odds_difference']:.4f}"
                      f"{ci(m, 'equalized_odds_difference')}  DP difference "
                      f"{m['demographic_parity_difference']:.4f}{ci(m, 'demographic_parity_difference')}")
    small = report.get("small_groups", [])
    if len(names) > 2 or small:  # many groups: ranked, each with its n and CI; the unreadable ones apart
        ranked = sorted((n for n in names if n not in small), key=report["group_accuracy"].get)
        print("groups, worst first (argmax; n, accuracy, 95% CI):")
        width = max(map(len, names))
        for n in ranked + small:
            acc_ci = report.get("group_accuracy_ci", {}).get(n)
            print(f"  {n:{width}s} n={report['groups'][n]['n']:<6d} {report['group_accuracy'][n]:.4f}"
                  + (f" [{acc_ci[0]:.3f}, {acc_ci[1]:.3f}]" if acc_ci else "")
                  + (f"  too small to read (n < {metrics.SMALL_GROUP}), not ranked" if n in small else ""))
    if "thresholds" in report:
        t = {n: report["thresholds"][n] for n in report["group_names"] if n in report["thresholds"]}
        how = report["thresholds"].get("objective", "")
        print(f"thresholds on p(class 1), from {report['thresholds']['fitted_on']}"
              f"{f' ({how})' if how else ''}: " + ", ".join(f"{n} {v:.3f}" for n, v in t.items()))


# the CLI's config: --key=value overrides (configurator.py's convention)
CLI = dict(
    ckpt="",  # our .safetensors checkpoint, or a Hub repo pushed with --push_to_hub (required)
    data_dir="",  # a data.py output folder to score (this, or images)
    images="",  # image files (comma-separated) or a folder: predictions.csv for them, no metrics
    split="test",  # the split of data_dir to score
    out_dir="",  # folder for report.json, report.png, predictions.csv (and README.md with --card)
    submit="",  # write challenge-format predictions (-1/1 per line, split order) to this file
    submit_thresholds=False,  # --submit decides with the per-group thresholds (fitted on val, or from --thresholds)
    thresholds="",  # a report.json of an earlier run: reuse its per-group thresholds instead of fitting on val
    threshold_objective="fair",  # what val-fitted thresholds maximise: fair score | accuracy with TPR (and FPR) parity
    threshold_tolerance=0.05,  # equal_opportunity, equalized_odds: the largest TPR / FPR difference between groups
    group_by="",  # regroup by stored attributes, no rebuild: Male,Young (intersections) | Race (categorical) | none
    card=False,  # also write a Hugging Face model card (out_dir/README.md) from this report
    push_to_hub="",  # a Hub repo id: upload model.safetensors, README.md (the card) and config.json there
    batch_size=256,  # images per forward pass
    device="auto",  # auto = cuda if available, else cpu
    amp="none",  # autocast dtype: bf16 | none (fp32)
    compile=False,  # torch.compile the model first (pays off on large splits on a GPU)
    n_boot=1000,  # bootstrap resamples behind the 95% CIs
)


def parse_args(argv):
    cfg = configurator.parse(argv, CLI, __file__, aliases={"data": "data_dir", "out": "out_dir"}, required=("ckpt",),
                             choices={"amp": ("bf16", "none"), "threshold_objective": metrics.THRESHOLD_OBJECTIVES})
    if bool(cfg["data_dir"]) == bool(cfg["images"]):
        raise UserError("give exactly one of --data_dir (a data.py folder) and --images (files or a folder)")
    if cfg["images"] and (cfg["submit"] or cfg["card"] or cfg["push_to_hub"]):
        raise UserError("--images writes predictions only; --submit, --card and --push_to_hub need --data_dir")
    if (cfg["card"] or cfg["push_to_hub"]) and not cfg["out_dir"]:
        raise UserError("--card and --push_to_hub need --out_dir (the card is written there first)")
    if cfg["n_boot"] < 0 or cfg["batch_size"] < 1:
        raise UserError("--n_boot must be >= 0 and --batch_size >= 1")
    configurator.require(cfg, "threshold_tolerance", lambda v: 0 <= v <= 1, "a rate difference in 0..1")
    return SimpleNamespace(**cfg)


def read_thresholds(path, names, classes):
    """Per-group thresholds [t_0, ..., t_{G-1}] saved by an earlier run in its report.json, checked to be the same
    task (class names) and the same groups, each in [0, 1]."""
    try:
        report = json.loads(Path(path).read_text())
        saved = report["thresholds"]
        values = [float(saved[n]) for n in names]
    except (OSError, ValueError, KeyError, TypeError) as e:  # missing, not JSON, or not an evaluate.py report
        raise UserError(f"--thresholds={path}: no per-group thresholds for {', '.join(names)} in it "
                        f"({type(e).__name__}: {e})") from None
    extra = sorted(set(saved) - set(names) - {"fitted_on", "objective", "tolerance"})
    if extra or report.get("classes", classes) != classes:
        raise UserError(f"--thresholds={path} is for other groups or classes ({', '.join(extra) or report['classes']})")
    if not all(0 <= v <= 1 for v in values):
        raise UserError(f"--thresholds={path}: thresholds are probabilities in [0, 1], got {values}")
    return values


def write_predictions(path, scores, labels, groups, thresholds, files=None):
    """predictions.csv, a row per sample in split order: what fairlearn, AIF360 or a spreadsheet take."""
    prob = torch.softmax(torch.as_tensor(scores, dtype=torch.float32), 1).numpy()
    argmax = metrics.decide(scores)
    decided = metrics.decide(scores, groups, thresholds) if thresholds else argmax
    header = ["index", "file", "label", "group", *(f"p_{c}" for c in range(prob.shape[1])), "pred", "pred_thresholded"]
    rows = [[i, files[i] if files else "", int(y), int(g), *(f"{v:.6f}" for v in prob[i]), int(a), int(d)]
            for i, (y, g, a, d) in enumerate(zip(np.asarray(labels), np.asarray(groups), argmax, decided))]

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
    run.write_atomic(path, write)


ARCH_TAGS = {"vit": ["vision-transformer"], "small": ["cnn"], "wrn50_2": ["cnn", "wide-resnet"]}  # model.ARCHS


def base_model(cfg):
    """The Hub model a run started from, for the card's base_model: its `pretrained` when that is a Hub id (a
    train_vit run from DINO weights, a MixMatch ViT), else None (from scratch, torchvision's weights, a local file)."""
    source = cfg.get("pretrained") or ""
    from_weights = cfg.get("init", "dino") == "dino" and source != "torchvision"
    is_hub_id = source.count("/") == 1 and not os.path.exists(source) and not source.endswith((".safetensors", ".bin"))
    return source if from_weights and is_hub_id else None


def model_card(report, ck_meta, meta, arch):
    """A Hugging Face model card (README.md): YAML metadata with the model-index results, then the report's
    per-group numbers, the worst cell, the fairness gaps with their CIs and the data's cell counts. arch: the
    checkpoint's model.ARCHS name, which sets the card's tags."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    cfg = ck_meta.get("config", {})
    source = meta.get("source", "data")
    dataset = "flwrlabs/celeba" if source == "celeba" else source
    headline = [(k, report[k]) for k in ("accuracy", "fair_score", "worst_group_accuracy", "equalized_odds_difference",
                                        "demographic_parity_difference", "auroc") if k in report]
    results = [EvalResult(task_type="image-classification", dataset_type=dataset, dataset_name=dataset,
                          dataset_split=report["split"], metric_type=k, metric_name=k.replace("_", " "),
                          metric_value=round(float(v), 4)) for k, v in headline]
    card_data = ModelCardData(
        library_name="pytorch", tags=["image-classification", "fairness", *ARCH_TAGS.get(arch, []), "safetensors"],
        base_model=base_model(cfg),
        datasets=[dataset], model_name=Path(report["ckpt"]).parent.name or "model", eval_results=results)
    ci = lambda k: (f" (95% CI {report[k + '_ci'][0]:.3f}-{report[k + '_ci'][1]:.3f})" if k + "_ci" in report
                    else "")
    lines = [f"# {card_data.model_name}", "",
             f"A binary face-attribute classifier ({', '.join(meta['classes'])}; label = `{meta.get('criterion')}`), "
             "trained with fairface-vit (plain PyTorch; weights in `model.safetensors`, our checkpoint format: the "
             "model config, training config and data summary are in its metadata).", "",
             "## Evaluation", "", f"`evaluate.py` on the {report['split']} split of `{report['data']}` "
             f"(n = {report['n']}): accuracy {report['accuracy']:.4f}, F1 {report['f1']:.4f}.", ""]
    if "groups" in report:
        lines += ["| group | n | accuracy | selection rate | TPR | FPR | AUROC | ECE |", "|---" * 8 + "|"]
        lines += [f"| {n} | {g['n']} | {g['accuracy']:.4f} | {g.get('selection_rate', math.nan):.4f} | "
                  f"{g.get('tpr', math.nan):.4f} | {g.get('fpr', math.nan):.4f} | {g.get('auroc', math.nan):.4f} | "
                  f"{g['ece']:.4f} |" for n, g in report["groups"].items()]
    lines += ["", "## Bias, risks and limitations", ""]
    if "groups" in report:
        if "fair_score" in report:
            lines.append(f"- Fair score (mean group accuracy minus the gap): {report['fair_score']:.4f}"
                         f"{ci('fair_score')}.")
        if report.get("small_groups"):
            lines.append(f"- Too few test samples to read (n < {metrics.SMALL_GROUP}): "
                         f"{', '.join(report['small_groups'])}; their numbers are not evidence either way.")
        lines.append(f"- Worst label x group cell: {report['worst_group']}, accuracy "
                     f"{report['worst_group_accuracy']:.4f}{ci('worst_group_accuracy')}; mean over cells "
                     f"{report['mean_cell_accuracy']:.4f}.")
        for k in ("equalized_odds_difference", "demographic_parity_difference", "equal_opportunity_difference"):
            if k in report:
                lines.append(f"- {k.replace('_', ' ').capitalize()}: {report[k]:.4f}{ci(k)}.")
    else:
        lines.append("- The evaluation data has no group labels: no per-group numbers were measured.")
    lines += ["", "Cells of the data (label / group: train, val, test counts):", ""]
    names_of = lambda kind, i: (meta[kind][i] if 0 <= i < len(meta[kind]) else str(i))
    cells = {}
    for split, info in meta["splits"].items():
        for c in info.get("cells", []):
            cells.setdefault((c["label"], c["group"]), {})[split] = c["n"]
    lines += [f"- {names_of('classes', y)} / {names_of('groups', g) if g >= 0 else 'unknown'}: "
              + ", ".join(f"{counts.get(s, 0)}" for s in meta["splits"]) for (y, g), counts in sorted(cells.items())]
    lines += ["", "These numbers hold for data like the evaluation split only; faces from other sources, ages, "
              "skin tones or image conditions may score differently, and the groups measured here are the only "
              "ones checked."]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def push_to_hub(repo_id, ckpt, out_dir, config):
    """Upload the checkpoint as model.safetensors (never a pickle), the card and a config.json to a Hub repo."""
    import shutil

    from huggingface_hub import HfApi

    run.write_text(os.path.join(out_dir, "config.json"), json.dumps(config))
    staged = os.path.join(out_dir, "model.safetensors")
    if os.path.abspath(ckpt) != os.path.abspath(staged):
        run.write_atomic(staged, lambda tmp: shutil.copyfile(ckpt, tmp))
    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        for name in ("model.safetensors", "README.md", "config.json"):
            api.upload_file(path_or_fileobj=os.path.join(out_dir, name), path_in_repo=name, repo_id=repo_id)
    except Exception as e:  # offline (httpx's ConnectError is no OSError), HF_HUB_OFFLINE=1, no token, no rights
        raise UserError(f"cannot push to the Hub repo {repo_id} ({type(e).__name__}); log in with "
                                     f"`hf auth login` and check the network; everything to upload is in {out_dir}") \
            from None
    print(f"pushed model.safetensors, README.md and config.json to https://huggingface.co/{repo_id}")


@configurator.cli
def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for folder, what in check_outputs(args):  # before loading or predicting anything
        run.check_writable(folder, what=what)
    net, ck_meta, _ = model.load_checkpoint(args.ckpt)
    device = run.pick_device(args.device)
    run.warn_slow_bf16(device, args.amp)
    net.to(device)
    runner = torch.compile(net) if args.compile else net  # the model as predict() calls it
    if args.images:
        predict_images(args, runner, net.config_dict()["img_size"], ck_meta, device)
    else:
        score_split(args, net, runner, ck_meta, device)


def check_outputs(args):
    """[(folder, what)] this command will write to: each checked before the work (run.check_writable)."""
    if args.images:
        out = args.out_dir or "predictions.csv"
        return [(os.path.dirname(out) or "." if out.endswith(".csv") else out, "the predictions")]
    return ([(args.out_dir, "the report")] if args.out_dir else []) + \
        ([(os.path.dirname(os.path.abspath(args.submit)), "the submission")] if args.submit else [])


def predict_images(args, runner, img_size, ck_meta, device):
    """--images: predictions for image files (no labels, no groups) -> predictions.csv."""
    trained = ck_meta.get("data", {}).get("image_size") or [img_size, img_size]
    images, files, skipped = data.read_images(args.images, trained[0])
    for path, why in skipped:
        print(f"skipped {path}: {why}")
    if not len(images):
        raise UserError(f"no readable image in --images={args.images}")
    none = torch.full((len(images),), -1)  # no labels, no groups
    batches = ((x.to(device), y, g) for x, y, g in zip(*(t.split(args.batch_size) for t in (images, none, none))))
    scores, _, _ = predict(runner, batches, img_size, desc="predict", amp=args.amp)
    out = args.out_dir or "predictions.csv"
    out = out if out.endswith(".csv") else os.path.join(out, "predictions.csv")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    write_predictions(out, scores, none, none, None, files)
    print(f"wrote {len(files)} predictions to {out} ({len(skipped)} files skipped)")


def check_split(args, net, ck_meta, meta):
    """Everything about --data_dir/--split that can be known before predicting. -> whether the split is labelled."""
    classes, num_classes = meta["classes"], net.config_dict()["num_classes"]
    if num_classes != len(classes):
        raise UserError(f"{args.ckpt} predicts {num_classes} classes but {args.data_dir} has "
                                     f"{len(classes)} ({', '.join(classes)}): a checkpoint for another task or a "
                                     "backbone without a head")
    if differ := data.mismatch(ck_meta.get("data", {}), meta):
        raise UserError(f"{args.ckpt} was trained for another task or data than {args.data_dir} "
                                     f"(trained vs here: {differ})")
    if args.submit and len(classes) != 2:
        raise UserError("the challenge format (-1/1) needs a 2-class data set")
    has_labels = all(c["label"] >= 0 for c in meta["splits"][args.split]["cells"])
    if not has_labels and not args.submit:
        raise UserError(f"split '{args.split}' has no labels to score; use --submit to write predictions")
    if not has_labels and (args.card or args.push_to_hub):
        raise UserError(f"a model card needs metrics: split '{args.split}' has no labels")
    return has_labels


def regroup(args, meta, split):
    """--group_by: the split's groups from its stored attributes (data.groups_from_attrs) -> (groups, names)."""
    attrs, names = data.load_attrs(args.data_dir, split)
    if attrs is None:
        raise UserError(f"--group_by={args.group_by}: {args.data_dir} stores no attributes to group by")
    expr = args.group_by.replace(",", "*")  # Male,Young: the intersections, as the product Male*Young
    groups, group_names = data.groups_from_attrs(expr, attrs, names, meta.get("attribute_values", {}))
    return torch.from_numpy(groups), group_names


def score_split(args, net, runner, ck_meta, device):
    """--data_dir: score a split (metrics, CIs, per-group thresholds fitted on val) -> report.json, report.png,
    predictions.csv, and on request the model card, a challenge submission and a Hub upload."""
    meta = data.read_meta(args.data_dir)
    if args.split not in meta["splits"]:
        raise UserError(f"split '{args.split}' is not in {args.data_dir} (it has: {', '.join(meta['splits'])})")
    data.read_meta(args.data_dir, splits={args.split, "val"} & set(meta["splits"]))  # the files predict will read
    has_labels = check_split(args, net, ck_meta, meta)
    classes, names = meta["classes"], meta.get("groups") or list(metrics.GROUP_NAMES)
    if args.group_by:  # checked (names, attributes) before any prediction
        test_groups, names = regroup(args, meta, args.split)
    img_size = net.config_dict()["img_size"]
    thresholds = read_thresholds(args.thresholds, names, classes) if args.thresholds else None

    loader = lambda split: data.make_loader(args.data_dir, split, args.batch_size, train=False, device=device)
    scores, labels, groups = predict(runner, loader(args.split), img_size, desc=f"predict {args.split}",
                                     amp=args.amp)
    if args.group_by:
        groups = test_groups
    fair = metrics.has_groups(groups)
    if has_labels and not fair:
        print(f"split '{args.split}' of {args.data_dir} does not hold two groups: overall metrics only")
    if thresholds is None and len(classes) == 2 and "val" in meta["splits"]:
        # post-processing: thresholds fitted on val (on val itself the thresholded score is optimistic)
        val = (scores, labels, groups) if args.split == "val" else \
            predict(runner, loader("val"), img_size, "val", amp=args.amp)
        if args.group_by and args.split != "val":
            val = (*val[:2], regroup(args, meta, "val")[0])
        if bool((val[1] >= 0).all()) and metrics.has_groups(val[2]):
            thresholds = metrics.fit_group_thresholds(*val, n_groups=len(names), objective=args.threshold_objective,
                                                      tolerance=args.threshold_tolerance)
    if args.submit_thresholds and thresholds is None:
        raise UserError("--submit_thresholds needs --thresholds=REPORT.json or a labelled val split with two or more "
                        "groups")

    report = {"ckpt": args.ckpt, "data": args.data_dir, "split": args.split, "classes": classes, "group_names": names,
              **({"group_by": args.group_by} if args.group_by else {})}
    if thresholds is not None:
        report["thresholds"] = {**dict(zip(names, thresholds)), "fitted_on": args.thresholds or "val",
                                **({} if args.thresholds else {"objective": args.threshold_objective,
                                                               "tolerance": args.threshold_tolerance})}
    if has_labels:
        report |= metrics.compute_metrics(scores, labels, groups, fair=fair, group_names=names, class_names=classes,
                                          n_boot=args.n_boot, curves=True)
        if fair and thresholds is not None:
            report["thresholded"] = metrics.compute_metrics(scores, labels, groups, thresholds, group_names=names,
                                                            class_names=classes, n_boot=args.n_boot)
        if fair and len(classes) == 2:
            report["frontier"] = frontier_report(scores, labels, groups, thresholds)
        print_table(report)
    if args.submit:
        decided = metrics.decide(scores, groups, thresholds) if args.submit_thresholds else metrics.decide(scores)
        os.makedirs(os.path.dirname(os.path.abspath(args.submit)), exist_ok=True)  # into a new folder too
        run.write_text(args.submit, "".join("1\n" if c == 1 else "-1\n" for c in decided.tolist()))
        print(f"wrote {len(scores)} predictions to {args.submit}"
              + (" (per-group thresholds)" if args.submit_thresholds else ""))
    if args.out_dir:
        write_outputs(args, report, ck_meta, meta, (scores, labels, groups), thresholds, has_labels, net.arch)
    if args.push_to_hub:
        push_to_hub(args.push_to_hub, args.ckpt, args.out_dir,
                    {"model": net.config_dict(), "arch": net.arch, "classes": classes, "groups": names,
                     "criterion": meta.get("criterion"), "image_size": meta["image_size"]})


def frontier_report(scores, labels, groups, thresholds):
    """The fairness-accuracy frontier of per-group thresholds on this split (metrics.frontier), with the points of
    the argmax rule and of the thresholds in use: each [mean group accuracy, max - min group accuracy]."""
    def point(pred):
        acc = list(metrics.group_accuracies(pred, labels, groups).values())
        return [float(np.mean(acc)), float(max(acc) - min(acc))]
    out = {"points": metrics.frontier(scores, labels, groups), "argmax": point(metrics.decide(scores))}
    if thresholds is not None:
        out["thresholded"] = point(metrics.decide(scores, groups, thresholds))
    return out


def write_outputs(args, report, ck_meta, meta, predictions, thresholds, has_labels, arch):
    """out_dir: report.json, predictions.csv, report.png (labelled splits) and README.md (--card / --push_to_hub)."""
    os.makedirs(args.out_dir, exist_ok=True)
    run.write_text(os.path.join(args.out_dir, "report.json"), json.dumps(report, indent=1) + "\n")
    files = meta["splits"][args.split].get("files")
    write_predictions(os.path.join(args.out_dir, "predictions.csv"), *predictions, thresholds, files)
    written = ["report.json", "predictions.csv"]
    if has_labels:
        plot_report(report, os.path.join(args.out_dir, "report.png"))
        written.append("report.png")
    if args.card or args.push_to_hub:
        run.write_text(os.path.join(args.out_dir, "README.md"), str(model_card(report, ck_meta, meta, arch)))
        written.append("README.md")
    print(f"wrote {', '.join(written)} to {args.out_dir}")


if __name__ == "__main__":
    main()
