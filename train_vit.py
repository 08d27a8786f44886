"""
Fine-tune a ViT (DINO ViT-S/8 by default) on a data.py data set for fair face-attribute classification.

nanoGPT-style: the values in the config block below are the defaults, and the defaults ARE the recipe of the
original 4th-place solution (DINO ViT-S/8 fine-tuned with SING at 224). Override any value with --key=value
(configurator.py: typed like its default), or start from a preset with --config=NAME (recipe, demo).

    python train_vit.py --config=recipe --data=data/celeba --seed=3 --out_dir=runs/seed3
    python train_vit.py --config=recipe --data=data/celeba --img_size=80           # native 80x80, ~8x cheaper
    python train_vit.py --sweep="0 1 2" --config=recipe --data=data/celeba        # runs/sweep/seed<N>, sweep.md
    torchrun --standalone --nproc_per_node=8 train_vit.py --data=data/celeba      # DDP: NCCL on GPU, gloo on CPU

A run writes out_dir/log.jsonl (one line per epoch, validation metrics under evaluate.py's names),
best.safetensors (best validation metric, select=), last.safetensors (+ optimizer, RNG and epoch state for
resume=true) and curves.png.
"""

import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import configurator
import data
import evaluate
import model
from sing import SING

# -----------------------------------------------------------------------------
# config (defaults = the original solution's recipe)
# I/O
data_dir = "data/celeba"  # a data.py output folder
out_dir = "runs/vit"  # where the checkpoints, log.jsonl and curves.png go
resume = False  # continue from out_dir/last.safetensors if it exists
force = False  # replace an earlier run in out_dir (without resume or force, such an out_dir is refused)
sweep = ""  # e.g. "0 1 2": train each seed into sweep_dir/seed<N>, then write sweep_dir/sweep.md
sweep_dir = "runs/sweep"  # the sweep's folder (its own, so a sweep never overwrites a `make train` run)
select = "fair"  # the validation metric that picks best.safetensors: fair | worst_group | accuracy
# model
init = "dino"  # dino: model.load_pretrained(pretrained) | scratch: random init of model.PRESETS[arch]
pretrained = "facebook/dino-vits8"  # Hub id or local weights file (init=dino)
arch = "vit_small_patch8"  # model.PRESETS name (init=scratch)
dim = 0  # init=scratch size overrides of the preset; 0 keeps the preset's value
depth = 0  # (init=scratch) number of blocks; 0 keeps the preset's
heads = 0  # (init=scratch) attention heads; 0 keeps the preset's
patch_size = 0  # (init=scratch) patch side in pixels; 0 keeps the preset's
img_size = 224  # the model's input: 80x80 images are resized (bicubic) on the device; 80 = native, 10x10 patches
drop_path = 0.0  # stochastic depth rate
# data
augment = "full"  # a data.AUGMENTS list: full (the original's) | weak (crop + flip) | none (resize + normalise)
augment_kw = ""  # overrides of data.augment's parameters, e.g. "erase_p=0,blur_kernel=3,crop_scale=(0.3,1.0)"
sampler = "random"  # random | balanced: oversample every label x group cell to the size of the largest
train_groups = ""  # e.g. "0": train on these group ids only (0 = women, 1 = men), comma-separated
backend = "resident"  # data.make_loader backend: resident | ffcv
# loss
loss = "bce_smooth"  # bce_smooth: BCE-with-logits on the 2 logits, targets 1-s / s (the recipe) | ce | focal
smoothing = 0.1  # label smoothing s of bce_smooth
focal_gamma = 2.0  # focal loss exponent
group_weights = ""  # loss weight per (label, group) cell "w00,w01,w10,w11" (label-major), e.g. "1,1,1,3"
# optimisation
opt = "sing"  # sing | adamw
lr = 5e-4  # peak learning rate
weight_decay = 5e-3  # not on biases and norms (the recipe's no-decay group, by parameter name)
warmup = 0.05  # linear warmup over this fraction of all iterations, then cosine to 0 at the end of `epochs`
epochs = 10  # also the schedule's horizon
stop_after = 0  # stop after this many epochs (0 = all): a short run that resume=true continues exactly
batch_size = 64  # global: split evenly over DDP ranks
eval_batch_size = 256  # validation batch
# system
seed = 0  # weights, batch order, augmentation, drop-path
device = "auto"  # auto = cuda if available, else cpu
compile = True  # torch.compile the model (works on the CPU too, where it is slower: the demo preset turns it off)
amp = "bf16"  # autocast dtype of the forward passes: bf16 | none (fp32); bf16 runs on the CPU too
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and type(v) in (bool, int, float, str)}
AMP = ("bf16", "none")
CHOICES = {"init": ("dino", "scratch"), "sampler": ("random", "balanced"), "backend": ("resident", "ffcv"),
           "loss": ("bce_smooth", "ce", "focal"), "opt": ("sing", "adamw"), "select": evaluate.SELECT,
           "augment": tuple(data.AUGMENTS), "amp": AMP}
