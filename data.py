"""
Face data for fair attribute classification: build data sets, load them fast, augment them on the device.

    python data.py synthetic --n 20000 --out data/synthetic    # offline: procedurally drawn faces
    python data.py celeba --out data/celeba                    # CelebA from the Hub (flwrlabs/celeba), or --root DIR
    python data.py challenge --root DIR --out data/challenge   # the 2023 challenge folder (train/, test/, train.txt)
    python data.py folder --root DIR --out data/masks          # class-per-subfolder trees (mask / no-mask, ...)
    python data.py aaf --root DIR --out data/aaf               # All-Age-Faces "aligned faces/" (gender from the name)

Every build writes OUT/{train,val,test}.beton (FFCV, raw uint8 RGB at native size; fields image, label, group and,
where the source has attributes, attrs) and OUT/meta.json, into a temporary folder renamed at the very end.
Library: read_meta, load_split, load_labels, load_attrs, summary, make_loader (backends "resident" and "ffcv"),
augment (the original training augmentation, drawn per sample, applied to the whole batch on its device) and
prepare (eval: resize + normalise). Conventions: labels 0..C-1 (-1 unknown), groups 0 = women, 1 = men
(-1 unknown), images uint8 NCHW.
"""

import argparse
import ast
import contextlib
import csv
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import types
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ERASE_FILL = (95, 242, 186)  # the seed's eraser colour: (np.random.rand(3) * 255).astype(int) after seed_everything(42)
SPLITS = ("train", "val", "test")
CELEBA_REPO = "flwrlabs/celeba"
CELEBA_REVISION = "2d738f56e0e7f925ea36ae7c808ea925264aacec"  # pinned: the images and the official partition
CELEBA_CONFIG = "img_align+identity+attr"
CHALLENGE_CELLS = (0.44, 0.145, 0.365, 0.05)  # (label 0, women), (1, women), (0, men), (1, men), as in the challenge


class DataError(Exception):
    """A problem with the user's input (missing folder, empty source, bad label file, no network): one line."""


def _cores():
    return len(os.sched_getaffinity(0))


@contextlib.contextmanager
def _keep_torch_threads():
    # FFCV calls torch.set_num_threads on import, on Loader construction and at every epoch start; undo it
    n = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------------------------
# Labels from attributes: "Blond_Hair ^ Eyeglasses", "Male", "Smiling and not Young", ...

_ALLOWED_NODES = (ast.Expression, ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.Name, ast.Load,
                  ast.And, ast.Or, ast.BitAnd, ast.BitOr, ast.BitXor, ast.Not, ast.Invert)
_BINOPS = {ast.BitAnd: np.logical_and, ast.BitOr: np.logical_or, ast.BitXor: np.logical_xor}


def parse_criterion(expr, names):
    """Compile a boolean expression of attribute names into f({name: bool array}) -> bool array. The expression is
    parsed with `ast` and only names and & | ^ ~ not and or are accepted: nothing is ever eval'd."""
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        raise DataError(f"cannot parse the criterion {expr!r}") from None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES):
            raise DataError(f"criterion {expr!r}: only attribute names and & | ^ ~ not and or are allowed")
        if isinstance(node, ast.Name) and node.id not in names:
            raise DataError(f"criterion {expr!r}: unknown attribute {node.id!r} (known: {' '.join(names)})")

    def ev(node, attrs):
        if isinstance(node, ast.Name):
            return np.asarray(attrs[node.id], bool)
        if isinstance(node, ast.UnaryOp):
            return ~ev(node.operand, attrs)
        if isinstance(node, ast.BoolOp):
            op = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
            out = ev(node.values[0], attrs)
            for v in node.values[1:]:
                out = op(out, ev(v, attrs))
            return out
        return _BINOPS[type(node.op)](ev(node.left, attrs), ev(node.right, attrs))

    return lambda attrs: ev(tree.body, attrs)


def _labels_from_attrs(attrs, names, criterion, group):
    """-> labels, groups (int64), class names, group names; group "none" gives -1 everywhere and no group names."""
    named = dict(zip(names, (attrs > 0).T))
    labels = parse_criterion(criterion, names)(named).astype(np.int64)
    classes = [f"not {criterion}" if criterion.isidentifier() else f"not ({criterion})", criterion]
    if group.lower() == "none":
        return labels, np.full(len(labels), -1, np.int64), classes, []
    groups = parse_criterion(group, names)(named).astype(np.int64)
    return labels, groups, classes, (["women", "men"] if group == "Male" else [f"not {group}", group])


# ----------------------------------------------------------------------------------------------------------------
# Synthetic faces: an offline stand-in for CelebA with the same hidden rule (Blond_Hair XOR Eyeglasses).
# Attributes are drawn per label x gender cell; everything else (skin, pose, light, background, distractors) is drawn
# independently of the label, so the only way to the label is to see hair colour AND glasses and combine them.

SYNTH_ATTRS = ("Blond_Hair", "Eyeglasses", "Male", "Long_Hair", "Beard", "Wearing_Lipstick", "Sunglasses")
SYNTH_GLASSES_SHARE, SYNTH_BOTH = 0.3, 0.05  # defaults of synth_attributes and the CLI, explained there
BLOND = np.array([(238, 218, 165), (224, 192, 122), (203, 168, 98), (246, 232, 192), (214, 176, 110)], np.float32)
OTHER_HAIR = np.array([(28, 22, 20), (62, 42, 30), (98, 66, 42), (132, 64, 34), (150, 148, 145), (208, 206, 200),
                       (120, 90, 60)], np.float32)  # black, dark/mid brown, auburn, grey, white, light brown
SKIN = np.array([(252, 224, 198), (96, 60, 42)], np.float32)  # lightest, darkest; tones are mixed in between
FRAMES = np.array([(18, 18, 20), (70, 44, 30), (196, 164, 84), (172, 172, 178), (128, 24, 34), (30, 40, 110)],
                  np.float32)  # black, tortoise, gold, silver, red, blue


def _cell_counts(fracs, n):
    """Exact counts per cell (largest remainder), so every split hits the asked proportions."""
    fracs = np.asarray(fracs, float) / np.sum(fracs)
    counts = np.floor(fracs * n).astype(int)
    counts[np.argsort(counts - fracs * n)[: n - counts.sum()]] += 1
    return counts


def synth_attributes(n, rng, cells=CHALLENGE_CELLS, glasses_share=SYNTH_GLASSES_SHARE, both=SYNTH_BOTH):
    """uint8 [n, len(SYNTH_ATTRS)]. `cells` = fractions of (xor 0, women), (1, women), (0, men), (1, men);
    `glasses_share` = fraction of positives that wear glasses (the rest are blond); `both` = fraction of negatives
    that are blond AND wear glasses (the case that tells XOR from OR).

    The defaults follow CelebA (blond ~15%, glasses ~6.5%: about 30% of the XOR positives wear glasses), except
    that `both` is 10x CelebA's ~0.5%, so the cell that tells XOR from OR holds 4% of a test split. At both=0.25
    neither attribute alone moves a prediction past the class prior (a pure XOR puzzle): a tiny ViT from scratch
    then stays at the trivial classifier for many CPU epochs."""
    cell = rng.permutation(np.repeat(np.arange(4), _cell_counts(cells, n)))
    xor, male = cell % 2 == 1, cell >= 2
    glasses_side, has_both = rng.random(n) < glasses_share, rng.random(n) < both
    blond = np.where(xor, ~glasses_side, has_both)
    glasses = np.where(xor, glasses_side, has_both)
    long_hair = rng.random(n) < np.where(male, 0.1, 0.8)
    beard = male & (rng.random(n) < 0.4)
    lipstick = ~male & (rng.random(n) < 0.5)
    sunglasses = glasses & (rng.random(n) < 0.15)
    return np.stack([blond, glasses, male, long_hair, beard, lipstick, sunglasses], 1).astype(np.uint8)


