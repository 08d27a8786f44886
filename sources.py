"""
Where the data sets come from. `python data.py SOURCE --key=value ...` builds one: the source returns its splits in
memory, build() writes OUT_DIR/{train,val,test}.beton and meta.json (the format is data.py's) into a temporary folder
renamed at the very end, so a failed or killed build leaves nothing behind. Sources:

    synthetic   procedurally drawn faces with CelebA's hidden rule, Blond_Hair XOR Eyeglasses (offline)
    celeba      CelebA: flwrlabs/celeba from the Hub (pinned revision), or --root with the official files or shards
    challenge   the 2023 challenge folder: train/, test/, train.txt
    folder      class-per-subfolder trees (mask / no-mask, ...), groups from an optional CSV
    aaf         All-Age-Faces "aligned faces/" (label = gender, from the file name)
    adience     Adience "aligned/" and fold_0..4_data.txt (label = gender; the subject-disjoint folds are the splits)
"""

import ast
import csv
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import cv2
import numpy as np
from tqdm import tqdm

import configurator
import data
from data import SPLITS

CELEBA_REPO = "flwrlabs/celeba"
CELEBA_REVISION = "2d738f56e0e7f925ea36ae7c808ea925264aacec"  # pinned: the images and the official partition
CELEBA_CONFIG = "img_align+identity+attr"
CHALLENGE_CELLS = (0.44, 0.145, 0.365, 0.05)  # (label 0, women), (1, women), (0, men), (1, men), as in the challenge

# ----------------------------------------------------------------------------------------------------------------
# Command-line defaults, one dict per source: `python data.py SOURCE --help` prints them with these comments

OUTPUT = dict(
    out_dir="",  # the folder to write, e.g. data/celeba (required; an existing one only with --force)
    force=False,  # replace out_dir if it exists
    size=80,  # stored image side in pixels (centre square crop, area resize)
)
ATTRIBUTES = dict(
    criterion="Blond_Hair ^ Eyeglasses",  # label: attribute names with & | ^ ~ not and or, e.g. Male
    group="Male",  # group (0/1): an attribute expression, or none
)
SPLIT = dict(
    split=(0.8, 0.1, 0.1),  # train,val,test fractions, stratified by label x group
    seed=0,  # seed of the split (synthetic: and of the drawing)
)
SYNTHETIC = dict(
    **OUTPUT,
    n=20000,  # images over all splits
    cells=CHALLENGE_CELLS,  # fractions of the cells (label 0, women), (1, women), (0, men), (1, men)
    glasses_share=0.3,  # fraction of the positives made by glasses rather than blond hair (CelebA's)
    both=0.05,  # fraction of the negatives blond AND in glasses (10x CelebA's; 0.25 makes a pure XOR puzzle)
    noise=0.03,  # label-noise rate of train and val (test labels stay clean)
    shift=0.0,  # test-split shift: harsher light, noise, blur and head roll
    **ATTRIBUTES,
    **SPLIT,
)
CELEBA = dict(
    **OUTPUT,
    root="",  # the source's folder (required; celeba: empty downloads flwrlabs/celeba from the Hub)
    revision=CELEBA_REVISION,  # the Hub revision to download (pinned)
    **ATTRIBUTES,
)
CHALLENGE = dict(
    **OUTPUT,
    root="",
    val_frac=0.2,  # validation fraction of the labelled images, stratified by label x group
    seed=0,
)
FOLDER = dict(
    **OUTPUT,
    root="",
    groups="",  # CSV with a header path,group (paths relative to root); empty: no groups
    **SPLIT,
)
AAF = dict(**OUTPUT, root="", **SPLIT)
ADIENCE = dict(
    **OUTPUT,
    root="",
    val_fold=3,  # the fold (0-4) held out for validation
    test_fold=4,  # the fold (0-4) held out for test; the benchmark's cross-validation rotates it
)
ALIASES = {"out": "out_dir", "target": "criterion"}


class DataError(Exception):
    """A problem with the user's input (missing folder, empty source, bad label file, no network): one line."""


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


def synth_attributes(n, rng, cells=CHALLENGE_CELLS, glasses_share=SYNTHETIC["glasses_share"],
                     both=SYNTHETIC["both"]):
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


