"""
Fine-tune a ViT (DINO ViT-S/8 by default) on a data.py data set for fair face-attribute classification.

nanoGPT-style: the values in the config block below are the defaults, and the defaults ARE the recipe of the
original 4th-place solution (DINO ViT-S/8 fine-tuned with SING at 224). Override any value with --key=value
(configurator.py: typed like its default), or start from a preset with --config=NAME (recipe, demo).

    python train_vit.py --config=recipe --data=data/celeba --seed=3 --out_dir=runs/seed3
    python train_vit.py --config=recipe --data=data/celeba --img_size=80           # native 80x80, ~8x cheaper
    python train_vit.py --sweep="0 1 2" --config=recipe --data=data/celeba        # runs/sweep/seed<N>, sweep.md
    torchrun --standalone --nproc_per_node=8 train_vit.py --data=data/celeba      # DDP: NCCL on GPU, gloo on CPU
    python train_vit.py --loss=group_dro --sampler=balanced --out_dir=runs/dro    # a debiasing loss or sampler

A run writes out_dir/log.jsonl (one line per epoch, validation metrics under metrics.py's names),
best.safetensors (best validation metric, select=), last.safetensors (+ optimizer, RNG and epoch state for
resume=true) and curves.png; with tensorboard=true, also TensorBoard event files holding log.jsonl's numbers (step =
epoch). The two-stage debiasing methods (JTT, DFR) and the debiasing table live in robust.py, which drives this
file's train().
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
import metrics
import model
import run
from configurator import UserError
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
select = "fair"  # the val metric behind best.safetensors: fair | worst_group | accuracy | balanced_accuracy | macro_f1
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
upsample = ""  # a JSON file {"indices": [...], "times": k}: each listed train sample seen k times per epoch (JTT)
backend = "resident"  # data.make_loader backend: resident | ffcv
# loss
loss = "bce_smooth"  # bce_smooth: BCE on the 2 logits, targets 1-s / s (the recipe) | ce | focal | group_dro
smoothing = 0.1  # label smoothing s of bce_smooth
focal_gamma = 2.0  # focal loss exponent
group_weights = ""  # weight per label x group cell y*G+g: C*G numbers, "w00,w01,w10,w11" | inverse: n / (k n_cell)
dro_step = 0.01  # loss=group_dro: step size eta of the exponentiated-gradient update of the cell weights
dro_adjust = 0.0  # loss=group_dro: generalisation adjustment C; the update sees each cell's loss + C / sqrt(n_cell)
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
amp = "bf16"  # autocast dtype of the forward passes: bf16 | none (fp32); an AVX2 CPU emulates bf16: ~20x slower
threads = 0  # CPU threads of torch's ops (torch.set_num_threads); 0 = torch's default (every core)
tensorboard = False  # also write each log.jsonl record as TensorBoard scalars in out_dir (pip install tensorboard)
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and type(v) in (bool, int, float, str)}
AMP = ("bf16", "none")
CHOICES = {"init": ("dino", "scratch"), "sampler": ("random", "balanced", "subsample"),
           "backend": ("resident", "ffcv"), "loss": ("bce_smooth", "ce", "focal", "group_dro"),
           "opt": ("sing", "adamw"), "select": metrics.SELECT, "augment": tuple(data.AUGMENTS), "amp": AMP}
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
# what a resumed run must share with the saved one (architecture, optimizer, data, batch order); the rest may change
RESUME_MUST_MATCH = ("data_dir", "init", "pretrained", "arch", "dim", "depth", "heads", "patch_size", "img_size",
                     "opt", "batch_size", "seed", "sampler", "train_groups", "upsample")
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
        net = model.load_pretrained(c.pretrained, img_size=c.img_size, num_classes=num_classes, drop_path=c.drop_path)
        if c.img_size % net.cfg.patch_size:
            raise UserError(f"--img_size={c.img_size}: must be a multiple of {c.pretrained}'s patch size "
                            f"{net.cfg.patch_size}")
        return net
    sizes = {k: getattr(c, k) for k in ("dim", "depth", "heads", "patch_size") if getattr(c, k)}
    cfg = replace(model.PRESETS[c.arch], img_size=c.img_size, num_classes=num_classes, drop_path=c.drop_path, **sizes)
    return model.ViT(cfg)


def build_optimizer(c, net, cuda):
    """SING (the recipe) or AdamW over param_groups."""
    if c.opt == "sing":
        return SING(param_groups(net, c.weight_decay), lr=c.lr)
    return torch.optim.AdamW(param_groups(net, c.weight_decay), lr=c.lr, fused=cuda)  # fused: a CUDA-only kernel


# the sampler: which train samples an epoch sees (train_groups, upsample, then sampler=)

def cells_of(idx, labels, groups):
    """The non-empty label x group cells of the samples idx, label-major: [indices of cell (y, g), ...]."""
    cells = [idx[(labels[idx] == y) & (groups[idx] == g)] for y in labels.unique() for g in groups.unique()]
    return [cell for cell in cells if len(cell)]


def subsample(idx, labels, groups, gen):
    """Every non-empty label x group cell of idx cut to the size of the smallest, a random draw of gen in each."""
    cells = cells_of(idx, labels, groups)
    n = min(len(cell) for cell in cells)
    return torch.cat([cell[torch.randperm(len(cell), generator=gen)[:n]] for cell in cells])


def in_train_groups(c, groups):
    """The train split's indices in train_groups (all of them when it is empty)."""
    idx = torch.arange(len(groups))
    if c.train_groups:
        idx = idx[torch.isin(groups, torch.tensor([int(g) for g in c.train_groups.split(",")]))]
        if len(idx) == 0:
            raise UserError(f"no training sample in groups {c.train_groups}")
    return idx


