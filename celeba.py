"""
CelebA: the Hub's flwrlabs/celeba parquet at a pinned revision, resumable and size-checked, or the official files with
--root; centre square, area resize, official partition. sources.py's `celeba` source turns what load() returns (the
images and the 40 attributes per split) into labels and groups by its attribute expressions.

    splits, attribute_names, skipped = load(root, revision, size, scratch)   # splits: {split: dict(images, attrs)}

root: empty downloads the shards from the Hub into its cache (beton.hub_parquet); a folder holding train-*, valid-* and
test-*.parquet shards reads those; any other folder must hold the official files (img_align_celeba/,
list_attr_celeba.txt, list_eval_partition.txt, or a celeba/ folder with them: torchvision's layout). The images go to
memory-mapped files in `scratch` (the build's temporary folder): ~4 GB at 80x80.
"""

import os

import numpy as np

import beton
from beton import DataError, decode_images, list_files, need_dir, need_space, read_text, relative_path
from data import SPLITS

CELEBA_REPO = "flwrlabs/celeba"
CELEBA_REVISION = "2d738f56e0e7f925ea36ae7c808ea925264aacec"  # pinned: the images and the official partition
CELEBA_CONFIG = "img_align+identity+attr"
CELEBA_SPLITS = {"train": "train", "valid": "val", "validation": "val", "test": "test"}  # shard name -> split
OFFLINE = ("cannot download CelebA from the Hugging Face Hub ({}). Either pass --root DIR with the official files "
           "(img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt) or the flwrlabs/celeba parquet "
           "shards, or build the offline synthetic set: make data DATA=synthetic")


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
    need_space(scratch, sum(rows.values()) * size * size * 3, "the decoded images")
    skipped, splits = [], {}
    for split in SPLITS:
        n = rows[split]
        images = np.lib.format.open_memmap(os.path.join(scratch, f"{split}.npy"), "w+", np.uint8, (n, size, size, 3))
        attrs, k = np.empty((n, len(attr_names)), np.uint8), 0
        for f in files[split]:
            for batch in f.iter_batches(batch_size=1024, columns=["image", *attr_names]):
                col = batch.column("image")
                blobs, paths = col.field("bytes").to_pylist(), col.field("path").to_pylist()
                got, kept = decode_images(blobs, paths, size, f"celeba {split}", out=images[k:], skipped=skipped)
                a = np.stack([batch.column(nm).to_numpy(zero_copy_only=False) for nm in attr_names], 1)
                attrs[k: k + len(kept)] = a[kept] > 0
                k += len(kept)
        splits[split] = dict(images=images[:k], attrs=attrs[:k])
    return splits, attr_names, skipped


def _celeba_official(root, size, scratch):
    """ROOT (or ROOT/celeba) with img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt."""
    if os.path.isfile(os.path.join(root, "celeba", "list_attr_celeba.txt")):
        root = os.path.join(root, "celeba")  # torchvision's layout
    img_dir = need_dir(os.path.join(root, "img_align_celeba"))
    attr_txt, part_txt = os.path.join(root, "list_attr_celeba.txt"), os.path.join(root, "list_eval_partition.txt")
    for p in (attr_txt, part_txt):
        if not os.path.isfile(p):
            raise DataError(f"label file not found: {p}")
    lines = [(k, ln.split()) for k, ln in enumerate(read_text(attr_txt).splitlines(), 1) if ln.strip()]
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
    for lineno, ln in enumerate(read_text(part_txt).splitlines(), 1):
        if not ln.strip():
            continue
        parts = ln.split()
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise DataError(f"{part_txt}:{lineno}: expected 'image.jpg 0|1|2' (train, val, test), got {ln.strip()!r}")
        name = relative_path(parts[0], f"{part_txt}:{lineno}", img_dir)
        if partition.setdefault(name, int(parts[1])) != int(parts[1]):
            raise DataError(f"{part_txt}:{lineno}: {name} is listed again in another split")
    names = [relative_path(r[0], f"{attr_txt}:{lineno}", img_dir) for lineno, r in rows]
    if len(set(names)) != len(names):
        raise DataError(f"{attr_txt} lists {len(names) - len(set(names))} images more than once")
    missing = [nm for nm in names if nm not in partition or not os.path.isfile(os.path.join(img_dir, nm))]
    if missing:
        raise DataError(f"the label files do not match the images: {len(missing)} listed images are missing from "
                        f"{img_dir} or from {part_txt} (first: {missing[0]})")
    attrs = np.array([[v == "1" for v in r[1:]] for _, r in rows], np.uint8)
    which = np.array([partition[nm] for nm in names])
    need_space(scratch, len(names) * size * size * 3, "the decoded images")
    skipped, splits = [], {}
    for s, split in enumerate(SPLITS):
        idx = np.flatnonzero(which == s)
        out = np.lib.format.open_memmap(os.path.join(scratch, f"{split}.npy"), "w+", np.uint8,
                                        (len(idx), size, size, 3))
        images, kept = decode_images([os.path.join(img_dir, names[i]) for i in idx], [names[i] for i in idx], size,
                                     f"celeba {split}", out=out, skipped=skipped, where=img_dir)
        splits[split] = dict(images=images, attrs=attrs[idx[kept]])
    return splits, attr_names, skipped


def load(root, revision, size, scratch):
    """-> ({split: dict(images=uint8 [n, size, size, 3] memory-mapped in scratch, attrs=uint8 [n, 40])}, the attribute
    names, skipped [{"file", "reason"}]): the Hub's shards at `revision` (root empty), a folder of shards, or the
    official files."""
    if not root:
        paths = beton.hub_parquet(CELEBA_REPO, CELEBA_CONFIG, revision, OFFLINE)
        return _celeba_parquet(beton.shards_by_split(paths, CELEBA_SPLITS), size, scratch)
    if os.path.isdir(root) and any(f.endswith(".parquet") for f in list_files(root)):
        shards = beton.shards_by_split([os.path.join(root, f) for f in list_files(root)], CELEBA_SPLITS)
        if set(shards) != set(SPLITS):
            raise DataError(f"{root}: need train-*, valid-* and test-*.parquet shards, found {sorted(shards)}")
        return _celeba_parquet(shards, size, scratch)
    return _celeba_official(need_dir(root), size, scratch)
