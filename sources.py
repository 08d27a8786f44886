"""
Where the data sets come from. `python data.py SOURCE --key=value ...` (data.py forwards to main() here) builds one:
the source returns its splits in memory (the layout: above SOURCES), and beton.atomic_build writes
OUT_DIR/{train,val,test}.beton and meta.json (the format is data.py's) so that OUT_DIR is always a whole data set,
the old one or the new one (--force), never half of one; what a killed build leaves, the next build finishes or
removes, and says so. Bad input ends in one DataError line before anything is written. Sources:

    synthetic   procedurally drawn faces with CelebA's hidden rule, Blond_Hair XOR Eyeglasses (offline; faces.py)
    celeba      CelebA: flwrlabs/celeba from the Hub (pinned revision), or --root with the official files or shards
    challenge   the 2023 challenge folder: train/, test/, train.txt
    folder      class-per-subfolder trees (mask / no-mask, ...), groups from an optional CSV
    aaf         All-Age-Faces "aligned faces/" (label = gender, from the file name)
    adience     Adience "aligned/" and fold_0..4_data.txt (label = gender; the subject-disjoint folds are the splits)
"""

import ast
import csv
import inspect
import io
import os
import re

import numpy as np

import beton
import celeba
import configurator
import data
import faces
from beton import DataError, decode_images, list_files, need_dir, read_text, relative_path
from data import SPLITS

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
    revision=celeba.CELEBA_REVISION,  # the Hub revision to download (pinned)
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
# The synthetic faces (drawn by faces.py)

def synthetic_source(cfg, scratch=None):
    """Procedurally drawn faces (offline, faces.py): attributes per label x gender cell, the label by `criterion`
    (the challenge's rule by default), label noise on train and val only."""
    cells = _fractions(cfg["cells"], "cells")
    sizes = faces.cell_counts(_fractions(cfg["split"]), cfg["n"])
    splits = {}
    for k, (split, n) in enumerate(zip(SPLITS, sizes)):
        rng = np.random.default_rng([cfg["seed"], k])
        attrs = faces.synth_attributes(n, rng, cells, cfg["glasses_share"], cfg["both"])
        images = faces.draw_faces(attrs, rng, cfg["size"], cfg["shift"] if split == "test" else 0.0)
        labels, groups, classes, group_names = _labels_from_attrs(attrs, faces.SYNTH_ATTRS, cfg["criterion"],
                                                                  cfg["group"])
        if split != "test":  # noisy labels for training and model selection, the clean rule for the final score
            labels = np.where(rng.random(n) < cfg["noise"], 1 - labels, labels)
        splits[split] = dict(images=images, labels=labels, groups=groups, attrs=attrs)
    return dict(splits=splits, classes=classes, groups=group_names, attributes=list(faces.SYNTH_ATTRS),
                criterion=cfg["criterion"], skipped=[])


# ----------------------------------------------------------------------------------------------------------------
# Splits (the input files are read with beton.py's helpers: decode_images, list_files, read_text, ...)

def _fractions(vals, key="split"):
    """Fractions in 0..1 that sum to 1 (to within 0.01: 0.33,0.33,0.34 is fine) -> exactly 1."""
    if min(vals) < 0 or max(vals) > 1 or abs(sum(vals) - 1) > 0.01:
        raise DataError(f"--{key}={','.join(map(str, vals))}: {len(vals)} fractions in 0..1 that sum to 1")
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


