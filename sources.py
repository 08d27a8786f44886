"""
Where the data sets come from. `python data.py SOURCE --key=value ...` builds one: the source returns its splits in
memory, build() writes OUT_DIR/{train,val,test}.beton and meta.json (the format is data.py's) into a hidden temporary
folder next to it, renamed at the very end; --force swaps an existing OUT_DIR for the new one so that a data set is
always either the old one or the new one, whole. Whatever a killed build leaves (its temporary folder, or the old
version moved aside) is finished or removed by the next build of the same OUT_DIR, which says so. Bad input ends in
one DataError line before anything is written. Sources:

    synthetic   procedurally drawn faces with CelebA's hidden rule, Blond_Hair XOR Eyeglasses (offline)
    celeba      CelebA: flwrlabs/celeba from the Hub (pinned revision), or --root with the official files or shards
    challenge   the 2023 challenge folder: train/, test/, train.txt
    folder      class-per-subfolder trees (mask / no-mask, ...), groups from an optional CSV
    aaf         All-Age-Faces "aligned faces/" (label = gender, from the file name)
    adience     Adience "aligned/" and fold_0..4_data.txt (label = gender; the subject-disjoint folds are the splits)
"""

import ast
import codecs
import csv
import errno
import hashlib
import io
import json
import math
import os
import queue
import re
import shutil
import sys
import tempfile
import time
import traceback
import types
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


_WORD = re.compile(r"\w+")
_KEYWORDS = ("and", "or", "not")


def parse_criterion(expr, names):
    """Compile a boolean expression of attribute names into f({name: bool array}) -> bool array. The expression is
    parsed with `ast` and only names and & | ^ ~ not and or are accepted: nothing is ever eval'd. Every word but the
    keywords is renamed to a placeholder before parsing, so names Python would not take (CelebA's 5_o_Clock_Shadow)
    work too, and messages name the words as written."""
    words = []

    def placeholder(m):
        if m[0] in _KEYWORDS:
            return m[0]
        words.append(m[0])
        return f"_{len(words) - 1}"

    try:
        tree = ast.parse(_WORD.sub(placeholder, expr), mode="eval")
    except SyntaxError:
        raise DataError(f"cannot parse the criterion {expr!r}") from None
    word = lambda node: words[int(node.id[1:])]
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES):
            raise DataError(f"criterion {expr!r}: only attribute names and & | ^ ~ not and or are allowed")
        if isinstance(node, ast.Name) and word(node) not in names:
            raise DataError(f"criterion {expr!r}: unknown attribute {word(node)!r} (known: {' '.join(names)})")

    def ev(node, attrs):
        if isinstance(node, ast.Name):
            return np.asarray(attrs[word(node)], bool)
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
    classes = [f"not {criterion}" if _WORD.fullmatch(criterion) else f"not ({criterion})", criterion]
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
    for i in tqdm(range(0, len(attrs), chunk), desc="drawing faces", unit="chunk", mininterval=1, leave=False,
                  disable=None):
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

def _read_images(sources, names, size, desc, out=None, skipped=None, where=None):
    """Decode many images with a thread pool (PIL releases the GIL while decoding and resizing). Unreadable ones are
    skipped and listed in `skipped`. Returns (images [k, size, size, 3] (a view of `out` when given), kept indices).
    where: the folder or label file they come from; when given, a non-empty list with no readable image is an error
    that names it (rather than an empty split further on)."""
    out = np.empty((len(sources), size, size, 3), np.uint8) if out is None else out
    kept, first_bad = [], None
    with ThreadPoolExecutor(data._cores()) as pool:
        results = pool.map(partial(data.decode_image, size=size), sources)
        for i, img in enumerate(tqdm(results, total=len(sources), desc=desc, unit="img", leave=False, disable=None)):
            if isinstance(img, str):
                skipped.append(dict(file=names[i], reason=img))
                first_bad = first_bad or (names[i], img)
            else:
                out[len(kept)] = img
                kept.append(i)
    if where is not None and first_bad and not kept:
        raise DataError(f"none of the {len(sources)} files from {where} is a readable image (the first, "
                        f"{first_bad[0]}: {first_bad[1]})")
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
    """Fractions in 0..1 that sum to 1 (to within 0.01: 0.33,0.33,0.34 is fine) -> exactly 1."""
    if min(vals) < 0 or max(vals) > 1 or abs(sum(vals) - 1) > 0.01:
        raise DataError(f"--{key}={','.join(map(str, vals))}: {len(vals)} fractions in 0..1 that sum to 1")
    return [v / sum(vals) for v in vals]


