"""
Fine-tune a ViT (DINO ViT-S/8 by default) on a data.py data set for fair face-attribute classification.

nanoGPT-style: the values in the config block below are the defaults, and the defaults ARE the recipe of the
original 4th-place solution (DINO ViT-S/8 fine-tuned with SING at 224). Override any value with --key=value
(configurator.py: typed like its default), or start from a preset with --config=NAME (recipe, demo).

    python train_vit.py --config=recipe --data=data/celeba --seed=3 --out_dir=runs/seed3
    python train_vit.py --config=recipe --data=data/celeba --img_size=80           # native 80x80, ~8x cheaper
    python train_vit.py --sweep="0 1 2" --config=recipe --data=data/celeba        # runs/sweep/seed<N>, sweep.md
    torchrun --standalone --nproc_per_node=8 train_vit.py --data=data/celeba      # DDP: NCCL on GPU, gloo on CPU
    python train_vit.py --config=robust --loss=group_dro --out_dir=runs/dro       # or --jtt_epochs=1, --sampler=...
    python train_vit.py --config=robust --dfr=runs/erm/last.safetensors --out_dir=runs/dfr  # DFR: refit the head
    python train_vit.py --config=robust --table=robust  # each debiasing method x 3 seeds -> runs/robust/robust_table.md

A run writes out_dir/log.jsonl (one line per epoch, validation metrics under evaluate.py's names),
best.safetensors (best validation metric, select=), last.safetensors (+ optimizer, RNG and epoch state for
resume=true) and curves.png.
"""

import json
import math
import os
import shlex
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
table = ""  # robust: every TABLE row x table_seeds seeds into out_dir/<row>_s<seed>, then out_dir/robust_table.md
table_seeds = 3  # the table's seeds: 0 .. table_seeds-1
quick = False  # with table: a few-minute check (1 seed, 2 epochs), not a result
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
sampler = "random"  # random | balanced: label x group cells oversampled to the largest | subsample: to the smallest
train_groups = ""  # e.g. "0": train on these group ids only (0 = women, 1 = men), comma-separated
backend = "resident"  # data.make_loader backend: resident | ffcv
# loss
loss = "bce_smooth"  # bce_smooth: BCE on the 2 logits, targets 1-s / s (the recipe) | ce | focal | group_dro
smoothing = 0.1  # label smoothing s of bce_smooth
focal_gamma = 2.0  # focal loss exponent
group_weights = ""  # loss weight per label x group cell "w00,w01,w10,w11" (label-major) | inverse: n / (4 n_cell)
dro_step = 0.01  # loss=group_dro: step size eta of the exponentiated-gradient update of the cell weights
dro_adjust = 0.0  # loss=group_dro: generalisation adjustment C; the update sees each cell's loss + C / sqrt(n_cell)
jtt_epochs = 0  # JTT (Liu et al. 2021): T epochs of ERM into out_dir/jtt_id find the train errors; 0 = off
jtt_up = 20  # JTT: lambda_up, how many times each error of that run is seen per epoch of the final run (upsampled)
dfr = ""  # DFR (Kirichenko et al. 2023): a checkpoint whose head is refitted on frozen features of val -> out_dir
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
threads = 0  # CPU threads of torch's ops (torch.set_num_threads); 0 = torch's default (every core)
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and type(v) in (bool, int, float, str)}
AMP = ("bf16", "none")
CHOICES = {"init": ("dino", "scratch"), "sampler": ("random", "balanced", "subsample"),
           "backend": ("resident", "ffcv"), "loss": ("bce_smooth", "ce", "focal", "group_dro"),
           "opt": ("sing", "adamw"), "select": evaluate.SELECT, "augment": tuple(data.AUGMENTS), "amp": AMP,
           "table": ("", "robust")}