def read_upsample(path, n):
    """upsample=PATH: (indices of the train split, times), checked against the split's size n."""
    try:
        spec = json.loads(Path(path).read_text())
        indices, times = torch.tensor(spec["indices"], dtype=torch.long), int(spec["times"])
    except (OSError, ValueError, TypeError, KeyError) as e:  # a missing or malformed file: bad input
        raise UserError(f"--upsample={path}: not a readable JSON file with 'indices' and 'times' ({e})") from None
    if times < 1 or (len(indices) and (indices.min() < 0 or indices.max() >= n)):
        raise UserError(f"--upsample={path}: times must be >= 1 and every index in 0..{n - 1}")
    return indices, times


def train_indices(c, labels, groups, epoch=0, upsample=None):
    """The train split's sample indices of one epoch after train_groups, upsample's extra copies (indices, times)
    and the sampler; None = all, in order. balanced is drawn once (seed), subsample anew each epoch (seed, epoch)."""
    if not c.train_groups and c.sampler == "random" and upsample is None:
        return None
    idx = in_train_groups(c, groups)
    if upsample is not None:  # JTT's second stage: the listed samples `times` times in all (Liu et al. 2021)
        extra, times = upsample
        idx = torch.cat([idx, extra[torch.isin(extra, idx)].repeat(times - 1)])
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


# the loss: one call in the loop

def cell_index(labels, groups, n_groups):
    """The label x group cell of each sample, label-major: y * G + g (2 x 2: w00, w01, w10, w11)."""
    return labels * n_groups + groups


def inverse_cell_weights(labels, groups, n_cells, n_groups):
    """group_weights=inverse: the weight of cell (y, g) is n / (k n_yg) over the k non-empty cells (cell_index), so
    every cell carries the same total weight and the mean weight per sample is 1."""
    counts = torch.bincount(cell_index(labels, groups, n_groups), minlength=n_cells).double()
    return torch.where(counts > 0, counts.sum() / ((counts > 0).sum() * counts.clamp(min=1)), 0.0).float()


