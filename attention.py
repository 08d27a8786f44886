"""
DINO-style attention maps of a ViT: the last block's attention from the CLS query to every patch, per head.

    python attention.py --ckpt runs/seed3/best.safetensors --data data/celeba --split val --n 16 --select errors
    python attention.py --ckpt runs/seed3/best.safetensors --data data/celeba --cell 1,0      # label 1, group 0 only
    python attention.py --ckpt facebook/dino-vits8 --images a.jpg b.png --out runs/attention  # Hub id: backbone only

--ckpt is one of our checkpoints (model.load_checkpoint; it must hold a ViT), a Hub id or a local pretrained
weights file (model.load_pretrained; no classifier head, so no prediction in the titles).

Per image (as facebookresearch/dino visualize_attention.py and the seed's scripts/Attention_maps.py):
- maps: row 0 (CLS query) of the last block's attention over the patch keys, one [h, w] map per head,
  renormalised to sum to 1 (the CLS->CLS share is dropped from the map and saved as `cls_self`);
- the head mean of these maps;
- DINO's mass threshold: per map, the smallest set of patches holding `--threshold` of its mass (0.6 as in the
  DINO paper figures), drawn as contours.
Maps are upsampled to the input with `--upsample nearest` (DINO, default: one flat square per patch) or
`bicubic` (the seed's script, smooth); masks are always upsampled nearest, so contours follow patch edges.

Input: the images the model sees, i.e. resized (bicubic) and normalised to the model's img_size by
data.prepare, exactly as in evaluation. --images must be square RGB files of any size: they are resized to
img_size (printed); crop non-square ones first. --data takes --split, --n, --select (random: a seeded sample;
errors/correct: the first n misclassified/correct images in a seeded random order, which needs a classifier)
and --cell LABEL,GROUP.

Output in --out: grid_000.png, grid_001.png, ... (one per batch of --batch_size images; rows = images,
columns = input, each head, head mean, input with every head's contour; each map coloured from its own min to
max; row titles = true label, group, prediction and softmax confidence when known, red when wrong) and
maps.safetensors with the raw maps before upsampling for analysis:
maps [N, heads, h, w], masks [N, heads, h, w] (bool), mean_masks [N, h, w], cls_self [N, heads],
indices [N] (index in the split, or in --images), labels / groups / preds [N] (-1 when unknown),
confidence [N] (nan when unknown); the metadata holds the run settings, class and group names and file names.
All files are written to a temporary folder next to --out and moved in only once every batch is done.
"""

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from data import IMAGENET_MEAN, IMAGENET_STD, load_split, prepare, read_meta
from model import load_checkpoint, load_pretrained

# -----------------------------------------------------------------------------
# pure functions: maps, masks, upsampling


def cls_attention_maps(attn, grid):
    """Last-block attention [B, heads, T, T] -> (maps [B, heads, h, w], cls_self [B, heads]).

    maps: the CLS query's attention over the h*w patch keys, renormalised per head to sum to 1 (the softmax row
    also gives some mass to the CLS key itself; that share is returned as cls_self).
    """
    h, w = grid
    row = attn[:, :, 0].float()
    if row.shape[-1] != 1 + h * w:
        raise ValueError(f"attention has {row.shape[-1]} tokens, expected 1 CLS + {h}x{w} patches")
    patches = row[..., 1:]
    maps = patches / patches.sum(-1, keepdim=True)
    return maps.unflatten(-1, (h, w)), row[..., 0]


