"""
MixMatch (Berthelot et al. 2019, https://arxiv.org/abs/1905.02249) semi-supervised training on one data.py folder,
in one file, nanoGPT style: the config block below holds the defaults, --key=value overrides them (configurator.py).

    python train_mixmatch.py --data=data/celeba --n_labeled=250                    # MixMatch, DINO ViT-S/8
    python train_mixmatch.py --data=data/aaf --config=wrn50_2 --mode=supervised    # the baseline, same labels
    python train_mixmatch.py --config=cpu_small --data=data/ssl --n_labeled=250    # small CNN from scratch on CPU
    python train_mixmatch.py --table --config=cpu_small --data=data/ssl --out_dir=runs/ssl_table  # -> ssl_table.md
    python train_mixmatch.py ... --out_dir=runs/x --resume                         # continue a killed run exactly
    python train_mixmatch.py --config=cpu_small --data=data/ssl --show=step.png    # draw step 1, no training
    torchrun --standalone --nproc_per_node=2 train_mixmatch.py ...                 # DDP: NCCL on GPU, gloo on CPU

(data/ssl: `python data.py synthetic --n 12000 --size 40 --target Male --group none --out data/ssl`, gender of faces;
`make ssl-table` builds it and runs the table.)

`n_labeled` train images (balanced per class, chosen by `seed`) keep their labels, the rest of the train split is
used without labels; val scores every `eval_every` steps, test scores the best checkpoint at the end.
mode=mixmatch (default) | supervised (the same n_labeled labels only: the baseline) | full (all labels: the ceiling).

One MixMatch step (the paper's Algorithm 1): augment the labelled batch once and the unlabelled batch K times; guess
labels by averaging the softmax over the K views (no gradient) and sharpen with T; concatenate [x; u_1..u_K] with
targets [onehot(y); q..q]; mix every row with a random row of the same concatenation with a per-sample
lambda ~ Beta(alpha, alpha), lambda' = max(lambda, 1 - lambda); soft cross-entropy on the labelled rows, mean squared
error between softmax and target on the rest, weighted by lambda_u ramped linearly from 0. After each optimizer step:
EMA of the weights (the EMA model is the one evaluated and saved) and decoupled weight decay w <- w * (1 - wd * lr)
on conv/linear weights, as the reference does. Batch norm: the guess pass uses batch statistics without updating
the running ones, and the mixed 3B batch goes through the model in one forward, so the statistics always see
labelled and unlabelled rows together (what the reference's interleave achieves with three forwards).

A run writes out_dir/log.jsonl (one line per validation, then the test line), curves.png, best.safetensors (the
EMA model at its best validation metric, select=) and last.safetensors (the EMA model, plus the raw model,
optimizer, RNG, batch-stream and loss state that resume=true continues bit-identically on the CPU); with
tensorboard=true, also TensorBoard event files holding log.jsonl's numbers (run.Events; TensorBoard step = step).
show=PATH.png draws the first step instead of training (show_step): the batch, the K views with the guessed and
sharpened labels, the mixup partners with their lambda', and the distribution of lambda' for three alphas.
DDP: batch_size is global; each rank takes its slice of the same global batch order, augments and mixes its own
rows (mixup partners come from the same rank, BN statistics are per rank), and the gradients are averaged.
"""

import copy
import dataclasses
import math
import os
import shlex
import sys
import time
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import configurator
import data
import evaluate
import metrics
import model
import run
import sing
from configurator import UserError