def challenge_source(cfg, scratch=None):
    """The challenge folder: train/*.jpg, test/*.jpg, train.txt (image<TAB>label -1/1<TAB>genre -1/1, no header).
    genre 1 is taken as men (CelebA's Male convention). A stratified label x group validation split, seeded. A row
    listed twice is kept once (said); the same image with other labels is refused."""
    root = need_dir(cfg["root"])
    train_dir, test_dir = need_dir(os.path.join(root, "train")), need_dir(os.path.join(root, "test"))
    txt = os.path.join(root, "train.txt")
    if not os.path.isfile(txt):
        raise DataError(f"label file not found: {txt}")
    rows, twice = {}, 0  # name -> (label, genre, line number)
    for lineno, line in enumerate(read_text(txt).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3 or parts[1] not in ("-1", "1") or parts[2] not in ("-1", "1"):
            raise DataError(f"{txt}:{lineno}: expected 'image<TAB>label<TAB>genre' with -1/1 values, "
                            f"got {line.strip()!r}")
        name = relative_path(parts[0], f"{txt}:{lineno}", train_dir)
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
    images, kept = decode_images([os.path.join(train_dir, nm) for nm in names], names, size, "train images",
                                 skipped=skipped, where=txt)
    labels, groups = np.array(labels, np.int64)[kept], np.array(genres, np.int64)[kept]
    full = dict(images=images, labels=labels, groups=groups)
    train_idx, val_idx = _stratified(labels * 2 + groups, [1 - cfg["val_frac"], cfg["val_frac"]], cfg["seed"])
    test_names = list_files(test_dir)
    if not test_names:
        raise DataError(f"no images in {test_dir}")
    test_images, test_kept = decode_images([os.path.join(test_dir, nm) for nm in test_names], test_names, size,
                                           "test images", skipped=skipped, where=test_dir)
    unknown = np.full(len(test_kept), -1, np.int64)
    test = dict(images=test_images, labels=unknown, groups=unknown, files=[test_names[i] for i in test_kept])
    return dict(splits=dict(train=_take(full, train_idx), val=_take(full, val_idx), test=test), classes=["-1", "1"],
                groups=["women", "men"], attributes=[], criterion=None, skipped=skipped)


def _read_group_csv(path, root):
    """CSV with a header `path,group` (path relative to --root) -> {path: group name}."""
    if not os.path.isfile(path):
        raise DataError(f"group file not found: {path}")
    rows = list(csv.DictReader(io.StringIO(read_text(path), newline="")))
    if not rows or not {"path", "group"} <= set(rows[0]):
        raise DataError(f"{path}: expected a CSV with a header 'path,group' and one row per image")
    table = {}
    for lineno, r in enumerate(rows, 2):
        name, group = relative_path(r["path"] or "", f"{path}:{lineno}", root), (r["group"] or "").strip()
        if table.get(name, group) != group:
            raise DataError(f"{path}:{lineno}: {name} is listed again with another group")
        table[name] = group
    missing = [p for p in table if not os.path.isfile(os.path.join(root, p))]
    if missing:
        raise DataError(f"{path} does not match the images: {len(missing)} paths not under {root} "
                        f"(first: {missing[0]})")
    return table


def folder_source(cfg, scratch=None):
    """Class-per-subfolder trees: ROOT/<class>/**/image, or ROOT/{train,val,test}/<class>/** when already split.
    Groups come from an optional CSV (`path,group`; group names in sorted order, e.g. female < male)."""
    root = need_dir(cfg["root"])
    presplit = os.path.isdir(os.path.join(root, "train"))
    tops = [os.path.join(root, s) for s in SPLITS] if presplit else [root]
    for top in tops:
        need_dir(top, "split folder")
    classes = sorted(d for d in os.listdir(tops[0]) if os.path.isdir(os.path.join(tops[0], d)) and d[0] != ".")
    if not classes:
        raise DataError(f"no class subfolders in {tops[0]}")
    files, labels = [], []
    part = []  # which of `tops` each file came from
    for t, top in enumerate(tops):
        for k, cls in enumerate(classes):
            cls_dir = os.path.join(top, cls)
            found = list_files(cls_dir) if os.path.isdir(cls_dir) else []
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
    images, kept = decode_images([os.path.join(root, f) for f in files], files, cfg["size"], "images", skipped=skipped,
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


def aaf_source(cfg, scratch=None):
    """All-Age-Faces: the `aligned faces/` folder (or the data set folder holding it). Label = gender from the serial
    number (0 female, 1 male); attrs Male and Age; seeded stratified splits."""
    root = need_dir(cfg["root"])
    inner = os.path.join(root, "aligned faces")
    folder = inner if os.path.isdir(inner) else root
    names = [f for f in list_files(folder) if os.sep not in f]
    if not names:
        raise DataError(f"no files in {folder}")
    skipped = [dict(file=f, reason="name is not NNNNNAyy.ext (serial, age)") for f in names if not AAF_NAME.match(f)]
    names = [f for f in names if AAF_NAME.match(f)]
    if not names:
        raise DataError(f"no All-Age-Faces images (named like 00000A02.jpg) in {folder}")
    images, kept = decode_images([os.path.join(folder, f) for f in names], names, cfg["size"], "images",
                                 skipped=skipped, where=folder)
    serial_age = np.array([[int(x) for x in AAF_NAME.match(names[i]).groups()] for i in kept], np.int64)
    male = (serial_age[:, 0] >= 7381).astype(np.int64)
    full = dict(images=images, labels=male, groups=np.full(len(kept), -1, np.int64),
                attrs=np.stack([male, serial_age[:, 1]], 1).astype(np.uint8))
    idx = _stratified(male, _fractions(cfg["split"]), cfg["seed"])
    return dict(splits={s: _take(full, i) for s, i in zip(SPLITS, idx)}, classes=["female", "male"], groups=[],
                attributes=["Male", "Age"], criterion=None, skipped=skipped)


ADIENCE_COLUMNS = ("user_id", "original_image", "face_id", "gender")


def adience_source(cfg, scratch=None):
    """Adience (gender): ROOT/fold_{0..4}_data.txt (tab-separated, with a header) and the aligned faces at
    ROOT/aligned/<user_id>/landmark_aligned_face.<face_id>.<original_image>. Label = gender (0 female, 1 male), no
    group; rows with gender u or empty are skipped and counted. Splits are the benchmark's folds, which are disjoint
    in people (a random split would put photos of one person in train and test): test = fold test_fold, val = fold
    val_fold, train = the other three. attrs: Male and the fold."""
    root = need_dir(cfg["root"])
    folds = (cfg["val_fold"], cfg["test_fold"])
    if not {*folds} <= set(range(5)) or folds[0] == folds[1]:
        raise DataError(f"--val_fold and --test_fold want two different folds in 0..4, got {folds[0]} and {folds[1]}")
    aligned = need_dir(os.path.join(root, "aligned"))
    names, male, fold, skipped = [], [], [], []
    for k in range(5):
        path = os.path.join(root, f"fold_{k}_data.txt")
        if not os.path.isfile(path):
            raise DataError(f"fold file not found: {path}")
        rows = list(csv.DictReader(io.StringIO(read_text(path), newline=""), delimiter="\t"))
        if not rows or not set(ADIENCE_COLUMNS) <= set(rows[0]):
            raise DataError(f"{path}: expected a tab-separated header with {', '.join(ADIENCE_COLUMNS)}")
        for lineno, r in enumerate(rows, 2):
            name = os.path.join((r["user_id"] or "").strip(), f"landmark_aligned_face.{(r['face_id'] or '').strip()}."
                                                              f"{(r['original_image'] or '').strip()}")
            name = relative_path(name, f"{path}:{lineno}", aligned)
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
    images, kept = decode_images([os.path.join(aligned, nm) for nm in names], names, cfg["size"], "images",
                                 skipped=skipped, where=aligned)
    male, fold = np.array(male, np.int64)[kept], np.array(fold, np.int64)[kept]
    full = dict(images=images, labels=male, groups=np.full(len(kept), -1, np.int64),
                attrs=np.stack([male, fold], 1).astype(np.uint8))
    idx = [np.flatnonzero(~np.isin(fold, folds)), np.flatnonzero(fold == folds[0]), np.flatnonzero(fold == folds[1])]
    return dict(splits={s: _take(full, i) for s, i in zip(SPLITS, idx)}, classes=["female", "male"], groups=[],
                attributes=["Male", "Fold"], criterion=None, skipped=skipped)


# ----------------------------------------------------------------------------------------------------------------
# CelebA (celeba.py reads its images and attributes; the label and the group are attribute expressions)

def celeba_source(cfg, scratch):
    """CelebA, 40 attributes kept, label and group by attribute expressions, the official partition. The only source
    that needs `scratch` (a folder for its memory-mapped images: ~4 GB at 80x80)."""
    splits, names, skipped = celeba.load(cfg["root"], cfg["revision"], cfg["size"], scratch)
    for split in splits.values():
        split["labels"], split["groups"], classes, groups = _labels_from_attrs(split["attrs"], names, cfg["criterion"],
                                                                              cfg["group"])
    return dict(splits=splits, classes=classes, groups=groups, attributes=names, criterion=cfg["criterion"],
                skipped=skipped)


# ----------------------------------------------------------------------------------------------------------------
# The command line: each source with its defaults. A source is fn(cfg, scratch) -> ds, the data set in memory that
# beton.write_dataset puts on disk:
#   ds["splits"]: {"train", "val", "test"} -> dict(
#       images=uint8 [n, size, size, 3] (an array, or a memory-mapped file in scratch),
#       labels=int64 [n] (0..C-1; -1 unknown, e.g. the challenge's test split),
#       groups=int64 [n] (0..G-1; -1 unknown),
#       attrs=uint8 [n, A] (optional: the source's attributes, one column per name in ds["attributes"]),
#       files=[n names] (optional: the images' file names, kept in meta.json: the challenge's test order))
#   ds["classes"]: C class names; ds["groups"]: G group names ([] without groups); ds["attributes"]: A names ([]
#   without attrs); ds["criterion"]: the attribute expression the labels come from, or None; ds["skipped"]: the
#   unreadable or unusable inputs, [{"file": ..., "reason": ...}].
# scratch: the build's temporary folder, for large intermediate files (*.npy, removed before the swap); only celeba
# uses it.

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
    """The bounds a type cannot express, checked before any work: `error: --key=value: what it takes`."""
    def need(keys, ok, allowed):
        for key in keys:
            if key in cfg:
                configurator.require(cfg, key, ok, allowed)

    need(["size"], lambda v: 8 <= v <= 1024, "the stored image side in pixels, 8 to 1024")
    need(["noise", "both", "glasses_share", "shift"], lambda v: 0 <= v <= 1, "a fraction in 0..1")
    need(["val_frac"], lambda v: 0 < v < 1, "a fraction between 0 and 1, both excluded")
    for key in ("split", "cells"):
        if key in cfg:
            _fractions(cfg[key], key)
    need(["n"], lambda v: v >= 1, "a number of images, 1 or more")
    need(["seed"], lambda v: v >= 0, "0 or more")


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


def build(source, cfg):
    """Build `source` into cfg["out_dir"], as one transaction (beton.atomic_build: the old data set or the new one,
    whole, at every instant). -> meta.json's contents."""
    check_config(cfg)

    def write(folder):
        ds = SOURCES[source][0](cfg, folder)
        _check_classes(ds)
        return beton.write_dataset(ds, folder, source, cfg)

    return beton.atomic_build(cfg["out_dir"], cfg["force"], write)


def main(argv):
    """`python data.py SOURCE --key=value ...` (data.py forwards here): build a data set, print its cells."""
    if not argv:
        raise DataError(f"name a source ({', '.join(SOURCES)}) or show (see python data.py --help)")
    if argv[0] in ("-h", "--help"):
        print(f"{data.__doc__.strip()}\n\n{__doc__.strip()}")
        return
    source, rest = argv[0], argv[1:]
    if source not in SOURCES:
        raise DataError(f"unknown source {source!r} (sources: {', '.join(SOURCES)}; or show)")
    if any(a in ("-h", "--help") for a in rest):  # then configurator prints the keys
        print(f"python data.py {source} --key=value ...\n{inspect.getdoc(SOURCES[source][0])}\n")
    cfg = parse(source, rest)
    meta = build(source, cfg)
    for s in SPLITS:
        cells = " ".join(f"{c['label']}/{c['group']}:{c['n']}" for c in meta["splits"][s]["cells"])
        print(f"{s:5s} n={meta['splits'][s]['n']:6d}  label/group cells {cells}")
    print(f"wrote {cfg['out_dir']} ({meta['n_skipped']} files skipped, content {meta['content_hash'][:12]})")