PRESETS = {
    "recipe": {},  # the defaults above: DINO ViT-S/8, 80->224 bicubic, SING 5e-4 / 5e-3, 10 epochs, batch 64
    # make demo: a 0.48M-parameter ViT (4 blocks, width 96, 10x10 patches: 64 tokens) from scratch at native 80x80 on
    # data/demo. On 2 CPU cores it trains ~2.3x faster per image than width 128 with 8x8 patches, for the same test
    # score (fair 0.848 vs 0.845, seed 0); 16x16 patches lose it (0.821). From scratch and this short, it learns
    # with crop + flip only (the full list keeps it at the trivial classifier for several epochs) and at a DeiT-like
    # lr (1e-3 for 5 epochs: 0.833; 2e-3 was unstable past 8 epochs).
    "demo": dict(init="scratch", arch="vit_tiny", dim=96, heads=4, patch_size=10, img_size=80, opt="adamw", lr=5e-4,
                 weight_decay=0.05, epochs=7, batch_size=128, warmup=0.1, loss="ce", augment="weak", compile=False,
                 amp="none"),
}
PRESETS["seed_recipe"] = PRESETS["recipe"]  # its earlier name
# make robust-table: the debiasing table on the CPU (data/robust: synthetic Blond_Hair x Male, 40x40). A 0.1M-parameter
# ViT (2 blocks, width 64, 8x8 patches) from scratch, small enough for 9 rows x 3 seeds in about half an hour.
PRESETS["robust"] = dict(init="scratch", arch="vit_tiny", dim=64, depth=2, heads=2, img_size=40, opt="adamw", lr=1e-3,
                         weight_decay=0.05, epochs=3, batch_size=128, warmup=0.1, loss="ce", augment="weak",
                         compile=False, amp="none", select="worst_group", data_dir="data/robust",
                         out_dir="runs/robust", threads=1)
# the same table on CelebA Blond_Hair x Male (data/celeba_blond, the literature's task), a GPU job: the recipe's DINO
# ViT-S/8 at native 80x80 with its SING settings, cross-entropy, 5 epochs, best epoch by worst-group val accuracy
PRESETS["robust_gpu"] = dict(img_size=80, loss="ce", epochs=5, batch_size=128, select="worst_group",
                             data_dir="data/celeba_blond", out_dir="runs/robust_celeba")
# what a resumed run must share with the saved one (architecture, optimizer, data, batch order); the rest may change
RESUME_MUST_MATCH = ("data_dir", "init", "pretrained", "arch", "dim", "depth", "heads", "patch_size", "img_size",
                     "opt", "batch_size", "seed", "sampler", "train_groups", "jtt_epochs", "jtt_up")
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


def cells_of(idx, labels, groups):
    """The non-empty label x group cells of the samples idx, label-major: [indices of cell (y, g), ...]."""
    cells = [idx[(labels[idx] == y) & (groups[idx] == g)] for y in labels.unique() for g in groups.unique()]
    return [cell for cell in cells if len(cell)]


def subsample(idx, labels, groups, gen):
    """Every non-empty label x group cell of idx cut to the size of the smallest, a random draw of gen in each."""
    cells = cells_of(idx, labels, groups)
    n = min(len(cell) for cell in cells)
    return torch.cat([cell[torch.randperm(len(cell), generator=gen)[:n]] for cell in cells])


def train_indices(c, labels, groups, epoch=0, errors=None):
    """The train split's sample indices of one epoch after train_groups, JTT's upsampled errors and the sampler;
    None = all, in order. balanced is drawn once (seed), subsample anew each epoch (seed, epoch)."""
    if not c.train_groups and c.sampler == "random" and errors is None:
        return None
    idx = torch.arange(len(labels))
    if c.train_groups:
        keep = torch.tensor([int(g) for g in c.train_groups.split(",")])
        idx = idx[torch.isin(groups, keep)]
        if len(idx) == 0:
            sys.exit(f"error: no training sample in groups {c.train_groups}")
    if errors is not None:  # JTT: the identification run's errors jtt_up times in all (Liu et al. 2021, upsampling)
        idx = torch.cat([idx, errors[torch.isin(errors, idx)].repeat(c.jtt_up - 1)])
    if c.sampler == "balanced":
        # every non-empty label x group cell tiled (whole copies, then a seeded random remainder) to the size of
        # the largest one; the loader shuffles them each epoch
        cells = cells_of(idx, labels, groups)
        n = max(len(cell) for cell in cells)
        gen = torch.Generator().manual_seed(c.seed)
        idx = torch.cat([torch.cat([cell.repeat(n // len(cell)), cell[torch.randperm(len(cell), generator=gen)
                                                                          [: n % len(cell)]]]) for cell in cells])
    elif c.sampler == "subsample":  # Idrissi et al. 2022 ("subg"): every cell cut to the smallest, drawn per epoch
        idx = subsample(idx, labels, groups, torch.Generator().manual_seed(c.seed * 1_000_003 + epoch))
    return idx