def group_dro_loss(per_sample, cell, q, step, adjust, world=1):
    """Group DRO's online algorithm (Sagawa et al. 2020, Algorithm 1) over the label x group cells (cell_index).
    Each cell's mean loss in the batch (0 for a cell the batch lacks) moves the cell weights q by exponentiated
    gradient ascent, q <- q exp(step (loss_cell + adjust_cell)) / Z, with adjust = C / sqrt(n_cell) the
    generalisation adjustment; the model then descends sum_cell q_cell loss_cell. -> (that loss times the global
    batch size, the scale of a summed loss; the new q). Under DDP the cell sums and counts are all-reduced, so
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


class Objective:
    """The training loss of a batch, objective(logits, y, g): the per-sample loss (bce_smooth, ce or focal) summed
    over the batch, as the recipe (reduction="sum"; SING and Adam normalise the gradient scale away), each sample
    weighted by its label x group cell (group_weights); or with loss=group_dro, Group DRO's online cell weights,
    which move every step and are kept in the resume state (state_dict) and the log (log)."""

    def __init__(self, c, labels, groups, n_classes, n_groups, device, world=1):
        """labels, groups: the train samples the run draws from (after train_groups), for the cell counts."""
        self.c, self.world, self.n_groups, self.cell_weights, self.q = c, world, n_groups, None, None
        n_cells = n_classes * n_groups
        if c.group_weights == "inverse":
            self.cell_weights = inverse_cell_weights(labels, groups, n_cells, n_groups).to(device)
        elif c.group_weights:  # C x G numbers, label-major (cell_index)
            self.cell_weights = torch.tensor(configurator.cast("group_weights", c.group_weights, (1.0,) * n_cells),
                                             device=device)
        if c.loss == "group_dro":  # uniform cell weights to start; C / sqrt(n_cell) from the train counts
            n_cell = torch.bincount(cell_index(labels, groups, n_groups), minlength=n_cells).float()
            self.adjust = torch.where(n_cell > 0, c.dro_adjust / n_cell.clamp(min=1).sqrt(), 0.0).to(device)
            self.q = torch.full((n_cells,), 1 / n_cells, device=device)

    def per_sample(self, logits, y):
        if self.c.loss == "bce_smooth":  # two independent sigmoids against 0.9 / 0.1 targets for smoothing 0.1
            target = F.one_hot(y, logits.shape[1]).float() * (1 - 2 * self.c.smoothing) + self.c.smoothing
            return F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1)
        if self.c.loss == "focal":  # focal (Lin et al. 2017): down-weights the easy samples
            logp = F.log_softmax(logits, 1).gather(1, y[:, None])[:, 0]
            return -((1 - logp.exp()) ** self.c.focal_gamma) * logp
        return F.cross_entropy(logits, y, reduction="none")  # ce, and group_dro's loss per sample

    def __call__(self, logits, y, g):
        per_sample = self.per_sample(logits, y)
        if self.q is not None:
            loss, self.q = group_dro_loss(per_sample, cell_index(y, g, self.n_groups), self.q, self.c.dro_step,
                                          self.adjust, self.world)
            return loss
        if self.cell_weights is not None:
            per_sample = per_sample * self.cell_weights[cell_index(y, g, self.n_groups)]
        return per_sample.sum()

    def state_dict(self):
        return {} if self.q is None else {"dro_q": self.q}

    def load_state_dict(self, state):
        if self.q is not None and "dro_q" in state:
            self.q = state["dro_q"].to(self.q.device)

    def log(self, group_names):
        """Group DRO's cell weights, named as evaluate's cells, for the epoch's record; {} for a fixed loss."""
        if self.q is None:
            return {}
        G = self.n_groups
        return {"dro_weights": {f"{k // G} / {group_names[k % G]}": float(v) for k, v in enumerate(self.q)}}


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
    run.write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


# -----------------------------------------------------------------------------
# the training run

