"""
DINO-style attention maps of a ViT: the last block's attention from the CLS query to every patch, per head.

    python attention.py --ckpt runs/seed3/best.safetensors --data data/celeba --split val --n 16 --show errors
    python attention.py --ckpt runs/seed3/best.safetensors --data data/celeba --cell 1,0      # label 1, group 0 only
    python attention.py --ckpt facebook/dino-vits8 --images a.jpg,b.png --out runs/attention  # Hub id: backbone only

--ckpt is one of our checkpoints (model.load_checkpoint; it must hold a ViT), a Hub id or a local pretrained
weights file (model.load_pretrained; no classifier head, so no prediction in the titles).

Per image (as facebookresearch/dino's visualize_attention.py and the original solution's attention script):
- maps: row 0 (CLS query) of the last block's attention over the patch keys, one [h, w] map per head,
  renormalised to sum to 1 (the CLS->CLS share is dropped from the map and saved as `cls_self`);
- the head mean of these maps;
- DINO's mass threshold: per map, the smallest set of patches holding `--threshold` of its mass (0.6 as in the
  DINO paper figures), drawn as contours.
Maps are upsampled to the input with `--upsample nearest` (DINO, default: one flat square per patch) or
`bicubic` (the original solution's, smooth); masks are always upsampled nearest, so contours follow patch edges.

Input: the images the model sees, i.e. resized (bicubic) and normalised to the model's img_size by
data.prepare, exactly as in evaluation. --images takes files of any size and mode (comma-separated, or a folder):
each is centre-cropped to a square and resized to the training data's size as the importers do, then to img_size;
unreadable files are listed and skipped. --data takes --split, --n, --show
(random: a seeded sample; errors/correct: the first n misclassified/correct images in a seeded random order,
which needs a classifier) and --cell LABEL,GROUP.

Output in --out: grid_000.png, grid_001.png, ... (one per batch of --batch_size images; rows = images,
columns = input, each head, head mean, input with every head's contour; each map coloured from its own min to
max; row titles = true label, group, prediction and softmax confidence when known, red when wrong) and
maps.safetensors with the raw maps before upsampling for analysis:
maps [N, heads, h, w], masks [N, heads, h, w] (bool), mean_masks [N, h, w], cls_self [N, heads],
indices [N] (index in the split, or in --images), labels / groups / preds [N] (-1 when unknown),
confidence [N] (nan when unknown); the metadata holds the run settings, class and group names and file names.
Each file is written atomically (run.write_atomic); grids left by an earlier run in --out are removed first.
"""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import configurator
import run
from configurator import UserError
from data import IMAGENET_MEAN, IMAGENET_STD, load_split, mismatch, prepare, read_images, read_meta
from model import checkpoint_path, load_checkpoint, load_pretrained

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
    """[B, C, h, w] -> [B, C, size, size]; nearest (DINO) or bicubic (the original solution's)."""
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
    run.write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    plt.close(fig)


# -----------------------------------------------------------------------------
# inputs: model, images, selection


def load_model(src, device):
    """Our checkpoint (with its meta) or pretrained weights (Hub id / local file, meta = {}); a ViT only."""
    path = checkpoint_path(src)  # a pushed Hub repo of ours comes down as one checkpoint file
    if is_our_checkpoint(path):
        model, meta, _ = load_checkpoint(path, device=device)
    else:
        model, meta = load_pretrained(src), {}
    if model.arch != "vit":
        raise UserError(f"--ckpt {src} holds a {model.arch!r} model, not a ViT: attention maps need a ViT checkpoint")
    return model.to(device).eval(), meta


def is_our_checkpoint(src):
    """A save_checkpoint file (its metadata names the arch), as opposed to plain pretrained weights."""
    try:
        with safe_open(src, "pt") as f:
            return "arch" in (f.metadata() or {})
    except (OSError, SafetensorError):  # not a file, or not safetensors (e.g. a .pth): load_pretrained's business
        return False


@torch.no_grad()
def select(model, images, labels, groups, args, device):
    """Indices of the split to show: --cell filter, then --select in a seeded random order, first --n."""
    idx = torch.arange(len(labels))
    if args.cell:
        label, group = args.cell
        idx = idx[(labels == label) & (groups == group)]
    idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(args.seed))]
    if args.show == "random":
        return idx[: args.n].sort().values
    if model.cfg.num_classes == 0:
        raise UserError(f"--show={args.show} needs predictions, but --ckpt {args.ckpt} has no classifier head")
    keep = [idx[:0]]
    for chunk in idx.split(args.batch_size):  # scan until n are found, not the whole split
        pred, _ = predict(model, prepare(images[chunk].to(device), model.cfg.img_size))
        hit = (pred != labels[chunk]) if args.show == "errors" else (pred == labels[chunk])
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