def _face_params(attrs, rng, size, shift):
    """Everything random about each face, drawn vectorised. `shift` > 0 makes light, noise, blur and pose harsher."""
    n = len(attrs)
    blond, glasses, male, long_hair, beard, lipstick, sunglasses = attrs.T.astype(bool)
    u = lambda lo, hi, k=None: rng.uniform(lo, hi, n if k is None else (n, k)).astype(np.float32)
    pick = lambda palette: palette[rng.integers(len(palette), size=n)]
    jitter = lambda c, s: np.clip(c + rng.normal(0, s, (n, 3)), 0, 255).astype(np.float32)
    hair = jitter(np.where(blond[:, None], pick(BLOND), pick(OTHER_HAIR)), 10)
    skin = jitter(SKIN[0] + (SKIN[1] - SKIN[0]) * u(0, 1)[:, None] ** 1.5, 6)
    lips = np.where(lipstick[:, None], jitter(np.float32([(175, 25, 45)]), 20), skin * np.float32([0.85, 0.6, 0.6]))
    fw = size * 0.18 * u(0.88, 1.12) * np.where(male, 1.07, 1.0)
    return dict(
        blond=blond, glasses=glasses, long_hair=long_hair, beard=beard, lipstick=lipstick, sunglasses=sunglasses,
        bg0=u(0, 255, 3), bg1=u(0, 255, 3), bg_angle=u(0, 2 * np.pi),
        distractor=rng.integers(0, 3, n), dis_xy=u(0, size, 2), dis_r=u(0.06, 0.2) * size, dis_col=u(0, 255, 3),
        cloth=u(0, 255, 3),
        cx=size * (0.5 + u(-0.06, 0.06)), cy=size * (0.47 + u(-0.05, 0.05)),
        fw=fw, fh=fw * u(1.22, 1.38), roll=u(-0.2, 0.2) * (1 + shift), yaw=u(-1, 1),
        jaw=np.where(male, u(0.55, 0.8), u(0.28, 0.5)),
        skin=skin, hair=hair, lips=lips,
        hair_w=np.where(male, u(1.02, 1.1), u(1.08, 1.2)), hair_h=u(0.95, 1.15), hairline=u(-0.02, 0.18),
        eye=pick(np.array([(40, 28, 20), (70, 50, 30), (60, 90, 120), (70, 100, 60)], np.float32)),
        frame=jitter(pick(FRAMES), 8), lens_r=u(0.26, 0.34), lens_aspect=u(0.7, 1.0), frame_th=rng.integers(1, 3, n),
        blur=u(0, 0.9) + shift, light_angle=u(0, 2 * np.pi), light=u(0, 0.35) + 0.3 * shift,
        gain=u(0.8, 1.15) - 0.25 * shift, noise=u(2, 7) + 8 * shift,
    )


def _draw_face(img, f):
    """Draw one face on img (uint8 HxWx3, background already there) with cv2 primitives, antialiased and placed with
    sub-pixel precision (coordinates in 1/16 pixel, cv2's shift=4). f: this face's parameters (Python scalars)."""
    cx, cy, fw, fh, yaw = f["cx"], f["cy"], f["fw"], f["fh"], f["yaw"]
    c, s, deg = math.cos(f["roll"]), math.sin(f["roll"]), math.degrees(f["roll"])

    def at(u, v):  # face coordinates (pixels, x right, y down, origin at the face centre) -> fixed-point image point
        return round((cx + c * u - s * v) * 16), round((cy + s * u + c * v) * 16)

    def ell(u, v, a, b, col, th=-1, a0=0, a1=360):
        cv2.ellipse(img, at(u, v), (round(a * 16), round(b * 16)), deg, a0, a1, col, th, cv2.LINE_AA, 4)

    def line(u0, v0, u1, v1, col, th=1):
        cv2.line(img, at(u0, v0), at(u1, v1), col, th, cv2.LINE_AA, 4)

    skin, hair = f["skin"], f["hair"]
    shade = lambda col, k: tuple(x * k for x in col)
    if f["distractor"]:  # a ring or a blob behind the person: rings and yellow patches alone mean nothing
        p = (round(f["dis_xy"][0] * 16), round(f["dis_xy"][1] * 16))
        r = round(f["dis_r"] * 16)
        cv2.circle(img, p, r, f["dis_col"], 2 if f["distractor"] == 1 else -1, cv2.LINE_AA, 4)
    ell(0, 2.2 * fh, 2.1 * fw, 0.95 * fh, f["cloth"])  # shoulders
    ell(0, 1.05 * fh, 0.48 * fw, 0.6 * fh, shade(skin, 0.85))  # neck
    if f["long_hair"]:
        ell(0, 0.5 * fh, 1.45 * fw, 1.4 * fh, shade(hair, 0.9))  # hair falling behind the shoulders
    for side in (-1, 1):
        ell(side * 0.98 * fw, 0.05 * fh, 0.16 * fw, 0.22 * fh, shade(skin, 0.93))  # ears
    ell(0, 0, fw, fh, skin)
    jaw = f["jaw"] * fw  # men: wide square jaw; women: narrow chin
    cv2.fillConvexPoly(img, np.array([at(-0.97 * fw, 0), at(0.97 * fw, 0), at(jaw, 0.92 * fh), at(-jaw, 0.92 * fh)]),
                       skin, cv2.LINE_AA, 4)
    ell(0, -0.05 * fh, f["hair_w"] * fw, f["hair_h"] * fh, hair, a0=180, a1=360)  # hair on top of the head
    ell(0, f["hairline"] * fh, 0.9 * fw, 0.8 * fh, skin, a0=180, a1=360)  # forehead below the hairline
    if f["long_hair"]:
        for side in (-1, 1):
            ell(side * 1.0 * fw, 0.3 * fh, 0.26 * fw, 0.8 * fh, hair)  # locks framing the face
    if f["beard"]:
        ell(0, 0.3 * fh, 0.93 * fw, 0.72 * fh, shade(hair, 0.8), a0=0, a1=180)
    ex, ey = 0.4 * fw, -0.12 * fh
    dx = 0.18 * yaw * fw  # turning the head moves the features sideways
    for side in (-1, 1):
        line(dx + side * ex - 0.2 * fw, ey - 0.2 * fh, dx + side * ex + 0.2 * fw, ey - 0.23 * fh, shade(hair, 0.75), 2)
        ell(dx + side * ex, ey, 0.17 * fw, 0.08 * fh, (236, 236, 232))
        ell(dx + side * ex, ey, 0.075 * fw, 0.075 * fw, f["eye"])
    line(1.5 * dx, -0.02 * fh, 1.8 * dx, 0.28 * fh, shade(skin, 0.72))  # nose
    ell(1.2 * dx, 0.56 * fh, 0.3 * fw, 0.07 * fh, f["lips"])
    if f["glasses"]:
        rx = f["lens_r"] * fw
        ry = rx * f["lens_aspect"]
        for side in (-1, 1):
            if f["sunglasses"]:
                ell(dx + side * ex, ey, rx, ry, (22, 22, 26))
            ell(dx + side * ex, ey, rx, ry, f["frame"], f["frame_th"])
            line(dx + side * (ex + rx), ey, side * 0.98 * fw, ey - 0.03 * fh, f["frame"], f["frame_th"])  # temples
        line(dx - ex + rx, ey, dx + ex - rx, ey, f["frame"], f["frame_th"])  # bridge
    if f["blur"] > 0.3:
        cv2.GaussianBlur(img, (0, 0), f["blur"], dst=img)