def _read_text(path):
    """A label file's text: UTF-8 (a leading byte-order mark is dropped), else Latin-1, which is said."""
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(f"{path} is UTF-16 text; save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        print(f"note: {path} is not UTF-8 (byte {e.start}); read it as Latin-1")
        return raw.decode("latin-1")


def _relative(name, where, folder):
    """A path from a label file (`where`), normalised; refused when absolute or leading out of `folder` (../)."""
    norm = os.path.normpath(name)
    if os.path.isabs(norm) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
        raise DataError(f"{where}: {name!r} is outside {folder}; listed images must be inside it")
    return norm


def _need_space(folder, need, what):
    """Refuse early what would fill the disk (FFCV's writer and memory-mapped scratch files die on a full disk)."""
    free = shutil.disk_usage(folder).free
    if free < need:
        raise DataError(f"not enough free space in {os.path.dirname(folder)}: {what} needs about "
                        f"{need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free; free some space or choose another "
                        "--out_dir")


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
    genre 1 is taken as men (CelebA's Male convention). A stratified label x group validation split, seeded. A row
    listed twice is kept once (said); the same image with other labels is refused."""
    root = _need_dir(cfg["root"])
    train_dir, test_dir = _need_dir(os.path.join(root, "train")), _need_dir(os.path.join(root, "test"))
    txt = os.path.join(root, "train.txt")
    if not os.path.isfile(txt):
        raise DataError(f"label file not found: {txt}")
    rows, twice = {}, 0  # name -> (label, genre, line number)
    for lineno, line in enumerate(_read_text(txt).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3 or parts[1] not in ("-1", "1") or parts[2] not in ("-1", "1"):
            raise DataError(f"{txt}:{lineno}: expected 'image<TAB>label<TAB>genre' with -1/1 values, "
                            f"got {line.strip()!r}")
        name = _relative(parts[0], f"{txt}:{lineno}", train_dir)
        if name in rows:
            if rows[name][:2] != (parts[1], parts[2]):
                raise DataError(f"{txt}:{lineno}: {name} is listed again with other labels (line {rows[name][2]}: "
                                f"{' '.join(rows[name][:2])}, here: {parts[1]} {parts[2]})")
            twice += 1
            continue
        rows[name] = (parts[1], parts[2], lineno)
    if not rows:
        raise DataError(f"{txt} lists no images")
    if twice:
        print(f"challenge: {txt} lists {twice} images more than once with the same labels; each is kept once")
    names = list(rows)
    labels, genres = [rows[nm][0] == "1" for nm in names], [rows[nm][1] == "1" for nm in names]
    missing = [nm for nm in names if not os.path.isfile(os.path.join(train_dir, nm))]
    if missing:
        raise DataError(f"{txt} does not match the images: {len(missing)} listed files are not in {train_dir} "
                        f"(first: {missing[0]})")
    skipped = []
    size = cfg["size"]
    images, kept = _read_images([os.path.join(train_dir, nm) for nm in names], names, size, "train images",
                                skipped=skipped, where=txt)
    labels, groups = np.array(labels, np.int64)[kept], np.array(genres, np.int64)[kept]
    full = dict(images=images, labels=labels, groups=groups)
    train_idx, val_idx = _stratified(labels * 2 + groups, [1 - cfg["val_frac"], cfg["val_frac"]], cfg["seed"])
    test_names = _list_files(test_dir)
    if not test_names:
        raise DataError(f"no images in {test_dir}")
    test_images, test_kept = _read_images([os.path.join(test_dir, nm) for nm in test_names], test_names, size,
                                          "test images", skipped=skipped, where=test_dir)
    unknown = np.full(len(test_kept), -1, np.int64)
    test = dict(images=test_images, labels=unknown, groups=unknown, files=[test_names[i] for i in test_kept])
    return dict(splits=dict(train=_take(full, train_idx), val=_take(full, val_idx), test=test), classes=["-1", "1"],
                groups=["women", "men"], attributes=[], criterion=None, skipped=skipped)


def _read_group_csv(path, root):
    """CSV with a header `path,group` (path relative to --root) -> {path: group name}."""
    if not os.path.isfile(path):
        raise DataError(f"group file not found: {path}")
    rows = list(csv.DictReader(io.StringIO(_read_text(path), newline="")))
    if not rows or not {"path", "group"} <= set(rows[0]):
        raise DataError(f"{path}: expected a CSV with a header 'path,group' and one row per image")
    table = {}
    for lineno, r in enumerate(rows, 2):
        name, group = _relative(r["path"] or "", f"{path}:{lineno}", root), (r["group"] or "").strip()
        if table.get(name, group) != group:
            raise DataError(f"{path}:{lineno}: {name} is listed again with another group")
        table[name] = group
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
    if len(classes) < 2:
        raise DataError(f"one class subfolder in {tops[0]} ({classes[0]}): a classifier needs two or more, one per "
                        "class")
    table = _read_group_csv(cfg["groups"], root) if cfg["groups"] else {}
    group_names = sorted(set(table.values()))
    gid = {g: i for i, g in enumerate(group_names)}
    skipped = []
    images, kept = _read_images([os.path.join(root, f) for f in files], files, cfg["size"], "images", skipped=skipped,
                                where=root)
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
    images, kept = _read_images([os.path.join(folder, f) for f in names], names, cfg["size"], "images", skipped=skipped,
                                where=folder)
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
        rows = list(csv.DictReader(io.StringIO(_read_text(path), newline=""), delimiter="\t"))
        if not rows or not set(ADIENCE_COLUMNS) <= set(rows[0]):
            raise DataError(f"{path}: expected a tab-separated header with {', '.join(ADIENCE_COLUMNS)}")
        for lineno, r in enumerate(rows, 2):
            name = os.path.join((r["user_id"] or "").strip(), f"landmark_aligned_face.{(r['face_id'] or '').strip()}."
                                                              f"{(r['original_image'] or '').strip()}")
            name = _relative(name, f"{path}:{lineno}", aligned)
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
                                skipped=skipped, where=aligned)
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
    for f in tqdm(sorted(listing, key=lambda f: f.path), desc="celeba shards", unit="shard", disable=None):
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
    try:
        schema = pq.read_schema(shards["train"][0])  # the 40 attributes: every bool column (or -1/1 ints, bar the id)
        files = {split: [pq.ParquetFile(p) for p in shards[split]] for split in SPLITS}
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"a CelebA parquet shard is not readable ({type(e).__name__}: {e})") from None
    if "image" not in schema.names:
        raise DataError(f"{shards['train'][0]}: no image column; not a flwrlabs/celeba shard")
    attr_names = [f.name for f in schema if pa.types.is_boolean(f.type) or (pa.types.is_integer(f.type) and f.name
                  not in ("celeb_id", "__index_level_0__"))]
    rows = {split: sum(f.metadata.num_rows for f in files[split]) for split in SPLITS}
    _need_space(scratch, sum(rows.values()) * size * size * 3, "the decoded images")
    skipped, splits = [], {}
    for split in SPLITS:
        n = rows[split]
        images = np.lib.format.open_memmap(os.path.join(scratch, f"{split}.npy"), "w+", np.uint8, (n, size, size, 3))
        attrs, k = np.empty((n, len(attr_names)), np.uint8), 0
        for f in files[split]:
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
    lines = [(k, ln.split()) for k, ln in enumerate(_read_text(attr_txt).splitlines(), 1) if ln.strip()]
    if len(lines) < 3 or len(lines[0][1]) != 1 or not lines[0][1][0].isdigit():
        raise DataError(f"{attr_txt}: expected the number of images, a line of attribute names, then one row per "
                        f"image ({'an empty file' if not lines else f'{len(lines)} non-empty lines'})")
    attr_names, rows = lines[1][1], lines[2:]
    if int(lines[0][1][0]) != len(rows):
        raise DataError(f"{attr_txt}: line 1 says {lines[0][1][0]} images, the file has {len(rows)} rows")
    for lineno, r in rows:
        if len(r) != len(attr_names) + 1 or not {*r[1:]} <= {"-1", "1", "0"}:
            raise DataError(f"{attr_txt}:{lineno}: expected a file name and {len(attr_names)} values of -1 or 1, got "
                            f"{' '.join(r)[:80]!r}")
    partition = {}
    for lineno, ln in enumerate(_read_text(part_txt).splitlines(), 1):
        if not ln.strip():
            continue
        parts = ln.split()
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise DataError(f"{part_txt}:{lineno}: expected 'image.jpg 0|1|2' (train, val, test), got {ln.strip()!r}")
        name = _relative(parts[0], f"{part_txt}:{lineno}", img_dir)
        if partition.setdefault(name, int(parts[1])) != int(parts[1]):
            raise DataError(f"{part_txt}:{lineno}: {name} is listed again in another split")
    names = [_relative(r[0], f"{attr_txt}:{lineno}", img_dir) for lineno, r in rows]
    if len(set(names)) != len(names):
        raise DataError(f"{attr_txt} lists {len(names) - len(set(names))} images more than once")
    missing = [nm for nm in names if nm not in partition or not os.path.isfile(os.path.join(img_dir, nm))]
    if missing:
        raise DataError(f"the label files do not match the images: {len(missing)} listed images are missing from "
                        f"{img_dir} or from {part_txt} (first: {missing[0]})")
    attrs = np.array([[v == "1" for v in r[1:]] for _, r in rows], np.uint8)
    which = np.array([partition[nm] for nm in names])
    _need_space(scratch, len(names) * size * size * 3, "the decoded images")
    skipped, splits = [], {}
    for s, split in enumerate(SPLITS):
        idx = np.flatnonzero(which == s)
        out = np.lib.format.open_memmap(os.path.join(scratch, f"{split}.npy"), "w+", np.uint8,
                                        (len(idx), size, size, 3))
        images, kept = _read_images([os.path.join(img_dir, names[i]) for i in idx], [names[i] for i in idx], size,
                                    f"celeba {split}", out=out, skipped=skipped, where=img_dir)
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


def _writer_layout(split):
    """-> (page size, worker count) for one split's file: a page holds at least one sample (FFCV cannot spread one
    over pages), and there are no more workers than chunks of 256 rows (each worker pads its last page)."""
    item = int(np.prod(split["images"].shape[1:])) + (split["attrs"].shape[1] if "attrs" in split else 0)
    page = max(1 << 21, 1 << (item - 1).bit_length())  # 2 MiB pages keep small files small
    return page, max(1, min(data._cores(), 8, -(-len(split["labels"]) // 256)))


def _beton_bytes(split):
    """An upper bound of the size of the file write_beton makes: the header and metadata pages, the data pages
    (samples never straddle pages, each worker pads its last one) and the allocation table."""
    n = len(split["labels"])
    page, workers = _writer_layout(split)
    item = int(np.prod(split["images"].shape[1:])) + (split["attrs"].shape[1] if "attrs" in split else 0)
    return (-(-(4096 + 64 * n) // page) + -(-n // (page // item)) + workers) * page + 64 * n


def write_beton(path, split):
    """One split -> FFCV file: image (raw uint8 RGB, native size), label, group (int), attrs (uint8 vector) if any."""
    with data._keep_torch_threads():
        from ffcv.fields import IntField, NDArrayField, RGBImageField
        from ffcv.writer import DatasetWriter
    fields = dict(image=RGBImageField(write_mode="raw"), label=IntField(), group=IntField())
    if "attrs" in split:
        fields["attrs"] = NDArrayField(np.dtype("uint8"), (split["attrs"].shape[1],))
    page, workers = _writer_layout(split)
    writer = DatasetWriter(path, fields, page_size=page, num_workers=workers)
    writer._write_common = types.MethodType(_ffcv_write, writer)  # FFCV's loop, with dying workers noticed
    writer.from_indexed_dataset(_Rows(split), chunksize=256)


def _writer_worker(errors, work_fn, *args):
    """One FFCV writer worker: an error goes to the parent (the errno of an OS error, else the traceback) instead of
    a traceback on stderr, and the worker exits with 1."""
    try:
        work_fn(*args)
    except BaseException as e:
        errors.put((e.errno if isinstance(e, OSError) else None, traceback.format_exc()))
        sys.exit(1)


def _ffcv_write(self, num_samples, queue_content, work_fn, extra_worker_args):
    """FFCV 1.0.2's DatasetWriter._write_common with its failure modes closed. FFCV's waits for a sample count that
    a dead worker (a full disk, a failing sample, the OOM killer) never reaches, so the parent waited forever; here
    the parent watches the workers and ends with the first one's error, workers report errors rather than print
    tracebacks, and the workers, queues and shared memory are cleaned up whatever happens."""
    import ctypes
    import multiprocessing as mp

    from ffcv.memory_allocator import MemoryAllocator
    self.num_samples = num_samples
    self.prepare()  # the header, and the shared block the workers write the metadata into
    processes, work = [], mp.Queue()
    try:
        for todo in queue_content:
            work.put(todo)
        for _ in range(self.num_workers):
            work.put(None)
        reports, errors, done = mp.Queue(), mp.SimpleQueue(), mp.Value(ctypes.c_uint64, 0)
        allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
        args = (work, self.metadata_sm, self.metadata_type, self.fields, allocator, done, reports, *extra_worker_args)
        processes = [mp.Process(target=_writer_worker, args=(errors, work_fn, *args)) for _ in range(self.num_workers)]
        for p in processes:
            p.start()
        table, reported = [], 0
        with tqdm(total=num_samples, desc=os.path.basename(self.fname), unit="img", leave=False, disable=None) as bar:
            while reported < len(processes):
                try:  # each worker reports its allocations once it has written its last page
                    table.extend(reports.get(timeout=1 if all(p.exitcode == 0 for p in processes) else 0.02))
                    reported += 1
                except queue.Empty:
                    if all(p.exitcode == 0 for p in processes):
                        raise RuntimeError(f"FFCV's writer workers for {self.fname} ended without reporting") from None
                bar.update(done.value - bar.n)
                failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
                if failed or not errors.empty():
                    code, text = errors.get() if not errors.empty() else (None, "")
                    if code is not None:
                        raise OSError(code, os.strerror(code), self.fname)
                    if text:
                        raise RuntimeError(f"FFCV's writer failed on {self.fname}:\n{text}")
                    raise DataError(f"FFCV's writer process died writing {os.path.basename(self.fname)} (exit code "
                                    f"{failed[0]}{': killed, out of memory?' if failed[0] == -9 else ''})")
        if done.value != num_samples:
            raise RuntimeError(f"FFCV's writer wrote {done.value} of {num_samples} samples of {self.fname}")
        self.finalize(table)
    finally:
        for p in processes:
            if p.is_alive():
                p.terminate()
            if p.pid is not None:
                p.join()
        work.cancel_join_thread()  # what is left in the queue when a worker failed must not block the exit
        work.close()
        self.metadata_sm.close()
        self.metadata_sm.unlink()


def _cells(labels, groups):
    pairs, counts = np.unique(np.stack([labels, groups], 1), axis=0, return_counts=True)
    return [dict(label=int(lab), group=int(g), n=int(c)) for (lab, g), c in zip(pairs, counts)]


def _split_hash(split):
    """The split's content hash, as data.content_hash defines it (what data.py verifies a .beton against)."""
    blocks = lambda arr: (arr[i: i + 4096] for i in range(0, len(arr), 4096))  # images may be a multi-GB memmap
    return data.content_hash(blocks(split["images"]), split["labels"], split["groups"],
                             blocks(split["attrs"]) if "attrs" in split else None)


def write_dataset(ds, folder, source, cfg):
    """Write the three splits and meta.json into `folder`; meta records the build's config (bar out_dir, force), each
    file's size and content hash. meta.json is written last, and atomically: a folder with one is whole."""
    sizes = {ds["splits"][s]["images"].shape[1:3] for s in SPLITS}
    assert len(sizes) == 1, sizes
    meta = dict(source=source, criterion=ds["criterion"], classes=ds["classes"], groups=ds["groups"],
                attributes=ds["attributes"], image_size=list(sizes.pop()), splits={},
                args={k: v for k, v in cfg.items() if k not in ("out_dir", "force")})
    for s in SPLITS:
        if len(ds["splits"][s]["labels"]) == 0:
            raise DataError(f"split {s!r} would be empty; give more images or other --split fractions")
    _need_space(folder, sum(_beton_bytes(ds["splits"][s]) for s in SPLITS) + (1 << 20), "the data set")
    for s in SPLITS:
        split, path = ds["splits"][s], os.path.join(folder, f"{s}.beton")
        write_beton(path, split)
        meta["splits"][s] = dict(n=len(split["labels"]), labelled=bool((split["labels"] >= 0).all()),
                                 cells=_cells(split["labels"], split["groups"]), bytes=os.path.getsize(path),
                                 sha256=_split_hash(split))
        if "files" in split:  # the challenge's test order, for submissions
            meta["splits"][s]["files"] = split["files"]
    meta["content_hash"] = hashlib.sha256("".join(meta["splits"][s]["sha256"] for s in SPLITS).encode()).hexdigest()
    meta["n_skipped"], meta["skipped"] = len(ds["skipped"]), ds["skipped"]
    with open(os.path.join(folder, "meta.json.part"), "w") as fh:
        json.dump(meta, fh, indent=1)
    os.replace(os.path.join(folder, "meta.json.part"), os.path.join(folder, "meta.json"))
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


def check_config(cfg):
    """The bounds a type cannot express, checked before any work: a DataError naming the key and what it takes."""
    def refuse(key, allowed):
        value = ",".join(map(str, cfg[key])) if isinstance(cfg[key], tuple) else cfg[key]
        raise DataError(f"--{key}={value}: {allowed}")

    if not 8 <= cfg["size"] <= 1024:
        refuse("size", "the stored image side in pixels, 8 to 1024")
    for key in ("noise", "both", "glasses_share", "shift"):
        if key in cfg and not 0 <= cfg[key] <= 1:
            refuse(key, "a fraction in 0..1")
    if "val_frac" in cfg and not 0 < cfg["val_frac"] < 1:
        refuse("val_frac", "a fraction between 0 and 1, both excluded")
    for key in ("split", "cells"):
        if key in cfg:
            _fractions(cfg[key], key)
    if "n" in cfg and cfg["n"] < 1:
        refuse("n", "a number of images, 1 or more")
    if "seed" in cfg and cfg["seed"] < 0:
        refuse("seed", "0 or more")


def _check_classes(ds):
    """A classifier needs two classes: a build whose train split holds one (a one-folder tree, a constant criterion,
    a label file with one label) is refused now, not when training fails on it."""
    labels = np.asarray(ds["splits"]["train"]["labels"])
    present = np.unique(labels[labels >= 0])
    if len(present) >= 2:
        return
    which = f"every image is {ds['classes'][present[0]]!r}" if len(present) else "no image has a label"
    why = (f"--criterion={ds['criterion']!r} has the same value on every image" if ds["criterion"] else
           "check the class folders or the label file")
    raise DataError(f"the train split holds one class ({which}): a classifier needs two; {why}")


def _leftovers(out):
    """Hidden folders next to `out` that builds of it made: [(path, kind, pid)], kind "build" (a build's temporary
    folder) or "old" (the version a --force rebuild moved aside), pid the building process (None: a temporary folder
    of an older data.py, which did not record it)."""
    parent, name = os.path.split(out)
    pattern = re.compile(rf"^\.{re.escape(name)}\.(?:(build|old)-(\d+)-\w+|[a-z0-9_]{{8}})\.tmp$")
    found = []
    for entry in sorted(os.listdir(parent)):
        m = pattern.match(entry)
        if m and os.path.isdir(os.path.join(parent, entry)):
            found.append((os.path.join(parent, entry), m[1] or "build", int(m[2]) if m[2] else None))
    return found


def _gone(path, pid):
    """Is the build that made `path` over: its process gone (an older data.py's folder: untouched for an hour)?"""
    if pid is None:
        return time.time() - os.path.getmtime(path) > 3600
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    return False


def _whole(folder):
    """Is `folder` a finished build (meta.json is written last; every file it lists there, at its size)?"""
    try:
        data.read_meta(folder, verify="size")
        return True
    except (OSError, ValueError, KeyError):
        return False


def _drop_scratch(folder):
    for f in os.listdir(folder):  # celeba's memory-mapped images
        if f.endswith(".npy"):
            os.remove(os.path.join(folder, f))


def _recover(out):
    """Finish or remove what killed builds of `out` left next to it (their processes are gone). -> one line per
    thing done, for the user."""
    notes, left = [], [(p, kind, pid) for p, kind, pid in _leftovers(out) if _gone(p, pid)]
    builds = [x for x in left if x[1] == "build"]
    for old, _, pid in (x for x in left if x[1] == "old"):
        if os.path.isdir(out):  # killed after the swap: the old version only waited to be deleted
            shutil.rmtree(old)
            notes.append(f"removed the previous version of {out} that a --force rebuild killed before its end "
                         f"(pid {pid}) had moved aside")
            continue
        new = next((x for x in builds if x[2] == pid and _whole(x[0])), None)
        if new:  # killed between the two renames of the swap: the new version is whole, so finish it
            builds.remove(new)
            _drop_scratch(new[0])
            os.replace(new[0], out)
            shutil.rmtree(old)
            notes.append(f"finished the --force rebuild of {out} that was killed (pid {pid}) while swapping in the "
                         "new version: it is in place now, the old one removed")
        else:
            os.replace(old, out)
            notes.append(f"restored {out}: a --force rebuild killed before its end (pid {pid}) had moved it aside")
    for path, _, _ in builds:
        shutil.rmtree(path, ignore_errors=True)
    if builds:
        notes.append(f"removed {len(builds)} temporary folder{'s' * (len(builds) > 1)} left by killed builds of {out}: "
                     f"{', '.join(os.path.basename(p) for p, _, _ in builds)}")
    return notes


def _swap(tmp, out):
    """Move the finished build in. A first build is one rename. A --force rebuild moves the old version aside (to a
    hidden .NAME.old-PID-*.tmp), the new one in, then deletes the old one: `out` is a whole data set at every instant
    but the one between the two renames, and a kill there leaves both versions whole for the next build to finish
    (_recover). Any other failure of the second rename puts the old version back."""
    if not os.path.exists(out):
        os.replace(tmp, out)
        return
    parent, name = os.path.split(out)
    old = os.path.join(parent, f".{name}.old-{os.getpid()}-{time.time_ns()}.tmp")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)  # if this is cut short, the next build removes the rest