def check_data(c, meta, labels, groups, n_train, world):
    """Every check of the data against the config, before any work. -> (whether val has two or more groups: then
    per-group metrics and select=fair / worst_group work; the number of groups G, of cells y * G + g)."""
    _, val_groups = data.load_labels(c.data_dir, "val")
    fair = metrics.has_groups(val_groups)
    n_groups = max(len(meta["groups"]), int(groups.max()) + 1 if len(groups) else 0)
    by_cell = [f"{k}={getattr(c, k)}" for k, off in (("train_groups", ""), ("sampler", "random"), ("group_weights", ""))
               if getattr(c, k) != off] + (["loss=group_dro"] if c.loss == "group_dro" else [])
    if c.batch_size % world:
        raise UserError(f"batch_size={c.batch_size} does not split evenly over {world} ranks")
    train_labels = {cell["label"] for cell in meta["splits"]["train"]["cells"]}
    if len(meta["classes"]) < 2 or len(train_labels) < 2:
        raise UserError(f"{c.data_dir} has {len(train_labels)} class in its train split: a classifier needs two")
    if c.select in metrics.NEEDS_GROUPS and not fair:
        raise UserError(f"select={c.select} needs two or more groups in the val split of {c.data_dir}; use "
                        "--select=accuracy")
    if by_cell and (groups < 0).any():
        raise UserError(f"{', '.join(by_cell)} need group labels on every train sample")
    if (c.group_weights or c.loss == "group_dro") and not fair:
        raise UserError(f"{by_cell[-1]} needs a data set with two or more groups")
    if c.group_weights and c.group_weights != "inverse":  # C x G numbers, once G is known
        configurator.cast("group_weights", c.group_weights, (1.0,) * (len(meta["classes"]) * n_groups))
    if c.train_groups:  # a subset of the groups must still hold two classes
        kept = labels[in_train_groups(c, groups)]
        left = {meta["classes"][y] if 0 <= y < len(meta["classes"]) else str(y): int((kept == y).sum())
                for y in kept.unique().tolist()}
        if len(left) < 2:
            raise UserError(f"--train_groups={c.train_groups} leaves one class in the train split ("
                            f"{', '.join(f'{k}: {n}' for k, n in left.items())}): a classifier needs two")
    if n_train // world < c.batch_size // world:
        raise UserError(f"--batch_size={c.batch_size} is larger than the {n_train} training samples; lower it")
    return fair, n_groups


def check_run(cfg, world=1):
    """Everything about one run that can be known before any work: the data against the config (check_data), the
    upsample file, and the out_dir (an earlier run there is refused unless resume or force). Sweeps and tables call
    it for every run before the first trains. -> (meta, train labels, train groups, upsample, the first epoch's
    indices, fair, n_groups)."""
    c = SimpleNamespace(**cfg)
    meta = data.read_meta(c.data_dir, splits=("train", "val"))
    labels, groups = data.load_labels(c.data_dir, "train")
    upsample = read_upsample(c.upsample, len(labels)) if c.upsample else None
    indices = train_indices(c, labels, groups, 0, upsample)
    fair, n_groups = check_data(c, meta, labels, groups, len(labels) if indices is None else len(indices), world)
    run.check_out_dir(c.out_dir, c.resume, c.force)
    run.check_writable(c.out_dir, what="the run")
    return meta, labels, groups, upsample, indices, fair, n_groups


