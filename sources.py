"""
Where the data sets come from. `python data.py SOURCE --key=value ...` (data.py forwards to main() here) builds one:
the source returns its splits in memory (the layout: above SOURCES), and beton.atomic_build writes
OUT_DIR/{train,val,test}.beton and meta.json (the format is data.py's) so that OUT_DIR is always a whole data set,
the old one or the new one (--force), never half of one; what a killed build leaves, the next build finishes or
removes, and says so. Bad input ends in one DataError line before anything is written. Sources:

    synthetic   procedurally drawn faces with CelebA's hidden rule, Blond_Hair XOR Eyeglasses (offline; faces.py)
    celeba      CelebA: flwrlabs/celeba from the Hub (pinned revision), or --root with the official files or shards
    challenge   the 2023 challenge folder: train/, test/, train.txt
    folder      class-per-subfolder trees (mask / no-mask, ...), groups from an optional CSV; --split_by=identity keeps
                each person (RMFD's ROOT/<class>/<person>/) in one split
    aaf         All-Age-Faces "aligned faces/" (label = gender, from the file name)
    adience     Adience "aligned/" and fold_0..4_data.txt (label = gender; the subject-disjoint folds are the splits)
    fairface    FairFace: HuggingFaceM4/FairFace from the Hub (pinned revision), or --root with the released images and
                fairface_label_{train,val}.csv; gender, 9 age bins, 7 race groups (by default: gender across race)
    utkface     UTKFace's flat folder of age_gender_race_date.jpg.chip.jpg (gender, 9 age bins, 5 race groups)
    csv         any labelled set as a CSV: a path and a label column, optional group, attribute and split columns
    mafa        MAFA's photos and .mat face boxes (needs scipy): every labelled face cropped, no mask / mask by NVIDIA's
                rule (python data.py mafa --help)
    merge       built data sets as one, each image's set kept as the attribute `source`:
                python data.py merge data/mafa "data/aaf:no mask" --out_dir=data/mask

Labels and groups of the sources with attributes (synthetic, celeba, fairface, utkface; mafa's and merge's groups)
are attribute expressions (data.py's labels_from_attrs and groups_from_attrs): --group=Male gives 2 groups,
--group=Race one per race, and --group=Male*Young the 4 intersections (ids mixed radix, the first factor most
significant: 0 = women & not Young). Every build ends by printing its classes with their image counts.
"""

import collections
import csv
import inspect
import io
import math
import os
import re

import numpy as np

import beton
import celeba
import configurator
import data
import faces
import fairface
import mafa
from beton import DataError, decode_images, list_files, need_dir, need_space, read_text, relative_path
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
    criterion="Blond_Hair ^ Eyeglasses",  # label: attribute names with & | ^ ~ not and or (e.g. Male), or as --group
    group="Male",  # groups: an expression (Male: women, men), a categorical attribute, a product (Male*Young), none
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
    skin_tones=0,  # 2-8 tone bins kept as the attribute Skin (0: none), the darkest rare and dim; --group=Skin
    **ATTRIBUTES,
    **SPLIT,
)
CELEBA = dict(
    **OUTPUT,
    root="",  # the source's folder (required; celeba, fairface: empty downloads from the Hub; csv: the CSV's folder)
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
    group_names="",  # the groups' names in id order, e.g. "adult,child"; empty: women/female/f = 0, men/male/m = 1
    classes="",  # the class folders to read, in label order, e.g. "no mask,mask" (empty: every folder, sorted)
    split_by="image",  # image|identity: identity keeps each person (the folder under a class folder) in one split
    **SPLIT,
)
AAF = dict(**OUTPUT, root="", **SPLIT)
ADIENCE = dict(
    **OUTPUT,
    root="",
    val_fold=3,  # the fold (0-4) held out for validation
    test_fold=4,  # the fold (0-4) held out for test; the benchmark's cross-validation rotates it
)
FAIRFACE = dict(
    **OUTPUT,
    root="",
    margin="0.25",  # the Hub's crop around the face: 0.25|1.25 (tight or with context; --root: the images there)
    revision=fairface.FAIRFACE_REVISION,
    criterion="Male",
    group="Race",
    val_frac=0.1,
    seed=0,
)
UTKFACE = dict(
    **OUTPUT,
    root="",
    criterion="Male",
    group="Race",
    **SPLIT,
)
CSV = dict(
    **OUTPUT,
    csv="",  # the CSV file (required): a header row, then one row per image
    root="",
    path_column="path",  # the column of image paths
    label_column="label",  # the column of labels: its distinct values, sorted, are the classes; blank: row skipped
    group_column="",  # optional column of groups: women/female/f = 0, men/male/m = 1, others need --group_names
    group_names="",  # the group column's names in id order, e.g. "adult,child"; blank cells: unknown
    attribute_columns="",  # optional columns kept as categorical attributes, e.g. age,skin (for --group_by later)
    split_column="",  # optional column of train/val/test per row; empty: a seeded --split stratified by label x group
    **SPLIT,
)
MAFA = dict(
    **OUTPUT,
    root="",
    enlarge=1.3,  # a face's square: its box's longer side times this, about the box's centre, fitted in the photo
    group="none",
    val_frac=0.1,
    seed=0,
)
MERGE = dict(
    out_dir="",
    force=False,
    group="",  # merge: empty keeps the inputs' groups (they must agree); none; or an expression, e.g. source
)
ALIASES = {"out": "out_dir", "target": "criterion"}
CHOICES = {"margin": ("0.25", "1.25"), "split_by": ("image", "identity")}
HUB_SOURCES = ("celeba", "fairface")  # without --root they download; csv's --root defaults to the CSV's folder


