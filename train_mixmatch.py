"""
MixMatch (Berthelot et al. 2019) semi-supervised training on one data.py folder, in one file, nanoGPT style.

    python train_mixmatch.py --data=data/celeba --n_labeled=250                    # MixMatch, DINO ViT-S/8
    python train_mixmatch.py --data=data/aaf --arch=wrn50_2 --mode=supervised      # the baseline, same labels
    python train_mixmatch.py --config=cpu_small --data=data/ssl --n_labeled=250    # small CNN from scratch on CPU
    python train_mixmatch.py --table=1 --config=cpu_small --data=data/ssl --n_labeled=250  # -> runs/ssl_table.md

(data/ssl: `python data.py synthetic --n 12000 --target Male --group none --out data/ssl`, gender of drawn faces;
`make ssl-table` builds it and runs the last line.)

`n_labeled` train images (balanced per class, chosen by `seed`) keep their labels, the rest of the train split is
used without labels; val scores every `eval_every` steps, test scores the best checkpoint at the end.
mode=mixmatch (default) | supervised (the same n_labeled labels only: the baseline) | full (all labels: the ceiling).

One MixMatch step (mixmatch.md §1.1): augment the labelled batch once and the unlabelled batch K times; guess
labels by averaging the softmax over the K views (no gradient) and sharpen with T; concatenate [x; u_1..u_K] with
targets [onehot(y); q..q]; mix every row with a random row of the same concatenation with a per-sample
lambda ~ Beta(alpha, alpha), lambda' = max(lambda, 1 - lambda); soft cross-entropy on the labelled rows, mean squared
error between softmax and target on the rest, weighted by lambda_u ramped linearly from 0. After each optimizer step:
EMA of the weights (the EMA model is the one evaluated and saved) and decoupled weight decay w <- w * (1 - wd * lr)
on conv/linear weights, as the reference does. Batch norm: the guess pass uses batch statistics without updating
the running ones, and the mixed 3B batch goes through the model in one forward, so the statistics always see
labelled and unlabelled rows together (what the reference's interleave achieves with three forwards).
"""
import copy
import dataclasses
import json
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data as D
import evaluate as E
import model as M
import sing

# -----------------------------------------------------------------------------
# default config values: the DINO ViT-S/8 fine-tuned with MixMatch
data = "data/celeba"  # a data.py output folder
out_dir = "runs/mixmatch"
seed = 0  # model init, augmentation, mixup, batch order and the choice of the labelled subset
n_labeled = 250  # labelled train images, balanced per class; the rest of the train split is unlabelled
mode = "mixmatch"  # mixmatch | supervised | full
# model
arch = "vit"  # vit (model.py's ViT) | wrn50_2 (torchvision Wide-ResNet-50-2) | small (from-scratch CNN for CPU runs)
pretrained = True  # vit: DINO weights from vit_src; wrn50_2: torchvision's ImageNet weights; small: ignored
vit_src = "facebook/dino-vits8"  # Hub id or local file for load_pretrained; pretrained=False builds vit_preset
vit_preset = "vit_small_patch8"  # model.PRESETS name used when pretrained=False
small_width = 16  # channels of the small CNN's first stage (doubles per stage)
img_size = 224  # model input: images are augmented at native size and resized to this on the device
augment = "weak"  # weak: flip + random crop, the reference's MixMatch augmentation | full: data.augment's whole list
# MixMatch
K = 2  # augmentations of each unlabelled image
T = 0.5  # sharpening temperature
alpha = 0.75  # Beta(alpha, alpha) for mixup
mixup = True  # False: the no-mixup variant (targets and inputs used as they are)
lambda_u = 75.0  # weight of the unlabelled L2 loss (averaged over classes: with 2 classes try less, mixmatch.md §5)
rampup = 0.25  # lambda_u ramps linearly from 0 over this fraction of `steps`
ema_decay = 0.999  # EMA of the weights, warmed up as min(ema_decay, (1 + t) / (10 + t))
# optimisation
opt = "adam"  # adam | sing
lr = 1e-4  # Adam 2e-3 is the reference's from-scratch value; a pretrained backbone wants less
weight_decay = 0.02  # decoupled: w <- w * (1 - weight_decay * lr) after each step, conv/linear weights only
batch_size = 64  # labelled images per step (and as many unlabelled, times K)
steps = 4096  # optimizer steps
eval_every = 256  # steps between validation passes
eval_batch_size = 256
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
amp = True  # bf16 autocast on CUDA (CPU runs stay fp32)
table = False  # run supervised / mixmatch / full over table_seeds seeds on the same data -> runs/ssl_table.md
table_seeds = 3
config = ""  # a preset name from PRESETS, applied before the other --key=value overrides
PRESETS = {
    # small CNN from scratch on the synthetic set, CPU: the acceptance table in the README. lambda_u: the L2 term is
    # a mean over classes, so 2 classes weigh it 5x more than CIFAR-10 does; 75 / 5 = 15, and at 25 a 1000-step
    # run (ramp 400 steps, not the reference's 16k) collapsed to the majority class on seed 1. 8 is measured.
    "cpu_small": dict(arch="small", pretrained=False, img_size=40, lr=2e-3, batch_size=64, steps=1000, eval_every=100,
                      lambda_u=8.0, rampup=0.4, ema_decay=0.99, device="cpu"),
    # the original gender / mask experiments' backbone, ImageNet weights
    "wrn50_2": dict(arch="wrn50_2", img_size=224, lr=1e-4, batch_size=32),
}
AUGMENTS = {  # data.augment keyword arguments
    "weak": dict(crop_scale=(0.64, 1.0), rotate_p=0.0, erase_p=0.0, color_p=0.0, blur_p=0.0),
    "full": {},  # the original list (train_vit.py's): crop, flip, rotation, erasing, colour, blur
}
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
# -----------------------------------------------------------------------------