def inverse_cell_weights(labels, groups):
    """group_weights=inverse: the weight of cell (y, g) is n / (k n_yg) over the k non-empty cells (label-major
    [w00, w01, w10, w11]), so every cell carries the same total weight and the mean weight per sample is 1."""
    counts = torch.bincount(2 * labels + groups, minlength=4).double()
    return torch.where(counts > 0, counts.sum() / ((counts > 0).sum() * counts.clamp(min=1)), 0.0).float()


def per_sample_loss(c, logits, y):
    if c.loss == "bce_smooth":  # two independent sigmoids against 0.9 / 0.1 targets for smoothing 0.1
        target = F.one_hot(y, logits.shape[1]).float() * (1 - 2 * c.smoothing) + c.smoothing
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1)
    if c.loss == "focal":  # focal (Lin et al. 2017): down-weights the easy samples
        logp = F.log_softmax(logits, 1).gather(1, y[:, None])[:, 0]
        return -((1 - logp.exp()) ** c.focal_gamma) * logp
    return F.cross_entropy(logits, y, reduction="none")  # ce, and group_dro's loss per sample


def loss_fn(c, logits, y, g, cell_weights):
    """Summed over the batch, as the recipe (reduction="sum"); SING and Adam normalise the gradient scale away."""
    per_sample = per_sample_loss(c, logits, y)
    if cell_weights is not None:
        per_sample = per_sample * cell_weights[2 * y + g]
    return per_sample.sum()