def synthetic_source(cfg):
    """Procedurally drawn faces (offline): attributes per label x gender cell, the label by `criterion` (the
    challenge's rule by default), label noise on train and val only."""
    if not 0 <= cfg["noise"] <= 1:
        raise DataError(f"--noise wants a rate in 0..1, got {cfg['noise']}")
    cells = _fractions(cfg["cells"], "cells")
    sizes = _cell_counts(_fractions(cfg["split"]), cfg["n"])
    splits = {}
    for k, (split, n) in enumerate(zip(SPLITS, sizes)):
        rng = np.random.default_rng([cfg["seed"], k])
        attrs = synth_attributes(n, rng, cells, cfg["glasses_share"], cfg["both"])
        images = draw_faces(attrs, rng, cfg["size"], cfg["shift"] if split == "test" else 0.0)
        labels, groups, classes, group_names = _labels_from_attrs(attrs, SYNTH_ATTRS, cfg["criterion"], cfg["group"])
        if split != "test":  # noisy labels for training and model selection, the clean rule for the final score
            labels = np.where(rng.random(n) < cfg["noise"], 1 - labels, labels)
        splits[split] = dict(images=images, labels=labels, groups=groups, attrs=attrs)
    return dict(splits=splits, classes=classes, groups=group_names, attributes=list(SYNTH_ATTRS),
                criterion=cfg["criterion"], skipped=[])


# ----------------------------------------------------------------------------------------------------------------
# Reading image files (every source but synthetic)

def _read_images(sources, names, size, desc, out=None, skipped=None):
    """Decode many images with a thread pool (PIL releases the GIL while decoding and resizing). Unreadable ones are
    skipped and listed in `skipped`. Returns (images [k, size, size, 3] (a view of `out` when given), kept indices)."""
    out = np.empty((len(sources), size, size, 3), np.uint8) if out is None else out
    kept = []
    with ThreadPoolExecutor(data._cores()) as pool:
        results = pool.map(partial(data.decode_image, size=size), sources)
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


def _fractions(vals, key="split"):
    """Non-negative shares -> fractions that sum to 1."""
    if min(vals) < 0 or sum(vals) <= 0:
        raise DataError(f"--{key} wants non-negative numbers with a positive sum, got {','.join(map(str, vals))}")
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


def challenge_source(cfg):
    """The challenge folder: train/*.jpg, test/*.jpg, train.txt (image<TAB>label -1/1<TAB>genre -1/1, no header).
    genre 1 is taken as men (CelebA's Male convention). A stratified label x group validation split, seeded."""
    if not 0 < cfg["val_frac"] < 1:
        raise DataError(f"--val_frac wants a fraction between 0 and 1, got {cfg['val_frac']}")
    root = _need_dir(cfg["root"])
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
    size = cfg["size"]
    images, kept = _read_images([os.path.join(train_dir, nm) for nm in names], names, size, "train images",
                                skipped=skipped)
    labels, groups = np.array(labels, np.int64)[kept], np.array(genres, np.int64)[kept]
    full = dict(images=images, labels=labels, groups=groups)
    train_idx, val_idx = _stratified(labels * 2 + groups, [1 - cfg["val_frac"], cfg["val_frac"]], cfg["seed"])
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


def folder_source(cfg):
    """Class-per-subfolder trees: ROOT/<class>/**/image, or ROOT/{train,val,test}/<class>/** when already split.
    Groups come from an optional CSV (`path,group`; group names in sorted order, e.g. female < male)."""
    root = _need_dir(cfg["root"])
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
    table = _read_group_csv(cfg["groups"], root) if cfg["groups"] else {}
    group_names = sorted(set(table.values()))
    gid = {g: i for i, g in enumerate(group_names)}
    skipped = []
    images, kept = _read_images([os.path.join(root, f) for f in files], files, cfg["size"], "images", skipped=skipped)
    files = [files[i] for i in kept]
    full = dict(images=images, labels=np.array(labels, np.int64)[kept],
                groups=np.array([gid.get(table.get(os.path.normpath(f)), -1) for f in files], np.int64))
    if presplit:
        idx = [np.flatnonzero(np.array(part)[kept] == t) for t in range(3)]
    else:
        idx = _stratified(full["labels"] * (len(group_names) + 1) + full["groups"] + 1, _fractions(cfg["split"]),
                          cfg["seed"])
    return dict(splits={s: _take(full, i) for s, i in zip(SPLITS, idx)}, classes=classes, groups=group_names,
                attributes=[], criterion=None, skipped=skipped)


AAF_NAME = re.compile(r"^(\d{5})A(\d{2})\.\w+$")  # serial number, age: 00000-07380 are women, 07381-13321 men