def train(cfg):
    """One run; returns the log record of the best epoch (what best.safetensors holds)."""
    c = SimpleNamespace(**cfg)
    rank, world = run.rank_world()
    master = rank == 0
    device = run.pick_device(c.device)
    cuda = device.type == "cuda"
    meta, labels, groups, upsample, indices, fair, n_groups = check_run(cfg, world)
    if master and not cuda and c.init == "dino" and c.img_size >= 224:
        print(f"warning: the recipe at {c.img_size}x{c.img_size} on a CPU runs at about 1 img/s in fp32 (~40 h per "
              "CelebA epoch); try --img_size=80 (native size) or `make demo`", file=sys.stderr)
    if master:
        run.warn_slow_bf16(device, c.amp)
    group_names = meta["groups"] or metrics.GROUP_NAMES
    kept = in_train_groups(c, groups)  # the samples the run draws from: their cell counts weigh the loss
    objective = Objective(c, labels[kept], groups[kept], len(meta["classes"]), n_groups, device, world)
    aug_kw = data.augment_settings(c.augment, c.augment_kw)

    with run.run_dir(c.out_dir, c.resume, c.force, master), run.Events(c.out_dir, c.tensorboard and master) as events:
        torch.manual_seed(c.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        net = build_model(c, len(meta["classes"])).to(device)
        torch.manual_seed(c.seed + 1_000_003 * rank)  # drop-path masks: a different stream per rank
        aug_gen = torch.Generator(device=device).manual_seed(c.seed + 1_000_003 * rank)  # a different stream per rank
        loader = lambda split, batch, train, idx=None: data.make_loader(
            c.data_dir, split, batch, train=train, seed=c.seed, indices=idx, device=device, backend=c.backend,
            rank=rank, world_size=world)
        train_loader = loader("train", c.batch_size // world, True, indices)
        val_loader = loader("val", c.eval_batch_size, False)

        optimizer = build_optimizer(c, net, cuda)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if master:  # room for best.safetensors and last.safetensors (weights + the optimizer's two moments)
            run.check_writable(c.out_dir, 4 * sum(p.numel() * p.element_size() for p in params), "its checkpoints")

        iters = len(train_loader)
        total = iters * c.epochs
        start_epoch, best, history = 0, -math.inf, []
        last_path = os.path.join(c.out_dir, "last.safetensors")
        configs = [cfg]  # every config this run was started or resumed with, oldest first (kept in last.safetensors)
        if c.resume and os.path.exists(last_path):
            state = model.resume_state(last_path, cfg, RESUME_MUST_MATCH, master)
            net.load_state_dict(state.pop("weights"))
            optimizer.load_state_dict(state["optimizer"])
            objective.load_state_dict(state)
            run.set_rng_states(state["rng"], aug_gen, device, rank)
            start_epoch, best, history = state["epoch"] + 1, state["best"], state["history"]
            configs = state.get("configs", []) + [cfg]
            if master:
                print(f"resuming {last_path} after epoch {start_epoch}")
            if history:  # the resume point first: TensorBoard drops what an interrupted session logged after it
                events.add(history[-1], history[-1]["epoch"])
        elif c.resume and master:
            print(f"resume=true but no {last_path} yet: starting from scratch")

        ddp_net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if cuda else None) \
            if world > 1 else net
        forward = torch.compile(ddp_net) if c.compile else ddp_net
        if master:
            print(f"{sum(p.numel() for p in params) / 1e6:.2f}M parameters, {iters} iterations/epoch x {c.epochs}"
                  f" epochs, global batch {c.batch_size} on {world} x {device}")

        for epoch in range(start_epoch, min(c.epochs, c.stop_after) if c.stop_after else c.epochs):
            net.train()
            if c.sampler == "subsample" and epoch:  # a new draw of every cell (the same sizes: the same iterations)
                train_loader = loader("train", c.batch_size // world, True,
                                      train_indices(c, labels, groups, epoch, upsample))
            train_loader.set_epoch(epoch)
            t0, loss_sum, n_seen, gnorms = time.time(), 0.0, 0, []
            bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{c.epochs}", disable=not master, leave=False)
            for i, (x, y, g) in enumerate(bar):
                if run.stop_requested(world, device):
                    bar.close()
                    raise run.Stopped(f"stopped by a signal in epoch {epoch + 1}: "
                                      f"{run.saved(c.out_dir, 'epoch', epoch)}; continue with --resume=true")
                lr_now = lr_at(c, epoch * iters + i, total)
                for group in optimizer.param_groups:
                    group["lr"] = lr_now
                inputs = data.augment(x, c.img_size, aug_gen, **aug_kw) if aug_kw is not None else \
                    data.prepare(x, c.img_size)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=c.amp == "bf16"):
                    logits = forward(inputs)
                loss = objective(logits.float(), y, g)
                optimizer.zero_grad(set_to_none=True)
                (loss * world).backward()  # DDP averages gradients over ranks; the recipe sums over the global batch
                # measured before the step: SING overwrites p.grad with the centred, normalised gradient
                gnorm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]).item()
                loss_val = loss.item()
                if not (math.isfinite(loss_val) and math.isfinite(gnorm)):  # gnorm is the same on every rank
                    raise UserError(f"non-finite loss {loss_val} / grad norm {gnorm} at epoch {epoch + 1} iteration "
                                    f"{i}; stopped before the update: {run.saved(c.out_dir, 'epoch', epoch)}")
                optimizer.step()
                loss_sum, n_seen = loss_sum + loss_val, n_seen + len(y)
                gnorms.append(gnorm)
                bar.set_postfix(loss=f"{loss_val / len(y):.4f}", img_s=f"{n_seen * world / (time.time() - t0):.0f}")
            train_time = time.time() - t0
            totals = torch.tensor([loss_sum, n_seen], dtype=torch.float64, device=device)
            if world > 1:
                dist.all_reduce(totals)

            scores, val_labels, val_groups = evaluate.predict(net, val_loader, c.img_size, world=world, amp=c.amp)
            val_metrics = metrics.compute_metrics(scores, val_labels, val_groups, fair=fair, group_names=group_names)
            record = {"epoch": epoch + 1, "lr": lr_now, "train_loss": (totals[0] / totals[1]).item(),
                      "grad_norm": float(np.mean(gnorms)), "grad_norm_max": float(np.max(gnorms)),
                      "img_per_s": totals[1].item() / train_time, "train_s": train_time, "time_s": time.time() - t0,
                      **val_metrics, **objective.log(group_names)}
            if cuda:  # the CUDA allocator's high-water mark of this process so far (no such counter on the CPU)
                record["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            history.append(record)
            events.add(record, record["epoch"])
            score = metrics.selection_score(val_metrics, c.select)
            improved, best = score > best, max(best, score)
            rng = run.rng_states(aug_gen, device, world)  # a collective: every rank takes part
            if master:
                state = {"optimizer": optimizer.state_dict(), "rng": rng, "epoch": epoch, "best": best,
                         "history": history, "configs": configs, **objective.state_dict()}
                ckpt_meta = {"config": cfg, "data": data.summary(c.data_dir, meta), "epoch": epoch + 1,
                             "metrics": val_metrics}
                with run.saving(c.out_dir, "epoch", epoch):
                    save_epoch(c, net, ckpt_meta, state, improved)
        return max(history, key=lambda h: metrics.selection_score(h, c.select)) if history else None


def save_epoch(c, net, ckpt_meta, state, improved):
    """The end of an epoch on rank 0: best.safetensors (if improved), last.safetensors with the resume state,
    log.jsonl and curves.png, each written atomically, and the epoch's line on the terminal."""
    history, metrics = state["history"], ckpt_meta["metrics"]
    record = history[-1]
    if improved:
        model.save_checkpoint(os.path.join(c.out_dir, "best.safetensors"), net, meta=ckpt_meta)
    model.save_checkpoint(os.path.join(c.out_dir, "last.safetensors"), net, meta=ckpt_meta, state=state)
    run.write_log(c.out_dir, history)
    plot_curves(history, os.path.join(c.out_dir, "curves.png"))
    groups_txt = " ".join(f"{k} {v:.4f}" for k, v in metrics.get("group_accuracy", {}).items())
    worst = f" | worst cell {metrics['worst_group_accuracy']:.4f}" if "worst_group" in metrics else ""
    dro = " | cell weights " + " ".join(f"{v:.3f}" for v in record["dro_weights"].values()) \
        if "dro_weights" in record else ""
    print(f"epoch {record['epoch']}: loss {record['train_loss']:.4f} | val acc {metrics['accuracy']:.4f} "
          f"{groups_txt} | fair {metrics.get('fair_score', float('nan')):.4f}{worst}{' *' if improved else ''}{dro} "
          f"| grad norm {record['grad_norm']:.3g} | {record['img_per_s']:.0f} img/s")


# -----------------------------------------------------------------------------
# a seed sweep

SWEEP_COLUMNS = ("fair_score", "worst_group_accuracy", "equalized_odds_difference", "accuracy")


def metrics_on_test(run_dir, c, device):
    """evaluate.py's metrics of run_dir/best.safetensors on the test split (what a sweep reports besides val)."""
    net, _, _ = model.load_checkpoint(os.path.join(run_dir, "best.safetensors"), device=device)
    loader = data.make_loader(c.data_dir, "test", c.eval_batch_size, train=False, device=device)
    return evaluate.split_metrics(net, loader, net.cfg.img_size)


def run_sweep(cfg):
    """Train each seed of cfg["sweep"] into sweep_dir/seed<N>, then sweep_dir/sweep.md: each seed's best
    validation epoch (select=) with its validation and test metrics, and their mean ± std over seeds."""
    c = SimpleNamespace(**cfg)
    seeds = [int(s) for s in c.sweep.replace(",", " ").split()]  # checked by parse_config
    runs = [(s, os.path.join(c.sweep_dir, f"seed{s}")) for s in seeds]
    for s, run_dir in runs:  # every seed's run checked before the first trains
        try:
            check_run({**cfg, "seed": s, "out_dir": run_dir}, run.rank_world()[1])
        except UserError as e:
            raise UserError(f"--sweep seed {s}: {e}") from None
    best = [train({**cfg, "seed": s, "out_dir": run_dir}) for s, run_dir in runs]
    if run.rank_world()[0] != 0:
        return
    device = run.pick_device(c.device)
    results = [(s, val, metrics_on_test(run_dir, c, device)) for (s, run_dir), val in zip(runs, best)]
    _, val0, test0 = results[0]
    cols = [("val", k) for k in SWEEP_COLUMNS if k in val0] + [("test", k) for k in SWEEP_COLUMNS if k in test0]
    pick = lambda val, test: [{"val": val, "test": test}[split][k] for split, k in cols]
    rows = [[s, val["epoch"], *pick(val, test)] for s, val, test in results]
    rows.append(["mean ± std", "", *(run.mean_std([r[i] for r in rows]) for i in range(2, len(cols) + 2))])
    run.write_table(os.path.join(c.sweep_dir, "sweep.md"),
                    [f"# Seed sweep: `train_vit.py {' '.join(sys.argv[1:])}`",
                     "Each seed's best.safetensors (best validation epoch by select=): validation and test metrics."],
                    ["seed", "best epoch", *(f"{split} {k}" for split, k in cols)], rows)


def parse_config(argv, defaults=DEFAULTS, file=__file__, presets=PRESETS, choices=CHOICES):
    """This script's config from the command line: defaults, a presets entry, then --key=value (configurator.py),
    with every check that needs no data (robust.py passes its own defaults, presets and files)."""
    cfg = configurator.parse(argv, defaults, file, presets=presets, choices=choices, aliases={"data": "data_dir"})
    data.augment_settings(cfg["augment"], cfg["augment_kw"])
    if cfg["group_weights"] not in ("", "inverse"):  # numbers here; their count (C x G) once the data is read
        configurator.cast("group_weights", cfg["group_weights"], (1.0,) * len(cfg["group_weights"].split(",")))
    need = lambda key, ok, allowed: configurator.require(cfg, key, ok, allowed)
    need("out_dir", lambda v: bool(v.strip()), "the run's folder, e.g. runs/x (empty is no folder)")
    need("lr", lambda v: v > 0, "the learning rate must be > 0")
    for key in ("batch_size", "eval_batch_size", "epochs", "img_size"):
        need(key, lambda v: v >= 1, "must be >= 1")
    for key in ("weight_decay", "stop_after", "dim", "depth", "heads", "patch_size", "focal_gamma", "dro_step",
                "dro_adjust", "threads"):
        need(key, lambda v: v >= 0, "must be >= 0")
    if cfg["loss"] == "group_dro":
        need("group_weights", lambda v: not v, "loss=group_dro weighs the cells itself; leave group_weights empty")
    for key in ("warmup", "drop_path"):
        need(key, lambda v: 0 <= v < 1, "must be in [0, 1)")
    need("smoothing", lambda v: 0 <= v < 0.5, "must be in [0, 0.5)")
    need("train_groups", lambda v: all(p.strip().isdigit() for p in v.split(",")) if v else True,
         "comma-separated group ids, e.g. 0 (women) or 0,1")
    need("sweep", lambda v: all(p.lstrip("-").isdigit() for p in v.replace(",", " ").split()),
         "a list of integer seeds, e.g. \"0 1 2\"")
    seeds = [int(p) for p in cfg["sweep"].replace(",", " ").split()]
    need("sweep", lambda v: len(set(seeds)) == len(seeds),
         f"seed {next((x for x in seeds if seeds.count(x) > 1), '')} is listed twice; each seed is one run")
    need("arch", lambda v: v in model.PRESETS, f"one of {', '.join(model.PRESETS)}")
    if cfg["tensorboard"]:
        run.tensorboard_writer()  # a missing package is one line now, before any work
    if cfg["init"] == "scratch":  # (init=dino: the patch size comes with the weights, checked once they are read)
        patch = cfg["patch_size"] or model.PRESETS[cfg["arch"]].patch_size
        need("img_size", lambda v: v % patch == 0, f"must be a multiple of the patch size {patch}")
    return cfg


def launch(cfg, work):
    """work(cfg) in this process as every run here starts: torch's thread count (threads=), freed memory kept for
    the CPU augmentation's batch buffers (data.keep_freed_memory: ~1.7x), torchrun's process group when launched
    by it (run.ddp)."""
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    data.keep_freed_memory()
    with run.ddp(cfg["device"]):
        return work(cfg)


@configurator.cli
def main(argv=None):
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    launch(cfg, run_sweep if cfg["sweep"] else train)


if __name__ == "__main__":
    main()