def group_dro_loss(per_sample, cell, q, step, adjust, world=1):
    """Group DRO's online algorithm (Sagawa et al. 2020, Algorithm 1) over the label x group cells (cell = 2y + g).
    Each cell's mean loss in the batch (0 for a cell the batch lacks) moves the cell weights q by exponentiated
    gradient ascent, q <- q exp(step (loss_cell + adjust_cell)) / Z, with adjust = C / sqrt(n_cell) the
    generalisation adjustment; the model then descends sum_cell q_cell loss_cell. -> (that loss times the global
    batch size, the scale of loss_fn's sum; the new q). Under DDP the cell sums and counts are all-reduced, so
    every rank moves q alike and the averaged gradients are those of the global batch's loss."""
    onehot = F.one_hot(cell, len(q)).to(per_sample.dtype)  # [B, cells]
    sums = onehot.T @ per_sample
    stats = torch.stack([sums.detach(), onehot.sum(0)])  # every rank's cell sums and counts
    if world > 1:
        dist.all_reduce(stats)
    counts = stats[1].clamp(min=1)
    q = q * torch.exp(step * (stats[0] / counts + adjust))
    q = q / q.sum()
    return (sums / counts) @ q * stats[1].sum(), q


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
    labels = groups = indices = errors = None
    by_cell = [f"{k}={getattr(c, k)}" for k, off in (("train_groups", ""), ("sampler", "random"), ("group_weights", ""))
               if getattr(c, k) != off] + (["loss=group_dro"] if c.loss == "group_dro" else [])
    if by_cell or c.jtt_epochs:
        labels, groups = data.load_labels(c.data_dir, "train")
        if by_cell and (groups < 0).any():
            sys.exit(f"error: {', '.join(by_cell)} need group labels on every train sample")
        indices = train_indices(c, labels, groups)
    cell_weights = dro_q = dro_adjust = None
    if c.group_weights or c.loss == "group_dro":
        if len(meta["classes"]) != 2 or not fair:
            sys.exit(f"error: {by_cell[-1]} needs a data set with 2 classes and 2 groups")
        base = train_indices(SimpleNamespace(**{**cfg, "sampler": "random"}), labels, groups)  # after train_groups
        base = torch.arange(len(labels)) if base is None else base
    if c.group_weights == "inverse":
        cell_weights = inverse_cell_weights(labels[base], groups[base]).to(device)
    elif c.group_weights:  # 4 numbers, label-major: w00,w01,w10,w11
        cell_weights = torch.tensor(configurator.cast("group_weights", c.group_weights, (1.0,) * 4), device=device)
    if c.loss == "group_dro":  # uniform cell weights to start; C / sqrt(n_cell) from the train counts
        n_cell = torch.bincount(2 * labels[base] + groups[base], minlength=4).float()
        dro_adjust = torch.where(n_cell > 0, c.dro_adjust / n_cell.clamp(min=1).sqrt(), 0.0).to(device)
        dro_q = torch.full((4,), 0.25, device=device)
    n_train = meta["splits"]["train"]["n"] if indices is None else len(indices)
    if n_train // world < c.batch_size // world:
        sys.exit(f"error: --batch_size={c.batch_size} is larger than the {n_train} training samples; lower it")
    aug_kw = {**(data.AUGMENTS[c.augment] or {}),
              **configurator.parse_kw("augment_kw", c.augment_kw, data.AUGMENT_PARAMS)}

    with model.run_dir(c.out_dir, c.resume, c.force, master):
        if c.jtt_epochs:  # JTT's first stage, before this run seeds anything: its errors are upsampled below
            errors = jtt_errors(cfg, device, master, group_names)
            indices = train_indices(c, labels, groups, 0, errors)
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
            if dro_q is not None and "dro_q" in state:
                dro_q = state["dro_q"].to(device)
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
            if c.sampler == "subsample" and epoch:  # a new draw of every cell (the same sizes: the same iterations)
                train_loader = data.make_loader(c.data_dir, "train", c.batch_size // world, train=True, seed=c.seed,
                                                indices=train_indices(c, labels, groups, epoch, errors), **loader_kw)
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
                if c.loss == "group_dro":
                    loss, dro_q = group_dro_loss(per_sample_loss(c, logits.float(), y), 2 * y + g, dro_q, c.dro_step,
                                                 dro_adjust, world)
                else:
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
                      "img_per_s": totals[1].item() / train_time, "train_s": train_time, "time_s": time.time() - t0,
                      **metrics}
            if cuda:  # the CUDA allocator's high-water mark of this process so far (no such counter on the CPU)
                record["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if dro_q is not None:  # Group DRO's cell weights at the end of the epoch, named as evaluate's cells
                record["dro_weights"] = {f"{k // 2} / {group_names[k % 2]}": float(v) for k, v in enumerate(dro_q)}
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
                                             "best": best, "history": history, "configs": configs,
                                             **({"dro_q": dro_q} if dro_q is not None else {})})
                model.write_atomic(os.path.join(c.out_dir, "log.jsonl"),
                                   lambda tmp: Path(tmp).write_text("".join(json.dumps(h) + "\n" for h in history)))
                plot_curves(history, os.path.join(c.out_dir, "curves.png"))
                groups_txt = " ".join(f"{k} {v:.4f}" for k, v in metrics.get("group_accuracy", {}).items())
                worst = f" | worst cell {metrics['worst_group_accuracy']:.4f}" if "worst_group" in metrics else ""
                dro = " | cell weights " + " ".join(f"{v:.3f}" for v in dro_q.tolist()) if dro_q is not None else ""
                print(f"epoch {epoch + 1}: loss {record['train_loss']:.4f} | val acc {metrics['accuracy']:.4f} "
                      f"{groups_txt} | fair {metrics.get('fair_score', float('nan')):.4f}{worst}"
                      f"{' *' if improved else ''}{dro} | grad norm {record['grad_norm']:.3g} | "
                      f"{record['img_per_s']:.0f} img/s")
        return max(history, key=lambda h: evaluate.selection_score(h, c.select)) if history else None