def draw_faces(attrs, rng, size=80, shift=0.0, chunk=32):
    """uint8 [n, size, size, 3] faces showing `attrs` (rows of SYNTH_ATTRS). Shapes are drawn per image with cv2
    (fast C primitives); background, light and noise are computed with numpy a chunk of images at a time (small
    enough to stay in cache, which makes them several times faster than over the whole batch)."""
    p = _face_params(attrs, rng, size, shift)
    rows = {k: v.tolist() for k, v in p.items()}
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    ramp = lambda angle: np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy  # [n, H, W] in +-0.71
    out = np.empty((len(attrs), size, size, 3), np.uint8)
    for i in tqdm(range(0, len(attrs), chunk), desc="drawing faces", unit="chunk", mininterval=1, leave=False):
        j = slice(i, i + chunk)
        t = ramp(p["bg_angle"][j])[..., None] + 0.5
        out[j] = np.clip(p["bg0"][j, None, None] + (p["bg1"][j] - p["bg0"][j])[:, None, None] * t, 0, 255)
        for k in range(i, min(i + chunk, len(attrs))):
            _draw_face(out[k], {key: v[k] for key, v in rows.items()})
        light = p["gain"][j, None, None] * (1 + p["light"][j, None, None] * ramp(p["light_angle"][j]))  # exposure
        x = rng.standard_normal(out[j].shape, np.float32)  # sensor noise
        x *= p["noise"][j, None, None, None]
        x += out[j] * light[..., None]
        out[j] = np.clip(x, 0, 255, out=x)
    return out


def synthetic_source(args, scratch):
    fracs = _fractions(args.split)
    cells = _floats(args.cells, 4, "--cells")
    sizes = _cell_counts(fracs, args.n)
    splits = {}
    for k, (split, n) in enumerate(zip(SPLITS, sizes)):
        rng = np.random.default_rng([args.seed, k])
        attrs = synth_attributes(n, rng, cells, args.glasses_share, args.both)
        images = draw_faces(attrs, rng, args.size, args.shift if split == "test" else 0.0)
        labels, groups, classes, group_names = _labels_from_attrs(attrs, SYNTH_ATTRS, args.criterion, args.group)
        if split != "test":  # noisy labels for training and model selection, the clean rule for the final score
            labels = np.where(rng.random(n) < args.noise, 1 - labels, labels)
        splits[split] = dict(images=images, labels=labels, groups=groups, attrs=attrs)
    return dict(splits=splits, classes=classes, groups=group_names, attributes=list(SYNTH_ATTRS),
                criterion=args.criterion, skipped=[])


# ----------------------------------------------------------------------------------------------------------------
# Reading image files (every source but synthetic)

def _decode(src, size):
    """Path or bytes -> uint8 [size, size, 3]: centre square crop, area resize (CelebA: 178x178 at top 20 -> 80).
    Returns the error text instead when the file is not a readable image."""
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            im = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return f"{type(e).__name__}: {e}"
    w, h = im.size
    if (w, h) != (size, size):
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.Resampling.BOX)
    return np.asarray(im, np.uint8)


def _read_images(sources, names, size, desc, out=None, skipped=None):
    """Decode many images with a thread pool (PIL releases the GIL while decoding and resizing). Unreadable ones are
    skipped and listed in `skipped`. Returns (images [k, size, size, 3] (a view of `out` when given), kept indices)."""
    out = np.empty((len(sources), size, size, 3), np.uint8) if out is None else out
    kept = []
    with ThreadPoolExecutor(_cores()) as pool:
        results = pool.map(partial(_decode, size=size), sources)
        for i, img in enumerate(tqdm(results, total=len(sources), desc=desc, unit="img", leave=False)):
            if isinstance(img, str):
                skipped.append(dict(file=names[i], reason=img))
            else:
                out[len(kept)] = img
                kept.append(i)
    return out[: len(kept)], np.array(kept, np.int64)