PRESETS = {
    "recipe": {},  # the defaults above: DINO ViT-S/8, 80->224 bicubic, SING 5e-4 / 5e-3, 10 epochs, batch 64
    # make demo: a 0.83M-parameter ViT (4 blocks, width 128, 8x8 patches) from scratch at native 80x80 on data/demo.
    # From scratch and this short, it learns with crop + flip only (the full list keeps it at the trivial
    # classifier for several epochs) and at a DeiT-like lr (2e-3 was unstable past 8 epochs).
    "demo": dict(init="scratch", arch="vit_tiny", dim=128, heads=4, img_size=80, opt="adamw", lr=5e-4,
                 weight_decay=0.05, epochs=7, batch_size=128, warmup=0.1, loss="ce", augment="weak", compile=False,
                 amp="none"),
}
PRESETS["seed_recipe"] = PRESETS["recipe"]  # its earlier name
# what a resumed run must share with the saved one (architecture, optimizer, data, batch order); the rest may change
RESUME_MUST_MATCH = ("data_dir", "init", "pretrained", "arch", "dim", "depth", "heads", "patch_size", "img_size",
                     "opt", "batch_size", "seed", "sampler", "train_groups")
NO_DECAY = ("bias", "bn", "norm", "layernorm")  # the original's no-decay name patterns: biases and norm layers


# -----------------------------------------------------------------------------
# building blocks

def param_groups(net, weight_decay):
    """The recipe's two groups: decay on every trainable parameter but biases and norms (by name, NO_DECAY)."""
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in params if not any(k in n for k in NO_DECAY)], "weight_decay": weight_decay},
            {"params": [p for n, p in params if any(k in n for k in NO_DECAY)], "weight_decay": 0.0}]


def build_model(c, num_classes):
    if c.init == "dino":
        try:
            net = model.load_pretrained(c.pretrained, img_size=c.img_size, num_classes=num_classes,
                                        drop_path=c.drop_path)
        except (OSError, RuntimeError, ValueError) as e:
            sys.exit(f"error: {e}")
        if c.img_size % net.cfg.patch_size:
            sys.exit(f"error: --img_size={c.img_size}: must be a multiple of {c.pretrained}'s patch size "
                     f"{net.cfg.patch_size}")
        return net
    sizes = {k: getattr(c, k) for k in ("dim", "depth", "heads", "patch_size") if getattr(c, k)}
    cfg = replace(model.PRESETS[c.arch], img_size=c.img_size, num_classes=num_classes, drop_path=c.drop_path, **sizes)
    return model.ViT(cfg)


def train_indices(c, labels, groups):
    """The train split's sample indices after train_groups and the balanced sampler; None = all, in order."""
    if not c.train_groups and c.sampler == "random":
        return None
    idx = torch.arange(len(labels))
    if c.train_groups:
        keep = torch.tensor([int(g) for g in c.train_groups.split(",")])
        idx = idx[torch.isin(groups, keep)]
        if len(idx) == 0:
            sys.exit(f"error: no training sample in groups {c.train_groups}")
    if c.sampler == "balanced":
        # every non-empty label x group cell tiled (whole copies, then a seeded random remainder) to the size of
        # the largest one; the loader shuffles them each epoch
        cells = [idx[(labels[idx] == y) & (groups[idx] == g)] for y in labels.unique() for g in groups.unique()]
        cells = [cell for cell in cells if len(cell)]
        n = max(len(cell) for cell in cells)
        gen = torch.Generator().manual_seed(c.seed)
        idx = torch.cat([torch.cat([cell.repeat(n // len(cell)), cell[torch.randperm(len(cell), generator=gen)
                                                                          [: n % len(cell)]]]) for cell in cells])
    return idx