def aaf_source(cfg):
    """All-Age-Faces: the `aligned faces/` folder (or the data set folder holding it). Label = gender from the serial
    number (0 female, 1 male); attrs Male and Age; seeded stratified splits."""
    root = _need_dir(cfg["root"])
    inner = os.path.join(root, "aligned faces")
    folder = inner if os.path.isdir(inner) else root
    names = [f for f in _list_files(folder) if os.sep not in f]
    if not names:
        raise DataError(f"no files in {folder}")
    skipped = [dict(file=f, reason="name is not NNNNNAyy.ext (serial, age)") for f in names if not AAF_NAME.match(f)]
    names = [f for f in names if AAF_NAME.match(f)]
    if not names:
        raise DataError(f"no All-Age-Faces images (named like 00000A02.jpg) in {folder}")
    images, kept = _read_images([os.path.join(folder, f) for f in names], names, cfg["size"], "images", skipped=skipped)
    serial_age = np.array([[int(x) for x in AAF_NAME.match(names[i]).groups()] for i in kept], np.int64)
    male = (serial_age[:, 0] >= 7381).astype(np.int64)
    full = dict(images=images, labels=male, groups=np.full(len(kept), -1, np.int64),
                attrs=np.stack([male, serial_age[:, 1]], 1).astype(np.uint8))
    idx = _stratified(male, _fractions(cfg["split"]), cfg["seed"])
    return dict(splits={s: _take(full, i) for s, i in zip(SPLITS, idx)}, classes=["female", "male"], groups=[],
                attributes=["Male", "Age"], criterion=None, skipped=skipped)


ADIENCE_COLUMNS = ("user_id", "original_image", "face_id", "gender")


def adience_source(cfg):
    """Adience (gender): ROOT/fold_{0..4}_data.txt (tab-separated, with a header) and the aligned faces at
    ROOT/aligned/<user_id>/landmark_aligned_face.<face_id>.<original_image>. Label = gender (0 female, 1 male), no
    group; rows with gender u or empty are skipped and counted. Splits are the benchmark's folds, which are disjoint
    in people (a random split would put photos of one person in train and test): test = fold test_fold, val = fold
    val_fold, train = the other three. attrs: Male and the fold."""
    root = _need_dir(cfg["root"])
    folds = (cfg["val_fold"], cfg["test_fold"])
    if not {*folds} <= set(range(5)) or folds[0] == folds[1]:
        raise DataError(f"--val_fold and --test_fold want two different folds in 0..4, got {folds[0]} and {folds[1]}")
    aligned = _need_dir(os.path.join(root, "aligned"))
    names, male, fold, skipped = [], [], [], []
    for k in range(5):
        path = os.path.join(root, f"fold_{k}_data.txt")
        if not os.path.isfile(path):
            raise DataError(f"fold file not found: {path}")
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        if not rows or not set(ADIENCE_COLUMNS) <= set(rows[0]):
            raise DataError(f"{path}: expected a tab-separated header with {', '.join(ADIENCE_COLUMNS)}")
        for r in rows:
            name = os.path.join(r["user_id"].strip(), f"landmark_aligned_face.{r['face_id'].strip()}."
                                                      f"{r['original_image'].strip()}")
            gender = (r["gender"] or "").strip()
            if gender not in ("f", "m"):
                skipped.append(dict(file=name, reason=f"gender {gender or 'empty'!r} in {os.path.basename(path)}"))
                continue
            names.append(name)
            male.append(gender == "m")
            fold.append(k)
    print(f"adience: {len(skipped)} rows without a gender (u or empty) skipped, {len(names)} kept")
    if not names:
        raise DataError(f"no rows with gender f or m in the fold files under {root}")
    found = [os.path.isfile(os.path.join(aligned, nm)) for nm in names]
    if not any(found):
        raise DataError(f"none of the {len(names)} faces with a gender in the fold files is under {aligned}")
    skipped += [dict(file=nm, reason="listed in a fold file, not in aligned/") for nm, f in zip(names, found) if not f]
    names, male, fold = ([v for v, f in zip(col, found) if f] for col in (names, male, fold))
    images, kept = _read_images([os.path.join(aligned, nm) for nm in names], names, cfg["size"], "images",
                                skipped=skipped)
    male, fold = np.array(male, np.int64)[kept], np.array(fold, np.int64)[kept]
    full = dict(images=images, labels=male, groups=np.full(len(kept), -1, np.int64),
                attrs=np.stack([male, fold], 1).astype(np.uint8))
    idx = [np.flatnonzero(~np.isin(fold, folds)), np.flatnonzero(fold == folds[0]), np.flatnonzero(fold == folds[1])]
    return dict(splits={s: _take(full, i) for s, i in zip(SPLITS, idx)}, classes=["female", "male"], groups=[],
                attributes=["Male", "Fold"], criterion=None, skipped=skipped)


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