def _os_error(e, out_dir):
    """An OSError of a build -> its one line (a full disk says what to do)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device of {os.path.dirname(os.path.abspath(out_dir))} while writing "
                f"{os.path.basename(e.filename or '') or 'the data set'} of {out_dir}; free some space or choose "
                "another --out_dir")
    return f"{e.strerror or type(e).__name__}: {e.filename}" if e.filename else f"{type(e).__name__}: {e}"


def build(source, cfg):
    """Build `source` into cfg["out_dir"] via a temporary folder next to it, swapped in only when everything is
    written (see _swap); first finish or remove what killed builds of the same out_dir left. -> meta.json's
    contents."""
    check_config(cfg)
    out = os.path.abspath(cfg["out_dir"])
    parent, name = os.path.split(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"--out_dir={cfg['out_dir']} is a file, not a folder")
    try:
        os.makedirs(parent, exist_ok=True)
        for note in _recover(out):
            print(note)
        if os.path.isdir(out):
            if not cfg["force"]:
                raise DataError(f"{cfg['out_dir']} already exists; pass --force to rebuild it")
            if os.listdir(out) and not os.path.isfile(os.path.join(out, "meta.json")):
                raise DataError(f"{cfg['out_dir']} holds other things than a data set (no meta.json): --force "
                                "replaces data sets only; choose another --out_dir")
        tmp = tempfile.mkdtemp(prefix=f".{name}.build-{os.getpid()}-", suffix=".tmp", dir=parent)
    except OSError as e:
        raise DataError(f"--out_dir={cfg['out_dir']}: cannot write there ({_os_error(e, cfg['out_dir'])})") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should be an ordinary folder
    try:
        fn = SOURCES[source][0]
        ds = fn(cfg, scratch=tmp) if fn is celeba_source else fn(cfg)
        _check_classes(ds)
        meta = write_dataset(ds, tmp, source, cfg)
        _drop_scratch(tmp)
        _swap(tmp, out)
    except OSError as e:
        raise DataError(_os_error(e, cfg["out_dir"])) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left behind on failure (a no-op after the swap)
    return meta