def mass_threshold_masks(maps, threshold):
    """Per map [..., h, w], the smallest set of patches holding at least `threshold` of its mass (bool, same shape).

    DINO's rule (visualize_attention.py L186-197) sorts ascending and keeps the patches whose cumulative mass
    exceeds 1 - threshold; equivalently: sort descending and keep each patch while the mass of the patches before
    it is still below the threshold. Ties are broken by sort order; the set size is minimal either way.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    flat = maps.flatten(-2).double()  # float64: the cumulative sum must not drift across the threshold
    flat = flat / flat.sum(-1, keepdim=True)
    val, idx = flat.sort(-1, descending=True)
    before = val.cumsum(-1) - val
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter(-1, idx, before < threshold)
    return keep.view(maps.shape)


def upsample(maps, size, mode="nearest"):
    """[B, C, h, w] -> [B, C, size, size]; nearest (DINO) or bicubic (the seed's script)."""
    if mode == "nearest":
        return F.interpolate(maps.float(), size=(size, size), mode="nearest")
    return F.interpolate(maps.float(), size=(size, size), mode="bicubic", align_corners=False)


def attention_maps(model, x, threshold):
    """Normalised model input [B, 3, S, S] -> maps, cls_self, per-head masks, head-mean masks (before upsampling)."""
    p = model.cfg.patch_size
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    maps, cls_self = cls_attention_maps(model.get_last_selfattention(x), grid)
    return maps, cls_self, mass_threshold_masks(maps, threshold), mass_threshold_masks(maps.mean(1), threshold)


def predict(model, x):
    """-> (pred [B], softmax confidence [B]); -1 / nan for a backbone without a classifier head."""
    if model.cfg.num_classes == 0:
        return torch.full((len(x),), -1), torch.full((len(x),), float("nan"))
    conf, pred = model(x).float().softmax(-1).max(-1)
    return pred.cpu(), conf.cpu()


# -----------------------------------------------------------------------------
# the grid plot

MIN_CELL = 160  # px; small inputs (e.g. 32 in tests, 80 native) are zoomed by an integer factor to stay readable
TITLE_PX = 20  # one row title strip above each row of cells, one header strip above the first
DPI = 100


def grid_size_px(rows, heads, img_size):
    """(width, height) in pixels of a grid PNG: columns = input, each head, mean, overlay."""
    cell = img_size * math.ceil(MIN_CELL / img_size)
    return (heads + 3) * cell, TITLE_PX + rows * (TITLE_PX + cell)


def plot_grid(path, images, maps, mean, masks, mean_masks, titles, wrong):
    """Write one grid PNG. images [B, 3, S, S] in [0, 1]; maps/masks [B, heads, S, S]; mean/mean_masks [B, S, S]."""
    B, heads, S = maps.shape[0], maps.shape[1], maps.shape[-1]
    W, H = grid_size_px(B, heads, S)
    cell = W // (heads + 3)
    colors = [plt.cm.tab10(j % 10) for j in range(heads)]
    fig = plt.figure(figsize=(W / DPI, H / DPI), dpi=DPI)
    names = ["input"] + [f"head {j}" for j in range(heads)] + ["mean", "overlay"]
    for c, name in enumerate(names):
        color = colors[c - 1] if 1 <= c <= heads else "black"
        fig.text((c + 0.5) * cell / W, 1 - TITLE_PX / 2 / H, name, ha="center", va="center", fontsize=9, color=color)

    def cell_axes(r, c):
        top = TITLE_PX + r * (TITLE_PX + cell) + TITLE_PX  # px from the top of the figure to the cell's top
        ax = fig.add_axes([c * cell / W, 1 - (top + cell) / H, cell / W, cell / H])
        ax.set_axis_off()
        return ax

    def contour(ax, mask, color):
        if mask.any() and not mask.all():  # a constant mask has no edge to draw
            ax.contour(mask.float().numpy(), levels=[0.5], colors=[color], linewidths=1)

    for r in range(B):
        y = 1 - (TITLE_PX + r * (TITLE_PX + cell) + TITLE_PX / 2) / H
        fig.text(0.005, y, titles[r], ha="left", va="center", fontsize=9, color="red" if wrong[r] else "black")
        img = images[r].permute(1, 2, 0).numpy()
        cell_axes(r, 0).imshow(img, interpolation="nearest")
        for j in range(heads):
            ax = cell_axes(r, 1 + j)
            ax.imshow(maps[r, j].numpy(), cmap="inferno", interpolation="nearest")
            contour(ax, masks[r, j], "cyan")
        ax = cell_axes(r, heads + 1)
        ax.imshow(mean[r].numpy(), cmap="inferno", interpolation="nearest")
        contour(ax, mean_masks[r], "cyan")
        ax = cell_axes(r, heads + 2)
        ax.imshow(img * 0.6, interpolation="nearest")  # dimmed so the contours stand out
        for j in range(heads):
            contour(ax, masks[r, j], colors[j])
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


# -----------------------------------------------------------------------------
# inputs: model, images, selection


def load_model(src, device):
    """Our checkpoint (with its meta) or pretrained weights (Hub id / local file, meta = {}); exits unless a ViT."""
    try:
        if is_our_checkpoint(src):
            model, meta, _ = load_checkpoint(src, device=device)
        else:
            model, meta = load_pretrained(src), {}
    except (OSError, ValueError, SafetensorError) as e:  # missing file, offline Hub, foreign keys, unknown arch
        sys.exit(f"error: cannot load --ckpt {src}: {e}")
    if model.arch != "vit":
        sys.exit(f"error: --ckpt {src} holds a {model.arch!r} model, not a ViT: attention maps need a ViT checkpoint")
    return model.to(device).eval(), meta


def is_our_checkpoint(src):
    """A save_checkpoint file (its metadata names the arch), as opposed to plain pretrained weights."""
    try:
        with safe_open(src, "pt") as f:
            return "arch" in (f.metadata() or {})
    except (OSError, SafetensorError):  # not a file, or not safetensors (e.g. a .pth): load_pretrained's business
        return False


def read_images(paths):
    """Square RGB files -> list of uint8 [3, s, s] tensors (any s); exits on an unreadable or non-square file."""
    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                arr = np.asarray(im.convert("RGB"))
        except OSError as e:
            sys.exit(f"error: cannot read image {p}: {e}")
        if arr.shape[0] != arr.shape[1]:
            sys.exit(f"error: {p} is {arr.shape[1]}x{arr.shape[0]}; attention.py takes square images, crop it first")
        out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
    return out


@torch.no_grad()
def select(model, images, labels, groups, args, device):
    """Indices of the split to show: --cell filter, then --select in a seeded random order, first --n."""
    idx = torch.arange(len(labels))
    if args.cell is not None:
        label, group = args.cell
        idx = idx[(labels == label) & (groups == group)]
    idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(args.seed))]
    if args.select == "random":
        return idx[: args.n].sort().values
    if model.cfg.num_classes == 0:
        sys.exit(f"error: --select {args.select} needs predictions, but --ckpt {args.ckpt} has no classifier head")
    keep = [idx[:0]]
    for chunk in idx.split(args.batch_size):  # scan until n are found, not the whole split
        pred, _ = predict(model, prepare(images[chunk].to(device), model.cfg.img_size))
        hit = (pred != labels[chunk]) if args.select == "errors" else (pred == labels[chunk])
        keep.append(chunk[hit])
        if sum(len(k) for k in keep) >= args.n:
            break
    return torch.cat(keep)[: args.n].sort().values