def parse_args(argv, defaults):
    """--key=value overrides of the config block (types follow the defaults), --config=NAME presets first."""
    cfg = dict(defaults)
    pairs = []
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__ + "\nconfig (--key=value):\n" + "\n".join(f"  --{k}={v!r}" for k, v in defaults.items())
                  + f"\npresets (--config=NAME): {', '.join(PRESETS)}")
            sys.exit(0)
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq or key not in cfg:
            sys.exit(f"error: unknown argument {arg!r} (expected --key=value with key one of: {', '.join(cfg)})")
        pairs.append((key, value))
    for key, value in sorted(pairs, key=lambda kv: kv[0] != "config"):  # the preset first, explicit values win
        if key == "config":
            if value not in PRESETS:
                sys.exit(f"error: unknown --config={value} (presets: {', '.join(PRESETS)})")
            cfg.update(PRESETS[value])
        cfg[key] = cast(key, value, type(defaults[key]))
    if cfg["mode"] not in ("mixmatch", "supervised", "full"):
        sys.exit(f"error: mode must be mixmatch, supervised or full, not {cfg['mode']!r}")
    if cfg["arch"] not in ("vit", "wrn50_2", "small"):
        sys.exit(f"error: arch must be vit, wrn50_2 or small, not {cfg['arch']!r}")
    if cfg["augment"] not in AUGMENTS:
        sys.exit(f"error: augment must be one of {', '.join(AUGMENTS)}, not {cfg['augment']!r}")
    if cfg["opt"] not in ("adam", "sing"):
        sys.exit(f"error: opt must be adam or sing, not {cfg['opt']!r}")
    return cfg


def cast(key, value, typ):
    if typ is bool:
        if value.lower() not in ("1", "0", "true", "false"):
            sys.exit(f"error: --{key} takes true/false or 1/0, not {value!r}")
        return value.lower() in ("1", "true")
    try:
        return typ(value)
    except ValueError:
        sys.exit(f"error: --{key}={value!r} is not a {typ.__name__}")


# ----------------------------------------------------------------------------- MixMatch, pure functions

def sharpen(p, T):
    """p^(1/T) renormalised over the class axis, computed as softmax(log p / T) so that T -> 0 gives the one-hot
    argmax instead of 0/0."""
    return torch.softmax(p.log() / T, dim=1)


def guess_labels(model, views, T):
    """Average the softmax over the K augmented views of one unlabelled batch, then sharpen. No gradient; the
    views go through the model in one forward (same result as K forwards for a model without batch statistics)."""
    with torch.no_grad(), frozen_bn_stats(model):
        p = model(torch.cat(views)).float().softmax(1).view(len(views), len(views[0]), -1).mean(0)
    return sharpen(p, T)


