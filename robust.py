"""
The debiasing harness around train_vit.py's recipe: the group-robustness literature's two-stage methods and a table
that puts every method side by side on one data set. It drives train_vit.train; the one-stage methods are keys of
the recipe itself (--loss=group_dro, --group_weights=inverse, --sampler=balanced|subsample, --train_groups=0), and
every train_vit.py key works here too.

    python robust.py --config=robust --jtt_epochs=1 --jtt_up=5 --out_dir=runs/jtt     # JTT (Liu et al. 2021)
    python robust.py --config=robust --dfr=runs/erm/last.safetensors --out_dir=runs/dfr  # DFR (Kirichenko et al. 2023)
    python robust.py --config=robust --table=robust   # each method x 3 seeds -> runs/robust/robust_table.md
    python robust.py --config=robust --table=robust --quick   # a few-minute check (1 seed, 2 epochs): runs/robust/quick

JTT writes out_dir/jtt_id (its identification run), out_dir/jtt_errors.json (the errors, train_vit.py's
upsample=PATH format) and then the final run into out_dir; DFR writes out_dir/best.safetensors and log.jsonl.
"""

import json
import os
import shlex
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

import configurator
import data
import evaluate
import metrics
import model
import run
import train_vit
from configurator import UserError

# -----------------------------------------------------------------------------
# config: every train_vit.py key, and these
table = ""  # robust: every TABLE row x table_seeds seeds into out_dir/<row>_s<seed>, then out_dir/robust_table.md
table_seeds = 3  # the table's seeds: 0 .. table_seeds-1
quick = False  # with table: a few-minute check (1 seed, 2 epochs), not a result
jtt_epochs = 0  # JTT (Liu et al. 2021): T epochs of ERM into out_dir/jtt_id find the train errors; 0 = off
jtt_up = 20  # JTT: lambda_up, how many times each error of that run is seen per epoch of the final run (upsampled)
dfr = ""  # DFR (Kirichenko et al. 2023): a checkpoint whose head is refitted on frozen features of val -> out_dir
# -----------------------------------------------------------------------------
OWN = {k: v for k, v in globals().items() if not k.startswith("_") and type(v) in (bool, int, float, str)}
DEFAULTS = {**train_vit.DEFAULTS, **OWN}
CHOICES = {**train_vit.CHOICES, "table": ("", "robust")}
PRESETS = {
    **train_vit.PRESETS,  # recipe, demo
    # make robust-table: the debiasing table on the CPU (data/robust: synthetic Blond_Hair x Male, 40x40). A
    # 0.1M-parameter ViT (2 blocks, width 64, 8x8 patches) from scratch, small enough for 9 rows x 3 seeds in about
    # 6 minutes on 2 idle cores.
    "robust": dict(init="scratch", arch="vit_tiny", dim=64, depth=2, heads=2, img_size=40, opt="adamw", lr=1e-3,
                   weight_decay=0.05, epochs=3, batch_size=128, warmup=0.1, loss="ce", augment="weak", compile=False,
                   amp="none", select="worst_group", data_dir="data/robust", out_dir="runs/robust", threads=1),
    # the same table on CelebA Blond_Hair x Male (data/celeba_blond, the literature's task), a GPU job: the recipe's
    # DINO ViT-S/8 at native 80x80 with its SING settings, cross-entropy, 5 epochs, best epoch by worst-group val
    # accuracy
    "robust_gpu": dict(img_size=80, loss="ce", epochs=5, batch_size=128, select="worst_group",
                       data_dir="data/celeba_blond", out_dir="runs/robust_celeba"),
}
DFR_L2 = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)  # the L2 strengths DFR tries (standardised features)
DFR_FITS = 10  # cell-balanced draws of val whose fitted heads DFR averages


def recipe_config(cfg):
    """cfg without this file's keys: what train_vit.train takes."""
    return {k: v for k, v in cfg.items() if k not in OWN}


# -----------------------------------------------------------------------------
# JTT: an identification run, its errors, a final run that sees them jtt_up times per epoch