def row_title(name, label, group, pred, conf, classes, groups):
    """'val[12]  true: Blond  group: women  pred: Blond (0.93)'; unknown parts (-1) are left out."""
    at = lambda names, i: names[i] if i < len(names) else str(i)
    title = name
    if label >= 0:
        title += f"  true: {at(classes, label)}"
    if group >= 0:
        title += f"  group: {at(groups, group)}"
    if pred >= 0:
        title += f"  pred: {at(classes, pred)} ({conf:.2f})"
    return title


# -----------------------------------------------------------------------------


def parse_cell(text):
    try:
        label, group = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cell takes LABEL,GROUP, e.g. 1,0, got {text!r}") from None
    return label, group


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="our .safetensors checkpoint, a Hub id or a pretrained weights file")
    ap.add_argument("--out", default="runs/attention", help="output folder")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", help="square image files, resized to the model's img_size")
    src.add_argument("--data", help="dataset folder made by data.py (data/<name>)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--n", type=int, default=16, help="images to show from --data")
    ap.add_argument("--select", choices=["random", "errors", "correct"], default="random")
    ap.add_argument("--cell", type=parse_cell, default=None,
                    metavar="LABEL,GROUP", help="only this label x group cell, e.g. 1,0 (group 0 = women, 1 = men)")
    ap.add_argument("--seed", type=int, default=0, help="order of the --select scan")
    ap.add_argument("--threshold", type=float, default=0.6, help="mass kept by the masks, in (0, 1]")
    ap.add_argument("--upsample", choices=["nearest", "bicubic"], default="nearest")
    ap.add_argument("--batch_size", type=int, default=16, help="images per forward pass and per grid PNG")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if not 0 < args.threshold <= 1:
        ap.error(f"--threshold must be in (0, 1], got {args.threshold}")
    if args.n < 1 or args.batch_size < 1:
        ap.error("--n and --batch_size must be >= 1")
    return args


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    model, ckpt_meta = load_model(args.ckpt, args.device)
    S = model.cfg.img_size
    data_meta = ckpt_meta.get("data") or {}
    if args.images:
        inputs = read_images(args.images)
        print(f"resizing {len(inputs)} images to {S}x{S} (the model's img_size), bicubic as in evaluation")
        indices = torch.arange(len(inputs))
        labels, groups = torch.full((len(inputs),), -1), torch.full((len(inputs),), -1)
        names = [Path(p).name for p in args.images]
    else:
        try:
            data_meta = read_meta(args.data)
            images, labels, groups = load_split(args.data, args.split)
        except (OSError, ValueError, KeyError) as e:
            sys.exit(f"error: cannot read split {args.split!r} of {args.data}: {e}")
        indices = select(model, images, labels, groups, args, args.device)
        if len(indices) == 0:
            cell = f" in cell label={args.cell[0]}, group={args.cell[1]}" if args.cell else ""
            sys.exit(f"error: empty selection: no {args.select} images in {args.data} {args.split}{cell}")
        inputs, labels, groups = list(images[indices]), labels[indices], groups[indices]
        names = [f"{args.split}[{i}]" for i in indices.tolist()]
    classes, group_names = data_meta.get("classes") or [], data_meta.get("groups") or []
    if model.cfg.num_classes and classes and model.cfg.num_classes != len(classes):
        sys.exit(f"error: {args.ckpt} predicts {model.cfg.num_classes} classes but the data has {len(classes)} "
                 f"({', '.join(classes)})")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        mean_t = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std_t = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        saved = {k: [] for k in ["maps", "masks", "mean_masks", "cls_self", "preds", "confidence"]}
        starts = range(0, len(inputs), args.batch_size)
        for b, start in enumerate(tqdm(starts, desc="attention", unit="batch")):
            chunk = slice(start, start + args.batch_size)
            x = torch.cat([prepare(u[None].to(args.device), S) for u in inputs[chunk]])
            maps, cls_self, masks, mean_masks = attention_maps(model, x, args.threshold)
            pred, conf = predict(model, x)
            for k, v in zip(saved, [maps, masks, mean_masks, cls_self, pred, conf]):
                saved[k].append(v.cpu())
            rows = zip(names[chunk], labels[chunk].tolist(), groups[chunk].tolist(), pred.tolist(), conf.tolist())
            titles = [row_title(*row, classes, group_names) for row in rows]
            wrong = [y >= 0 and p >= 0 and p != y for y, p in zip(labels[chunk].tolist(), pred.tolist())]
            shown = (x.cpu() * std_t + mean_t).clamp(0, 1)
            maps_up = upsample(maps.cpu(), S, args.upsample)
            plot_grid(tmp / f"grid_{b:03d}.png", shown, maps_up, maps_up.mean(1),
                      upsample(masks.cpu(), S).bool(), upsample(mean_masks.cpu()[:, None], S)[:, 0].bool(),
                      titles, wrong)
        tensors = {k: torch.cat(v).contiguous() for k, v in saved.items()}
        tensors.update(indices=indices.long(), labels=labels.long(), groups=groups.long())
        info = dict(ckpt=args.ckpt, source="images" if args.images else "data", data=args.data, split=args.split,
                    select=args.select, cell=args.cell, seed=args.seed, threshold=args.threshold,
                    upsample=args.upsample, img_size=S, patch_size=model.cfg.patch_size, names=names,
                    classes=classes, groups=group_names)
        save_file(tensors, tmp / "maps.safetensors", metadata={k: json.dumps(v) for k, v in info.items()})
        out.mkdir(exist_ok=True)
        for f in out.glob("grid_*.png"):  # a previous, longer run's grids would pass for this run's
            f.unlink()
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {len(starts)} grid PNG(s) and maps.safetensors ({len(inputs)} images) to {out}")


if __name__ == "__main__":
    main()