@contextmanager
def frozen_bn_stats(model):
    """Batch norm keeps using batch statistics (train mode) but its running statistics stay as they are: the guess
    pass must not move them (the reference keeps only the BN update of the training forward)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum


def mix(x, p, alpha):
    """MixUp of every row with a random row of the same batch, lambda ~ Beta(alpha, alpha) per sample and
    lambda' = max(lambda, 1 - lambda) so each row stays closer to itself; inputs and targets mixed identically."""
    lam = torch.distributions.Beta(alpha, alpha).sample((len(x),)).to(x.device)
    lam = torch.maximum(lam, 1 - lam)
    perm = torch.randperm(len(x), device=x.device)
    lx, lp = lam.view(-1, *[1] * (x.dim() - 1)), lam.view(-1, *[1] * (p.dim() - 1))
    return lx * x + (1 - lx) * x[perm], lp * p + (1 - lp) * p[perm]


def soft_cross_entropy(logits, target):
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


def l2_loss(logits, target):
    """Mean over samples and classes of (softmax - target)^2, as the reference."""
    return (logits.float().softmax(1) - target).pow(2).mean()


def rampup_weight(step, length):
    """Linear ramp from 0 at step 0 to 1 at step `length`, then 1."""
    return 1.0 if length <= 0 else min(max(step / length, 0.0), 1.0)


@torch.no_grad()
def ema_update(ema, model, decay, step):
    """ema <- d * ema + (1 - d) * model for the parameters, d = min(decay, (1 + step) / (10 + step)) so that short
    runs are not dominated by the random init; buffers (BN running statistics) are copied from the model, since the
    EMA model never sees data itself."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - d)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def decayed_weights(model):
    """The conv / linear kernels: the reference decays these only (no biases, norms, position embeddings)."""
    return [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


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


def batches(indices, batch_size, generator):
    """Endless random batches of `indices`: reshuffled passes laid end to end, so a set smaller than a batch still
    fills every batch and every sample is seen equally often."""
    queue = indices[:0]
    while True:
        while len(queue) < batch_size:
            queue = torch.cat([queue, indices[torch.randperm(len(indices), generator=generator)]])
        yield queue[:batch_size]
        queue = queue[batch_size:]


# ----------------------------------------------------------------------------- one run

def build_model(cfg, num_classes):
    if cfg["arch"] == "small":
        return M.SmallCNN(img_size=cfg["img_size"], num_classes=num_classes, width=cfg["small_width"])
    if cfg["arch"] == "wrn50_2":
        return M.WideResNet50(img_size=cfg["img_size"], num_classes=num_classes, pretrained=cfg["pretrained"])
    if cfg["pretrained"]:
        return M.load_pretrained(cfg["vit_src"], img_size=cfg["img_size"], num_classes=num_classes)
    return M.ViT(dataclasses.replace(M.PRESETS[cfg["vit_preset"]], img_size=cfg["img_size"], num_classes=num_classes))


def evaluate(model, loader, img_size, fair, group_names):
    """evaluate.py's metrics; per-group accuracy and the fair score only when the data has both groups."""
    scores, labels, groups = E.predict(model, loader, img_size)
    return E.compute_metrics(scores, labels, groups, fair=fair, group_names=group_names, n_boot=0)


def selection_score(metrics):
    """What picks best.safetensors: the fair score where the data has two groups, else accuracy."""
    return metrics.get("fair_score", metrics["accuracy"])