def loss_fn(c, logits, y, g, cell_weights):
    """Summed over the batch, as the recipe (reduction="sum"); SING and Adam normalise the gradient scale away."""
    if c.loss == "bce_smooth":  # two independent sigmoids against 0.9 / 0.1 targets for smoothing 0.1
        target = F.one_hot(y, logits.shape[1]).float() * (1 - 2 * c.smoothing) + c.smoothing
        per_sample = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1)
    elif c.loss == "ce":
        per_sample = F.cross_entropy(logits, y, reduction="none")
    else:  # focal (Lin et al. 2017): down-weights the easy samples
        logp = F.log_softmax(logits, 1).gather(1, y[:, None])[:, 0]
        per_sample = -((1 - logp.exp()) ** c.focal_gamma) * logp
    if cell_weights is not None:
        per_sample = per_sample * cell_weights[2 * y + g]
    return per_sample.sum()


def lr_at(c, it, total):
    """transformers' get_cosine_schedule_with_warmup, as the original: lr 0 at the first step, peak after warmup."""
    warm = c.warmup * total
    if it < warm:
        return c.lr * it / max(1.0, warm)
    return c.lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * (it - warm) / max(1.0, total - warm))))


def plot_curves(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.5))
    ax[0].plot(ep, [h["train_loss"] for h in history], "o-")
    ax[0].set(title="train loss (per sample)", xlabel="epoch")
    ax[1].plot(ep, [h["accuracy"] for h in history], "k.-", label="all")
    for name in history[-1].get("group_accuracy", {}):
        ax[1].plot(ep, [h["group_accuracy"][name] for h in history], "o-", label=name)
    ax[1].set(title="val accuracy", xlabel="epoch")
    ax[1].legend()
    if "fair_score" in history[-1]:
        ax[2].plot(ep, [h["fair_score"] for h in history], "o-")
        ax[2].fill_between(ep, *zip(*[h["fair_score_ci"] for h in history]), alpha=0.2, label="95% CI")
        ax[2].legend()
    ax[2].set(title="val fair score", xlabel="epoch")
    fig.tight_layout()
    model.write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


# -----------------------------------------------------------------------------
# the training run