# -----------------------------------------------------------------------------
# the two-stage methods: JTT's identification run, DFR's last-layer refit

def jtt_errors(cfg, device, master, group_names=evaluate.GROUP_NAMES):
    """JTT's first stage (Liu et al. 2021): the same config without JTT, trained for jtt_epochs epochs (its own
    schedule) into out_dir/jtt_id; the train samples its last epoch misclassifies (argmax on the unaugmented images
    against the train labels) are the error set, written to out_dir/jtt_errors.json and returned as split indices.
    resume and force pass through to it, so a resumed JTT run finds its identification run finished."""
    id_dir = os.path.join(cfg["out_dir"], "jtt_id")
    train({**cfg, "jtt_epochs": 0, "epochs": cfg["jtt_epochs"], "stop_after": 0, "out_dir": id_dir})
    net, _, _ = model.load_checkpoint(os.path.join(id_dir, "last.safetensors"), device=device)
    loader = data.make_loader(cfg["data_dir"], "train", cfg["eval_batch_size"], train=False, device=device,
                              backend=cfg["backend"])  # every rank scores the whole split: the same set everywhere
    scores, labels, groups = evaluate.predict(net, loader, net.cfg.img_size, amp=cfg["amp"])
    errors = torch.nonzero(scores.argmax(1) != labels).flatten()
    if master:
        name = lambda g: group_names[g] if 0 <= g < len(group_names) else str(g)
        per_cell = {f"{y} / {name(g)}": int(((labels[errors] == y) & (groups[errors] == g)).sum())
                    for y in labels.unique().tolist() for g in groups.unique().tolist()}
        record = {"id_run": id_dir, "epochs": cfg["jtt_epochs"], "jtt_up": cfg["jtt_up"], "n_train": len(labels),
                  "n_errors": len(errors), "errors_per_cell": per_cell, "errors": errors.tolist()}
        model.write_atomic(os.path.join(cfg["out_dir"], "jtt_errors.json"),
                           lambda tmp: Path(tmp).write_text(json.dumps(record) + "\n"))
        print(f"JTT: {len(errors)} of {len(labels)} train samples misclassified after {cfg['jtt_epochs']} epochs "
              f"(label / group: {per_cell}); each is seen {cfg['jtt_up']} times per epoch from now on")
    return errors