def train(cfg):
    """One run into cfg['out_dir']; returns the test metrics of the best (EMA) checkpoint."""
    torch.manual_seed(cfg["seed"])
    dev = torch.device(cfg["device"])
    meta = D.read_meta(cfg["data"])
    num_classes, group_names = len(meta["classes"]), meta.get("groups") or E.GROUP_NAMES
    train_x, train_y, train_g = D.load_split(cfg["data"], "train")
    fair = sorted(train_g.unique().tolist()) == [0, 1]
    train_x, train_y = train_x.to(dev), train_y.to(dev)
    everything = torch.arange(len(train_y))
    try:
        lab = everything if cfg["mode"] == "full" else labeled_subset(train_y.cpu(), cfg["n_labeled"], num_classes,
                                                                      cfg["seed"])
    except ValueError as e:
        sys.exit(f"error: --n_labeled={cfg['n_labeled']}: {e}")
    unlab = everything[~torch.isin(everything, lab)]
    if cfg["mode"] == "mixmatch" and len(unlab) == 0:
        sys.exit("error: n_labeled covers the whole train split: nothing left unlabelled for MixMatch")
    val_loader = D.make_loader(cfg["data"], "val", cfg["eval_batch_size"], train=False, device=dev)

    try:
        model = build_model(cfg, num_classes).to(dev)
    except (OSError, RuntimeError, ValueError) as e:  # weights offline, missing or misshaped: model.py words it
        sys.exit(f"error: {e}")
    ema = copy.deepcopy(model).requires_grad_(False)
    if cfg["opt"] == "sing":
        optimizer = sing.SING(model.parameters(), lr=cfg["lr"])  # decay is decoupled below, for both optimizers
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    decayed = decayed_weights(model)
    autocast = torch.autocast("cuda", torch.bfloat16) if cfg["amp"] and dev.type == "cuda" else nullcontext()

    os.makedirs(cfg["out_dir"], exist_ok=True)
    log_path = os.path.join(cfg["out_dir"], "log.jsonl")
    open(log_path, "w").close()
    gen_idx = torch.Generator().manual_seed(cfg["seed"])  # batch order (CPU)
    gen_aug = torch.Generator(dev).manual_seed(cfg["seed"])  # augmentation draws, on the batch's device
    lab_batches = batches(lab, cfg["batch_size"], gen_idx)
    unlab_batches = batches(unlab, cfg["batch_size"], gen_idx)
    ramp_steps = cfg["rampup"] * cfg["steps"]
    size, B = cfg["img_size"], cfg["batch_size"]
    augment = lambda x: D.augment(x, size, generator=gen_aug, **AUGMENTS[cfg["augment"]])
    ckpt_meta = {"config": cfg, "data": D.summary(cfg["data"], meta),
                 "n_labeled": len(lab), "labeled_indices": lab.tolist() if cfg["mode"] != "full" else None}
    history, best, best_step, losses = [], -math.inf, 0, []
    bar = tqdm(range(1, cfg["steps"] + 1), desc=f"{cfg['mode']} s{cfg['seed']}", dynamic_ncols=True)
    t0, seen = time.time(), 0
    for step in bar:
        model.train()
        idx = next(lab_batches).to(dev)
        xl = augment(train_x[idx])
        pl = F.one_hot(train_y[idx], num_classes).float()
        with autocast:
            if cfg["mode"] == "mixmatch":
                xu = train_x[next(unlab_batches).to(dev)]
                views = [augment(xu) for _ in range(cfg["K"])]
                q = guess_labels(model, views, cfg["T"])
                x, p = torch.cat([xl, *views]), torch.cat([pl] + [q] * cfg["K"])
                if cfg["mixup"]:
                    x, p = mix(x, p, cfg["alpha"])
                logits = model(x)  # one forward over all rows: BN statistics see labelled and unlabelled together
                loss_x, loss_u = soft_cross_entropy(logits[:B], p[:B]), l2_loss(logits[B:], p[B:])
                w_u = cfg["lambda_u"] * rampup_weight(step, ramp_steps)
                loss = loss_x + w_u * loss_u
                seen += B * (1 + cfg["K"])
            else:
                loss = loss_x = soft_cross_entropy(model(xl), pl)
                loss_u, w_u = torch.zeros(()), 0.0
                seen += B
        if not torch.isfinite(loss):
            sys.exit(f"error: non-finite loss at step {step}; {cfg['out_dir']}/best.safetensors is the last good one")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema_update(ema, model, cfg["ema_decay"], step)
        with torch.no_grad():
            torch._foreach_mul_(decayed, 1 - cfg["weight_decay"] * cfg["lr"])
        losses.append((loss_x.item(), loss_u.item()))  # one host sync per step for both
        bar.set_postfix(lx=f"{losses[-1][0]:.3f}", lu=f"{losses[-1][1]:.4f}", w_u=f"{w_u:.1f}",
                        img_s=f"{seen / (time.time() - t0):.0f}")

        if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
            m_ema, m_raw = (evaluate(m, val_loader, size, fair, group_names) for m in (ema, model))
            lx_mean, lu_mean = (sum(v) / len(losses) for v in zip(*losses))
            losses = []
            row = {"step": step, "loss_x": lx_mean, "loss_u": lu_mean, "w_u": w_u, **m_ema,
                   "raw": {k: m_raw[k] for k in ("accuracy", "f1", "group_accuracy", "fair_score") if k in m_raw}}
            history.append(row)
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            tqdm.write(f"step {step}: val acc {m_ema['accuracy']:.4f} (raw {m_raw['accuracy']:.4f})"
                       f" f1 {m_ema['f1']:.4f}" + (f" fair {m_ema['fair_score']:.4f}" if fair else ""))
            if selection_score(m_ema) > best:
                best, best_step = selection_score(m_ema), step
                M.save_checkpoint(os.path.join(cfg["out_dir"], "best.safetensors"), ema,
                                  {**ckpt_meta, "step": step, "metrics": m_ema})
            M.save_checkpoint(os.path.join(cfg["out_dir"], "last.safetensors"), ema,
                              {**ckpt_meta, "step": step, "metrics": m_ema},
                              state={"raw_model": model.state_dict(), "step": step})
            plot(history, os.path.join(cfg["out_dir"], "curves.png"))
    bar.close()

    best_model, _, _ = M.load_checkpoint(os.path.join(cfg["out_dir"], "best.safetensors"), device=dev)
    test_loader = D.make_loader(cfg["data"], "test", cfg["eval_batch_size"], train=False, device=dev)
    test = evaluate(best_model, test_loader, size, fair, group_names)
    with open(log_path, "a") as f:
        f.write(json.dumps({"test": test, "best_step": best_step}) + "\n")
    print(f"test (best val step {best_step}): acc {test['accuracy']:.4f} f1 {test['f1']:.4f}"
          + (f" fair {test['fair_score']:.4f}" if fair else "") + f" -> {cfg['out_dir']}")
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
    E.write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