# ----------------------------------------------------------------------------------------------------------------
# Labels and groups: from attributes by --criterion and --group (data.py's expressions), or from names in a file

def _labels_and_groups(attrs, names, values, cfg):
    """-> labels, groups (int64, -1 unknown), class names, group names ([] for --group=none)."""
    labels, classes = data.labels_from_attrs(cfg["criterion"], attrs, names, values)
    groups, group_names = data.groups_from_attrs(cfg["group"], attrs, names, values)
    return labels, groups, classes, group_names


GENDER_NAMES = (("women", "woman", "female", "f"), ("men", "man", "male", "m"))


def _listed(names, most=4):
    """The first `most` names for a message, comma-separated, with ", ..." when there are more."""
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def group_ids(names, order="", where="the groups"):
    """Group names, one per image, as a file spells them -> (ids int64, group names by id); a blank name is unknown
    (-1). With `order` (--group_names=a,b,c) each name's id is its place in that list, and a name not in it is
    refused. Without, only gender names have a fixed id: women/woman/female/f (any case) = 0, men/man/male/m = 1,
    and a file with any other name is refused, because sorting would give its ids an arbitrary meaning."""
    names = [nm.strip() for nm in names]
    found = sorted({nm for nm in names if nm})
    if not found and not order:
        return np.full(len(names), -1, np.int64), []
    if order:
        order = [nm.strip() for nm in order.split(",")]
        if "" in order or len(set(order)) < len(order):
            raise DataError(f"--group_names={','.join(order)}: a blank name or a name given twice")
        index = {nm: i for i, nm in enumerate(order)}
        why = lambda shown: f"group names not in --group_names: {shown}"
    else:
        index = {nm: k for nm in found for k, spells in enumerate(GENDER_NAMES) if nm.lower() in spells}
        # a file's own spelling names its group when it spells it one way; else (or when absent) ours
        order = [own[0] if len(own := [nm for nm in found if index.get(nm) == k]) == 1 else spells[0]
                 for k, spells in enumerate(GENDER_NAMES)]
        why = lambda shown: (f"cannot place the group names {shown}: only women/female/f (0) and men/male/m (1) have "
                             f"a fixed id; give each name its id with --group_names={','.join(found[:6])} (id order)")
    if stray := [repr(nm) for nm in found if nm not in index]:
        raise DataError(f"{where}: {why(_listed(stray, 6))}")
    return np.array([index.get(nm, -1) for nm in names], np.int64), list(order)


# ----------------------------------------------------------------------------------------------------------------
# The synthetic faces (drawn by faces.py)