DFR_L2 = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)  # the L2 strengths DFR tries (standardised features)
DFR_FITS = 10  # cell-balanced draws of val whose fitted heads DFR averages


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
    opt = torch.optim.LBFGS([W, b], max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ W.T + b, y) + l2 * W.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
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
    fit, held = subsample(half[len(z) // 2:], labels, groups, gen), half[: len(z) // 2]

    def worst_cell(W, b, idx):
        pred = (z[idx].double() @ W.T + b).argmax(1)
        return min(evaluate.cell_accuracies(pred, labels[idx], groups[idx]).values())

    tried = {l2: worst_cell(*fit_head(z[fit], labels[fit], l2, num_classes), held) for l2 in DFR_L2}
    l2 = max(tried, key=tried.get)  # ties: the weakest penalty, the first in DFR_L2
    draws = [subsample(torch.arange(len(z)), labels, groups, gen) for _ in range(DFR_FITS)]
    heads = [fit_head(z[d], labels[d], l2, num_classes) for d in draws]
    W = torch.stack([h[0] for h in heads]).mean(0) / std.double()
    b = torch.stack([h[1] for h in heads]).mean(0) - W @ mean.double()
    return W, b, {"l2": l2, "held_out_worst_cell": tried, "n_fit": len(draws[0]), "fits": DFR_FITS}


def run_dfr(cfg):
    """DFR from the checkpoint cfg["dfr"]: its head refitted on frozen features of val (dfr_head), the rest of the
    network unchanged, written as out_dir/best.safetensors; out_dir/log.jsonl holds the choice, val metrics (of the
    split the head was fitted on) and test metrics. -> the test metrics."""
    c = SimpleNamespace(**cfg)
    device = configurator.pick_device(c.device)
    try:
        net, ck_meta, _ = model.load_checkpoint(c.dfr, device=device)
        meta = data.read_meta(c.data_dir)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    if not isinstance(net, model.ViT):
        sys.exit(f"error: --dfr={c.dfr} holds a {net.arch}; DFR here refits the head of a ViT")
    if differ := data.mismatch(ck_meta.get("data") or {}, meta):
        sys.exit(f"error: --dfr={c.dfr} was trained for other data than {c.data_dir}: {differ}")
    group_names = meta["groups"] or evaluate.GROUP_NAMES
    with model.run_dir(c.out_dir, c.resume, c.force):
        split = lambda name: features(net, data.make_loader(c.data_dir, name, c.eval_batch_size, train=False,
                                                            device=device, backend=c.backend), net.cfg.img_size, c.amp)
        val, test = split("val"), split("test")
        if not evaluate.has_both_groups(val[2]) or (val[2] < 0).any():
            sys.exit(f"error: DFR needs a group label on every val sample of {c.data_dir}, and both groups")
        W, b, info = dfr_head(*val, seed=c.seed, num_classes=len(meta["classes"]))
        with torch.no_grad():
            net.head.weight.copy_(W.float())
            net.head.bias.copy_(b.float())
        scored = lambda f: evaluate.compute_metrics(f[0].double() @ W.T + b, f[1], f[2], group_names=group_names,
                                                    n_boot=0)
        val_metrics, on_test = scored(val), scored(test)
        model.save_checkpoint(os.path.join(c.out_dir, "best.safetensors"), net,
                              meta={"config": ck_meta.get("config", {}), "data": ck_meta.get("data"),
                                    "epoch": ck_meta.get("epoch"), "metrics": val_metrics, "dfr": {"from": c.dfr,
                                                                                                    **info}})
        record = {"dfr": c.dfr, **info, **val_metrics, "test": on_test}
        model.write_atomic(os.path.join(c.out_dir, "log.jsonl"), lambda tmp: Path(tmp).write_text(json.dumps(record)
                                                                                                 + "\n"))
        print(f"DFR: the head of {c.dfr} refitted on {DFR_FITS} cell-balanced draws of {info['n_fit']} val samples "
              f"(l2 {info['l2']:g}) -> {os.path.join(c.out_dir, 'best.safetensors')}; test accuracy "
              f"{on_test['accuracy']:.4f}, worst cell {on_test['worst_group_accuracy']:.4f} "
              f"({on_test['worst_group']}), fair {on_test['fair_score']:.4f}")
    return on_test


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
    minutes = {tag: [] for _, tag, _ in TABLE}
    for s in seeds:
        for _, tag, over in TABLE:
            if "dfr" not in over:
                t0 = time.time()
                train({**run_cfg, **over, "seed": s, "out_dir": folder(tag, s)})
                minutes[tag].append((time.time() - t0) / 60)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    device = configurator.pick_device(cfg["device"])
    results = {tag: [] for _, tag, _ in TABLE}
    for s in seeds:
        for _, tag, over in TABLE:
            if "dfr" in over:
                t0 = time.time()
                base = os.path.join(folder(over["dfr"], s), "last.safetensors")  # the ERM row's final weights
                results[tag].append(run_dfr({**run_cfg, "dfr": base, "seed": s, "out_dir": folder(tag, s)}))
                minutes[tag].append((time.time() - t0) / 60)
            else:
                results[tag].append(test_metrics(folder(tag, s), cfg["data_dir"], cfg["eval_batch_size"], device))
    meta = data.read_meta(cfg["data_dir"])
    names = meta["groups"] or evaluate.GROUP_NAMES
    cells = ", ".join(f"{meta['classes'][c['label']]} / {names[c['group']]} {c['n']}"
                      for c in meta["splits"]["train"]["cells"] if c["group"] >= 0)
    command = " ".join(shlex.quote(f"--{k}={v}") for k, v in cfg.items() if v != DEFAULTS[k])
    model_txt = (f"{cfg['arch']} from scratch" if cfg["init"] == "scratch" else cfg["pretrained"]) + \
        (f" (dim {cfg['dim']}, depth {cfg['depth']})" if cfg["init"] == "scratch" and cfg["dim"] else "")
    lines = [f"Test metrics of each run's best.safetensors (best epoch by validation {cfg['select']}), mean ± std over "
             f"seeds {', '.join(map(str, seeds))}; data `{cfg['data_dir']}` (train cells: {cells}); {model_txt} at "
             f"{cfg['img_size']}x{cfg['img_size']}, {run_cfg['epochs']} epochs, lr {cfg['lr']:g}, batch "
             f"{cfg['batch_size']}. Minutes: wall time per run on this machine (JTT's includes its identification run; "
             "DFR's is the refit alone, on top of ERM's).", "",
             f"Command: `python train_vit.py {command}`" + (" (quick: 1 seed, 2 epochs; a check, not a result)"
                                                            if cfg["quick"] else ""), "",
             f"Measured {time.strftime('%Y-%m-%d')}; the whole table took {(time.time() - start) / 60:.0f} min.", "",
             "| method | " + " | ".join(name for _, name in TABLE_COLUMNS) + " | minutes |",
             "|---" * (len(TABLE_COLUMNS) + 2) + "|"]
    for row, tag, _ in TABLE:
        stats = []
        for key, _ in TABLE_COLUMNS:
            v = torch.tensor([r.get(key, float("nan")) for r in results[tag]], dtype=torch.float64)
            stats.append(f"{v.mean():.4f} ± {v.std(correction=int(len(v) > 1)):.4f}")
        lines.append(f"| {row} | " + " | ".join(stats) + f" | {np.mean(minutes[tag]):.1f} |")
    text = "\n".join(lines) + "\n"
    os.makedirs(out_dir, exist_ok=True)
    model.write_atomic(os.path.join(out_dir, "robust_table.md"), lambda tmp: Path(tmp).write_text(text))
    print(text)
    return results


def parse_config(argv):
    """This script's config from the command line: DEFAULTS, a PRESETS entry, then --key=value (configurator.py)."""
    cfg = configurator.parse(argv, DEFAULTS, __file__, presets=PRESETS, choices=CHOICES, aliases={"data": "data_dir"})
    # every check that needs no data runs now, before anything is loaded
    configurator.parse_kw("augment_kw", cfg["augment_kw"], data.AUGMENT_PARAMS)
    if cfg["group_weights"] and cfg["group_weights"] != "inverse":
        configurator.cast("group_weights", cfg["group_weights"], (1.0,) * 4)
    need = lambda key, ok, allowed: configurator.require(cfg, key, ok, allowed)
    need("lr", lambda v: v > 0, "the learning rate must be > 0")
    for key in ("batch_size", "eval_batch_size", "epochs", "img_size", "jtt_up", "table_seeds"):
        need(key, lambda v: v >= 1, "must be >= 1")
    for key in ("weight_decay", "stop_after", "dim", "depth", "heads", "patch_size", "focal_gamma", "dro_step",
                "dro_adjust", "jtt_epochs", "threads"):
        need(key, lambda v: v >= 0, "must be >= 0")
    if cfg["loss"] == "group_dro":
        need("group_weights", lambda v: not v, "loss=group_dro weighs the cells itself; leave group_weights empty")
    if cfg["jtt_epochs"]:
        need("sampler", lambda v: v == "random", "JTT (jtt_epochs > 0) upsamples its error set itself; use random")
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
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    ddp = "RANK" in os.environ  # launched by torchrun
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() and cfg["device"] != "cpu" else "gloo")
        if torch.cuda.is_available() and cfg["device"] != "cpu":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    try:
        if cfg["table"]:
            run_table(cfg)
        elif cfg["dfr"]:
            if not ddp or dist.get_rank() == 0:
                run_dfr(cfg)
        elif cfg["sweep"]:
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