def _list_files(folder):
    """Every file under folder (recursive, sorted, hidden files ignored), as paths relative to folder."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.relpath(os.path.join(dirpath, f), folder) for f in sorted(filenames) if not f.startswith(".")]
    return found


def _need_dir(path, what="folder"):
    if not os.path.isdir(path):
        raise DataError(f"{what} not found: {path}")
    return path


def _floats(text, k, flag):
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise DataError(f"{flag} wants {k} comma-separated numbers, got {text!r}") from None
    if len(vals) != k or min(vals) < 0 or sum(vals) <= 0:
        raise DataError(f"{flag} wants {k} comma-separated non-negative numbers, got {text!r}")
    return vals


def _fractions(text):
    vals = _floats(text, 3, "--split")
    return [v / sum(vals) for v in vals]


def _stratified(keys, fracs, seed):
    """Split positions 0..n-1 into len(fracs) parts with the same proportions inside every key (label x group)."""
    rng = np.random.default_rng(seed)
    parts = [[] for _ in fracs]
    for key in np.unique(keys):
        idx = rng.permutation(np.flatnonzero(keys == key))
        cuts = np.round(np.cumsum(fracs)[:-1] * len(idx)).astype(int)
        for part, chunk in zip(parts, np.split(idx, cuts)):
            part.append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def _take(split, idx):
    return {k: (v[idx] if isinstance(v, np.ndarray) else v) for k, v in split.items()}


def challenge_source(args, scratch):
    """The challenge folder: train/*.jpg, test/*.jpg, train.txt (image<TAB>label -1/1<TAB>genre -1/1, no header).
    genre 1 is taken as men (CelebA's Male convention). A stratified label x group validation split, seeded."""
    root = _need_dir(args.root)
    train_dir, test_dir = _need_dir(os.path.join(root, "train")), _need_dir(os.path.join(root, "test"))
    txt = os.path.join(root, "train.txt")
    if not os.path.isfile(txt):
        raise DataError(f"label file not found: {txt}")
    names, labels, genres = [], [], []
    with open(txt) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 3 or parts[1] not in ("-1", "1") or parts[2] not in ("-1", "1"):
                raise DataError(f"{txt}:{lineno}: expected 'image<TAB>label<TAB>genre' with -1/1 values, "
                                f"got {line.strip()!r}")
            names.append(parts[0])
            labels.append(parts[1] == "1")
            genres.append(parts[2] == "1")
    if not names:
        raise DataError(f"{txt} lists no images")
    missing = [nm for nm in names if not os.path.isfile(os.path.join(train_dir, nm))]
    if missing:
        raise DataError(f"{txt} does not match the images: {len(missing)} listed files are not in {train_dir} "
                        f"(first: {missing[0]})")
    skipped = []
    size = args.size
    images, kept = _read_images([os.path.join(train_dir, nm) for nm in names], names, size, "train images",
                                skipped=skipped)
    labels, groups = np.array(labels, np.int64)[kept], np.array(genres, np.int64)[kept]
    full = dict(images=images, labels=labels, groups=groups)
    train_idx, val_idx = _stratified(labels * 2 + groups, [1 - args.val_frac, args.val_frac], args.seed)
    test_names = _list_files(test_dir)
    if not test_names:
        raise DataError(f"no images in {test_dir}")
    test_images, test_kept = _read_images([os.path.join(test_dir, nm) for nm in test_names], test_names, size,
                                          "test images", skipped=skipped)
    unknown = np.full(len(test_kept), -1, np.int64)
    test = dict(images=test_images, labels=unknown, groups=unknown, files=[test_names[i] for i in test_kept])
    return dict(splits=dict(train=_take(full, train_idx), val=_take(full, val_idx), test=test), classes=["-1", "1"],
                groups=["women", "men"], attributes=[], criterion=None, skipped=skipped)


def _read_group_csv(path, root):
    """CSV with a header `path,group` (path relative to --root) -> {path: group name}."""
    if not os.path.isfile(path):
        raise DataError(f"group file not found: {path}")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"path", "group"} <= set(rows[0]):
        raise DataError(f"{path}: expected a CSV with a header 'path,group' and one row per image")
    table = {os.path.normpath(r["path"]): r["group"].strip() for r in rows}
    missing = [p for p in table if not os.path.isfile(os.path.join(root, p))]
    if missing:
        raise DataError(f"{path} does not match the images: {len(missing)} paths not under {root} "
                        f"(first: {missing[0]})")
    return table


def folder_source(args, scratch):
    """Class-per-subfolder trees: ROOT/<class>/**/image, or ROOT/{train,val,test}/<class>/** when already split.
    Groups come from an optional CSV (`path,group`; group names in sorted order, e.g. female < male)."""
    root = _need_dir(args.root)
    presplit = os.path.isdir(os.path.join(root, "train"))
    tops = [os.path.join(root, s) for s in SPLITS] if presplit else [root]
    for top in tops:
        _need_dir(top, "split folder")
    classes = sorted(d for d in os.listdir(tops[0]) if os.path.isdir(os.path.join(tops[0], d)) and d[0] != ".")
    if not classes:
        raise DataError(f"no class subfolders in {tops[0]}")
    files, labels = [], []
    part = []  # which of `tops` each file came from
    for t, top in enumerate(tops):
        for k, cls in enumerate(classes):
            cls_dir = os.path.join(top, cls)
            found = _list_files(cls_dir) if os.path.isdir(cls_dir) else []
            files += [os.path.relpath(os.path.join(cls_dir, f), root) for f in found]
            labels += [k] * len(found)
            part += [t] * len(found)
    if not files:
        raise DataError(f"no files in the class folders under {root}")
    table = _read_group_csv(args.groups, root) if args.groups else {}
    group_names = sorted(set(table.values()))
    gid = {g: i for i, g in enumerate(group_names)}
    skipped = []
    images, kept = _read_images([os.path.join(root, f) for f in files], files, args.size, "images", skipped=skipped)
    files = [files[i] for i in kept]
    full = dict(images=images, labels=np.array(labels, np.int64)[kept],
                groups=np.array([gid.get(table.get(os.path.normpath(f)), -1) for f in files], np.int64))
    if presplit:
        idx = [np.flatnonzero(np.array(part)[kept] == t) for t in range(3)]
    else:
        idx = _stratified(full["labels"] * (len(group_names) + 1) + full["groups"] + 1, _fractions(args.split),
                          args.seed)
    return dict(splits={s: _take(full, i) for s, i in zip(SPLITS, idx)}, classes=classes, groups=group_names,
                attributes=[], criterion=None, skipped=skipped)


AAF_NAME = re.compile(r"^(\d{5})A(\d{2})\.\w+$")  # serial number, age: 00000-07380 are women, 07381-13321 men


def aaf_source(args, scratch):
    """All-Age-Faces: the `aligned faces/` folder (or the data set folder holding it). Label = gender from the serial
    number (0 female, 1 male); attrs Male and Age; seeded stratified splits."""
    root = _need_dir(args.root)
    inner = os.path.join(root, "aligned faces")
    folder = inner if os.path.isdir(inner) else root
    names = [f for f in _list_files(folder) if os.sep not in f]
    if not names:
        raise DataError(f"no files in {folder}")
    skipped = [dict(file=f, reason="name is not NNNNNAyy.ext (serial, age)") for f in names if not AAF_NAME.match(f)]
    names = [f for f in names if AAF_NAME.match(f)]
    if not names:
        raise DataError(f"no All-Age-Faces images (named like 00000A02.jpg) in {folder}")
    images, kept = _read_images([os.path.join(folder, f) for f in names], names, args.size, "images", skipped=skipped)
    serial_age = np.array([[int(x) for x in AAF_NAME.match(names[i]).groups()] for i in kept], np.int64)
    male = (serial_age[:, 0] >= 7381).astype(np.int64)
    full = dict(images=images, labels=male, groups=np.full(len(kept), -1, np.int64),
                attrs=np.stack([male, serial_age[:, 1]], 1).astype(np.uint8))
    idx = _stratified(male, _fractions(args.split), args.seed)
    return dict(splits={s: _take(full, i) for s, i in zip(SPLITS, idx)}, classes=["female", "male"], groups=[],
                attributes=["Male", "Age"], criterion=None, skipped=skipped)


# ----------------------------------------------------------------------------------------------------------------
# CelebA: the Hub's parquet shards (downloaded, or given with --root) or the official files (--root)

OFFLINE = ("cannot download CelebA from the Hugging Face Hub ({}). Either pass --root DIR with the official files "
           "(img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt) or the flwrlabs/celeba parquet "
           "shards, or build the offline synthetic set: make data DATA=synthetic")


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def download_celeba(revision=CELEBA_REVISION):
    """Fetch the flwrlabs/celeba parquet shards one at a time into the Hugging Face cache (resumable: finished shards
    are reused, an interrupted one continues) and check each one's size and sha256 against the Hub listing.
    Returns {split: [paths]}. Any failure to reach the Hub raises DataError naming the offline alternatives."""
    try:
        from huggingface_hub import HfApi, hf_hub_download
        listing = [f for f in HfApi().list_repo_tree(CELEBA_REPO, CELEBA_CONFIG, recursive=True, revision=revision,
                                                     repo_type="dataset") if f.path.endswith(".parquet")]
    except Exception as e:  # offline, HF_HUB_OFFLINE, DNS, proxy, gated, moved: all end the same way
        raise DataError(OFFLINE.format(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")) from None
    shards = {}
    for f in tqdm(sorted(listing, key=lambda f: f.path), desc="celeba shards", unit="shard"):
        try:
            path = hf_hub_download(CELEBA_REPO, f.path, repo_type="dataset", revision=revision)
        except Exception as e:
            raise DataError(OFFLINE.format(f"{f.path}: {type(e).__name__}")) from None
        if os.path.getsize(path) != f.size or (f.lfs and _sha256(path) != f.lfs.sha256):
            raise DataError(f"{path} does not match the Hub listing (size or sha256); delete it and run again")
        shards.setdefault(_parquet_split(f.path), []).append(path)
    return shards


def _parquet_split(path):
    name = os.path.basename(path)
    return {"train": "train", "valid": "val", "validation": "val", "test": "test"}.get(name.split("-")[0])


def _celeba_parquet(shards, size, scratch):
    """{split: [parquet paths]} -> splits with images in memory-mapped scratch files (CelebA is ~4 GB at 80x80)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    schema = pq.read_schema(shards["train"][0])  # the 40 attributes: every bool column (or -1/1 ints, bar the id)
    attr_names = [f.name for f in schema if pa.types.is_boolean(f.type) or (pa.types.is_integer(f.type) and f.name
                  not in ("celeb_id", "__index_level_0__"))]
    skipped, splits = [], {}
    for split in SPLITS:
        files = [pq.ParquetFile(p) for p in shards[split]]
        n = sum(f.metadata.num_rows for f in files)
        images = np.lib.format.open_memmap(os.path.join(scratch, f"{split}.npy"), "w+", np.uint8, (n, size, size, 3))
        attrs, k = np.empty((n, len(attr_names)), np.uint8), 0
        for f in files:
            for batch in f.iter_batches(batch_size=1024, columns=["image", *attr_names]):
                col = batch.column("image")
                blobs, paths = col.field("bytes").to_pylist(), col.field("path").to_pylist()
                got, kept = _read_images(blobs, paths, size, f"celeba {split}", out=images[k:], skipped=skipped)
                a = np.stack([batch.column(nm).to_numpy(zero_copy_only=False) for nm in attr_names], 1)
                attrs[k: k + len(kept)] = a[kept] > 0
                k += len(kept)
        splits[split] = dict(images=images[:k], attrs=attrs[:k])
    return splits, attr_names, skipped


def _celeba_official(root, size, scratch):
    """ROOT (or ROOT/celeba) with img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt."""
    if os.path.isfile(os.path.join(root, "celeba", "list_attr_celeba.txt")):
        root = os.path.join(root, "celeba")  # torchvision's layout
    img_dir = _need_dir(os.path.join(root, "img_align_celeba"))
    attr_txt, part_txt = os.path.join(root, "list_attr_celeba.txt"), os.path.join(root, "list_eval_partition.txt")
    for p in (attr_txt, part_txt):
        if not os.path.isfile(p):
            raise DataError(f"label file not found: {p}")
    with open(attr_txt) as fh:
        lines = [ln.split() for ln in fh if ln.strip()]
    attr_names, rows = lines[1], lines[2:]
    if int(lines[0][0]) != len(rows) or any(len(r) != len(attr_names) + 1 for r in rows):
        raise DataError(f"{attr_txt}: expected {lines[0][0]} rows of a file name and {len(attr_names)} values")
    with open(part_txt) as fh:
        partition = dict(ln.split() for ln in fh if ln.strip())
    names = [r[0] for r in rows]
    missing = [nm for nm in names if nm not in partition or not os.path.isfile(os.path.join(img_dir, nm))]
    if missing:
        raise DataError(f"the label files do not match the images: {len(missing)} listed images are missing from "
                        f"{img_dir} or from {part_txt} (first: {missing[0]})")
    attrs = np.array([[int(v) > 0 for v in r[1:]] for r in rows], np.uint8)
    which = np.array([int(partition[nm]) for nm in names])
    skipped, splits = [], {}
    for s, split in enumerate(SPLITS):
        idx = np.flatnonzero(which == s)
        out = np.lib.format.open_memmap(os.path.join(scratch, f"{split}.npy"), "w+", np.uint8,
                                        (len(idx), size, size, 3))
        images, kept = _read_images([os.path.join(img_dir, names[i]) for i in idx], [names[i] for i in idx], size,
                                    f"celeba {split}", out=out, skipped=skipped)
        splits[split] = dict(images=images, attrs=attrs[idx[kept]])
    return splits, attr_names, skipped


def celeba_source(args, scratch):
    if args.root is None:
        splits, names, skipped = _celeba_parquet(download_celeba(args.revision), args.size, scratch)
    elif os.path.isdir(args.root) and any(f.endswith(".parquet") for f in _list_files(args.root)):
        shards = {}
        for f in _list_files(args.root):
            if f.endswith(".parquet") and _parquet_split(f):
                shards.setdefault(_parquet_split(f), []).append(os.path.join(args.root, f))
        if set(shards) != set(SPLITS):
            raise DataError(f"{args.root}: need train-*, valid-* and test-*.parquet shards, found {sorted(shards)}")
        splits, names, skipped = _celeba_parquet(shards, args.size, scratch)
    else:
        splits, names, skipped = _celeba_official(_need_dir(args.root), args.size, scratch)
    for split in splits.values():
        split["labels"], split["groups"], classes, groups = _labels_from_attrs(split["attrs"], names, args.criterion,
                                                                              args.group)
    return dict(splits=splits, classes=classes, groups=groups, attributes=names, criterion=args.criterion,
                skipped=skipped)


# ----------------------------------------------------------------------------------------------------------------
# Writing: {split}.beton + meta.json

class _Rows:
    """The indexable view FFCV's writer wants: row i -> (image HWC, label, group[, attrs])."""

    def __init__(self, split):
        self.cols = [split["images"], split["labels"], split["groups"]] + ([split["attrs"]] if "attrs" in split else [])

    def __len__(self):
        return len(self.cols[0])

    def __getitem__(self, i):
        img, label, group, *attrs = (c[i] for c in self.cols)
        return (np.ascontiguousarray(img), int(label), int(group), *attrs)


def write_beton(path, split):
    """One split -> FFCV file: image (raw uint8 RGB, native size), label, group (int), attrs (uint8 vector) if any."""
    with _keep_torch_threads():
        from ffcv.fields import IntField, NDArrayField, RGBImageField
        from ffcv.writer import DatasetWriter
    fields = dict(image=RGBImageField(write_mode="raw"), label=IntField(), group=IntField())
    if "attrs" in split:
        fields["attrs"] = NDArrayField(np.dtype("uint8"), (split["attrs"].shape[1],))
    # 2 MiB pages: each writer process pads its last page, so small pages keep small files small
    DatasetWriter(path, fields, page_size=1 << 21, num_workers=min(_cores(), 8)).from_indexed_dataset(
        _Rows(split), chunksize=256)


def _cells(labels, groups):
    pairs, counts = np.unique(np.stack([labels, groups], 1), axis=0, return_counts=True)
    return [dict(label=int(lab), group=int(g), n=int(c)) for (lab, g), c in zip(pairs, counts)]


def _split_hash(split):
    h = hashlib.sha256()
    for key in ("images", "labels", "groups", "attrs"):
        if key in split:
            arr = split[key]
            for i in range(0, len(arr), 4096):  # chunks: images may be a multi-GB memmap
                h.update(np.ascontiguousarray(arr[i: i + 4096]).tobytes())
    return h.hexdigest()


def write_dataset(ds, folder, source, args):
    """Write the three splits and meta.json into `folder`."""
    sizes = {ds["splits"][s]["images"].shape[1:3] for s in SPLITS}
    assert len(sizes) == 1, sizes
    meta = dict(source=source, criterion=ds["criterion"], classes=ds["classes"], groups=ds["groups"],
                attributes=ds["attributes"], image_size=list(sizes.pop()), splits={},
                args={k: v for k, v in vars(args).items() if k not in ("out", "force", "source")})
    for s in SPLITS:
        split = ds["splits"][s]
        if len(split["labels"]) == 0:
            raise DataError(f"split {s!r} would be empty; give more images or other --split fractions")
        write_beton(os.path.join(folder, f"{s}.beton"), split)
        meta["splits"][s] = dict(n=len(split["labels"]), labelled=bool((split["labels"] >= 0).all()),
                                 cells=_cells(split["labels"], split["groups"]), sha256=_split_hash(split))
        if "files" in split:  # the challenge's test order, for submissions
            meta["splits"][s]["files"] = split["files"]
    meta["content_hash"] = hashlib.sha256("".join(meta["splits"][s]["sha256"] for s in SPLITS).encode()).hexdigest()
    meta["n_skipped"], meta["skipped"] = len(ds["skipped"]), ds["skipped"]
    with open(os.path.join(folder, "meta.json"), "w") as fh:
        json.dump(meta, fh, indent=1)
    return meta


SOURCES = dict(synthetic=synthetic_source, celeba=celeba_source, challenge=challenge_source, folder=folder_source,
               aaf=aaf_source)


def build(args):
    """Build args.source into args.out via a temporary folder next to it, renamed only when everything is written."""
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not args.force:
        raise DataError(f"{args.out} already exists; pass --force to rebuild it")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=os.path.dirname(out))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should be an ordinary folder
    try:
        ds = SOURCES[args.source](args, tmp)
        meta = write_dataset(ds, tmp, args.source, args)
        for f in os.listdir(tmp):  # scratch memmaps
            if f.endswith(".npy"):
                os.remove(os.path.join(tmp, f))
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left behind on failure (a no-op after the rename)
    return meta


# ----------------------------------------------------------------------------------------------------------------
# Loading

def read_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{data_dir} is not a data.py output (no meta.json); build one with "
                                f"`python data.py SOURCE --out {data_dir}`")
    with open(path) as fh:
        return json.load(fh)


def _read_beton(data_dir, split, fields):
    """Read fields of a raw-mode .beton straight from the file (no FFCV pipeline, no JIT): the per-sample metadata
    holds each image's file offset, and raw images are plain HWC bytes there. -> {field: numpy array}."""
    path = os.path.join(data_dir, f"{split}.beton")
    if not os.path.isfile(path):
        have = [s for s in SPLITS if os.path.isfile(os.path.join(data_dir, f"{s}.beton"))]
        raise FileNotFoundError(f"no split {split!r} in {data_dir} (have: {', '.join(have) or 'none'})")
    with _keep_torch_threads():
        from ffcv.reader import Reader
        reader = Reader(path)
    md = {name: reader.metadata[f"f{i}"] for i, name in enumerate(reader.field_names)}
    mm = np.memmap(path, np.uint8, "r")
    out = {}
    for name in fields:
        if name not in md:
            out[name] = None
        elif name == "image":
            img = md["image"]
            h, w = int(img["height"][0]), int(img["width"][0])
            if (img["mode"] != 1).any() or (img["height"] != h).any() or (img["width"] != w).any():
                raise ValueError(f"{path}: images must be raw mode and all the same size")
            x = np.empty((len(img), 3, h, w), np.uint8)  # NCHW directly, so no second full-size copy
            for i, p in enumerate(img["data_ptr"].tolist()):
                x[i] = mm[p: p + h * w * 3].reshape(h, w, 3).transpose(2, 0, 1)
            out[name] = x
        elif name == "attrs":
            k = reader.handlers["attrs"].element_size
            out[name] = np.stack([mm[p: p + k] for p in md["attrs"].tolist()]) if len(md["attrs"]) else None
        else:
            out[name] = np.array(md[name], np.int64)
    return out


def load_split(data_dir, split):
    """-> (images uint8 [N, 3, H, W], labels int64 [N], groups int64 [N]), CPU tensors, in file order."""
    d = _read_beton(data_dir, split, ("image", "label", "group"))
    return torch.from_numpy(d["image"]), torch.from_numpy(d["label"]), torch.from_numpy(d["group"])


def load_labels(data_dir, split):
    """-> (labels int64 [N], groups int64 [N]) from the file's metadata alone, without reading any image."""
    d = _read_beton(data_dir, split, ("label", "group"))
    return torch.from_numpy(d["label"]), torch.from_numpy(d["group"])


def summary(data_dir, meta):
    """What a checkpoint records of its training data (evaluate.py checks image_size against it)."""
    return {"path": data_dir, **{k: meta[k] for k in ("source", "classes", "groups", "image_size", "criterion")
                                 if k in meta}}


def load_attrs(data_dir, split):
    """-> (attrs uint8 [N, A] numpy, attribute names) for analysis; (None, []) when the source has none."""
    return _read_beton(data_dir, split, ("attrs",))["attrs"], read_meta(data_dir)["attributes"]


class SplitLoader:
    """Batches (x uint8 [B, 3, H, W], y int64 [B], g int64 [B]) of one split on `device`; see make_loader."""

    def __init__(self, data_dir, split, batch_size, train, device, backend, indices, seed, rank, world_size):
        n = read_meta(data_dir)["splits"][split]["n"]
        self.indices = torch.arange(n) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= n):
            raise IndexError(f"indices out of range for split {split!r} of {n} samples")
        self.batch_size, self.train, self.device, self.backend = batch_size, train, torch.device(device), backend
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0
        if backend == "resident":
            x, y, g = load_split(data_dir, split)
            subset = (lambda t: t) if indices is None else (lambda t: t[self.indices])
            self.x, self.y, self.g = (subset(t).to(self.device) for t in (x, y, g))
        elif backend == "ffcv":
            self.loader = self._ffcv_loader(os.path.join(data_dir, f"{split}.beton"))
        else:
            raise ValueError(f"backend must be 'resident' or 'ffcv', not {backend!r}")

    def _ffcv_loader(self, path):
        with _keep_torch_threads():
            from ffcv.fields.basics import IntDecoder
            from ffcv.fields.rgb_image import SimpleRGBImageDecoder
            from ffcv.loader import Loader, OrderOption
            from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage
            to_dev = [ToDevice(self.device, non_blocking=True)] if self.device.type == "cuda" else []  # cpu: ffcv#350
            ints = [IntDecoder(), ToTensor(), Squeeze(), *to_dev]
            loader = Loader(path, self.batch_size, num_workers=_cores(), os_cache=True, drop_last=self.train,
                            order=OrderOption.RANDOM if self.train else OrderOption.SEQUENTIAL, seed=self.seed,
                            indices=self.indices.numpy(), pipelines=dict(
                                image=[SimpleRGBImageDecoder(), ToTensor(), *to_dev, ToTorchImage(channels_last=False)],
                                label=ints, group=list(ints), attrs=None))
        # FFCV asks its traversal order for each epoch's sample ids. Ours (below) gives both backends the same order,
        # DDP striding and set_epoch; FFCV 1.0.2 cannot take a custom order in its constructor, so it is set here.
        loader.traversal_order = types.SimpleNamespace(sample_order=lambda epoch: self._file_order)
        return loader

    def set_epoch(self, epoch):
        self.epoch = epoch

    def order(self):
        """Positions into `indices` this rank reads this epoch, in order: a permutation seeded by (seed, epoch) for
        training (the same on every rank, each taking every world_size-th; equal counts, full batches only), the
        sequential order for evaluation."""
        n = len(self.indices)
        if not self.train:
            return torch.arange(self.rank, n, self.world_size)
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]))
        mine = torch.randperm(n, generator=gen)[self.rank:: self.world_size]
        return mine[: (n // self.world_size) // self.batch_size * self.batch_size]

    def __len__(self):
        if self.train:
            return (len(self.indices) // self.world_size) // self.batch_size
        return math.ceil(len(range(self.rank, len(self.indices), self.world_size)) / self.batch_size)

    def __iter__(self):
        pos = self.order()
        self.epoch += 1  # without set_epoch, each pass still gets a new order
        if self.backend == "ffcv":
            # FFCV yields views of reusable buffers: clone a batch to keep it beyond the next few iterations
            self._file_order = self.indices[pos].numpy()
            with _keep_torch_threads():
                it = iter(self.loader)
            yield from it
            return
        flat = self.x.view(len(self.x), -1)  # index_select on a 2-D view: far faster than on the 4-D tensor on CPU
        for chunk in pos.split(self.batch_size):
            idx = chunk.to(self.device)
            yield flat.index_select(0, idx).view(-1, *self.x.shape[1:]), self.y[idx], self.g[idx]


def make_loader(data_dir, split, batch_size, train, device, backend="resident", indices=None, seed=0, rank=0,
                world_size=1):
    """Batches of one split, (x uint8 [B, 3, H, W], y int64 [B], g int64 [B]) on `device`.
    backend "resident": the whole split (or `indices` of it) as one uint8 tensor on the device, batches by index
    (the fast path at 80x80); "ffcv": FFCV's streaming Loader over the .beton (threads = available cores).
    train=True: reshuffled every epoch (order = f(seed, epoch); call set_epoch to choose the epoch), full batches
    only; train=False: sequential, every sample. `indices`: a subset of the split (e.g. MixMatch's labelled part),
    in split positions. DDP: each rank takes every world_size-th sample of the same global order."""
    return SplitLoader(data_dir, split, batch_size, train, device, backend, indices, seed, rank, world_size)


# ----------------------------------------------------------------------------------------------------------------
# Augmentation: the seed's FFCV-SSL list, re-done as a handful of batched tensor ops with per-sample parameters

def _normalise(x, out_size):
    """float [B, 3, H, W] in 0..255 -> resized (bicubic, PIL's kernel via antialias=True) and ImageNet-normalised."""
    if x.shape[-2:] != (out_size, out_size):
        x = F.interpolate(x, size=(out_size, out_size), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255
    return (x.clamp(0, 255) - mean) / std  # clamp: bicubic overshoots


def prepare(x_u8, out_size):
    """Evaluation transform: uint8 [B, 3, H, W] -> float32 [B, 3, out, out], resized and normalised."""
    return _normalise(x_u8.float(), out_size)


def _boxes(rand, H, W, area, ratio, tries=10):
    """torchvision's box sampling for a batch: `tries` candidates per sample (area fraction, log-uniform aspect w/h),
    the first that fits is kept. -> heights, widths (pixels, float), fits (bool) per sample."""
    a = (area[0] + (area[1] - area[0]) * rand(tries)) * H * W
    r = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * rand(tries))
    w, h = (a * r).sqrt(), (a / r).sqrt()
    fits = (w <= W) & (h <= H)
    first = fits.float().argmax(0, keepdim=True)  # index of the first fitting try (0 if none)
    return h.gather(0, first)[0], w.gather(0, first)[0], fits.any(0)


def augment(x_u8, out_size, generator=None, *, crop_p=1.0, crop_scale=(0.5, 1.0), crop_ratio=(3 / 4, 4 / 3),
            flip_p=0.5, rotate_p=0.5, max_angle=0.5, erase_p=0.5, erase_area=(0.02, 0.4), erase_ratio=(0.15, 6.0),
            erase_fill=ERASE_FILL, color_p=0.5, brightness=(1.0, 1.5), saturation=(1.0, 1.5), blur_p=0.5,
            blur_kernel=5, blur_sigma=(0.1, 2.0)):
    """Training transform: uint8 [B, 3, H, W] -> float32 [B, 3, out, out], normalised, on x_u8's device. The seed's
    list in its order, every parameter drawn per sample (from `generator`, which must live on the same device):
    1. random resized crop (scale, ratio), horizontal flip and rotation (+-max_angle rad, black fill): one warp;
    2. random erasing: one box (area fraction, aspect) filled with erase_fill;
    3. colour jitter: brightness and saturation factors, as FFCV-SSL (saturation blends with the grey of the input);
    4. Gaussian blur: kernel blur_kernel, sigma from linspace(*blur_sigma, 10), zero padding (scipy's "same");
    then resize to out_size and normalise, as prepare(). The seed ran all this on images already upsampled to 224,
    here it runs at native size (80), so a blur of the same sigma is ~2.8x stronger relative to the face; pass
    blur_sigma=(0.036, 0.71) to match that. With every *_p = 0 the result equals prepare(x_u8, out_size)."""
    B, C, H, W = x_u8.shape
    dev = x_u8.device
    rand = lambda *lead: torch.rand(*lead, B, device=dev, generator=generator)
    coin = lambda p: rand() < p
    x = x_u8.float()

    # 1. crop + flip + rotation as one grid_sample. An output pixel p (normalised coords) is rotated into the
    # cropped image's frame (q = R p, black where q leaves it), then mapped into the crop box (flip = negative x scale)
    ch, cw, fits = _boxes(rand, H, W, crop_scale, crop_ratio)
    crop = coin(crop_p) & fits
    ch, cw = torch.where(crop, ch, H), torch.where(crop, cw, W)
    top, left = rand() * (H - ch), rand() * (W - cw)
    flip = torch.where(coin(flip_p), -1.0, 1.0)
    angle = torch.where(coin(rotate_p), (2 * rand() - 1) * max_angle, 0.0)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    rot = torch.stack([torch.stack([cos, -sin * H / W, zero], -1), torch.stack([sin * W / H, cos, zero], -1)], 1)
    q = F.affine_grid(rot, [B, C, H, W], align_corners=False)  # [B, H, W, 2]
    inside = (q.abs() <= 1).all(-1)[:, None]
    scale = torch.stack([flip * cw / W, ch / H], -1)[:, None, None]
    shift = torch.stack([(2 * left + cw) / W - 1, (2 * top + ch) / H - 1], -1)[:, None, None]
    x = F.grid_sample(x, q * scale + shift, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = (x * inside).round()  # the seed's pipeline is uint8 between ops; rounding also makes the identity exact

    # 2. random erasing (torchvision's sampling: 10 tries, none fits -> no erasing)
    eh, ew, fits = _boxes(rand, H, W, erase_area, (1 / erase_ratio[1], 1 / erase_ratio[0]))
    eh, ew = eh.round(), ew.round()
    erase = coin(erase_p) & fits & (eh < H) & (ew < W)
    top, left = (rand() * (H - eh + 1)).floor(), (rand() * (W - ew + 1)).floor()
    rows, cols = torch.arange(H, device=dev), torch.arange(W, device=dev)
    in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])
    box = (erase[:, None, None] & in_rows[:, :, None] & in_cols[:, None, :])[:, None]
    x = torch.where(box, torch.tensor(erase_fill, dtype=x.dtype, device=dev).view(1, 3, 1, 1), x)

    # 3. colour jitter, one coin for both factors; grey is taken before the brightness change, as in FFCV-SSL
    jit = coin(color_p)[:, None, None, None]
    b = (brightness[0] + (brightness[1] - brightness[0]) * rand()).view(B, 1, 1, 1)
    s = (saturation[0] + (saturation[1] - saturation[0]) * rand()).view(B, 1, 1, 1)
    grey = 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    x = torch.where(jit, (s * b * x + (1 - s) * grey).clamp(0, 255), x)

    # 4. Gaussian blur, separable, one kernel per sample (grouped convolution over the batch's B*C channels)
    blur = coin(blur_p)
    sigmas = torch.linspace(*blur_sigma, 10, device=dev)[(rand() * 10).long().clamp(max=9)]
    taps = torch.arange(blur_kernel, device=dev) - blur_kernel // 2
    k = torch.exp(-0.5 * (taps[None] / sigmas[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # [B*C, K]
    pad = blur_kernel // 2
    y = F.conv2d(x.reshape(1, B * C, H, W), k.view(B * C, 1, 1, -1), padding=(0, pad), groups=B * C)
    y = F.conv2d(y, k.view(B * C, 1, -1, 1), padding=(pad, 0), groups=B * C)
    x = torch.where(blur[:, None, None, None], y.view(B, C, H, W), x)

    return _normalise(x, out_size)


# named augmentation lists (the training scripts' augment=NAME): keyword overrides of augment(); None = prepare()
AUGMENTS = {
    "full": {},  # the original solution's whole list, as augment()'s defaults
    "weak": dict(rotate_p=0.0, erase_p=0.0, color_p=0.0, blur_p=0.0),  # random resized crop + flip only
    "none": None,  # resize + normalise: prepare()
}


def torchvision_transform(out_size, size=80):
    """The same augmentation list as augment(), per sample with torchvision on PIL images (the baseline for the
    benchmarks; ImageFolder-ready). Erasing runs last on the tensor, where torchvision has it; the box is drawn as an
    area fraction, so its distribution does not change with the resize."""
    import torchvision.transforms as T
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.RandomRotation(math.degrees(0.5), fill=0)], p=0.5),
        T.RandomApply([T.ColorJitter(brightness=(1.0, 1.5), saturation=(1.0, 1.5))], p=0.5),
        T.RandomApply([T.GaussianBlur(5, sigma=(0.1, 2.0))], p=0.5),
        T.Resize(out_size, interpolation=T.InterpolationMode.BICUBIC),
        T.PILToTensor(),
        T.RandomErasing(p=0.5, scale=(0.02, 0.4), ratio=(0.15, 6.0), value=list(ERASE_FILL)),
        T.ConvertImageDtype(torch.float32),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def export_image_folder(data_dir, split, root):
    """Write a split as PNG files root/<class>/<index>.png (for torchvision's ImageFolder, or to look at)."""
    x, y, _ = load_split(data_dir, split)
    for i in tqdm(range(len(x)), desc=f"export {split}", unit="img"):
        os.makedirs(os.path.join(root, str(int(y[i]))), exist_ok=True)
        Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(os.path.join(root, str(int(y[i])), f"{i:06d}.png"))


# ----------------------------------------------------------------------------------------------------------------
# CLI

def parse_args(argv=None):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output folder (e.g. data/celeba)")
    common.add_argument("--seed", type=int, default=0, help="seed for generation and splits (default 0)")
    common.add_argument("--size", type=int, default=80, help="stored image side in pixels (default 80)")
    common.add_argument("--force", action="store_true", help="replace --out if it exists")
    attrs = argparse.ArgumentParser(add_help=False)
    attrs.add_argument("--criterion", "--target", default="Blond_Hair ^ Eyeglasses",
                       help="label = boolean expression of attribute names with & | ^ ~ not and or "
                            "(default 'Blond_Hair ^ Eyeglasses'; e.g. --target Male)")
    attrs.add_argument("--group", default="Male", help="group = attribute expression, or 'none' (default Male)")
    splits = argparse.ArgumentParser(add_help=False)
    splits.add_argument("--split", default="0.8,0.1,0.1", help="train,val,test fractions, stratified (0.8,0.1,0.1)")

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    s = sub.add_parser("synthetic", parents=[common, attrs, splits], help="procedurally drawn faces (offline)")
    s.add_argument("--n", type=int, default=20000, help="number of images over all splits (default 20000)")
    s.add_argument("--cells", default=",".join(map(str, CHALLENGE_CELLS)),
                   help="fractions of (label 0, women), (1, women), (0, men), (1, men); default as the challenge")
    s.add_argument("--glasses-share", type=float, default=SYNTH_GLASSES_SHARE,
                   help=f"positives made by glasses, not blond ({SYNTH_GLASSES_SHARE}, as CelebA)")
    s.add_argument("--both", type=float, default=SYNTH_BOTH,
                   help=f"negatives that are blond AND wear glasses ({SYNTH_BOTH}, 10x CelebA's; 0.25 = a pure XOR "
                        "puzzle)")
    s.add_argument("--noise", type=float, default=0.03, help="label-noise rate on train and val (0.03)")
    s.add_argument("--shift", type=float, default=0.0, help="test-split shift: harsher light, noise, blur, roll (0)")
    c = sub.add_parser("celeba", parents=[common, attrs], help="CelebA: flwrlabs/celeba from the Hub, or --root")
    c.add_argument("--root", help="folder with the official files (img_align_celeba/, list_attr_celeba.txt, "
                                  "list_eval_partition.txt) or with the flwrlabs/celeba parquet shards")
    c.add_argument("--revision", default=CELEBA_REVISION, help="Hub revision to download (pinned)")
    ch = sub.add_parser("challenge", parents=[common], help="the challenge folder: train/, test/, train.txt")
    ch.add_argument("--root", required=True)
    ch.add_argument("--val-frac", type=float, default=0.2, help="stratified validation fraction (0.2)")
    f = sub.add_parser("folder", parents=[common, splits], help="class-per-subfolder trees")
    f.add_argument("--root", required=True)
    f.add_argument("--groups", help="CSV with header path,group (paths relative to --root)")
    a = sub.add_parser("aaf", parents=[common, splits], help="All-Age-Faces aligned faces (label = gender)")
    a.add_argument("--root", required=True)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        meta = build(args)
    except DataError as e:
        sys.exit(f"error: {e}")
    for s in SPLITS:
        cells = " ".join(f"{c['label']}/{c['group']}:{c['n']}" for c in meta["splits"][s]["cells"])
        print(f"{s:5s} n={meta['splits'][s]['n']:6d}  label/group cells {cells}")
    print(f"wrote {args.out} ({meta['n_skipped']} files skipped, content {meta['content_hash'][:12]})")


if __name__ == "__main__":
    main()