def synthetic_source(cfg, scratch=None):
    """Procedurally drawn faces (offline, faces.py): attributes per label x gender cell, the label by `criterion`
    (the challenge's rule by default), label noise on train and val only. --skin_tones=K adds the categorical
    attribute Skin (K tone bins, the darkest rarer and dimly lit): --group=Skin gives K groups."""
    cells = _fractions(cfg["cells"], "cells")
    sizes = faces.cell_counts(_fractions(cfg["split"]), cfg["n"])
    tones = cfg["skin_tones"]
    names = list(faces.SYNTH_ATTRS) + ([faces.SKIN_ATTR] if tones else [])
    values = {faces.SKIN_ATTR: faces.tone_names(tones)} if tones else {}
    splits = {}
    for k, (split, n) in enumerate(zip(SPLITS, sizes)):
        rng = np.random.default_rng([cfg["seed"], k])
        attrs = faces.synth_attributes(n, rng, cells, cfg["glasses_share"], cfg["both"], tones)
        images = faces.draw_faces(attrs, rng, cfg["size"], cfg["shift"] if split == "test" else 0.0, skin_tones=tones)
        labels, groups, classes, group_names = _labels_and_groups(attrs, names, values, cfg)
        if split != "test":  # noisy labels for training and model selection, the clean rule for the final score
            flip = rng.random(n) < cfg["noise"]  # to any other class (1 - label for two), drawn last
            labels = np.where(flip, (labels + rng.integers(1, len(classes), n)) % len(classes), labels)
        splits[split] = dict(images=images, labels=labels, groups=groups, attrs=attrs)
    return dict(splits=splits, classes=classes, groups=group_names, attributes=names, attribute_values=values,
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


def _cell_keys(labels, groups):
    """One key per label x group cell (either may be -1, unknown), for _stratified."""
    return np.unique(np.stack([labels, groups], 1), axis=0, return_inverse=True)[1].reshape(-1)


def _parts(labels, groups, fracs, seed):
    """Each row's part 0..len(fracs)-1 (train, val, test), stratified by label x group (_stratified)."""
    part = np.empty(len(labels), np.int64)
    for k, idx in enumerate(_stratified(_cell_keys(labels, groups), fracs, seed)):
        part[idx] = k
    return part


def _unit_parts(units, keys, fracs, seed):
    """Each row's part 0..len(fracs)-1 (train, val, test) with all the rows of a unit (a person's images, a photo's
    faces) in one part: the units in a seeded random order, each to the part furthest below its share of the unit's
    cells (keys: label x group, as _cell_keys). Every cell's parts come within about a unit's size of the fractions."""
    unit_of = np.unique(units, return_inverse=True)[1].reshape(-1)
    cell_of = np.unique(keys, return_inverse=True)[1].reshape(-1)
    rows = np.zeros((unit_of.max() + 1, cell_of.max() + 1))  # rows per unit x cell
    np.add.at(rows, (unit_of, cell_of), 1)
    want = np.outer(fracs, rows.sum(0))  # rows per part x cell
    have, part = np.zeros_like(want), np.empty(len(rows), np.int64)
    closed = np.array(fracs) == 0
    for u in np.random.default_rng(seed).permutation(len(rows)):
        short = ((want - have) / np.maximum(want, 1)) @ rows[u]  # each part's shortfall, in this unit's cells
        part[u] = np.argmax(np.where(closed, -np.inf, short))
        have[part[u]] += rows[u]
    return part[unit_of]


def _take(split, idx):
    return {k: (v[idx] if isinstance(v, np.ndarray) else v) for k, v in split.items()}


def _decode_splits(chunks, split_of, names, rows, size, scratch, skipped, where):
    """Decode a table's images straight into its splits: chunks yields (row positions, image sources: paths or bytes)
    over the rows in order; split_of: each row's split (0 train, 1 val, 2 test); rows: the per-row arrays (labels,
    groups, attrs). Each split's images go to a memory-mapped file in scratch, in row order (FairFace at 224x224 is
    15 GB); unreadable images are skipped and listed. -> {split: dict(images, **rows at the readable rows)}"""
    counts = np.bincount(split_of, minlength=len(SPLITS))
    need_space(scratch, int(counts.sum()) * size * size * 3, "the decoded images")
    out = [np.lib.format.open_memmap(os.path.join(scratch, f"{s}.npy"), "w+", np.uint8, (int(c), size, size, 3))
           if c else np.empty((0, size, size, 3), np.uint8) for s, c in zip(SPLITS, counts)]
    kept, first = [[np.zeros(0, np.int64)] for _ in SPLITS], len(skipped)
    for pos, sources in chunks:
        for k, split in enumerate(SPLITS):
            sel = np.flatnonzero(split_of[pos] == k)
            if len(sel):
                filled = sum(map(len, kept[k]))
                _, ok = decode_images([sources[i] for i in sel], [names[pos[i]] for i in sel], size,
                                      f"{split} images", out=out[k][filled:], skipped=skipped)
                kept[k].append(pos[sel[ok]])
    kept = [np.concatenate(k) for k in kept]
    if len(split_of) and not sum(map(len, kept)):
        raise DataError(f"none of the {len(split_of)} images from {where} is readable (the first, "
                        f"{skipped[first]['file']}: {skipped[first]['reason']})")
    return {s: dict(images=out[k][:len(kept[k])], **{key: v[kept[k]] for key, v in rows.items()})
            for k, s in enumerate(SPLITS)}


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
    train_idx, val_idx = _stratified(_cell_keys(labels, groups), [1 - cfg["val_frac"], cfg["val_frac"]], cfg["seed"])
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


FOLDER_MAX_CLASSES = 10  # more folders than this is a tree of people (RWMFD's 23, RMFD's 525), not of classes


def _class_folders(top, wanted):
    """The class folders under `top`, in label order: those --classes names (`wanted`, comma-separated), or else
    every folder, sorted, refused when the tree does not look like one folder per class: MAFA's root, more than
    FOLDER_MAX_CLASSES folders, or numbers like 0001 (people's folders)."""
    found = sorted(d for d in os.listdir(top) if os.path.isdir(os.path.join(top, d)) and d[0] != ".")
    if wanted:
        names = [c.strip() for c in wanted.split(",")]
        missing = [c for c in names if c not in found]
        if missing or len(set(names)) < len(names):
            why = f"no folder {missing[0]!r}" if missing else "a class named twice"
            raise DataError(f"--classes={wanted}: {why} in {top} (its folders: {_listed(found) or 'none'})")
        return names
    if not found:
        raise DataError(f"no class subfolders in {top}")
    named = lambda what: f"{top} {what}; name the class folders to read, in label order, with --classes=a,b"
    if any(d.endswith("-images") or d.startswith("MAFA-Label-") for d in found):
        raise DataError(named(f"looks like MAFA's root ({_listed(found)}): build it with python data.py mafa --root="
                              f"{top}, which crops the faces"))
    if len(found) > FOLDER_MAX_CLASSES or all(d.isdecimal() and len(d) >= 3 for d in found):
        raise DataError(named(f"holds {len(found)} folders ({_listed(found)}): more than {FOLDER_MAX_CLASSES}, or "
                              "numbers like 0001, look like a folder per person, not per class; point --root at the "
                              "folder above the class folders (with --split_by=identity when each class folder holds "
                              "a folder per person)"))
    return found


def folder_source(cfg, scratch=None):
    """Class-per-subfolder trees: ROOT/<class>/**/image, or ROOT/{train,val,test}/<class>/** when already split.
    The classes are the folders, sorted, or those --classes names, in its order (class 0 first); a tree that looks
    like MAFA's root or like a folder per person (more than 10 folders, or names like 0001) is refused without it.
    Groups come from an optional CSV (`path,group`), numbered by group_ids: women/woman/female/f = 0,
    men/man/male/m = 1, any other names by their place in --group_names; a blank group or an image the CSV does not
    list is unknown.
    Splits are seeded and stratified by label x group: by image, or with --split_by=identity by person, the folder
    directly under a class folder (RMFD: AFDB_face_dataset/<person>/, AFDB_masked_face_dataset/<person>/), so that
    no person is in two splits (one name under two classes is one person); images directly in a class folder then
    have no person and are skipped."""
    root = need_dir(cfg["root"])
    presplit = os.path.isdir(os.path.join(root, "train"))
    by_person = cfg["split_by"] == "identity"
    if presplit and by_person:
        raise DataError(f"{root} is already split into train/, val/ and test/, which --split_by=identity would not "
                        "change; it splits a tree ROOT/<class>/<person>/")
    tops = [os.path.join(root, s) for s in SPLITS] if presplit else [root]
    for top in tops:
        need_dir(top, "split folder")
    classes = _class_folders(tops[0], cfg["classes"])
    files, labels, people, skipped = [], [], [], []
    part = []  # which of `tops` each file came from
    for t, top in enumerate(tops):
        for k, cls in enumerate(classes):
            cls_dir = os.path.join(top, cls)
            found = list_files(cls_dir) if os.path.isdir(cls_dir) else []
            if by_person:
                skipped += [dict(file=os.path.join(cls, f), reason="not in a person's folder (--split_by=identity)")
                            for f in found if os.sep not in f]
                found = [f for f in found if os.sep in f]
            files += [os.path.relpath(os.path.join(cls_dir, f), root) for f in found]
            labels += [k] * len(found)
            people += [f.split(os.sep)[0] for f in found]
            part += [t] * len(found)
    if not files:
        raise DataError(f"no files in the class folders under {root}" + (" (in person folders)" if by_person else ""))
    if len(classes) < 2:
        raise DataError(f"one class subfolder in {tops[0]} ({classes[0]}): a classifier needs two or more, one per "
                        "class")
    if cfg["group_names"] and not cfg["groups"]:
        raise DataError("--group_names names the groups of a --groups file; give one")
    table = _read_group_csv(cfg["groups"], root) if cfg["groups"] else {}
    groups, group_names = group_ids([table.get(os.path.normpath(f), "") for f in files], cfg["group_names"],
                                    cfg["groups"])  # before decoding: a file of names we cannot place fails at once
    images, kept = decode_images([os.path.join(root, f) for f in files], files, cfg["size"], "images", skipped=skipped,
                                 where=root)
    groups = groups[kept]
    full = dict(images=images, labels=np.array(labels, np.int64)[kept], groups=groups)
    if presplit:
        idx = [np.flatnonzero(np.array(part)[kept] == t) for t in range(3)]
    elif by_person:
        people = np.array(people)[kept]
        parts = _unit_parts(people, _cell_keys(full["labels"], groups), _fractions(cfg["split"]), cfg["seed"])
        idx = [np.flatnonzero(parts == k) for k in range(len(SPLITS))]
        print(f"folder: {len(set(people))} people, {' / '.join(str(len(set(people[i]))) for i in idx)} in "
              f"{' / '.join(SPLITS)}")
    else:
        idx = _stratified(_cell_keys(full["labels"], full["groups"]), _fractions(cfg["split"]), cfg["seed"])
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
            if any(r[c] is None for c in ADIENCE_COLUMNS):  # csv gives None for the fields a cut-off line lacks
                skipped.append(dict(file=f"{os.path.basename(path)}:{lineno}",
                                    reason=f"malformed row: {sum(v is not None for v in r.values())} of "
                                           f"{len(r)} fields"))
                continue
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
    malformed = sum(s["reason"].startswith("malformed") for s in skipped)
    print(f"adience: {len(skipped) - malformed} rows without a gender (u or empty) and {malformed} malformed rows "
          f"skipped, {len(names)} kept")
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
        split["labels"], split["groups"], classes, groups = _labels_and_groups(split["attrs"], names, {}, cfg)
    return dict(splits=splits, classes=classes, groups=groups, attributes=names, criterion=cfg["criterion"],
                skipped=skipped)


# ----------------------------------------------------------------------------------------------------------------
# The field's fairness face sets (FairFace, UTKFace) and any labelled set listed in a CSV. Each reads its table first,
# splits it by label x group, then decodes the images straight into their splits (_decode_splits)

def fairface_source(cfg, scratch):
    """FairFace (Karkkainen & Joo, 2021): the Hub's HuggingFaceM4/FairFace parquet at a pinned revision (--margin
    0.25 or 1.25; downloaded shard by shard, resumable, size- and sha256-checked), a folder of those shards, or --root
    with the released images and fairface_label_train.csv, fairface_label_val.csv (file,age,gender,race,service_test).
    Attributes Male (1 = men: the Hub's gender 0 = Male and the CSV's Male/Female are remapped, so group 0 is women),
    Age (9 bins), Race (7) and service_test; label and groups by --criterion and --group (default: gender across the 7
    race groups). The released val split is the test split; val is carved from the released train, stratified by
    label x group (--val_frac, seeded). Unreadable and missing images are skipped and counted."""
    values = {"Age": list(fairface.FAIRFACE_AGES), "Race": list(fairface.FAIRFACE_RACES)}
    names = fairface.FAIRFACE_ATTRS
    _labels_and_groups(np.zeros((0, len(names)), np.uint8), names, values, cfg)  # checked before a download
    skipped = []
    chunks, files, attrs, released, where = fairface.load(cfg["root"], cfg["margin"], cfg["revision"], skipped)
    labels, groups, classes, group_names = _labels_and_groups(attrs, names, values, cfg)
    split_of, train = np.full(len(files), 2, np.int64), np.flatnonzero(released == 0)
    split_of[train] = _parts(labels[train], groups[train], [1 - cfg["val_frac"], cfg["val_frac"]], cfg["seed"])
    splits = _decode_splits(chunks, split_of, files, dict(labels=labels, groups=groups, attrs=attrs), cfg["size"],
                            scratch, skipped, where)
    return dict(splits=splits, classes=classes, groups=group_names, attributes=list(names),
                attribute_values=values, criterion=cfg["criterion"], skipped=skipped)


UTKFACE_ATTRS = ("Male", "Age", "Race")
UTKFACE_RACES = ("White", "Black", "Asian", "Indian", "Others")
UTKFACE_SUFFIX = ".jpg.chip.jpg"
AGE_EDGES = (3, 10, 20, 30, 40, 50, 60, 70)  # the first age of FairFace's bins 1..8 (0-2, 3-9, ..., more than 70)


def _utkface_name(name):
    """age_gender_race_date.jpg.chip.jpg -> (age, Male, race), or why the name is not one: a few real names lack the
    race field, carry a space or miss a dot."""
    if not name.endswith(UTKFACE_SUFFIX):
        return f"name does not end in {UTKFACE_SUFFIX}"
    fields = name[: -len(UTKFACE_SUFFIX)].split("_")
    if len(fields) != 4:
        return f"{len(fields)} fields before {UTKFACE_SUFFIX}, not 4 (age_gender_race_date)"
    if not all(f.isdecimal() for f in fields):
        return "a field that is not a number (age_gender_race_date)"
    age, gender, race = map(int, fields[:3])
    if gender > 1 or race >= len(UTKFACE_RACES):
        return f"gender {gender} or race {race} out of range (0-1, 0-{len(UTKFACE_RACES) - 1})"
    return age, 1 - gender, race  # UTKFace's gender 0 is male


def utkface_source(cfg, scratch):
    """UTKFace: the flat folder of age_gender_race_date.jpg.chip.jpg faces (--root: UTKFace/ or the folder holding
    it). Gender 0 = male (stored as Male = 1, so group 0 is women), race 0-4 = White, Black, Asian, Indian, Others.
    Attributes Male, Age (FairFace's 9 bins) and Race; label and groups by --criterion and --group (default: gender
    across the 5 race groups). Files with malformed names (a few real ones lack the race field, carry a space or
    miss a dot) and unreadable images are skipped and counted with the reason; seeded splits stratified by label x
    group."""
    root = need_dir(cfg["root"])
    folder = os.path.join(root, "UTKFace") if os.path.isdir(os.path.join(root, "UTKFace")) else root
    files = [f for f in list_files(folder) if os.sep not in f]
    if not files:
        raise DataError(f"no files in {folder}")
    fields, skipped = {}, []
    for f in files:
        got = _utkface_name(f)
        if isinstance(got, str):
            skipped.append(dict(file=f, reason=got))
        else:
            fields[f] = got
    if not fields:
        raise DataError(f"no UTKFace images (named like 25_0_2_20170116174525125{UTKFACE_SUFFIX}) in {folder}")
    print(f"utkface: {len(skipped)} files with malformed names skipped, {len(fields)} kept")
    names = list(fields)
    age, male, race = np.array(list(fields.values()), np.int64).T
    attrs = np.stack([male, np.searchsorted(AGE_EDGES, age, side="right"), race], 1).astype(np.uint8)
    values = {"Age": list(fairface.FAIRFACE_AGES), "Race": list(UTKFACE_RACES)}
    labels, groups, classes, group_names = _labels_and_groups(attrs, UTKFACE_ATTRS, values, cfg)
    split_of = _parts(labels, groups, _fractions(cfg["split"]), cfg["seed"])
    splits = _decode_splits([(np.arange(len(names)), [os.path.join(folder, nm) for nm in names])], split_of, names,
                            dict(labels=labels, groups=groups, attrs=attrs), cfg["size"], scratch, skipped, folder)
    return dict(splits=splits, classes=classes, groups=group_names, attributes=list(UTKFACE_ATTRS),
                attribute_values=values, criterion=cfg["criterion"], skipped=skipped)


CSV_SPLITS = {"train": 0, "val": 1, "valid": 1, "validation": 1, "test": 2}


def _sorted_values(values):
    """Distinct names in order: as numbers when every one is a number (2 before 10), else as text."""
    values = set(values)
    try:
        return sorted(values, key=lambda v: (float(v), v))
    except ValueError:
        return sorted(values)


def csv_source(cfg, scratch):
    """Any labelled image set listed in a CSV with a header row (--csv=FILE), one row per image; paths relative to
    --root (default: the CSV's folder). Classes are the label column's distinct values, sorted (as numbers when all
    are numbers); rows with a blank label and listed files that are not there are skipped and counted. Optional: a
    group column (group_ids: women/woman/female/f = 0, men/man/male/m = 1, any other names by their place in
    --group_names; blank = unknown), attribute columns kept as categorical attributes (evaluate.py --group_by=NAME
    regroups by them later; blank = unknown) and a split column (train, val or test per row; else a seeded --split
    stratified by label x group)."""
    path = cfg["csv"]
    if not os.path.isfile(path):
        raise DataError(f"CSV file not found: {path}")
    root = need_dir(cfg["root"] or os.path.dirname(os.path.abspath(path)))
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    header = reader.fieldnames or []
    attr_cols = [c.strip() for c in cfg["attribute_columns"].split(",") if c.strip()]
    wanted = [(f"--{k}_column", cfg[f"{k}_column"]) for k in ("path", "label", "group", "split")]
    for key, col in wanted + [("--attribute_columns", c) for c in attr_cols]:
        if col and col not in header:
            raise DataError(f"{path}: no column {col!r} ({key}; the header has: {', '.join(header) or 'nothing'})")
    pc, lc, gc, sc = (col for _, col in wanted)
    names, cells, seen, skipped = [], [], {}, []
    for lineno, r in enumerate(reader, 2):
        where = f"{path}:{lineno}"
        cell = {c: (r[c] or "").strip() for c in [pc, lc, gc, sc, *attr_cols] if c}
        if not cell[pc]:
            raise DataError(f"{where}: no path in column {pc!r}")
        name = relative_path(cell[pc], where, root)
        if name in seen:
            raise DataError(f"{where}: {name} is listed again (line {seen[name]}); one row per image")
        seen[name] = lineno
        if sc and cell[sc].lower() not in CSV_SPLITS:
            raise DataError(f"{where}: split {cell[sc]!r} is not train, val or test (column {sc!r})")
        if not cell[lc]:
            skipped.append(dict(file=name, reason=f"no label (line {lineno})"))
        elif not os.path.isfile(os.path.join(root, name)):
            skipped.append(dict(file=name, reason=f"listed on line {lineno}, not under {root}"))
        else:
            names.append(name)
            cells.append(cell)
    if not names:
        raise DataError(f"{path} lists no image with a label that is under {root}" if seen else f"{path} has no rows")
    classes = _sorted_values(c[lc] for c in cells)
    index = {v: i for i, v in enumerate(classes)}
    labels = np.array([index[c[lc]] for c in cells], np.int64)
    if cfg["group_names"] and not gc:
        raise DataError("--group_names names the values of a --group_column; give one")
    groups, group_names = group_ids([c[gc] for c in cells] if gc else [""] * len(cells), cfg["group_names"],
                                    f"{path} (column {gc!r})")
    values = {col: _sorted_values(c[col] for c in cells if c[col]) for col in attr_cols}
    for col, vals in values.items():
        if len(vals) >= data.UNKNOWN:
            raise DataError(f"{path}: attribute column {col!r} holds {len(vals)} distinct values; at most "
                            f"{data.UNKNOWN - 1} (the code {data.UNKNOWN} means unknown)")
    rows = dict(labels=labels, groups=groups)
    if attr_cols:
        codes = {col: {v: i for i, v in enumerate(vals)} for col, vals in values.items()}
        rows["attrs"] = np.array([[codes[col].get(c[col], data.UNKNOWN) for col in attr_cols] for c in cells],
                                 np.uint8)
    split_of = np.array([CSV_SPLITS[c[sc].lower()] for c in cells], np.int64) if sc else \
        _parts(labels, groups, _fractions(cfg["split"]), cfg["seed"])
    splits = _decode_splits([(np.arange(len(names)), [os.path.join(root, nm) for nm in names])], split_of, names,
                            rows, cfg["size"], scratch, skipped, root)
    return dict(splits=splits, classes=classes, groups=group_names, attributes=attr_cols, attribute_values=values,
                criterion=None, skipped=skipped)


# ----------------------------------------------------------------------------------------------------------------
# The mask sets: MAFA (mafa.py reads its label files) and merged sets (built data sets as one, the set of each image
# kept as the attribute `source`)

def mafa_source(cfg, scratch):
    """MAFA, masked faces in the wild (mafa.py reads it; needs scipy): --root holds train-images/images/,
    test-images/images/, MAFA-Label-Train/LabelTrainAll.mat and MAFA-Label-Test/LabelTestAll.mat. Every annotated
    face is cropped: a square about its box's centre, the box's longer side times --enlarge, shrunk and shifted to
    fit inside the photo, then resized to --size. Classes no mask (0) and mask (1), by NVIDIA's rule
    (github.com/NVIDIA-AI-IOT/face-mask-detection, data_utils/mafa2kitti.py):
        train faces: mask if occ_type != 3 (not a hand) and occ_degree > 2 (3 or more face parts covered);
                     no mask if occ_type == 3 and occ_degree < 2
        test faces:  mask if face_type == 1 (masked) and occ_type != 3 and occ_degree > 2;
                     no mask if face_type == 2 (unmasked)
    Every other face (invalid, a mask over 2 parts or fewer, a hand over more) is skipped and counted with its reason
    in meta.json, as are empty boxes and faces of missing photos. MAFA's train and test split are kept; val is carved
    from train by photo (the faces of one photo stay in one split), stratified by label x group (--val_frac, seeded).
    Attributes occ_type (simple, complex, human body), occ_degree and orientation (left ... right); no groups unless
    --group names an expression of them (e.g. orientation)."""
    skipped = []
    faces = mafa.load(need_dir(cfg["root"]), cfg["enlarge"], skipped)
    labels, attrs, values, names = faces["labels"], faces["attrs"], faces["values"], list(mafa.ATTRS)
    groups, group_names = data.groups_from_attrs(cfg["group"], attrs, names, values)
    split_of, train = np.full(len(labels), 2, np.int64), np.flatnonzero(faces["released"] == 0)
    split_of[train] = _unit_parts(faces["photo"][train], _cell_keys(labels[train], groups[train]),
                                  [1 - cfg["val_frac"], cfg["val_frac"]], cfg["seed"])
    reasons = collections.Counter(s["reason"] for s in skipped)
    print(f"mafa: {len(labels)} faces labelled ({int(labels.sum())} mask), {len(skipped)} skipped; the most common "
          f"reasons: " + "; ".join(f"{n} x {why}" for why, n in reasons.most_common(3)))
    splits = _decode_splits([(np.arange(len(labels)), faces["sources"])], split_of, faces["names"],
                            dict(labels=labels, groups=groups, attrs=attrs), cfg["size"], scratch, skipped, cfg["root"])
    return dict(splits=splits, classes=list(mafa.CLASSES), groups=group_names, attributes=names,
                attribute_values=values, criterion=None, skipped=skipped)


def _merge_inputs(args):
    """merge's arguments DIR or DIR:CLASS -> [(DIR, CLASS or None)]; an argument that is a folder as typed is a DIR
    even with a colon in its name."""
    inputs = []
    for arg in args:
        path, colon, cls = arg.rpartition(":")
        if not colon or os.path.isdir(arg):
            path, cls = arg, None
        elif not cls.strip():
            raise DataError(f"{arg!r}: DIR:CLASS names no class after the colon")
        inputs.append((path, cls and cls.strip()))
    return inputs


def _recode(codes, old, new):
    """Categorical codes into `old` value names -> codes into `new` (a superset); UNKNOWN stays unknown."""
    lut = np.full(256, data.UNKNOWN, np.uint8)
    lut[: len(old)] = [new.index(v) for v in old]
    return lut[codes]


def merge_source(cfg, scratch):
    """Built data sets as one, split by split (train with train, val with val, test with test), each image's set kept
    as the categorical attribute `source`: its folder's name (an input that is itself a merge keeps its images'
    sources), so that evaluate.py --group_by=source shows whether a model tells the sets apart rather than the
    classes. DIR:CLASS labels every image of that set CLASS (masked faces from one set, unmasked from another: merge
    data/mafa "data/aaf:no mask"); without it a set keeps its class names. The classes are the union of the names, in
    first-seen order. The inputs must store one image size (rebuild one with --size). Attributes that every input
    stores are kept (categorical values merged by name), others dropped. The inputs' groups are kept when they all
    have the same; else --group=none, or an expression of the kept attributes (e.g. --group=source), sets them.
    meta.json records each input with its content hash."""
    inputs = _merge_inputs(cfg["inputs"])
    metas = [data.read_meta(d, splits=SPLITS) for d, _ in inputs]
    first, m0, sizes = inputs[0][0], metas[0], [m["image_size"] for m in metas]
    for (d, _), size in zip(inputs, sizes):
        if size != sizes[0]:
            raise DataError(f"{first} stores {sizes[0][0]}x{sizes[0][1]} images, {d} {size[0]}x{size[1]}: rebuild one "
                            f"with --size so that they agree")
    classes = []
    for (_, cls), m in zip(inputs, metas):
        classes += [c for c in ([cls] if cls else m["classes"]) if c not in classes]
    values_of = lambda m: m.get("attribute_values", {})
    merged = ["source" in values_of(m) for m in metas]  # inputs that are merges themselves: their sources are kept
    folders = [os.path.basename(os.path.normpath(d)) for d, _ in inputs]
    twice = [f for i, f in enumerate(folders) if not merged[i] and
             any(f == g for j, g in enumerate(folders) if j != i and not merged[j])]
    if twice:
        raise DataError(f"two inputs are folders named {twice[0]}: the source attribute names each set by its "
                        "folder; rename one")
    kept = [a for a in metas[0]["attributes"] if a != "source" and all(a in m["attributes"] for m in metas) and
            len({a in values_of(m) for m in metas}) == 1]  # in every input, categorical in all or in none
    values = {}
    for a in [a for a in kept if a in values_of(metas[0])] + ["source"]:
        values[a] = []
        for m, f, is_merge in zip(metas, folders, merged):
            own = values_of(m)[a] if a != "source" or is_merge else [f]
            values[a] += [v for v in own if v not in values[a]]
        if len(values[a]) >= data.UNKNOWN:
            raise DataError(f"the inputs' attribute {a} holds {len(values[a])} values together; at most "
                            f"{data.UNKNOWN - 1}")
    names = kept + ["source"]
    dropped = sorted({a for m in metas for a in m["attributes"]} - set(names))
    group_names = m0["groups"]
    if cfg["group"]:  # checked, and its group names, before any image is read
        group_names = data.groups_from_attrs(cfg["group"], np.zeros((0, len(names)), np.uint8), names, values)[1]
    elif any(m["groups"] != m0["groups"] for m in metas):
        which = "; ".join(f"{d}: {', '.join(m['groups']) or 'none'}" for (d, _), m in zip(inputs, metas))
        raise DataError(f"the inputs' groups differ ({which}): pass --group=none, or an expression of the merged "
                        f"attributes ({', '.join(names)}), e.g. --group=source")
    splits = {}
    for s in SPLITS:
        n = sum(m["splits"][s]["n"] for m in metas)
        need_space(scratch, n * 3 * math.prod(sizes[0]), f"the merged {s} images")
        images = np.lib.format.open_memmap(os.path.join(scratch, f"{s}.npy"), "w+", np.uint8, (n, *sizes[0], 3))
        labels, groups, attrs, at = [], [], [], 0
        for (d, cls), m, f, is_merge in zip(inputs, metas, folders, merged):
            x, y, g = (t.numpy() for t in data.load_split(d, s))
            images[at: at + len(y)] = x.transpose(0, 2, 3, 1)
            at += len(y)
            if cls:
                labels.append(np.full(len(y), classes.index(cls), np.int64))
            else:  # each class to its merged index; -1, unlabelled, stays so
                labels.append(np.array([classes.index(c) for c in m["classes"]] + [-1], np.int64)[y])
            groups.append(g)
            a, a_names = data.load_attrs(d, s)
            a = dict(zip(a_names, (np.zeros((len(y), len(a_names)), np.uint8) if a is None else a).T))  # by name
            cols = [_recode(a[k], values_of(m)[k], values[k]) if k in values else a[k] for k in kept]
            cols.append(_recode(a["source"], values_of(m)["source"], values["source"]) if is_merge else
                        np.full(len(y), values["source"].index(f), np.uint8))
            attrs.append(np.stack(cols, 1))
        attrs = np.concatenate(attrs)
        splits[s] = dict(images=images, labels=np.concatenate(labels), attrs=attrs, groups=data.groups_from_attrs(
            cfg["group"], attrs, names, values)[0] if cfg["group"] else np.concatenate(groups))
    both = np.concatenate([np.stack([sp["labels"], sp["attrs"][:, -1]], 1) for sp in splits.values()])
    pairs, counts = np.unique(both, axis=0, return_counts=True)  # the shortcut to look for: a class from one source
    print("merge: class / source " + ", ".join(f"{classes[y] if y >= 0 else 'unlabelled'} / {values['source'][a]} "
                                               f"{n}" for (y, a), n in zip(pairs.tolist(), counts.tolist())))
    criteria = {m.get("criterion") for m in metas}
    if dropped:
        print(f"merge: attributes not stored by every input are dropped: {', '.join(dropped)}")
    return dict(splits=splits, classes=classes, groups=group_names, attributes=names, attribute_values=values,
                criterion=criteria.pop() if len(criteria) == 1 and not any(c for _, c in inputs) else None,
                skipped=[], inputs=[dict(path=d, relabel=cls, source=m.get("source"), classes=m["classes"],
                                         content_hash=m["content_hash"]) for (d, cls), m in zip(inputs, metas)])


# ----------------------------------------------------------------------------------------------------------------
# The command line: each source with its defaults. A source is fn(cfg, scratch) -> ds, the data set in memory that
# beton.write_dataset puts on disk:
#   ds["splits"]: {"train", "val", "test"} -> dict(
#       images=uint8 [n, size, size, 3] (an array, or a memory-mapped file in scratch),
#       labels=int64 [n] (0..C-1; -1 unknown, e.g. the challenge's test split),
#       groups=int64 [n] (0..G-1; -1 unknown),
#       attrs=uint8 [n, A] (optional: the source's attributes, one column per name in ds["attributes"]: 0/1 for a
#           boolean one, the value's index for a categorical one, data.UNKNOWN (255) where not known),
#       files=[n names] (optional: the images' file names, kept in meta.json: the challenge's test order))
#   ds["classes"]: C class names; ds["groups"]: G group names ([] without groups); ds["attributes"]: A names ([]
#   without attrs); ds["attribute_values"] (optional): {name: [value names]} of the categorical attributes;
#   ds["criterion"]: the attribute expression the labels come from, or None; ds["skipped"]: the unreadable or
#   unusable inputs, [{"file": ..., "reason": ...}]; ds["inputs"] (optional, merge): the built sets it was made of.
# scratch: the build's temporary folder, for large intermediate files (*.npy, removed before the swap): celeba's,
# _decode_splits' and merge's memory-mapped images.

SOURCES = dict(synthetic=(synthetic_source, SYNTHETIC), celeba=(celeba_source, CELEBA),
               challenge=(challenge_source, CHALLENGE), folder=(folder_source, FOLDER), aaf=(aaf_source, AAF),
               adience=(adience_source, ADIENCE), fairface=(fairface_source, FAIRFACE),
               utkface=(utkface_source, UTKFACE), csv=(csv_source, CSV), mafa=(mafa_source, MAFA),
               merge=(merge_source, MERGE))


def parse(source, argv):
    """A source's --key=value arguments -> its config dict (configurator's rules; --help prints the keys)."""
    defaults = SOURCES[source][1]
    required = ["out_dir"] + (["root"] if "root" in defaults and source not in (*HUB_SOURCES, "csv") else []) + \
        (["csv"] if "csv" in defaults else [])
    return configurator.parse(argv, defaults, __file__, aliases={a: k for a, k in ALIASES.items() if k in defaults},
                              choices={k: v for k, v in CHOICES.items() if k in defaults}, required=required)


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
    need(["enlarge"], lambda v: 1 <= v <= 4, "the face box's enlargement, 1 to 4")
    need(["seed"], lambda v: v >= 0, "0 or more")
    need(["skin_tones"], lambda v: v == 0 or v in faces.SKIN_TONES,
         f"0 (none) or a number of skin tone bins, {min(faces.SKIN_TONES)} to {max(faces.SKIN_TONES)}")
    if "inputs" in cfg and len(cfg["inputs"]) < 2:
        raise DataError(f"merge needs two or more built data sets, got {len(cfg['inputs'])}: python data.py merge "
                        "DIR[:CLASS] DIR[:CLASS] ... --out_dir=OUT")


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


def class_counts(meta):
    """"no mask 1200, mask 60": a built set's classes with their images over all splits (and the unlabelled)."""
    n = np.zeros(len(meta["classes"]) + 1, np.int64)  # the last: label -1
    for split in meta["splits"].values():
        for c in split["cells"]:
            n[c["label"]] += c["n"]
    return ", ".join([f"{name} {k}" for name, k in zip(meta["classes"], n.tolist())] +
                     [f"unlabelled {n[-1]}"] * bool(n[-1]))


def main(argv):
    """`python data.py SOURCE --key=value ...` (data.py forwards here): build a data set, print its classes and
    cells. merge takes its inputs first: `python data.py merge DIR[:CLASS] ... --key=value ...`."""
    if not argv:
        raise DataError(f"name a source ({', '.join(SOURCES)}) or show (see python data.py --help)")
    if argv[0] in ("-h", "--help"):
        print(f"{data.__doc__.strip()}\n\n{__doc__.strip()}")
        return
    source, rest = argv[0], argv[1:]
    if source not in SOURCES:
        raise DataError(f"unknown source {source!r} (sources: {', '.join(SOURCES)}; or show)")
    if any(a in ("-h", "--help") for a in rest):  # then configurator prints the keys
        usage = "merge DIR[:CLASS] DIR[:CLASS] ..." if source == "merge" else source
        print(f"python data.py {usage} --key=value ...\n{inspect.getdoc(SOURCES[source][0])}\n")
    inputs = []
    while source == "merge" and rest and not rest[0].startswith("-"):
        inputs.append(rest.pop(0))
    cfg = parse(source, rest)
    if source == "merge":
        cfg["inputs"] = inputs
    meta = build(source, cfg)
    for s in SPLITS:
        cells = " ".join(f"{c['label']}/{c['group']}:{c['n']}" for c in meta["splits"][s]["cells"])
        print(f"{s:5s} n={meta['splits'][s]['n']:6d}  label/group cells {cells}")
    print(f"classes: {class_counts(meta)}")
    print(f"wrote {cfg['out_dir']} ({meta['n_skipped']} files skipped, content {meta['content_hash'][:12]})")