def train(cfg):
    """One run; returns the log record of the best epoch (what best.safetensors holds)."""
    c = SimpleNamespace(**cfg)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    master = rank == 0
    device = configurator.pick_device(c.device)
    cuda = device.type == "cuda"
    if c.batch_size % world:
        sys.exit(f"error: batch_size={c.batch_size} does not split evenly over {world} ranks")
    try:
        meta = data.read_meta(c.data_dir)
        data.load_labels(c.data_dir, "train")  # opens the split: a damaged file is one line now, not at the loader
        _, val_groups = data.load_labels(c.data_dir, "val")
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"error: {e}")
    group_names = meta["groups"] or evaluate.GROUP_NAMES
    fair = evaluate.has_both_groups(val_groups)
    train_labels = {cell["label"] for cell in meta["splits"]["train"]["cells"]}
    if len(meta["classes"]) < 2 or len(train_labels) < 2:
        sys.exit(f"error: {c.data_dir} has {len(train_labels)} class in its train split: a classifier needs two")
    if c.select != "accuracy" and not fair:
        sys.exit(f"error: select={c.select} needs both groups in the val split of {c.data_dir}; use --select=accuracy")
    if master and not cuda and c.init == "dino" and c.img_size >= 224:
        print(f"warning: the recipe at {c.img_size}x{c.img_size} on a CPU runs at about 1 img/s (~40 h per CelebA "
              "epoch); try --img_size=80 (native size) or `make demo`", file=sys.stderr)
    indices = None
    if c.train_groups or c.sampler == "balanced":
        labels, groups = data.load_labels(c.data_dir, "train")
        if (groups < 0).any():
            sys.exit("error: sampler=balanced and train_groups need group labels on every train sample")
        indices = train_indices(c, labels, groups)
    cell_weights = None
    if c.group_weights:  # 4 numbers, label-major: w00,w01,w10,w11
        cell_weights = torch.tensor(configurator.cast("group_weights", c.group_weights, (1.0,) * 4), device=device)
        if len(meta["classes"]) != 2 or not fair:
            sys.exit(f"error: group_weights={c.group_weights} needs a data set with 2 classes and 2 groups")
    n_train = meta["splits"]["train"]["n"] if indices is None else len(indices)
    if n_train // world < c.batch_size // world:
        sys.exit(f"error: --batch_size={c.batch_size} is larger than the {n_train} training samples; lower it")
    aug_kw = {**(data.AUGMENTS[c.augment] or {}),
              **configurator.parse_kw("augment_kw", c.augment_kw, data.AUGMENT_PARAMS)}

    with model.run_dir(c.out_dir, c.resume, c.force, master):
        torch.manual_seed(c.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        net = build_model(c, len(meta["classes"])).to(device)
        torch.manual_seed(c.seed + 1_000_003 * rank)  # drop-path masks: a different stream per rank
        aug_gen = torch.Generator(device=device).manual_seed(c.seed + 1_000_003 * rank)  # a different stream per rank
        loader_kw = dict(device=device, backend=c.backend, rank=rank, world_size=world)
        train_loader = data.make_loader(c.data_dir, "train", c.batch_size // world, train=True, seed=c.seed,
                                        indices=indices, **loader_kw)
        val_loader = data.make_loader(c.data_dir, "val", c.eval_batch_size, train=False, **loader_kw)

        groups_of_params = param_groups(net, c.weight_decay)
        params = [p for group in groups_of_params for p in group["params"]]
        if c.opt == "sing":
            optimizer = SING(groups_of_params, lr=c.lr)
        else:
            optimizer = torch.optim.AdamW(groups_of_params, lr=c.lr, fused=cuda)  # fused: a CUDA-only kernel

        iters = len(train_loader)
        total = iters * c.epochs
        start_epoch, best, history = 0, -math.inf, []
        last_path, best_path = os.path.join(c.out_dir, "last.safetensors"), os.path.join(c.out_dir, "best.safetensors")
        configs = [cfg]  # every config this run was started or resumed with, oldest first (kept in last.safetensors)
        if c.resume and os.path.exists(last_path):
            state = model.resume_state(last_path, cfg, RESUME_MUST_MATCH, master)
            net.load_state_dict(state.pop("weights"))
            optimizer.load_state_dict(state["optimizer"])
            model.set_rng_states(state["rng"], aug_gen, device, rank)
            start_epoch, best, history = state["epoch"] + 1, state["best"], state["history"]
            configs = state.get("configs", []) + [cfg]
            if master:
                print(f"resuming {last_path} after epoch {start_epoch}")
        elif c.resume and master:
            print(f"resume=true but no {last_path} yet: starting from scratch")

        ddp_net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if cuda else None) if world > 1 \
            else net
        forward = torch.compile(ddp_net) if c.compile else ddp_net
        ckpt_meta = {"config": cfg, "data": data.summary(c.data_dir, meta)}
        if master:
            print(f"{sum(p.numel() for p in params) / 1e6:.2f}M parameters, {iters} iterations/epoch x {c.epochs}"
                  f" epochs, global batch {c.batch_size} on {world} x {device}")

        end_epoch = min(c.epochs, c.stop_after) if c.stop_after else c.epochs
        for epoch in range(start_epoch, end_epoch):
            net.train()
            train_loader.set_epoch(epoch)
            t0, loss_sum, n_seen, gnorms = time.time(), 0.0, 0, []
            bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{c.epochs}", disable=not master, leave=False)
            for i, (x, y, g) in enumerate(bar):
                if model.stop_requested(world, device):
                    bar.close()
                    kept = f"{last_path} holds epoch {epoch}" if epoch else "no epoch had finished"
                    sys.exit(f"stopped by a signal in epoch {epoch + 1}: {kept}; continue with --resume=true")
                lr_now = lr_at(c, epoch * iters + i, total)
                for group in optimizer.param_groups:
                    group["lr"] = lr_now
                inputs = data.augment(x, c.img_size, aug_gen, **aug_kw) if c.augment != "none" else \
                    data.prepare(x, c.img_size)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=c.amp == "bf16"):
                    logits = forward(inputs)
                loss = loss_fn(c, logits.float(), y, g, cell_weights)
                optimizer.zero_grad(set_to_none=True)
                (loss * world).backward()  # DDP averages gradients over ranks; the recipe sums over the global batch
                # measured before the step: SING overwrites p.grad with the centred, normalised gradient
                gnorm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]).item()
                loss_val = loss.item()
                if not (math.isfinite(loss_val) and math.isfinite(gnorm)):  # gnorm is the same on every rank
                    sys.exit(f"error: non-finite loss {loss_val} / grad norm {gnorm} at epoch {epoch + 1} iteration "
                             f"{i}; stopped before the update, {last_path} keeps the last good epoch")
                optimizer.step()
                loss_sum, n_seen = loss_sum + loss_val, n_seen + len(y)
                gnorms.append(gnorm)
                bar.set_postfix(loss=f"{loss_val / len(y):.4f}", img_s=f"{n_seen * world / (time.time() - t0):.0f}")
            train_time = time.time() - t0
            totals = torch.tensor([loss_sum, n_seen], dtype=torch.float64, device=device)
            if world > 1:
                dist.all_reduce(totals)

            scores, val_labels, val_groups = evaluate.predict(net, val_loader, c.img_size, world=world, amp=c.amp)
            metrics = evaluate.compute_metrics(scores, val_labels, val_groups, fair=fair, group_names=group_names)
            record = {"epoch": epoch + 1, "lr": lr_now, "train_loss": (totals[0] / totals[1]).item(),
                      "grad_norm": float(np.mean(gnorms)), "grad_norm_max": float(np.max(gnorms)),
                      "img_per_s": totals[1].item() / train_time, "time_s": time.time() - t0, **metrics}
            history.append(record)
            score = evaluate.selection_score(metrics, c.select)
            improved = score > best
            best = max(best, score)
            rng = model.rng_states(aug_gen, device, world)  # a collective: every rank takes part
            if master:
                if improved:
                    model.save_checkpoint(best_path, net, meta={**ckpt_meta, "epoch": epoch + 1, "metrics": metrics})
                model.save_checkpoint(last_path, net, meta={**ckpt_meta, "epoch": epoch + 1, "metrics": metrics},
                                      state={"optimizer": optimizer.state_dict(), "rng": rng, "epoch": epoch,
                                             "best": best, "history": history,
                                             "configs": configs})
                model.write_atomic(os.path.join(c.out_dir, "log.jsonl"),
                                   lambda tmp: Path(tmp).write_text("".join(json.dumps(h) + "\n" for h in history)))
                plot_curves(history, os.path.join(c.out_dir, "curves.png"))
                groups_txt = " ".join(f"{k} {v:.4f}" for k, v in metrics.get("group_accuracy", {}).items())
                print(f"epoch {epoch + 1}: loss {record['train_loss']:.4f} | val acc {metrics['accuracy']:.4f} "
                      f"{groups_txt} | fair {metrics.get('fair_score', float('nan')):.4f}{' *' if improved else ''} | "
                      f"grad norm {record['grad_norm']:.3g} | {record['img_per_s']:.0f} img/s")
        return max(history, key=lambda h: evaluate.selection_score(h, c.select)) if history else None