# the CLI's config: --key=value overrides (configurator.py's convention)
CLI = dict(
    ckpt="",  # our .safetensors checkpoint, a Hub id or a pretrained weights file (required)
    data_dir="",  # a data.py output folder to take images from (this, or images)
    images="",  # image files (comma-separated) or a folder of them, resized to the model's img_size
    out_dir="runs/attention",  # output folder
    split="val",  # the split of data_dir
    n=16,  # images to show from data_dir
    show="random",  # random | errors | correct (the latter two need a classifier head)
    cell="",  # only this label x group cell of data_dir, "LABEL,GROUP", e.g. 1,0 (group 0 = women, 1 = men)
    seed=0,  # order of the scan behind show
    threshold=0.6,  # mass kept by the masks, in (0, 1]
    upsample="nearest",  # nearest (DINO: one square per patch) | bicubic (smooth)
    batch_size=16,  # images per forward pass and per grid PNG
    device="auto",  # auto = cuda if available, else cpu
)
CHOICES = {"show": ("random", "errors", "correct"), "upsample": ("nearest", "bicubic")}


def parse_args(argv):
    cfg = configurator.parse(argv, CLI, __file__, choices=CHOICES, required=("ckpt",),
                             aliases={"data": "data_dir", "out": "out_dir", "select": "show"})
    if bool(cfg["data_dir"]) == bool(cfg["images"]):
        raise UserError("give exactly one of --data_dir (a data.py folder) and --images (files or a folder)")
    configurator.require(cfg, "threshold", lambda v: 0 < v <= 1, "must be in (0, 1]")
    for key in ("n", "batch_size"):
        configurator.require(cfg, key, lambda v: v >= 1, "must be >= 1")
    if cfg["cell"]:
        cfg["cell"] = configurator.cast("cell", cfg["cell"], (0, 0))
    run.check_writable(cfg["out_dir"], what="the attention maps")  # before the model is loaded
    cfg["device"] = run.pick_device(cfg["device"])
    return SimpleNamespace(**cfg)


@configurator.cli
@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    model, ckpt_meta = load_model(args.ckpt, args.device)
    S = model.cfg.img_size
    data_meta = ckpt_meta.get("data") or {}
    if args.images:
        stored = (data_meta.get("image_size") or [S])[0]  # the size the model was trained on, before its resize to S
        images, names, skipped = read_images(args.images, stored)
        for path, why in skipped:
            print(f"skipped {path}: {why}")
        if not len(images):
            raise UserError(f"cannot read any image of --images={args.images}")
        inputs = list(images)
        print(f"{len(inputs)} images: centre square crop, {stored}x{stored} as the training data, then {S}x{S} "
              "(the model's img_size), bicubic as in evaluation")
        indices = torch.arange(len(inputs))
        labels, groups = torch.full((len(inputs),), -1), torch.full((len(inputs),), -1)
    else:
        data_meta = read_meta(args.data_dir, splits=(args.split,))
        if differ := mismatch(ckpt_meta.get("data") or {}, data_meta):
            raise UserError(f"{args.ckpt} was trained for another task or data than {args.data_dir} (trained vs "
                            f"here: {differ})")
        images, labels, groups = load_split(args.data_dir, args.split)
        indices = select(model, images, labels, groups, args, args.device)
        if len(indices) == 0:
            cell = f" in cell label={args.cell[0]}, group={args.cell[1]}" if args.cell else ""
            raise UserError(f"empty selection: no {args.show} images in {args.data_dir} {args.split}{cell}")
        inputs, labels, groups = list(images[indices]), labels[indices], groups[indices]
        names = [f"{args.split}[{i}]" for i in indices.tolist()]
    classes, group_names = data_meta.get("classes") or [], data_meta.get("groups") or []
    if model.cfg.num_classes and classes and model.cfg.num_classes != len(classes):
        raise UserError(f"{args.ckpt} predicts {model.cfg.num_classes} classes but the data has {len(classes)} "
                        f"({', '.join(classes)})")

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("grid_*.png"):  # a previous, longer run's grids would pass for this run's
        f.unlink()
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
        plot_grid(out / f"grid_{b:03d}.png", shown, maps_up, maps_up.mean(1),
                  upsample(masks.cpu(), S).bool(), upsample(mean_masks.cpu()[:, None], S)[:, 0].bool(), titles, wrong)
    tensors = {k: torch.cat(v).contiguous() for k, v in saved.items()}
    tensors.update(indices=indices.long(), labels=labels.long(), groups=groups.long())
    info = dict(ckpt=args.ckpt, source="images" if args.images else "data", data=args.data_dir, split=args.split,
                show=args.show, cell=args.cell, seed=args.seed, threshold=args.threshold,
                upsample=args.upsample, img_size=S, patch_size=model.cfg.patch_size, names=names,
                classes=classes, groups=group_names)
    run.write_atomic(out / "maps.safetensors",
                     lambda tmp: save_file(tensors, tmp, metadata={k: json.dumps(v) for k, v in info.items()}))
    print(f"wrote {len(starts)} grid PNG(s) and maps.safetensors ({len(inputs)} images) to {out}")


if __name__ == "__main__":
    main()