# ----------------------------------------------------------------------------- the table

def run_table(cfg):
    """supervised / mixmatch / full on the same data, seeds 0..table_seeds-1 (each seed its own labelled subset,
    shared by the three modes) -> runs/ssl_table.md with test mean +- std."""
    name = os.path.basename(os.path.normpath(cfg["data"]))
    modes = ("supervised", "mixmatch", "full")
    results = {m: [] for m in modes}
    for s in range(cfg["table_seeds"]):
        for m in modes:
            out = os.path.join("runs", "ssl_table", f"{name}_{cfg['n_labeled']}_{m}_s{s}")
            results[m].append(train({**cfg, "mode": m, "seed": s, "out_dir": out, "table": False}))
    keys = [k for k in ("accuracy", "f1", "fair_score") if k in results["full"][0]]
    lines = [f"Test metrics of the best-validation EMA checkpoint, mean ± std over seeds "
             f"{', '.join(map(str, range(cfg['table_seeds'])))}; data `{cfg['data']}`, {cfg['n_labeled']} labels "
             f"(full: every train label), arch `{cfg['arch']}`, {cfg['steps']} steps.",
             "", f"Command: `python train_mixmatch.py {' '.join(sys.argv[1:])}`", "",
             "| mode | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for m in modes:
        cells = []
        for k in keys:
            v = torch.tensor([r[k] for r in results[m]], dtype=torch.float64)
            cells.append(f"{v.mean():.4f} ± {v.std(correction=int(len(v) > 1)):.4f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    E.write_atomic(os.path.join("runs", "ssl_table.md"), lambda tmp: Path(tmp).write_text(text))
    print(text)


if __name__ == "__main__":
    cfg = parse_args(sys.argv[1:], {k: globals()[k] for k in config_keys})
    if not os.path.isfile(os.path.join(cfg["data"], "meta.json")):
        sys.exit(f"error: {cfg['data']} is not a data.py output folder (no meta.json); build one with data.py")
    run_table(cfg) if cfg["table"] else train(cfg)
