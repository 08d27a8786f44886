"""
FairFace (Karkkainen & Joo, 2021): the Hub's HuggingFaceM4/FairFace parquet at a pinned revision (downloaded shard by
shard, resumable, size- and sha256-checked by beton.hub_parquet), a folder of those shards, or the released images with
fairface_label_train.csv and fairface_label_val.csv. sources.py's `fairface` source turns what load() returns (each
image's attributes and released split) into labels, groups and splits, and decodes the images into them.

    chunks, files, attrs, released, where = load(root, margin, revision, skipped)

attrs: uint8 [n, 4] in FAIRFACE_ATTRS' order, Male (1 = men), Age (9 bins), Race (7), service_test; released: 0 for the
released train split, 1 for the released val split (our test split); chunks: (row positions, image paths or bytes).
"""

import csv
import io
import os

import numpy as np

import beton
from beton import DataError, list_files, need_dir, read_text, relative_path

# HuggingFaceM4/FairFace's main branch as found (commit "Update README.md", after both margins' train and validation
# shards were uploaded): https://huggingface.co/datasets/HuggingFaceM4/FairFace/tree/54d573cdb8b5af490ba8da9da2799628f6e5c496
FAIRFACE_REVISION = "54d573cdb8b5af490ba8da9da2799628f6e5c496"

FAIRFACE_REPO = "HuggingFaceM4/FairFace"
# the Hub's class order (its card: https://huggingface.co/datasets/HuggingFaceM4/FairFace), which the released CSVs
# spell out; the Hub's gender is 0 = Male, 1 = Female, stored here as Male (1 = men) so that group 0 is women
FAIRFACE_AGES = ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70")
FAIRFACE_RACES = ("East Asian", "Indian", "Black", "White", "Middle Eastern", "Latino_Hispanic", "Southeast Asian")
FAIRFACE_ATTRS = ("Male", "Age", "Race", "service_test")
FAIRFACE_CODES = {"gender": ("Female", "Male"), "age": FAIRFACE_AGES, "race": FAIRFACE_RACES,
                  "service_test": ("False", "True")}  # the CSV's columns -> our codes, in FAIRFACE_ATTRS' order
FAIRFACE_SPLITS = {"train": "train", "validation": "test", "val": "test"}  # the released val is our test split
FAIRFACE_OFFLINE = ("cannot download FairFace from the Hugging Face Hub ({}). Either pass --root DIR with the "
                    "released images and fairface_label_train.csv, fairface_label_val.csv, or with the "
                    "HuggingFaceM4/FairFace parquet shards, or build the offline synthetic set: make data "
                    "DATA=synthetic")


def read_csv(root, skipped):
    """ROOT/fairface_label_{train,val}.csv (file,age,gender,race,service_test; file like train/1.jpg, relative to
    ROOT) -> (image paths, names, attrs uint8 [n, 4], released split 0 train / 1 val); listed files that are not
    there are skipped."""
    names, attrs, released = [], [], []
    for k, which in enumerate(("train", "val")):
        path = os.path.join(root, f"fairface_label_{which}.csv")
        if not os.path.isfile(path):
            raise DataError(f"label file not found: {path} (--root holds fairface_label_train.csv, "
                            "fairface_label_val.csv and the images; an empty --root downloads the Hub's copy)")
        reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
        if not {"file", *FAIRFACE_CODES} <= set(reader.fieldnames or ()):
            raise DataError(f"{path}: expected a header file,{','.join(FAIRFACE_CODES)}")
        for lineno, r in enumerate(reader, 2):
            where = f"{path}:{lineno}"
            codes = []
            for col, allowed in FAIRFACE_CODES.items():
                value = (r[col] or "").strip()
                lowered = [a.lower() for a in allowed]
                if value.lower() not in lowered:
                    raise DataError(f"{where}: {col} {value!r} is not one of {', '.join(allowed)}")
                codes.append(lowered.index(value.lower()))
            names.append(relative_path((r["file"] or "").strip(), where, root))
            attrs.append(codes)
            released.append(k)
    found = np.array([os.path.isfile(os.path.join(root, nm)) for nm in names], bool)
    if not found.any():
        raise DataError(f"none of the {len(names)} images the FairFace label files list is under {root}")
    skipped += [dict(file=nm, reason="listed in a label file, not under --root") for nm, f in zip(names, found)
                if not f]
    names = [nm for nm, f in zip(names, found) if f]
    return ([os.path.join(root, nm) for nm in names], names, np.array(attrs, np.uint8)[found],
            np.array(released, np.int64)[found])


def read_parquet(shards):
    """{"train": [paths], "test": [paths]}: the Hub's shards of the released train and val -> (image chunks, names
    shard:row, attrs uint8 [n, 4], released split 0 train / 1 val)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    files, names, attrs, released = [], [], [], []
    for k, which in enumerate(("train", "test")):
        for path in shards[which]:
            try:
                f = pq.ParquetFile(path)
                table = f.read(columns=["gender", "age", "race", "service_test"]) if {
                    "image", *FAIRFACE_CODES} <= set(f.schema_arrow.names) else None
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"a FairFace parquet shard is not readable ({type(e).__name__}: {e})") from None
            cols = None if table is None else [table.column(c).to_numpy(zero_copy_only=False).astype(np.int64)
                                                for c in ("gender", "age", "race", "service_test")]
            if cols is None or any(((c < 0) | (c >= n)).any() for c, n in zip(cols, (2, 9, 7, 2))):
                raise DataError(f"{path}: not a HuggingFaceM4/FairFace shard (columns image, age, gender, race, "
                                "service_test with the card's codes)")
            attrs.append(np.stack([1 - cols[0], *cols[1:]], 1).astype(np.uint8))  # Hub gender 0 = Male
            names += [f"{os.path.basename(path)}:{i}" for i in range(len(table))]
            released += [k] * len(table)
            files.append(f)

    def chunks():
        start = 0
        for f in files:
            for batch in f.iter_batches(batch_size=1024, columns=["image"]):
                blobs = [b or b"" for b in batch.column("image").field("bytes").to_pylist()]  # none: unreadable
                yield np.arange(start, start + len(blobs)), blobs
                start += len(blobs)
    return chunks(), names, np.concatenate(attrs), np.array(released, np.int64)


def load(root, margin, revision, skipped):
    """root: empty downloads the `margin` shards (0.25 or 1.25) from the Hub; a folder holding parquet shards (or a
    snapshot of the Hub repository, with a folder per margin) reads those; any other folder must hold the released
    files. Listed images that are missing are added to `skipped`. -> (chunks, files, attrs, released, where)."""
    if root:  # the shards of one margin (a snapshot of the Hub's repository holds both), or the released files
        folder = os.path.join(root, margin) if os.path.isdir(os.path.join(root, margin)) else need_dir(root)
        shards = [os.path.join(folder, f) for f in list_files(folder) if f.endswith(".parquet")]
        where = folder if shards else root
    else:
        shards = beton.hub_parquet(FAIRFACE_REPO, margin, revision, FAIRFACE_OFFLINE)
        where = f"{FAIRFACE_REPO}/{margin}"
    if not shards:
        paths, files, attrs, released = read_csv(root, skipped)
        return [(np.arange(len(paths)), paths)], files, attrs, released, where
    shards = beton.shards_by_split(shards, FAIRFACE_SPLITS)
    if set(shards) != {"train", "test"}:
        raise DataError(f"{where}: need the train-* and validation-*.parquet shards, found "
                        f"{sorted(shards) or 'neither'}")
    return (*read_parquet(shards), where)