def run_jtt(cfg):
    """JTT (Liu et al. 2021). Stage 1: the same config trained for jtt_epochs epochs (its own schedule) into
    out_dir/jtt_id; the train samples its last epoch misclassifies (argmax on the unaugmented images against the
    train labels) are the error set, written to out_dir/jtt_errors.json. Stage 2: train_vit.train with
    upsample=that file (each error seen jtt_up times per epoch) into out_dir. resume and force pass through to both,
    so a resumed JTT run finds its identification run finished. -> stage 2's best record."""
    out_dir, (rank, _) = cfg["out_dir"], run.rank_world()
    run.check_out_dir(out_dir, cfg["resume"], cfg["force"])  # the final run's folder, before the first stage's work
    id_dir, errors_path = os.path.join(out_dir, "jtt_id"), os.path.join(out_dir, "jtt_errors.json")
    train_vit.train({**recipe_config(cfg), "epochs": cfg["jtt_epochs"], "stop_after": 0, "out_dir": id_dir})
    device = run.pick_device(cfg["device"])
    net, _, _ = model.load_checkpoint(os.path.join(id_dir, "last.safetensors"), device=device)
    loader = data.make_loader(cfg["data_dir"], "train", cfg["eval_batch_size"], train=False, device=device,
                              backend=cfg["backend"])  # every rank scores the whole split: the same set everywhere
    scores, labels, groups = evaluate.predict(net, loader, net.cfg.img_size, amp=cfg["amp"])
    errors = torch.nonzero(scores.argmax(1) != labels).flatten()
    if rank == 0:
        names = data.read_meta(cfg["data_dir"])["groups"] or metrics.GROUP_NAMES
        name = lambda g: names[g] if 0 <= g < len(names) else str(g)
        per_cell = {f"{y} / {name(g)}": int(((labels[errors] == y) & (groups[errors] == g)).sum())
                    for y in labels.unique().tolist() for g in groups.unique().tolist()}
        record = {"id_run": id_dir, "epochs": cfg["jtt_epochs"], "n_train": len(labels), "n_errors": len(errors),
                  "errors_per_cell": per_cell, "indices": errors.tolist(), "times": cfg["jtt_up"]}
        os.makedirs(out_dir, exist_ok=True)
        run.write_text(errors_path, json.dumps(record) + "\n")
        print(f"JTT: {len(errors)} of {len(labels)} train samples misclassified after {cfg['jtt_epochs']} epochs "
              f"(label / group: {per_cell}); each is seen {cfg['jtt_up']} times per epoch from now on")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # the file is written before any rank reads it
    return train_vit.train({**recipe_config(cfg), "upsample": errors_path})


# -----------------------------------------------------------------------------
# DFR: the last layer refitted on frozen features of cell-balanced validation draws

@torch.no_grad()
def features(net, loader, img_size, amp="none"):
    """(frozen features [N, dim]: forward_features, the CLS token after the final norm; labels; groups), on the CPU."""
    net.eval()
    out = []
    for x, y, g in loader:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
            out.append((net.forward_features(data.prepare(x, img_size)).float().cpu(), y.cpu(), g.cpu()))
    return tuple(torch.cat(t) for t in zip(*out))


def fit_head(x, y, l2, num_classes=2):
    """Multinomial logistic regression on fixed features: W [classes, d], b [classes] minimising the mean
    cross-entropy + l2 |W|^2, full batch, float64, LBFGS with a strong-Wolfe line search (a convex problem)."""
    x = x.double()
    W = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    lbfgs = torch.optim.LBFGS([W, b], max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                              line_search_fn="strong_wolfe")

    def closure():
        lbfgs.zero_grad()
        loss = F.cross_entropy(x @ W.T + b, y) + l2 * W.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        lbfgs.step(closure)
    return W.detach(), b.detach()