def celeba_source(cfg, scratch):
    """CelebA, 40 attributes kept, label and group by attribute expressions, the official partition. The only source
    that needs `scratch` (a folder for its memory-mapped images: ~4 GB at 80x80)."""
    root, size = cfg["root"], cfg["size"]
    if not root:
        splits, names, skipped = _celeba_parquet(download_celeba(cfg["revision"]), size, scratch)
    elif os.path.isdir(root) and any(f.endswith(".parquet") for f in _list_files(root)):
        shards = {}
        for f in _list_files(root):
            if f.endswith(".parquet") and _parquet_split(f):
                shards.setdefault(_parquet_split(f), []).append(os.path.join(root, f))
        if set(shards) != set(SPLITS):
            raise DataError(f"{root}: need train-*, valid-* and test-*.parquet shards, found {sorted(shards)}")
        splits, names, skipped = _celeba_parquet(shards, size, scratch)
    else:
        splits, names, skipped = _celeba_official(_need_dir(root), size, scratch)
    for split in splits.values():
        split["labels"], split["groups"], classes, groups = _labels_from_attrs(split["attrs"], names, cfg["criterion"],
                                                                              cfg["group"])
    return dict(splits=splits, classes=classes, groups=groups, attributes=names, criterion=cfg["criterion"],
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
    with data._keep_torch_threads():
        from ffcv.fields import IntField, NDArrayField, RGBImageField
        from ffcv.writer import DatasetWriter
    fields = dict(image=RGBImageField(write_mode="raw"), label=IntField(), group=IntField())
    if "attrs" in split:
        fields["attrs"] = NDArrayField(np.dtype("uint8"), (split["attrs"].shape[1],))
    # 2 MiB pages: each writer process pads its last page, so small pages keep small files small
    DatasetWriter(path, fields, page_size=1 << 21, num_workers=min(data._cores(), 8)).from_indexed_dataset(
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


def write_dataset(ds, folder, source, cfg):
    """Write the three splits and meta.json into `folder`; meta records the build's config (bar out_dir, force)."""
    sizes = {ds["splits"][s]["images"].shape[1:3] for s in SPLITS}
    assert len(sizes) == 1, sizes
    meta = dict(source=source, criterion=ds["criterion"], classes=ds["classes"], groups=ds["groups"],
                attributes=ds["attributes"], image_size=list(sizes.pop()), splits={},
                args={k: v for k, v in cfg.items() if k not in ("out_dir", "force")})
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


# ----------------------------------------------------------------------------------------------------------------
# The command line: each source with its defaults

SOURCES = dict(synthetic=(synthetic_source, SYNTHETIC), celeba=(celeba_source, CELEBA),
               challenge=(challenge_source, CHALLENGE), folder=(folder_source, FOLDER), aaf=(aaf_source, AAF),
               adience=(adience_source, ADIENCE))


def parse(source, argv):
    """A source's --key=value arguments -> its config dict (configurator's rules; --help prints the keys)."""
    defaults = SOURCES[source][1]
    required = ["out_dir"] + (["root"] if "root" in defaults and source != "celeba" else [])
    return configurator.parse(argv, defaults, __file__, aliases={a: k for a, k in ALIASES.items() if k in defaults},
                              required=required)


def build(source, cfg):
    """Build `source` into cfg["out_dir"] via a temporary folder next to it, renamed only when everything is
    written. -> meta.json's contents."""
    out = os.path.abspath(cfg["out_dir"])
    if os.path.exists(out) and not cfg["force"]:
        raise DataError(f"{cfg['out_dir']} already exists; pass --force to rebuild it")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=os.path.dirname(out))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should be an ordinary folder
    try:
        fn = SOURCES[source][0]
        ds = fn(cfg, scratch=tmp) if fn is celeba_source else fn(cfg)
        meta = write_dataset(ds, tmp, source, cfg)
        for f in os.listdir(tmp):  # scratch memmaps
            if f.endswith(".npy"):
                os.remove(os.path.join(tmp, f))
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left behind on failure (a no-op after the rename)
    return meta