# -----------------------------------------------------------------------------
# config (defaults: the DINO ViT-S/8 fine-tuned with MixMatch)
# I/O
data_dir = "data/celeba"  # a data.py output folder
out_dir = "runs/mixmatch"  # the run's folder; with table=true, the folder of every run and of ssl_table.md
resume = False  # continue from out_dir/last.safetensors if it exists
force = False  # replace an earlier run in out_dir (without resume or force, such an out_dir is refused)
select = "accuracy"  # the val metric behind best.safetensors (metrics.SELECT); fair and worst_group need groups
seed = 0  # model init, augmentation, mixup, batch order and the choice of the labelled subset
n_labeled = 250  # labelled train images, balanced per class; the rest of the train split is unlabelled
mode = "mixmatch"  # mixmatch | supervised | full
# model
net = "vit"  # vit (model.py's ViT) | wrn50_2 (torchvision Wide-ResNet-50-2) | small (a from-scratch CNN for CPUs)
pretrained = "facebook/dino-vits8"  # vit: Hub id or weights file; wrn50_2: torchvision (ImageNet); "": random init
arch = "vit_small_patch8"  # model.PRESETS name of the ViT built when pretrained is empty (train_vit.py's meaning)
small_width = 16  # channels of the small CNN's first stage (doubles per stage)
img_size = 224  # model input: images are augmented at native size and resized to this on the device
augment = "weak"  # a data.AUGMENTS list: weak (crop + flip, the reference's kind) | full (the original's) | none
augment_kw = ""  # overrides of data.augment's parameters, e.g. "crop_scale=(0.64,1.0)"
# MixMatch
K = 2  # augmentations of each unlabelled image
T = 0.5  # sharpening temperature
alpha = 0.75  # Beta(alpha, alpha) for mixup
mixup = True  # false: the no-mixup variant (targets and inputs used as they are)
lambda_u = 75.0  # weight of the unlabelled L2 loss, a mean over classes: 2 classes weigh it 5x more than CIFAR-10
rampup = 0.25  # lambda_u ramps linearly from 0 over this fraction of `steps`
ema_decay = 0.999  # EMA of the weights, warmed up as min(ema_decay, (1 + t) / (10 + t))
# optimisation
opt = "adam"  # adam | sing
lr = 1e-4  # Adam 2e-3 is the reference's from-scratch value; a pretrained backbone wants less
weight_decay = 0.02  # decoupled: w <- w * (1 - weight_decay * lr) after each step, conv/linear weights only
batch_size = 64  # labelled images per step (and as many unlabelled, times K); global: split evenly over DDP ranks
steps = 4096  # optimizer steps (the ramp-up's horizon)
stop_after = 0  # stop after this many steps (0 = all): a short run that resume=true continues exactly
eval_every = 256  # steps between validation passes
eval_batch_size = 256  # validation / test batch (per rank)
# system
device = "auto"  # auto = cuda if available, else cpu
amp = "bf16"  # autocast dtype of the forward passes: bf16 | none (fp32); an AVX2 CPU emulates bf16: ~20x slower
compile = False  # torch.compile the model (works on the CPU too, where it is slower)
table = False  # supervised, mixmatch, mixmatch without mixup, full: table_seeds seeds -> out_dir/ssl_table.md
table_seeds = 3  # seeds 0 .. table_seeds-1
tensorboard = False  # also write each log.jsonl record as TensorBoard scalars in out_dir (pip install tensorboard)
# the picture of one step
show = ""  # PATH.png: draw this config's first MixMatch step on its data (batch, guesses, mixup, lambda') and exit
show_ckpt = ""  # show's guessing model: a checkpoint, e.g. runs/x/best.safetensors; "" = the untrained initial model
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and type(v) in (bool, int, float, str)}
CHOICES = {"mode": ("mixmatch", "supervised", "full"), "net": ("vit", "wrn50_2", "small"), "opt": ("adam", "sing"),
           "augment": tuple(data.AUGMENTS), "select": metrics.SELECT, "arch": tuple(model.PRESETS),
           "amp": ("bf16", "none")}
# what a resumed run must share with the saved one (architecture, optimizer, data, labelled subset); the rest may change
RESUME_MUST_MATCH = ("data_dir", "mode", "n_labeled", "seed", "net", "pretrained", "arch",
                     "small_width", "img_size", "opt", "batch_size", "K")
PRESETS = {
    # small CNN from scratch on the synthetic set, CPU: the README's table (12 runs of 500 steps in 8 minutes on 2
    # cores; the earlier 1000-step table, on faces stored at 80x80, ranked the rows the same way). lambda_u: the L2
    # term is a mean over classes, so 2 classes weigh it 5x more than CIFAR-10 does; 75 / 5 = 15, and at 25 a
    # 1000-step run (ramp 400 steps, not the reference's 16k) collapsed to the majority class on seed 1. 8 is
    # measured. The crop keeps at least 64% of the area (80% of the side), close to the reference's 4-pixel
    # pad-and-crop on 32x32 images.
    "cpu_small": dict(net="small", pretrained="", img_size=40, lr=2e-3, batch_size=64, steps=500, eval_every=50,
                      lambda_u=8.0, rampup=0.4, ema_decay=0.99, device="cpu", augment_kw="crop_scale=(0.64,1.0)",
                      amp="none"),
    # the original gender / mask experiments' backbone, ImageNet weights
    "wrn50_2": dict(net="wrn50_2", pretrained="torchvision", img_size=224, lr=1e-4, batch_size=32),
}
IMBALANCE = 5  # a train class ratio beyond 1:IMBALANCE gets the select=accuracy warning (imbalance_warning)
# the table's rows: (name, run folder tag, config overrides); "no mixup" is the paper's ablation
TABLE = (("supervised", "supervised", dict(mode="supervised")),
         ("mixmatch", "mixmatch", dict(mode="mixmatch", mixup=True)),
         ("mixmatch (no mixup)", "mixmatch-nomixup", dict(mode="mixmatch", mixup=False)),
         ("full", "full", dict(mode="full")))


# ----------------------------------------------------------------------------- MixMatch, pure functions

def sharpen(p, T):
    """p^(1/T) renormalised over the class axis, computed as softmax(log p / T) so that T -> 0 gives the one-hot
    argmax instead of 0/0."""
    return torch.softmax(p.log() / T, dim=1)


def guess_labels(net, views, T):
    """The label guess of one unlabelled batch: the softmax averaged over its K augmented views, and that guess
    sharpened with T. No gradient; the views go through the model in one forward (same result as K forwards for a
    model without batch statistics). -> (guess, sharpened guess), [B, classes] each."""
    with torch.no_grad(), frozen_bn_stats(net):
        p = net(torch.cat(views)).float().softmax(1).view(len(views), len(views[0]), -1).mean(0)
    return p, sharpen(p, T)