SWEEP_COLUMNS = ("fair_score", "worst_group_accuracy", "equalized_odds_difference", "accuracy")


def test_metrics(run_dir, data_dir, batch_size, device):
    """evaluate.py's metrics of run_dir/best.safetensors on the test split (what a sweep reports besides val)."""
    net, _, _ = model.load_checkpoint(os.path.join(run_dir, "best.safetensors"), device=device)
    loader = data.make_loader(data_dir, "test", batch_size, train=False, device=device)
    scores, labels, groups = evaluate.predict(net, loader, net.cfg.img_size)
    return evaluate.compute_metrics(scores, labels, groups, fair=evaluate.has_both_groups(groups), n_boot=0)


def write_sweep(results, path):
    """Markdown table over seeds: each seed's best-validation checkpoint, its validation and test metrics, then
    mean +- std (sample std) over seeds. results: [(seed, best val record, test metrics)]."""
    _, val0, test0 = results[0]
    cols = [("val", k) for k in SWEEP_COLUMNS if k in val0] + [("test", k) for k in SWEEP_COLUMNS if k in test0]
    rows = np.array([[{"val": val, "test": test}[split][k] for split, k in cols] for _, val, test in results])
    std = rows.std(0, ddof=1) if len(rows) > 1 else np.zeros(rows.shape[1])
    lines = [f"# Seed sweep: `train_vit.py {' '.join(sys.argv[1:])}`", "",
             "Each seed's best.safetensors (best validation epoch by select=): validation and test metrics.", "",
             "| seed | best epoch | " + " | ".join(f"{split} {k}" for split, k in cols) + " |",
             "|---" * (len(cols) + 2) + "|"]
    lines += [f"| {s} | {val['epoch']} | " + " | ".join(f"{v:.4f}" for v in row) + " |"
              for (s, val, _), row in zip(results, rows)]
    lines.append("| mean ± std | | " + " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in zip(rows.mean(0), std)) + " |")
    model.write_atomic(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    print("\n".join(lines))


def parse_config(argv):
    """This script's config from the command line: DEFAULTS, a PRESETS entry, then --key=value (configurator.py)."""
    cfg = configurator.parse(argv, DEFAULTS, __file__, presets=PRESETS, choices=CHOICES, aliases={"data": "data_dir"})
    # every check that needs no data runs now, before anything is loaded
    configurator.parse_kw("augment_kw", cfg["augment_kw"], data.AUGMENT_PARAMS)
    if cfg["group_weights"]:
        configurator.cast("group_weights", cfg["group_weights"], (1.0,) * 4)
    need = lambda key, ok, allowed: configurator.require(cfg, key, ok, allowed)
    need("lr", lambda v: v > 0, "the learning rate must be > 0")
    for key in ("batch_size", "eval_batch_size", "epochs", "img_size"):
        need(key, lambda v: v >= 1, "must be >= 1")
    for key in ("weight_decay", "stop_after", "dim", "depth", "heads", "patch_size", "focal_gamma"):
        need(key, lambda v: v >= 0, "must be >= 0")
    for key in ("warmup", "drop_path"):
        need(key, lambda v: 0 <= v < 1, "must be in [0, 1)")
    need("smoothing", lambda v: 0 <= v < 0.5, "must be in [0, 0.5)")
    need("train_groups", lambda v: all(p.strip().isdigit() for p in v.split(",")) if v else True,
         "comma-separated group ids, e.g. 0 (women) or 0,1")
    need("arch", lambda v: v in model.PRESETS, f"one of {', '.join(model.PRESETS)}")
    if cfg["init"] == "scratch":  # (init=dino: the patch size comes with the weights, checked once they are read)
        patch = cfg["patch_size"] or model.PRESETS[cfg["arch"]].patch_size
        need("img_size", lambda v: v % patch == 0, f"must be a multiple of the patch size {patch}")
    return cfg


def main(argv=None):
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    ddp = "RANK" in os.environ  # launched by torchrun
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() and cfg["device"] != "cpu" else "gloo")
        if torch.cuda.is_available() and cfg["device"] != "cpu":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    try:
        if cfg["sweep"]:
            try:
                seeds = [int(s) for s in cfg["sweep"].replace(",", " ").split()]
            except ValueError:
                sys.exit(f"error: --sweep={cfg['sweep']} is not a list of integer seeds")
            runs = [(s, os.path.join(cfg["sweep_dir"], f"seed{s}")) for s in seeds]
            best = [train({**cfg, "seed": s, "out_dir": run_dir}) for s, run_dir in runs]
            if not ddp or dist.get_rank() == 0:
                device = configurator.pick_device(cfg["device"])
                results = [(s, val, test_metrics(run_dir, cfg["data_dir"], cfg["eval_batch_size"], device))
                           for (s, run_dir), val in zip(runs, best)]
                write_sweep(results, os.path.join(cfg["sweep_dir"], "sweep.md"))
        else:
            train(cfg)
    finally:
        if ddp:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