def dfr_head(feats, labels, groups, seed=0, num_classes=2):
    """DFR on the validation split (Kirichenko et al. 2023, "DFR^Val_Tr"): a linear head on frozen features, fitted on
    label x group cell-balanced draws of val. The L2 strength is chosen as the paper chooses its C: fit on a
    balanced draw of one random half of val, keep the strength with the best worst-cell accuracy on the other half.
    Then DFR_FITS heads, each on a new balanced draw of all of val, are averaged. Features are standardised (val
    mean and std) and the standardisation folded into the head. (The paper uses an L1 penalty on CelebA; L2 here.)
    -> (W [classes, dim], b [classes]) for the raw features, and what was chosen."""
    gen = torch.Generator().manual_seed(seed)
    mean, std = feats.mean(0), feats.std(0).clamp(min=1e-6)
    z = (feats - mean) / std
    half = torch.randperm(len(z), generator=gen)
    fit, held = train_vit.subsample(half[len(z) // 2:], labels, groups, gen), half[: len(z) // 2]

    def worst_cell(W, b, idx):
        pred = (z[idx].double() @ W.T + b).argmax(1)
        return min(metrics.cell_accuracies(pred, labels[idx], groups[idx]).values())

    tried = {l2: worst_cell(*fit_head(z[fit], labels[fit], l2, num_classes), held) for l2 in DFR_L2}
    l2 = max(tried, key=tried.get)  # ties: the weakest penalty, the first in DFR_L2
    draws = [train_vit.subsample(torch.arange(len(z)), labels, groups, gen) for _ in range(DFR_FITS)]
    heads = [fit_head(z[d], labels[d], l2, num_classes) for d in draws]
    W = torch.stack([h[0] for h in heads]).mean(0) / std.double()
    b = torch.stack([h[1] for h in heads]).mean(0) - W @ mean.double()
    return W, b, {"l2": l2, "held_out_worst_cell": tried, "n_fit": len(draws[0]), "fits": DFR_FITS}


def run_dfr(cfg):
    """DFR from the checkpoint cfg["dfr"]: its head refitted on frozen features of val (dfr_head), the rest of the
    network unchanged, written as out_dir/best.safetensors; out_dir/log.jsonl holds the choice, val metrics (of the
    split the head was fitted on) and test metrics. -> the test metrics."""
    c = SimpleNamespace(**cfg)
    device = run.pick_device(c.device)
    net, ck_meta, _ = model.load_checkpoint(c.dfr, device=device)
    meta = data.read_meta(c.data_dir, splits=("val", "test"))
    if not isinstance(net, model.ViT):
        raise UserError(f"--dfr={c.dfr} holds a {net.arch}; DFR here refits the head of a ViT")
    if differ := data.mismatch(ck_meta.get("data") or {}, meta):
        raise UserError(f"--dfr={c.dfr} was trained for other data than {c.data_dir}: {differ}")
    _, val_groups = data.load_labels(c.data_dir, "val")
    if not metrics.has_groups(val_groups) or (val_groups < 0).any():
        raise UserError(f"DFR needs a group label on every val sample of {c.data_dir}, and two or more groups")
    group_names = meta["groups"] or metrics.GROUP_NAMES
    with run.run_dir(c.out_dir, c.resume, c.force):
        split = lambda name: features(net, data.make_loader(c.data_dir, name, c.eval_batch_size, train=False,
                                                            device=device, backend=c.backend), net.cfg.img_size, c.amp)
        val, test = split("val"), split("test")
        W, b, info = dfr_head(*val, seed=c.seed, num_classes=len(meta["classes"]))
        with torch.no_grad():
            net.head.weight.copy_(W.float())
            net.head.bias.copy_(b.float())
        scored = lambda f: metrics.compute_metrics(f[0].double() @ W.T + b, f[1], f[2], group_names=group_names,
                                                   n_boot=0)
        val_metrics, on_test = scored(val), scored(test)
        model.save_checkpoint(os.path.join(c.out_dir, "best.safetensors"), net,
                              meta={"config": ck_meta.get("config", {}), "data": ck_meta.get("data"),
                                    "epoch": ck_meta.get("epoch"), "metrics": val_metrics,
                                    "dfr": {"from": c.dfr, **info}})
        run.write_text(os.path.join(c.out_dir, "log.jsonl"),
                       json.dumps({"dfr": c.dfr, **info, **val_metrics, "test": on_test}) + "\n")
        print(f"DFR: the head of {c.dfr} refitted on {DFR_FITS} cell-balanced draws of {info['n_fit']} val samples "
              f"(l2 {info['l2']:g}) -> {os.path.join(c.out_dir, 'best.safetensors')}; test accuracy "
              f"{on_test['accuracy']:.4f}, worst cell {on_test['worst_group_accuracy']:.4f} "
              f"({on_test['worst_group']}), fair {on_test['fair_score']:.4f}")
    return on_test


# -----------------------------------------------------------------------------
# the debiasing table (--table=robust): the group-robustness literature's baselines side by side on one data set

# (row, run folder tag, config overrides). Group DRO samples cells evenly, as its paper and BalancingGroups run it;
# JTT: one ERM epoch finds the errors (T = 1, as the paper on CelebA), upsampled 5x (the paper's CelebA lambda_up is
# 50: 5 keeps the CPU table short); DFR refits the head of the same seed's ERM run (its last epoch).
TABLE = (("ERM", "erm", {}),
         ("reweighting (inverse cell frequency)", "reweight", dict(group_weights="inverse")),
         ("oversampling (sampler=balanced)", "oversample", dict(sampler="balanced")),
         ("subsampling (sampler=subsample)", "subsample", dict(sampler="subsample")),
         ("Group DRO", "group_dro", dict(loss="group_dro", sampler="balanced")),
         ("JTT", "jtt", dict(jtt_epochs=1, jtt_up=5)),
         ("DFR (ERM's head refitted on val)", "dfr", dict(dfr="erm")),
         ("focal loss (the original's)", "focal", dict(loss="focal")),
         ("women only (the original's)", "women", dict(train_groups="0")))
TABLE_COLUMNS = (("worst_group_accuracy", "worst group"), ("accuracy", "average"), ("fair_score", "fair"),
                 ("equalized_odds_difference", "EO difference"))


def run_one(cfg):
    """One run of any method: JTT's two stages, or the recipe with its debiasing keys. -> the best record."""
    return run_jtt(cfg) if cfg["jtt_epochs"] else train_vit.train(recipe_config(cfg))


def run_table(cfg):
    """Every TABLE row x seeds 0..table_seeds-1 on cfg's data, each run in out_dir/<tag>_s<seed> (replaced by a new
    table; with resume=true continued), its best.safetensors chosen by select= (worst_group in the robust preset);
    then the test metrics of each, mean ± std per row -> out_dir/robust_table.md, printed. quick: 1 seed, 2 epochs,
    in out_dir/quick (a check that leaves the real table alone)."""
    run_cfg, start = {**cfg, "table": "", "quick": False, "force": not cfg["resume"]}, time.time()
    out_dir = os.path.join(cfg["out_dir"], "quick") if cfg["quick"] else cfg["out_dir"]
    if cfg["quick"]:
        run_cfg |= {"table_seeds": 1, "epochs": min(cfg["epochs"], 2)}
    seeds = range(run_cfg["table_seeds"])
    folder = lambda tag, s: os.path.join(out_dir, f"{tag}_s{s}")
    for s in seeds:  # every row and seed checked against the data before the first one trains
        for name, tag, over in TABLE:
            row = {**run_cfg, **over, "seed": s, "out_dir": folder(tag, s)}
            try:
                if "dfr" not in over:  # DFR refits the ERM row's head: its own checks run with it
                    train_vit.check_run(recipe_config(row))
            except UserError as e:
                raise UserError(f"robust table row '{name}' (seed {s}): {e}") from None
    minutes = {tag: [] for _, tag, _ in TABLE}
    for s in seeds:
        for _, tag, over in TABLE:
            if "dfr" not in over:
                t0 = time.time()
                run_one({**run_cfg, **over, "seed": s, "out_dir": folder(tag, s)})
                minutes[tag].append((time.time() - t0) / 60)
    if run.rank_world()[0] != 0:
        return
    device = run.pick_device(cfg["device"])
    results = {tag: [] for _, tag, _ in TABLE}
    for s in seeds:
        for _, tag, over in TABLE:
            t0 = time.time()
            if "dfr" in over:
                base = os.path.join(folder(over["dfr"], s), "last.safetensors")  # the ERM row's final weights
                results[tag].append(run_dfr({**run_cfg, "dfr": base, "seed": s, "out_dir": folder(tag, s)}))
                minutes[tag].append((time.time() - t0) / 60)
            else:
                results[tag].append(train_vit.metrics_on_test(folder(tag, s), SimpleNamespace(**cfg), device))
    write_table(cfg, run_cfg, out_dir, results, minutes, seeds, start)
    return results


def write_table(cfg, run_cfg, out_dir, results, minutes, seeds, start):
    """out_dir/robust_table.md: what was run (data, model, command, date, time), then a row per method."""
    meta = data.read_meta(cfg["data_dir"])
    names = meta["groups"] or metrics.GROUP_NAMES
    cells = ", ".join(f"{meta['classes'][c['label']]} / {names[c['group']]} {c['n']}"
                      for c in meta["splits"]["train"]["cells"] if c["group"] >= 0)
    command = " ".join(shlex.quote(f"--{k}={v}") for k, v in cfg.items() if v != DEFAULTS[k])
    model_txt = (f"{cfg['arch']} from scratch" if cfg["init"] == "scratch" else cfg["pretrained"]) + \
        (f" (dim {cfg['dim']}, depth {cfg['depth']})" if cfg["init"] == "scratch" and cfg["dim"] else "")
    intro = [f"Test metrics of each run's best.safetensors (best epoch by validation {cfg['select']}), mean ± std over "
             f"seeds {', '.join(map(str, seeds))}; data `{cfg['data_dir']}` (train cells: {cells}); {model_txt} at "
             f"{cfg['img_size']}x{cfg['img_size']}, {run_cfg['epochs']} epochs, lr {cfg['lr']:g}, batch "
             f"{cfg['batch_size']}. Minutes: wall time per run on this machine (JTT's includes its identification run; "
             "DFR's is the refit alone, on top of ERM's).",
             f"Command: `python robust.py {command}`" + (" (quick: 1 seed, 2 epochs; a check, not a result)"
                                                         if cfg["quick"] else ""),
             f"Measured {time.strftime('%Y-%m-%d')}; the whole table took {(time.time() - start) / 60:.0f} min."]
    rows = [[row, *(run.mean_std([r.get(key, float("nan")) for r in results[tag]]) for key, _ in TABLE_COLUMNS),
             f"{np.mean(minutes[tag]):.1f}"] for row, tag, _ in TABLE]
    run.write_table(os.path.join(out_dir, "robust_table.md"), intro,
                    ["method", *(name for _, name in TABLE_COLUMNS), "minutes"], rows)


def parse_config(argv):
    """train_vit.py's keys and checks, with this file's keys, presets and help."""
    cfg = train_vit.parse_config(argv, DEFAULTS, (__file__, train_vit.__file__), PRESETS, CHOICES)
    need = lambda key, ok, allowed: configurator.require(cfg, key, ok, allowed)
    for key in ("jtt_up", "table_seeds"):
        need(key, lambda v: v >= 1, "must be >= 1")
    need("jtt_epochs", lambda v: v >= 0, "must be >= 0")
    if cfg["jtt_epochs"]:
        need("sampler", lambda v: v == "random", "JTT (jtt_epochs > 0) upsamples its error set itself; use random")
        need("upsample", lambda v: not v, "JTT (jtt_epochs > 0) writes its own upsample file; leave upsample empty")
    return cfg


def run_any(cfg):
    """The table, a DFR refit (on rank 0) or one run, as the keys say."""
    if cfg["table"]:
        return run_table(cfg)
    if cfg["dfr"]:
        return run_dfr(cfg) if run.rank_world()[0] == 0 else None
    return run_one(cfg)


@configurator.cli
def main(argv=None):
    train_vit.launch(parse_config(sys.argv[1:] if argv is None else argv), run_any)


if __name__ == "__main__":
    main()