@contextmanager
def frozen_bn_stats(net):
    """Batch norm keeps using batch statistics (train mode) but its running statistics stay as they are: the guess
    pass must not move them (the reference keeps only the BN update of the training forward)."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum


def mixup_lambdas(n, alpha, device=None):
    """n draws of lambda' = max(lambda, 1 - lambda), lambda ~ Beta(alpha, alpha): MixMatch's mixing weights, each
    row kept closer to itself (from torch's global RNG, as the rest of the step's mixup)."""
    lam = torch.distributions.Beta(alpha, alpha).sample((n,)).to(device)
    return torch.maximum(lam, 1 - lam)


def mix(x, p, alpha):
    """MixUp of every row with a random row of the same batch (its partner), weights lambda' from mixup_lambdas;
    inputs and targets mixed identically. -> (mixed x, mixed p, lambda' per row, partner index per row)."""
    lam = mixup_lambdas(len(x), alpha, x.device)
    perm = torch.randperm(len(x), device=x.device)
    lx, lp = lam.view(-1, *[1] * (x.dim() - 1)), lam.view(-1, *[1] * (p.dim() - 1))
    return lx * x + (1 - lx) * x[perm], lp * p + (1 - lp) * p[perm], lam, perm


def soft_cross_entropy(logits, target):
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


def l2_loss(logits, target):
    """Mean over samples and classes of (softmax - target)^2, as the reference."""
    return (logits.float().softmax(1) - target).pow(2).mean()


def rampup_weight(step, length):
    """Linear ramp from 0 at step 0 to 1 at step `length`, then 1."""
    return 1.0 if length <= 0 else min(max(step / length, 0.0), 1.0)


@torch.no_grad()
def ema_update(ema, net, decay, step):
    """ema <- d * ema + (1 - d) * net for the parameters, d = min(decay, (1 + step) / (10 + step)) so that short
    runs are not dominated by the random init; buffers (BN running statistics) are copied from the model, since the
    EMA model never sees data itself."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), net.parameters()):
        e.lerp_(p.detach(), 1 - d)
    for e, b in zip(ema.buffers(), net.buffers()):
        e.copy_(b)


def decayed_weights(net):
    """The conv / linear kernels: the reference decays these only (no biases, norms, position embeddings)."""
    return [m.weight for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def labeled_subset(labels, n_labeled, num_classes, seed):
    """Indices of n_labeled samples balanced per class (the remainder of n_labeled / num_classes goes to the first
    classes), drawn with `seed`; sorted. The rest of the split is the unlabelled set."""
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in range(num_classes):
        want = n_labeled // num_classes + (c < n_labeled % num_classes)
        idx = (labels == c).nonzero().flatten()
        if len(idx) < want:
            raise ValueError(f"class {c} has {len(idx)} train images, fewer than the {want} labelled ones asked")
        picked.append(idx[torch.randperm(len(idx), generator=g)[:want]])
    return torch.cat(picked).sort().values


class Batches:
    """Endless random batches of `indices`: reshuffled passes laid end to end, so a set smaller than a batch still
    fills every batch and every sample is seen equally often. Its whole state is `generator` (shuffles) and `queue`
    (drawn, not yet served), so a stream saved mid-pass continues exactly. Training reads its two streams directly
    (no make_loader) because they are endless and share one generator."""

    def __init__(self, indices, batch_size, generator, queue=None):
        self.indices, self.batch_size, self.generator = indices, batch_size, generator
        self.queue = indices[:0] if queue is None else queue

    def __iter__(self):
        return self

    def __next__(self):
        while len(self.queue) < self.batch_size:
            order = torch.randperm(len(self.indices), generator=self.generator)
            self.queue = torch.cat([self.queue, self.indices[order]])
        batch, self.queue = self.queue[: self.batch_size], self.queue[self.batch_size:]
        return batch


# ----------------------------------------------------------------------------- one run

def build_model(c, num_classes):
    if c.net == "small":
        return model.SmallCNN(img_size=c.img_size, num_classes=num_classes, width=c.small_width)
    if c.net == "wrn50_2":
        return model.WideResNet50(img_size=c.img_size, num_classes=num_classes, pretrained=bool(c.pretrained))
    if c.pretrained:
        return model.load_pretrained(c.pretrained, img_size=c.img_size, num_classes=num_classes)
    return model.ViT(dataclasses.replace(model.PRESETS[c.arch], img_size=c.img_size, num_classes=num_classes))


def mixmatch_rows(c, net, xl, pl, views):
    """What one MixMatch step feeds the model, and what show= draws: labels guessed by net from the K unlabelled
    views and sharpened with T, then the rows [x; u_1..u_K] with targets [p; q..q], mixed (unless mixup=false).
    -> namespace: guess and q (the guess sharpened), [B, classes]; x and p, the (mixed) rows and targets, [(1+K)B, ...];
    lam and perm, each row's lambda' and partner (None without mixup)."""
    guess, q = guess_labels(net, views, c.T)
    x, p = torch.cat([xl, *views]), torch.cat([pl] + [q] * c.K)
    lam = perm = None
    if c.mixup:
        x, p, lam, perm = mix(x, p, c.alpha)
    return SimpleNamespace(guess=guess, q=q, x=x, p=p, lam=lam, perm=perm)


def mixmatch_losses(c, net, forward, xl, pl, views):
    """MixMatch's two losses for one step: mixmatch_rows, then one forward over all of them (BN statistics see
    labelled and unlabelled rows together). -> (soft CE on the labelled rows, L2 on the rest)."""
    b, rows = len(xl), mixmatch_rows(c, net, xl, pl, views)
    logits = forward(rows.x)
    return soft_cross_entropy(logits[:b], rows.p[:b]), l2_loss(logits[b:], rows.p[b:])


def step_loss(c, net, forward, rows, step, ramp_steps):
    """One step's loss on draw_rows' rows: mode=mixmatch, loss_x + w_u * loss_u with w_u ramped up over ramp_steps;
    supervised and full, the soft cross-entropy of the labelled rows (loss_u 0). -> (loss, loss_x, loss_u, w_u)."""
    xl, pl, views = rows
    if c.mode != "mixmatch":
        loss_x = soft_cross_entropy(forward(xl), pl)
        return loss_x, loss_x, torch.zeros((), device=xl.device), 0.0
    loss_x, loss_u = mixmatch_losses(c, net, forward, xl, pl, views)
    w_u = c.lambda_u * rampup_weight(step, ramp_steps)
    return loss_x + w_u * loss_u, loss_x, loss_u, w_u


def validate(c, ema, net, val_loader, group_names, world, step, losses, w_u):
    """A validation: (its log record: the EMA model's metrics, the raw model's headline numbers and the mean losses
    since the last validation; the EMA model's metrics)."""
    m_ema, m_raw = (evaluate.split_metrics(m, val_loader, c.img_size, group_names, world, c.amp) for m in (ema, net))
    lx_mean, lu_mean = (sum(v) / len(losses) for v in zip(*losses))
    return {"step": step, "loss_x": lx_mean, "loss_u": lu_mean, "w_u": w_u, **m_ema,
            "raw": {k: m_raw[k] for k in ("accuracy", "f1", "group_accuracy", "fair_score") if k in m_raw}}, m_ema


def load_train_data(c, world, dev, master=True):
    """The train split (images and labels on the device), its labelled and unlabelled indices, and meta.json, once
    every check of the data against the config has passed (and the imbalance warning printed, by the master)."""
    if c.batch_size % world:
        raise UserError(f"batch_size={c.batch_size} does not split evenly over {world} ranks")
    meta = data.read_meta(c.data_dir, splits=("train", "val", "test"))
    _, val_groups = data.load_labels(c.data_dir, "val")
    train_x, train_y, _ = data.load_split(c.data_dir, "train")
    num_classes = len(meta["classes"])
    if c.select in metrics.NEEDS_GROUPS and not metrics.has_groups(val_groups):
        raise UserError(f"select={c.select} needs two or more groups in the val split of {c.data_dir}; use "
                        "--select=accuracy")
    if len(train_y.unique()) < 2:
        raise UserError(f"{c.data_dir} has one class in its train split: a classifier needs two")
    if master and (warning := imbalance_warning(c, train_y, meta["classes"])):
        print(warning, file=sys.stderr)
    if c.mode != "full" and c.n_labeled < num_classes:
        raise UserError(f"--n_labeled={c.n_labeled}: at least one labelled image per class ({num_classes} classes)")
    everything = torch.arange(len(train_y))
    try:
        lab = everything if c.mode == "full" else labeled_subset(train_y, c.n_labeled, num_classes, c.seed)
    except ValueError as e:  # a class with fewer images than its share of n_labeled
        raise UserError(f"--n_labeled={c.n_labeled}: {e}") from None
    unlab = everything[~torch.isin(everything, lab)]
    if c.mode == "mixmatch" and len(unlab) == 0:
        raise UserError("n_labeled covers the whole train split: nothing left unlabelled for MixMatch")
    return meta, train_x.to(dev), train_y.to(dev), lab, unlab


def imbalance_warning(c, train_y, classes):
    """The one-line warning for select=accuracy on a train split whose largest class outnumbers its smallest more
    than IMBALANCE to 1 (mask sets run 1:18 to 1:40): validation accuracy then favours the majority-class model, so
    best.safetensors may be it. "" otherwise."""
    counts = torch.bincount(train_y, minlength=len(classes)).tolist()
    if c.select != "accuracy" or max(counts) <= IMBALANCE * min(counts):
        return ""
    ratio = max(counts) / min(counts) if min(counts) else math.inf
    per_class = ", ".join(f"{name} {n}" for name, n in zip(classes, counts))
    return (f"warning: the train classes run 1:{ratio:.0f} ({per_class}); select=accuracy would favour the majority "
            "class: consider --select=balanced_accuracy")


def last_step(history):
    """The step last.safetensors holds (each evaluation's record is saved with it); 0 before the first."""
    return history[-1]["step"] if history else 0


def build_run(c, num_classes, dev, rank):
    """The seeded pieces of a run: (model, its EMA copy, optimizer, batch-order generator, augmentation generator)."""
    torch.manual_seed(c.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    net = build_model(c, num_classes).to(dev)
    if rank:  # mixup draws: rank 0 goes on with the single-process stream, every other rank gets its own
        torch.manual_seed(c.seed + 1_000_003 * rank)
    ema = copy.deepcopy(net).requires_grad_(False)
    # weight decay is decoupled (after each step, in train) for both optimizers
    optimizer = sing.SING(net.parameters(), lr=c.lr) if c.opt == "sing" else torch.optim.Adam(net.parameters(), lr=c.lr)
    gen_idx = torch.Generator().manual_seed(c.seed)  # batch order (CPU), the same global order on every rank
    gen_aug = torch.Generator(dev).manual_seed(c.seed + 1_000_003 * rank)  # augmentation draws, one stream per rank
    return net, ema, optimizer, gen_idx, gen_aug


def batch_streams(c, lab, unlab, gen_idx, gen_aug):
    """What the steps draw from: the labelled and unlabelled batch streams (batch order from gen_idx) and the train
    transform of augment= (draws from gen_aug). -> (labelled Batches, unlabelled Batches, transform)."""
    kw = data.augment_settings(c.augment, c.augment_kw)
    transform = (lambda x: data.prepare(x, c.img_size)) if kw is None else \
        (lambda x: data.augment(x, c.img_size, generator=gen_aug, **kw))
    return Batches(lab, c.batch_size, gen_idx), Batches(unlab, c.batch_size, gen_idx), transform


def draw_rows(c, train_x, train_y, num_classes, streams, mine):
    """One step's input rows: this rank's slice `mine` of the next labelled batch, augmented once, with its one-hot
    targets, and for mode=mixmatch its slice of the next unlabelled batch augmented K times. -> (xl, pl, views: a
    list of K batches, empty in the other modes)."""
    lab_batches, unlab_batches, transform = streams
    idx = next(lab_batches)[mine].to(train_x.device)
    xl, pl = transform(train_x[idx]), F.one_hot(train_y[idx], num_classes).float()
    if c.mode != "mixmatch":
        return xl, pl, []
    xu = train_x[next(unlab_batches)[mine].to(train_x.device)]
    return xl, pl, [transform(xu) for _ in range(c.K)]


def train(cfg):
    """One run into cfg['out_dir']; returns the test metrics of the best (EMA) checkpoint, or None when stop_after
    ended the run early."""
    c = SimpleNamespace(**cfg)
    rank, world = run.rank_world()
    master = rank == 0
    dev = run.pick_device(c.device)
    b = c.batch_size // world  # this rank's labelled rows (and unlabelled ones, times K)
    meta, train_x, train_y, lab, unlab = load_train_data(c, world, dev, master)
    num_classes, group_names = len(meta["classes"]), meta.get("groups") or metrics.GROUP_NAMES
    val_loader = data.make_loader(c.data_dir, "val", c.eval_batch_size, train=False, device=dev, rank=rank,
                                  world_size=world)

    net, ema, optimizer, gen_idx, gen_aug = build_run(c, num_classes, dev, rank)
    if master:  # before any step: an earlier run, a folder that takes no files, no room for best + last checkpoints
        run.warn_slow_bf16(dev, c.amp)
        run.check_out_dir(c.out_dir, c.resume, c.force)
        run.check_writable(c.out_dir, 4 * sum(p.numel() * p.element_size() for p in net.parameters()), "the run")
    decayed = decayed_weights(net)
    autocast = torch.autocast(dev.type, torch.bfloat16) if c.amp == "bf16" else nullcontext()
    streams = batch_streams(c, lab, unlab, gen_idx, gen_aug)
    lab_batches, unlab_batches, _ = streams

    with run.run_dir(c.out_dir, c.resume, c.force, master), run.Events(c.out_dir, c.tensorboard and master) as events:
        start, best, best_step, history, losses = 0, -math.inf, 0, [], []
        last_path, best_path = os.path.join(c.out_dir, "last.safetensors"), os.path.join(c.out_dir, "best.safetensors")
        configs = [cfg]  # every config this run was started or resumed with, oldest first (kept in last.safetensors)
        if c.resume and os.path.exists(last_path):
            state = model.resume_state(last_path, cfg, RESUME_MUST_MATCH, master)
            ema.load_state_dict(state["weights"])
            configs = state.get("configs", []) + [cfg]
            net.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            run.set_rng_states(state["rng"], gen_aug, dev, rank)
            gen_idx.set_state(state["batch_order"])
            lab_batches.queue, unlab_batches.queue = state["queues"]
            start, best, best_step, history, losses = (state[k] for k in ("step", "best", "best_step", "history",
                                                                            "losses"))
            if master:
                print(f"resuming {last_path} after step {start}")
            if history:  # the resume point first: TensorBoard drops what an interrupted session logged after it
                events.add(history[-1], history[-1]["step"])
        elif c.resume and master:
            print(f"resume=true but no {last_path} yet: starting from scratch")
        forward = nn.parallel.DistributedDataParallel(net, device_ids=[dev] if dev.type == "cuda" else None) \
            if world > 1 else net
        forward = torch.compile(forward) if c.compile else forward

        ckpt_meta = {"config": cfg, "data": data.summary(c.data_dir, meta),
                     "n_labeled": len(lab), "labeled_indices": lab.tolist() if c.mode != "full" else None}

        def save_last(step):  # a collective (the RNG states of every rank): all ranks call it
            rng = run.rng_states(gen_aug, dev, world)
            if master:
                state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                         "rng": rng, "batch_order": gen_idx.get_state(),
                         "queues": [lab_batches.queue, unlab_batches.queue], "best": best, "best_step": best_step,
                         "history": history, "losses": losses, "configs": configs}
                # a failed write leaves last.safetensors as the previous evaluation saved it
                with run.saving(c.out_dir, "step", last_step(history[:-1])):
                    model.save_checkpoint(last_path, ema, {**ckpt_meta, "step": step,
                                                           "metrics": history[-1] if history else None}, state=state)
                    run.write_log(c.out_dir, history)

        ramp_steps, mine = c.rampup * c.steps, slice(rank * b, (rank + 1) * b)
        end = min(c.steps, c.stop_after) if c.stop_after else c.steps
        bar = tqdm(range(start + 1, end + 1), desc=f"{c.mode} s{c.seed}", dynamic_ncols=True, disable=not master)
        t0, seen = time.time(), 0
        for step in bar:
            if run.stop_requested(world, dev):
                bar.close()
                raise run.Stopped(f"stopped by a signal at step {step}: "
                                  f"{run.saved(c.out_dir, 'step', last_step(history))}; continue with --resume=true")
            net.train()
            with autocast:
                rows = draw_rows(c, train_x, train_y, num_classes, streams, mine)
                loss, loss_x, loss_u, w_u = step_loss(c, net, forward, rows, step, ramp_steps)
            pair = torch.stack([loss_x.detach(), loss_u.detach()])
            if world > 1:
                dist.all_reduce(pair)
                pair /= world
            lx, lu = pair.tolist()  # one host sync per step for both; the global batch's means, the same on every rank
            if not (math.isfinite(lx) and math.isfinite(lu)):
                raise UserError(f"non-finite loss at step {step}: {run.saved(c.out_dir, 'step', last_step(history))}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP averages the gradients: the global batch's mean loss
            optimizer.step()
            ema_update(ema, net, c.ema_decay, step)
            with torch.no_grad():
                torch._foreach_mul_(decayed, 1 - c.weight_decay * c.lr)
            losses.append([lx, lu])
            seen += c.batch_size * (1 + c.K * (c.mode == "mixmatch"))
            bar.set_postfix(lx=f"{lx:.3f}", lu=f"{lu:.4f}", w_u=f"{w_u:.1f}", img_s=f"{seen / (time.time() - t0):.0f}")

            evaluating = step % c.eval_every == 0 or step == c.steps
            if evaluating:
                record, val_metrics = validate(c, ema, net, val_loader, group_names, world, step, losses, w_u)
                losses = []
                history.append(record)
                events.add(record, step)
                score = metrics.selection_score(record, c.select)
                improved = score > best
                if improved:
                    best, best_step = score, step
                if master:
                    fair = f" fair {record['fair_score']:.4f}" if "fair_score" in record else ""
                    tqdm.write(f"step {step}: val acc {record['accuracy']:.4f} (raw {record['raw']['accuracy']:.4f})"
                               f" f1 {record['f1']:.4f}{fair}{' *' if improved else ''}")
                    if improved:
                        with run.saving(c.out_dir, "step", last_step(history[:-1])):
                            model.save_checkpoint(best_path, ema, {**ckpt_meta, "step": step, "metrics": val_metrics})
                    plot(history, os.path.join(c.out_dir, "curves.png"))
            if evaluating or step == end:
                save_last(step)
        bar.close()
        if end < c.steps:
            if master:
                print(f"stopped after step {end} of {c.steps} (stop_after); --resume=true continues it")
            return None

        return best_on_test(c, history, best_step, group_names, dev, events)


def best_on_test(c, history, best_step, group_names, dev, events):
    """The end of a run: best.safetensors scored on the test split (every rank its shard), the test line appended
    to log.jsonl (and to the TensorBoard events, at the last step). -> the test metrics."""
    rank, world = run.rank_world()
    if world > 1:
        dist.barrier()  # rank 0 wrote best.safetensors
    best_model, _, _ = model.load_checkpoint(os.path.join(c.out_dir, "best.safetensors"), device=dev)
    test_loader = data.make_loader(c.data_dir, "test", c.eval_batch_size, train=False, device=dev, rank=rank,
                                   world_size=world)
    test = evaluate.split_metrics(best_model, test_loader, c.img_size, group_names, world, c.amp)
    if rank == 0:
        record = {"test": test, "best_step": best_step}
        run.write_log(c.out_dir, [*history, record])
        events.add(record, c.steps)
        print(f"test (best val step {best_step}): acc {test['accuracy']:.4f} f1 {test['f1']:.4f}"
              + (f" fair {test['fair_score']:.4f}" if "fair_score" in test else "") + f" -> {c.out_dir}")
    return test


def plot(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps_ = [r["step"] for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(steps_, [r["loss_x"] for r in history], label="labelled CE")
    a.plot(steps_, [r["loss_u"] for r in history], label="unlabelled L2")
    a.set(xlabel="step", yscale="log", title="train losses")
    a.legend()
    b.plot(steps_, [r["accuracy"] for r in history], label="accuracy (EMA)")
    b.plot(steps_, [r["raw"]["accuracy"] for r in history], "--", label="accuracy (raw)")
    for name in history[-1].get("group_accuracy", {}):
        b.plot(steps_, [r["group_accuracy"][name] for r in history], ":", label=f"{name} (EMA)")
    if "fair_score" in history[-1]:
        b.plot(steps_, [r["fair_score"] for r in history], label="fair score (EMA)")
    b.set(xlabel="step", title="validation")
    b.legend()
    fig.tight_layout()
    run.write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


# ----------------------------------------------------------------------------- the picture of one step (show=)

def show_step(cfg):
    """show=PATH.png: the first step of this config on its data, drawn without training. The same calls as train's
    first step (load_train_data, build_run, batch_streams, draw_rows, mixmatch_rows) with the same seeds, so the
    batch, augmentations, guesses, partners and lambda' are the ones step 1 of `python train_mixmatch.py` with these
    keys uses; show_ckpt= only swaps the model that guesses. -> mixmatch_rows' namespace."""
    c = SimpleNamespace(**cfg)
    dev = run.pick_device(c.device)
    meta, train_x, train_y, lab, unlab = load_train_data(c, 1, dev)
    classes = meta["classes"]
    if c.show_ckpt:  # read first: rebuilding its model draws from torch's RNG, which build_run then seeds as train does
        guesser, ckpt, _ = model.load_checkpoint(c.show_ckpt, device=dev)
        if differ := data.mismatch(ckpt.get("data") or {}, meta):
            raise UserError(f"--show_ckpt={c.show_ckpt} was trained on other data than {c.data_dir}: {differ}")
        if guesser.config_dict()["img_size"] != c.img_size:
            raise UserError(f"--show_ckpt={c.show_ckpt} takes {guesser.config_dict()['img_size']}-pixel inputs: pass "
                            f"--img_size={guesser.config_dict()['img_size']}")
    # train's seeds: torch's RNG (mixup's draws), the batch-order and augmentation generators
    net, _, _, gen_idx, gen_aug = build_run(c, len(classes), dev, 0)
    net, who = (guesser, c.show_ckpt) if c.show_ckpt else (net, "the untrained initial model")
    net.train()  # as in training: batch statistics (frozen_bn_stats keeps the running ones)
    with torch.autocast(dev.type, torch.bfloat16) if c.amp == "bf16" else nullcontext():
        xl, pl, views = draw_rows(c, train_x, train_y, len(classes), batch_streams(c, lab, unlab, gen_idx, gen_aug),
                                  slice(None))
        rows = mixmatch_rows(c, net, xl, pl, views)
    title = (f"MixMatch step 1 on {c.data_dir} (seed {c.seed}): {len(xl)} labelled + {len(xl)} x K={c.K} unlabelled "
             f"rows, T={c.T:g}, α={c.alpha:g}; labels guessed by {who}")
    plot_step(c.show, title, classes, c, xl, pl, views, rows)
    print(f"wrote {c.show}")
    return rows


def plot_step(path, title, classes, c, xl, pl, views, rows, n=4):
    """One PNG of a MixMatch step (mixmatch_rows' output for the rows xl, pl, views): the labelled batch (2n images)
    with labels; n unlabelled images in their K views with the guessed (mean over the views) and sharpened label
    distributions; n mixed rows (labelled and unlabelled ones) with their partner, the result, its lambda' and mixed
    target; beside them the density of lambda' for alpha / 4, alpha and 4 alpha, drawn by mixup_lambdas as mix does
    (the original work's mixup notebook), with this step's lambda' values marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (data.IMAGENET_MEAN, data.IMAGENET_STD))
    rgb = lambda x: (x.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    b, K = len(xl), len(views)
    name = lambda r: f"labelled {r}" if r < b else f"unlabelled {(r - b) % b}, view {(r - b) // b + 1}"

    def image(ax, x, label):
        ax.imshow(rgb(x), interpolation="nearest")
        ax.set(xticks=[], yticks=[])
        ax.set_title(label, fontsize=7)

    def bars(ax, p, label):
        ax.bar(range(len(classes)), p.float().cpu().numpy(), color="tab:blue")
        ax.set(ylim=(0, 1), yticks=[0, 0.5, 1], xticks=range(len(classes)))
        ax.set_xticklabels(classes, fontsize=6, rotation=30)
        ax.tick_params(labelsize=6)
        ax.set_title(label, fontsize=7)

    fig = plt.figure(figsize=(12, 4 + 2.4 * n), layout="constrained")
    top, middle, bottom = fig.subfigures(3, 1, height_ratios=[1.2, 1.3 * n, 1.3 * n])
    top.suptitle("the labelled batch (augmented once)", fontsize=9)
    n_l = min(2 * n, b)
    for i, ax in enumerate(top.subplots(1, 2 * n, squeeze=False)[0]):
        if i < n_l:
            image(ax, xl[i], classes[int(pl[i].argmax())])
        else:
            ax.axis("off")
    middle.suptitle(f"unlabelled images: K={K} augmented views, the guess (mean softmax over the views) and the "
                    f"guess sharpened with T={c.T:g}", fontsize=9)
    n_u = min(n, b)
    axes = middle.subplots(n_u, K + 2, squeeze=False, width_ratios=[1] * K + [1.6, 1.6])
    for j in range(n_u):
        for k in range(K):
            image(axes[j, k], views[k][j], f"unlabelled {j}, view {k + 1}")
        bars(axes[j, K], rows.guess[j], "guess")
        bars(axes[j, K + 1], rows.q[j], f"sharpened (T={c.T:g})")
    left, right = bottom.subfigures(1, 2, width_ratios=[3, 2])
    left.suptitle("mixup: each row of [labelled; unlabelled views] mixed with a random partner, weight λ' on itself",
                  fontsize=9)
    shown = sorted({0, min(1, b - 1), b, b + min(1, b - 1)})  # two labelled rows, two unlabelled ones
    axes = left.subplots(len(shown), 4, squeeze=False, width_ratios=[1, 1, 1, 1.6])
    x_in = torch.cat([xl, *views])  # the rows before mixing: mixmatch_rows' x is the mixed one
    for i, r in enumerate(shown):
        lam, partner = float(rows.lam[r]), int(rows.perm[r])
        image(axes[i, 0], x_in[r], name(r))
        image(axes[i, 1], x_in[partner], f"partner: {name(partner)}")
        image(axes[i, 2], rows.x[r], f"mixed, λ'={lam:.2f}")
        bars(axes[i, 3], rows.p[r], "mixed target")
    ax = right.subplots()
    for a in (c.alpha / 4, c.alpha, 4 * c.alpha):
        density, *_ = ax.hist(mixup_lambdas(20000, a).numpy(), bins=50, range=(0.5, 1), density=True, lw=1.5,
                              histtype="step", label=f"α={a:g}" + (" (this run)" if a == c.alpha else ""))
        if a == c.alpha:
            top_y = 1.5 * density.max()  # small alphas pile up at 1 far higher: cut there, the rest stays readable
    ax.plot(rows.lam.cpu().numpy(), [0] * len(rows.lam), "|", color="k", ms=14, label="this step's λ'")
    ax.set(xlabel="λ' = max(λ, 1 - λ), λ ~ Beta(α, α)", ylabel="density", xlim=(0.5, 1), ylim=(0, top_y))
    ax.legend(fontsize=8)
    right.suptitle("what α does: at λ' near 1 a row stays itself, at 0.5 half its partner", fontsize=9)
    fig.suptitle(title, fontsize=10)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    run.write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)


# ----------------------------------------------------------------------------- the table

def run_table(cfg):
    """The TABLE rows on the same data, seeds 0..table_seeds-1 (each seed its own labelled subset, shared by the
    rows), each run in out_dir/<data>_<n_labeled>_<row>_s<seed> -> out_dir/ssl_table.md with test mean +- std."""
    name = os.path.basename(os.path.normpath(cfg["data_dir"]))
    results = {row: [] for row, _, _ in TABLE}
    for s in range(cfg["table_seeds"]):
        for row, tag, overrides in TABLE:
            out = os.path.join(cfg["out_dir"], f"{name}_{cfg['n_labeled']}_{tag}_s{s}")
            results[row].append(train({**cfg, **overrides, "seed": s, "out_dir": out, "table": False}))
    if run.rank_world()[0] != 0:
        return
    keys = [k for k in ("accuracy", "f1", "fair_score") if k in results["full"][0]]
    command = " ".join(shlex.quote(f"--{k}={v}") for k, v in cfg.items() if v != DEFAULTS[k])
    intro = [f"Test metrics of the best-validation EMA checkpoint, mean ± std over seeds "
             f"{', '.join(map(str, range(cfg['table_seeds'])))}; data `{cfg['data_dir']}`, {cfg['n_labeled']} labels "
             f"(full: every train label), net `{cfg['net']}`, {cfg['steps']} steps.",
             f"Command: `python train_mixmatch.py {command}`"]
    rows = [[row, *(run.mean_std([r[k] for r in results[row]]) for k in keys)] for row, _, _ in TABLE]
    run.write_table(os.path.join(cfg["out_dir"], "ssl_table.md"), intro, ["mode", *keys], rows)


def parse_config(argv):
    """This script's config from the command line: DEFAULTS, a PRESETS entry, then --key=value (configurator.py)."""
    cfg = configurator.parse(argv, DEFAULTS, __file__, presets=PRESETS, choices=CHOICES, aliases={"data": "data_dir"})
    # every check that needs no data runs now, before anything is loaded
    data.augment_settings(cfg["augment"], cfg["augment_kw"])
    need = lambda key, ok, allowed: configurator.require(cfg, key, ok, allowed)
    need("out_dir", lambda v: bool(v.strip()), "the run's folder, e.g. runs/x (empty is no folder)")
    for key in ("lr", "T", "alpha"):
        need(key, lambda v: v > 0, "must be > 0")
    for key in ("batch_size", "eval_batch_size", "steps", "eval_every", "K", "img_size", "small_width",
                "table_seeds"):
        need(key, lambda v: v >= 1, "must be >= 1")
    for key in ("weight_decay", "lambda_u", "stop_after"):
        need(key, lambda v: v >= 0, "must be >= 0")
    need("rampup", lambda v: 0 <= v <= 1, "a fraction of steps, in [0, 1]")
    need("ema_decay", lambda v: 0 <= v < 1, "must be in [0, 1)")
    if cfg["net"] == "wrn50_2":
        need("pretrained", lambda v: v in ("", "torchvision"), "net=wrn50_2 takes torchvision (its ImageNet weights) "
             "or nothing (random init); --config=wrn50_2 sets it")
    if cfg["mode"] != "full":
        need("n_labeled", lambda v: v >= 1, "at least one labelled image per class (mode=full uses every label)")
    if cfg["show"]:
        need("mode", lambda v: v == "mixmatch", "--show draws a MixMatch step: needs mode=mixmatch")
        need("mixup", lambda v: v, "--show draws MixMatch's mixup: needs mixup=true")
    need("show_ckpt", lambda v: not v or cfg["show"], "the model of --show=PATH.png: pass --show too")
    if cfg["tensorboard"]:
        run.tensorboard_writer()  # a missing package is one line now, before any work
    return cfg


@configurator.cli
def main(argv=None):
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    data.keep_freed_memory()  # the CPU augmentation's batch buffers reused, not page-faulted in anew (~1.7x)
    if cfg["show"]:
        show_step(cfg)
        return
    with run.ddp(cfg["device"]):
        if cfg["table"]:
            run_table(cfg)
        else:
            train(cfg)


if __name__ == "__main__":
    main()
