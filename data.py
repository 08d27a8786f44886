"""
Face data at run time: the data set format, fast loaders, and the original augmentation drawn per sample and
applied to a whole batch on its device. The command line builds data sets from the sources in sources.py.

    python data.py synthetic --n=20000 --out_dir=data/synthetic   # offline: procedurally drawn faces
    python data.py celeba --out_dir=data/celeba                   # CelebA from the Hub (flwrlabs/celeba), or --root=DIR
    python data.py challenge --root=DIR --out_dir=data/challenge  # the 2023 challenge folder (train/, test/, train.txt)
    python data.py fairface --out_dir=data/fairface               # FairFace from the Hub: gender across 7 race groups
    python data.py synthetic --skin_tones=4 --group=Skin --out_dir=data/tones   # offline, 4 groups, one rare and dim
    python data.py mafa --root=DIR --out_dir=data/mafa            # MAFA's face boxes cropped: no mask / mask (scipy)
    python data.py folder --root=DIR --split_by=identity --out_dir=data/rmfd   # RMFD: no person in two splits
    python data.py merge data/mafa "data/aaf:no mask" --out_dir=data/mask   # one set, attribute source = mafa / aaf
    python data.py SOURCE --help                                  # a source's keys and their defaults
    python data.py show data/demo --augment=full                  # originals beside augmented copies, per cell -> PNG

A data set is a folder: {train,val,test}.beton (FFCV, raw uint8 RGB at native size; fields image, label, group and,
where the source has attributes, attrs) and meta.json (class, group and attribute names, the values of categorical
attributes, counts per label x group cell, skipped files, the build's config, a content hash). Conventions: labels
0..C-1 (-1 unknown); groups 0..G-1 (-1 unknown) named in meta.json "groups", with 0 = women, 1 = men for gender
(--group=Male, a group column of women/men) and gender first in a product (Male*Race: women & each race, then men);
images uint8 NCHW; attrs uint8, one column per name in meta.json "attributes": 0/1 for a boolean attribute, the
value's index for a categorical one (its names in meta.json "attribute_values", {name: [values]}; absent in data sets
built before it), UNKNOWN (255) where the value is not known.
Library: read_meta, load_split, load_labels, load_attrs, summary, make_loader (backends "resident" and "ffcv"),
augment (training) and prepare (evaluation: resize + normalise), AUGMENTS (named augmentation lists); attribute
expressions for labels and groups, at build and evaluation time: parse_criterion, labels_from_attrs,
groups_from_attrs (e.g. "Male", "Race", "Male*Young", "Blond_Hair ^ Eyeglasses").
"""

import ast
import contextlib
import inspect
import io
import json
import math
import os
import re
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F

import configurator
import run

SPLITS = ("train", "val", "test")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# the original solution's eraser colour: (np.random.rand(3) * 255).astype(int) after its seed_everything(42)
ERASE_FILL = (95, 242, 186)


def cores():
    """The cores this process may run on (FFCV's workers, the importers' decoding threads, the benchmarks)."""
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
# Loading

class DataFileError(configurator.UserError):
    """A data set on disk that is not as data.py built it: missing, or a file damaged or changed since the build."""


class DataError(configurator.UserError):
    """A problem with the user's input about data: to a build (missing folder, empty source, bad label file, no
    network, a full disk; the importers in sources.py and celeba.py raise it, beton.py's writer too) or an attribute
    expression (a criterion, a group) that names no stored attribute: one line."""


def read_meta(data_dir, splits=(), verify=None):
    """data_dir/meta.json, once the split files are checked against it. verify="size" checks that every split's file
    is there at the size meta.json records (a stat each); "full" also checks each split's content hash (reading every
    byte, once per file and process); "once" (the default) checks the content hash of a file the first time it is
    read here and again whenever its size or mtime changed (recorded in data_dir/.hashed.json), so a file damaged
    or edited in place to the same size is caught without re-hashing every run; None takes DATA_VERIFY from the
    environment.
    splits: the splits the caller will read, opened and checked now (_open_beton: sample count, fields, image
    sizes, offsets, label range), so a damaged file fails before any work; the loaders reuse that check.
    A missing, damaged or changed data set raises DataFileError, with a one-line message that says what to do."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise DataFileError(_not_a_data_set(data_dir))
    try:
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except ValueError as e:  # not JSON, not UTF-8
        raise DataFileError(f"{path} is not readable JSON ({e}); {_rebuild(data_dir, {})}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("splits"), dict) or "image_size" not in meta or \
            not all(isinstance(v, dict) and "n" in v for v in meta["splits"].values()):
        raise DataFileError(f"{path} is not a data.py meta.json (no splits or image size); {_rebuild(data_dir, {})}")
    verify = verify or os.environ.get("DATA_VERIFY") or "once"
    if verify not in ("size", "once", "full"):
        raise configurator.UserError(f"DATA_VERIFY={verify}: once (the default), size or full")
    before = _hashed_here(data_dir) if verify == "once" else {}
    hashed = dict(before)
    for split, info in meta["splits"].items():
        beton = os.path.join(data_dir, f"{split}.beton")
        if not os.path.isfile(beton):
            raise DataFileError(f"{beton} is missing (meta.json lists split {split!r}); {_rebuild(data_dir, meta)}")
        st = os.stat(beton)
        if "bytes" in info and st.st_size != info["bytes"]:
            raise DataFileError(f"{beton} has {st.st_size} bytes, meta.json records {info['bytes']}: it changed after "
                                f"the build; {_rebuild(data_dir, meta)}")
        if verify == "full" or (verify == "once" and hashed.get(split) != [st.st_size, st.st_mtime_ns]):
            _verify_content(data_dir, split, meta)
            hashed[split] = [st.st_size, st.st_mtime_ns]
    if verify == "once" and hashed != before:
        try:
            run.write_text(os.path.join(data_dir, HASHED), json.dumps(hashed))
        except configurator.UserError:  # a read-only data set (write_text's one line): hashed again next time
            pass
    for split in splits:
        _open_beton(data_dir, split, meta)
    return meta


HASHED = ".hashed.json"  # {split: [size, mtime_ns]} of the files whose content hash was checked in this folder


def _hashed_here(data_dir):
    """The split files of data_dir hashed in full before, as they were then (DATA_VERIFY=once): a file with the
    same size and mtime is trusted without reading it again; one changed in place, even to the same size, is not."""
    try:
        with open(os.path.join(data_dir, HASHED), encoding="utf-8") as fh:
            record = json.load(fh)
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):  # none yet, or damaged: everything is hashed again
        return {}


def temp_folder(name, kind, pid, unique):
    """The name of a hidden folder that a build of data set `name` makes beside it (beton.py): kind "build", the
    temporary folder it writes into, or "old", the version a --force rebuild moves aside; pid the building process.
    What a killed build leaves, the next build finishes or removes, and a reader of a missing data set says why."""
    return f".{name}.{kind}-{pid}-{unique}.tmp"


def parse_temp_folder(entry, name):
    """temp_folder's inverse for data set `name`: a folder name -> (kind, pid), or None for any other name."""
    head, tail = f".{name}.", ".tmp"
    if not (entry.startswith(head) and entry.endswith(tail)):
        return None
    kind, _, rest = entry[len(head): -len(tail)].partition("-")
    pid, _, unique = rest.partition("-")
    return (kind, int(pid)) if kind in ("build", "old") and pid.isdecimal() and unique else None


def _not_a_data_set(data_dir):
    parent, name = os.path.split(os.path.abspath(data_dir))
    build = f"build one with `python data.py SOURCE --out_dir={data_dir}`"
    if os.path.exists(data_dir):
        why = "it is a file" if not os.path.isdir(data_dir) else build
    else:  # a --force rebuild moves the old version aside (temp_folder "old"); a kill there leaves no data_dir
        aside = [f for f in (os.listdir(parent) if os.path.isdir(parent) else ())
                 if (parse_temp_folder(f, name) or ("",))[0] == "old"]
        why = (f"a --force rebuild of it was killed and left it aside as {aside[0]}; run the same data.py command "
               "again to finish it") if aside else f"it does not exist; {build}"
    return f"{data_dir} is not a data.py output (no meta.json): {why}"


def _rebuild(data_dir, meta):
    if "source" not in meta:
        return f"rebuild it: python data.py SOURCE --out_dir={data_dir} --force"
    return (f"rebuild it: python data.py {meta['source']} --out_dir={data_dir} --force (with the options recorded in "
            "its meta.json)")


_OPENED = {}  # (path, size, mtime_ns, its meta.json entry) -> _open_beton's result: checked once per process


def _open_beton(data_dir, split, meta):
    """A split's file, opened and checked against meta.json: the sample count, the fields, raw images of the
    recorded size, every image and attribute vector inside the file, labels and groups in range. -> (path, Reader,
    {field: per-sample metadata}); a file unchanged since its last check here is not read again."""
    if split not in meta["splits"]:
        raise DataFileError(f"no split {split!r} in {data_dir} (have: {', '.join(meta['splits']) or 'none'})")
    path = os.path.join(data_dir, f"{split}.beton")
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, json.dumps(meta["splits"][split], sort_keys=True))
    if key not in _OPENED:
        _OPENED[key] = _check_beton(data_dir, path, split, meta)
    return _OPENED[key]


def _check_beton(data_dir, path, split, meta):
    with _keep_torch_threads():
        from ffcv.reader import Reader
        try:
            reader = Reader(path)
        except Exception as e:  # a damaged header reaches numpy and FFCV in many ways
            raise DataFileError(f"{path} is not a readable .beton ({type(e).__name__}: {e}); "
                                f"{_rebuild(data_dir, meta)}") from None
    md = {name: reader.metadata[f"f{i}"] for i, name in enumerate(reader.field_names)}
    size, n, (h, w) = os.path.getsize(path), meta["splits"][split]["n"], meta["image_size"]
    problem = None
    if reader.num_samples != n or len(reader.metadata) != n:
        problem = f"{len(reader.metadata)} samples, meta.json records {n}"
    elif not {"image", "label", "group"} <= set(md):
        problem = f"fields {', '.join(md)}"
    elif n and ((md["image"]["mode"] != 1).any() or (md["image"]["height"] != h).any() or
                (md["image"]["width"] != w).any()):
        problem = f"images that are not all raw {h}x{w}"
    elif n and md["image"]["data_ptr"].max() + h * w * 3 > size:
        problem = "images beyond the end of the file"
    elif "attrs" in md and n and md["attrs"].max() + reader.handlers["attrs"].element_size > size:
        problem = "attributes beyond the end of the file"
    elif n and ((md["label"] < -1).any() or (md["label"] >= len(meta.get("classes") or [0, 1])).any() or
                (md["group"] < -1).any()):
        problem = "labels or groups out of range"
    if problem:
        raise DataFileError(f"{path} does not match its meta.json ({problem}): it changed after the build; "
                            f"{_rebuild(data_dir, meta)}")
    return path, reader, md


def content_hash(images, labels, groups, attrs=None):
    """The sha256 meta.json records for a split (sources.py computes it when building; read_meta(verify="full")
    recomputes it from the file): the images as uint8 HWC in order, the labels and groups as int64, then the
    attribute vectors as uint8. images, attrs: arrays, or iterables of blocks of rows."""
    import hashlib
    h = hashlib.sha256()
    for block in images:
        h.update(np.ascontiguousarray(block, np.uint8))
    h.update(np.ascontiguousarray(labels, np.int64))
    h.update(np.ascontiguousarray(groups, np.int64))
    for block in () if attrs is None else attrs:
        h.update(np.ascontiguousarray(block, np.uint8))
    return h.hexdigest()


_VERIFIED = set()  # (path, size, mtime_ns) of the files whose content hash this process has checked


def _verify_content(data_dir, split, meta):
    """Recompute a split's content hash from its file and refuse a mismatch (read_meta(verify="full"))."""
    path = os.path.abspath(os.path.join(data_dir, f"{split}.beton"))
    st = os.stat(path)
    want, key = meta["splits"][split].get("sha256"), (path, st.st_size, st.st_mtime_ns)
    if not want or key in _VERIFIED:
        return
    path, reader, md = _open_beton(data_dir, split, meta)
    mm = np.memmap(path, np.uint8, "r")
    nb, k = math.prod(meta["image_size"]) * 3, reader.handlers["attrs"].element_size if "attrs" in md else 0
    got = content_hash((mm[p: p + nb] for p in md["image"]["data_ptr"].tolist()), md["label"], md["group"],
                       (mm[p: p + k] for p in md["attrs"].tolist()) if "attrs" in md else None)
    if got != want:
        raise DataFileError(f"{path}: its content (sha256 {got[:12]}) is not what meta.json records ({want[:12]}): it "
                            f"changed after the build; {_rebuild(data_dir, meta)}")
    _VERIFIED.add(key)


def _read_beton(data_dir, split, fields, rows=None):
    """Read fields of a raw-mode .beton straight from the file (no FFCV pipeline, no JIT): the per-sample metadata
    holds each image's file offset, and raw images are plain HWC bytes there. rows: positions to read (default all).
    The file is checked against meta.json first (read_meta, _open_beton). -> {field: numpy array}."""
    meta = read_meta(data_dir)
    path, reader, md = _open_beton(data_dir, split, meta)
    md = md if rows is None else {name: v[rows] for name, v in md.items()}
    mm = np.memmap(path, np.uint8, "r")
    out = {}
    for name in fields:
        if name not in md:
            out[name] = None
        elif name == "image":
            h, w = meta["image_size"]
            x = np.empty((len(md["image"]), 3, h, w), np.uint8)  # NCHW directly, so no second full-size copy
            for i, p in enumerate(md["image"]["data_ptr"].tolist()):
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


def load_attrs(data_dir, split):
    """-> (attrs uint8 [N, A] numpy, attribute names) for analysis; (None, []) when the source has none."""
    return _read_beton(data_dir, split, ("attrs",))["attrs"], read_meta(data_dir)["attributes"]


def summary(data_dir, meta):
    """What a checkpoint records of its training data (evaluate.py and attention.py check data against it)."""
    return {"path": data_dir, **{k: meta[k] for k in ("source", "classes", "groups", "image_size", "criterion")
                                 if k in meta}}


def mismatch(trained, meta):
    """What differs between a checkpoint's data summary and a data set's meta.json: the task (class names, label
    criterion), the group names and the stored image size; "" when they agree. Keys a summary lacks are not checked
    (checkpoints from elsewhere)."""
    differ = [f"{k} {trained[k]} vs {meta.get(k)}" for k in ("classes", "criterion", "groups", "image_size")
              if trained.get(k) and trained[k] != meta.get(k)]  # both read from JSON: lists and strings
    return "; ".join(differ)


class SplitLoader:
    """Batches (x uint8 [B, 3, H, W], y int64 [B], g int64 [B]) of one split on `device`; see make_loader."""

    def __init__(self, data_dir, split, batch_size, train, device, backend, indices, seed, rank, world_size):
        n = read_meta(data_dir, splits=(split,))["splits"][split]["n"]
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
            # no ToDevice on the CPU: a CPU-only pipeline with ToDevice('cpu') hangs (https://github.com/libffcv/ffcv/issues/350)
            to_dev = lambda: [ToDevice(self.device, non_blocking=True)] if self.device.type == "cuda" else []
            ints = lambda: [IntDecoder(), ToTensor(), Squeeze(), *to_dev()]  # a pipeline of its own per field
            loader = Loader(path, self.batch_size, num_workers=cores(), os_cache=True, drop_last=self.train,
                            order=OrderOption.RANDOM if self.train else OrderOption.SEQUENTIAL, seed=self.seed,
                            indices=self.indices.numpy(), pipelines=dict(
                                image=[SimpleRGBImageDecoder(), ToTensor(), *to_dev(),
                                       ToTorchImage(channels_last=False)],
                                label=ints(), group=ints(), attrs=None))
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
    in split positions. DDP: each rank takes every world_size-th sample of the same global order.
    The "ffcv" backend yields views of buffers it reuses: clone a batch to keep it beyond the next few iterations."""
    return SplitLoader(data_dir, split, batch_size, train, device, backend, indices, seed, rank, world_size)


# ----------------------------------------------------------------------------------------------------------------
# Attribute expressions: labels and groups from stored attributes. The sources build with them (--criterion,
# --group) and evaluate.py regroups a built split's attrs with them (--group_by), so both read an expression alike.

MAX_EXPRESSION = 1000  # characters: a longer expression is a pasted mistake, and ast would spend memory on it
MAX_DEPTH = 50  # operator nesting: deeper trees would reach Python's recursion limit in the evaluation below
MAX_GROUPS = 256  # a product's cells: more groups than any face data set can fill
UNKNOWN = 255  # a categorical attribute's stored code when its value is not known
_ALLOWED_NODES = (ast.Expression, ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.Name, ast.Load,
                  ast.And, ast.Or, ast.BitAnd, ast.BitOr, ast.BitXor, ast.Not, ast.Invert)
_BINOPS = {ast.BitAnd: np.logical_and, ast.BitOr: np.logical_or, ast.BitXor: np.logical_xor}
_WORD = re.compile(r"\w+")
_KEYWORDS = ("and", "or", "not")


def parse_criterion(expr, names, what="criterion", categorical=()):
    """Compile a boolean expression of attribute names into f({name: bool array}) -> bool array. The expression is
    parsed with `ast` and only names and & | ^ ~ not and or are accepted: nothing is ever eval'd. Every word but the
    keywords is renamed to a placeholder before parsing, so names Python would not take (CelebA's 5_o_Clock_Shadow)
    work too, and messages name the words as written. what: the key's name in messages ("criterion", "group");
    categorical: names that are known but hold value indices, refused here (they are factors of a product)."""
    expr = _bounded(expr, what)
    words = []

    def placeholder(m):
        if m[0] in _KEYWORDS:
            return m[0]
        words.append(m[0])
        return f"_{len(words) - 1}"

    text = _WORD.sub(placeholder, expr)
    if max(np.cumsum([(c == "(") - (c == ")") for c in text]), default=0) > MAX_DEPTH:  # ast gives up at 200
        raise DataError(f"{what} {expr[:40]!r}...: parentheses nested more than {MAX_DEPTH} levels deep")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise DataError(f"cannot parse the {what} {expr!r}") from None
    word = lambda node: words[int(node.id[1:])]
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES):
            raise DataError(f"{what} {expr!r}: only attribute names and & | ^ ~ not and or are allowed")
        if isinstance(node, ast.Name) and word(node) not in names:
            raise DataError(f"{what} {expr!r}: unknown attribute {word(node)!r} (known: {' '.join(names) or 'none'})")
        if isinstance(node, ast.Name) and word(node) in categorical:
            raise DataError(f"{what} {expr!r}: {word(node)} is categorical ({len(categorical[word(node)])} values), "
                            f"not true or false; use it alone or as a factor of a product, e.g. Male*{word(node)}")
    stack, deepest = [(tree.body, 1)], 0  # iterative: a deep tree must not reach the recursion limit right here
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack += [(child, depth + 1) for child in ast.iter_child_nodes(node) if not isinstance(child, ast.expr_context)]
    if deepest > MAX_DEPTH:
        raise DataError(f"{what} {expr[:40]!r}...: nested {deepest} levels deep, at most {MAX_DEPTH}")

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


def _bounded(expr, what):
    """The expression without its outer spaces, refused when it is too long to be meant."""
    expr = expr.strip()
    if len(expr) > MAX_EXPRESSION:
        raise DataError(f"{what} {expr[:40]!r}... is {len(expr)} characters long, at most {MAX_EXPRESSION}")
    return expr


def _product(expr, attrs, names, values, what, gender):
    """A product of factors "A * B * ..." -> (ids int64 [n], -1 where any factor is unknown; their names). A factor
    is a categorical attribute (its value indices, names from `values`) or a boolean expression (0/1, named
    not X / X, or women / men for exactly Male when `gender`). Ids are mixed radix, the first factor most
    significant (id = g1 * K2 + g2), so Male first keeps 0 = women; names are joined with " & "."""
    expr, values, kind = _bounded(expr, what), values or {}, "groups" if gender else "classes"
    if attrs is None:  # load_attrs of a source that keeps none (folder, challenge, csv without attribute columns)
        raise DataError(f"{what} {expr!r}: this data set stores no attributes")
    factors = [f.strip() for f in expr.split("*")]
    if not all(factors):
        raise DataError(f"{what} {expr!r}: an empty factor; a product reads A*B, e.g. Male*Young")
    named = dict(zip(names, (attrs > 0).T))
    ids, out = np.zeros(len(attrs), np.int64), None
    for f in factors:
        if f in values:
            fid, fnames = attrs[:, list(names).index(f)].astype(np.int64), list(values[f])
            fid[fid >= len(fnames)] = -1  # UNKNOWN, or a code beyond the names
        else:
            fid = parse_criterion(f, names, what, categorical=values)(named).astype(np.int64)
            fnames = ["women", "men"] if gender and f == "Male" else \
                [f"not {f}" if _WORD.fullmatch(f) else f"not ({f})", f]
        if len(fnames) * (len(out) if out else 1) > MAX_GROUPS:
            raise DataError(f"{what} {expr!r} makes more than {MAX_GROUPS} {kind}; use fewer or smaller factors")
        ids = np.where((ids < 0) | (fid < 0), -1, ids * len(fnames) + fid)
        out = fnames if out is None else [f"{a} & {b}" for a in out for b in fnames]
    return ids, out


def labels_from_attrs(expr, attrs, names, values=None):
    """The label of every row from its attributes (uint8 [n, A], columns `names`; `values`: meta.json's
    attribute_values) -> (labels int64 [n], -1 where unknown; class names). expr: a boolean expression (classes
    "not X", "X"), a categorical attribute (classes: its values) or a product of them (see groups_from_attrs)."""
    return _product(expr, attrs, names, values, "criterion", gender=False)


def groups_from_attrs(expr, attrs, names, values=None):
    """The group of every row from its attributes (uint8 [n, A], columns `names`; `values`: meta.json's
    attribute_values, {attribute: [value names]}) -> (groups int64 [n], -1 where unknown; group names).
    expr: "none" (every row -1, no names), or a product of factors "A * B * ..." (spaces allowed), each factor a
    categorical attribute (one group per value) or a boolean expression of attribute names (two groups: "not X",
    "X", or "women", "men" for exactly Male). Ids are mixed radix, first factor most significant: Male*Young gives
    women & not Young = 0, women & Young = 1, men & not Young = 2, men & Young = 3. A product of more than
    MAX_GROUPS groups, an unknown name, an empty factor or a malformed expression raises DataError."""
    if expr.strip().lower() == "none":
        return np.full(len(attrs), -1, np.int64), []
    return _product(expr, attrs, names, values, "group", gender=True)


# ----------------------------------------------------------------------------------------------------------------
# Augmentation: the original solution's FFCV-SSL list, re-done as a handful of batched tensor ops with per-sample
# parameters

GREY = (0.2989, 0.587, 0.114)  # FFCV-SSL's (and PIL's) grey, for the saturation jitter


def _normalise(x, out_size):
    """float [B, 3, H, W] in 0..255 -> resized (bicubic, PIL's kernel via antialias=True) and ImageNet-normalised.
    Works in place: x must be the caller's own buffer."""
    if x.shape[-2:] != (out_size, out_size):
        x = F.interpolate(x, size=(out_size, out_size), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255
    return x.clamp_(0, 255).sub_(mean).div_(std)  # clamp: bicubic overshoots


def prepare(x_u8, out_size):
    """Evaluation transform: uint8 [B, 3, H, W] -> float32 [B, 3, out, out], resized and normalised."""
    return _normalise(x_u8.to(torch.float32, copy=True), out_size)


def _boxes(rand, H, W, area, ratio, tries=10):
    """torchvision's box sampling for a batch: `tries` candidates per sample (area fraction, log-uniform aspect w/h),
    the first that fits is kept. -> heights, widths (pixels, float), fits (bool) per sample."""
    a = (area[0] + (area[1] - area[0]) * rand(tries)) * H * W
    r = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * rand(tries))
    w, h = (a * r).sqrt(), (a / r).sqrt()
    fits = (w <= W) & (h <= H)
    first = fits.float().argmax(0, keepdim=True)  # index of the first fitting try (0 if none)
    return h.gather(0, first)[0], w.gather(0, first)[0], fits.any(0)


# Devices on which augment() computes an op only for the samples that drew it (index the subset, compute, scatter
# back; erasing as one slice assignment per erased sample). Finding the subset reads the coins on the host: free on
# the CPU, a sync on a GPU, where every sample is computed instead and the drawn ones kept with torch.where (same
# values; tests/test_data.py compares the two ways on the CPU).
_PER_SAMPLE_DEVICES = ("cpu",)


def _correlate(z, k, dim):
    """z [S, C, H, W] correlated along dim with one odd kernel per sample, k [S, K], zero padding (conv2d's maths):
    K shifted, weighted copies added up. On the CPU this beats a grouped convolution (~2x, no per-shape setup)."""
    n, r = z.shape[dim], k.shape[1] // 2
    kv = k.view(*k.shape, 1, 1, 1)
    out = z * kv[:, r]
    for t in range(1, min(r, n - 1) + 1):
        out.narrow(dim, 0, n - t).addcmul_(z.narrow(dim, t, n - t), kv[:, r + t])  # out[i] += k[r + t] z[i + t]
        out.narrow(dim, t, n - t).addcmul_(z.narrow(dim, 0, n - t), kv[:, r - t])  # out[i] += k[r - t] z[i - t]
    return out


def _on_drawn(drawn, x, op):
    """x with op applied to the samples where drawn [B] is true; op(x_subset, index) -> the new x_subset, index
    picking the subset's per-sample parameters. In place on x's subset when x lives on a _PER_SAMPLE_DEVICES device."""
    if x.device.type not in _PER_SAMPLE_DEVICES:
        return torch.where(drawn.view(-1, 1, 1, 1), op(x, slice(None)), x)
    idx = drawn.nonzero().squeeze(1)
    if len(idx) == len(x):
        return op(x, slice(None))
    if len(idx):
        x[idx] = op(x[idx], idx)
    return x


def augment(x_u8, out_size, generator=None, *, crop_p=1.0, crop_scale=(0.5, 1.0), crop_ratio=(3 / 4, 4 / 3),
            flip_p=0.5, rotate_p=0.5, max_angle=0.5, erase_p=0.5, erase_area=(0.02, 0.4), erase_ratio=(0.15, 6.0),
            erase_fill=ERASE_FILL, color_p=0.5, brightness=(1.0, 1.5), saturation=(1.0, 1.5), blur_p=0.5,
            blur_kernel=5, blur_sigma=(0.1, 2.0)):
    """Training transform: uint8 [B, 3, H, W] -> float32 [B, 3, out, out], normalised, on x_u8's device. The
    original solution's list in its order, every parameter drawn per sample (from `generator`, which must live on the
    same device):
    1. random resized crop (scale, ratio), horizontal flip and rotation (+-max_angle rad, black fill): one warp;
    2. random erasing: one box (area fraction, aspect) filled with erase_fill;
    3. colour jitter: brightness and saturation factors, as FFCV-SSL (saturation blends with the grey of the input);
    4. Gaussian blur: kernel blur_kernel, sigma from linspace(*blur_sigma, 10), zero padding (scipy's "same");
    then resize to out_size and normalise, as prepare(). The original solution ran all this on images already
    upsampled to 224, here it runs at native size (80), so a blur of the same sigma is ~2.8x stronger relative to the
    face; pass blur_sigma=(0.036, 0.71) to match that. With every *_p = 0 the result equals prepare(x_u8, out_size).
    Every parameter is drawn whatever the probabilities (a seed gives the same draws for any *_p), but an op whose
    probability is 0 is not run at all, and on the CPU the erasing and the blur run only on the samples that drew them.
    Runs in fp32 inside a caller's autocast too."""
    if blur_kernel < 1 or blur_kernel % 2 == 0:
        raise ValueError(f"blur_kernel={blur_kernel}: needs an odd size (1, 3, 5, ...), as torchvision's GaussianBlur")
    B, C, H, W = x_u8.shape
    dev = x_u8.device
    rand = lambda *lead: torch.rand(*lead, B, device=dev, generator=generator)
    coin = lambda p: rand() < p
    per_sample = dev.type in _PER_SAMPLE_DEVICES
    x = x_u8.to(torch.float32, memory_format=torch.contiguous_format, copy=True)  # our own buffer, worked in place

    # 1. crop + flip + rotation as one grid_sample. An output pixel p (normalised coords) is rotated into the
    # cropped image's frame (q = R p, black where q leaves it), then mapped into the crop box (flip = negative x scale):
    # g = S F R p + t, one affine map per sample, written straight into the grid (no affine_grid, no bmm). The flip F
    # is done after the warp instead, on the output: F R(angle) p = R(-angle) F p, and F p is the mirrored pixel. Same
    # image, but grid_sample reads a mirrored grid ~3x slower on the CPU
    ch, cw, fits = _boxes(rand, H, W, crop_scale, crop_ratio)
    crop = coin(crop_p) & fits
    ch, cw = torch.where(crop, ch, H), torch.where(crop, cw, W)
    top, left = rand() * (H - ch), rand() * (W - cw)
    flipped = coin(flip_p)
    angle = torch.where(coin(rotate_p), (2 * rand() - 1) * max_angle, 0.0)
    if crop_p > 0 or flip_p > 0 or rotate_p > 0:
        angle = torch.where(flipped, -angle, angle)
        cos, sin, sx, sy = angle.cos(), angle.sin(), cw / W, ch / H
        tx, ty = (2 * left + cw) / W - 1, (2 * top + ch) / H - 1
        px = (2 * torch.arange(W, device=dev) + 1) / W - 1  # pixel centres, align_corners=False
        py = ((2 * torch.arange(H, device=dev) + 1) / H - 1)[:, None]
        v = lambda t: t[:, None, None]
        grid = torch.empty(B, H, W, 2, device=dev)
        torch.add(v(sx * cos) * px, v(-sx * sin * H / W) * py + v(tx), out=grid[..., 0])
        torch.add(v(sy * sin * W / H) * px, v(sy * cos) * py + v(ty), out=grid[..., 1])
        if rotate_p > 0:  # |q| > 1 <=> g outside the crop box; a far-off x coordinate samples only the zero padding
            outside = ((grid[..., 0] - v(tx)).abs_() > v(sx)) | ((grid[..., 1] - v(ty)).abs_() > v(sy))
            grid[..., 0].masked_fill_(outside, -8.0)
        with torch.autocast(dev.type, enabled=False):  # fp32 even inside a caller's autocast
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        x = x.round_()  # the original pipeline is uint8 between ops
        if flip_p > 0:
            x = _on_drawn(flipped, x, lambda xs, i: xs.flip(-1))

    # 2. random erasing (torchvision's sampling: 10 tries, none fits -> no erasing)
    eh, ew, fits = _boxes(rand, H, W, erase_area, (1 / erase_ratio[1], 1 / erase_ratio[0]))
    eh, ew = eh.round(), ew.round()
    erase = coin(erase_p) & fits & (eh < H) & (ew < W)
    top, left = (rand() * (H - eh + 1)).floor(), (rand() * (W - ew + 1)).floor()
    if erase_p > 0:
        fill = torch.tensor(erase_fill, dtype=x.dtype, device=dev).view(C, 1, 1)
        if per_sample:  # one slice assignment per erased sample: ~0.7 ms for 256 images, a masked pass is ~5 ms
            y0, x0, h, w = (p.long().tolist() for p in (top, left, eh, ew))
            for i in erase.nonzero().squeeze(1).tolist():
                x[i, :, y0[i]:y0[i] + h[i], x0[i]:x0[i] + w[i]] = fill
        else:
            rows, cols = torch.arange(H, device=dev), torch.arange(W, device=dev)
            in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None]) & erase[:, None]
            in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])
            x = torch.where((in_rows[:, :, None] & in_cols[:, None, :])[:, None], fill, x)

    # 3. colour jitter, one coin for both factors; grey is taken before the brightness change, as in FFCV-SSL:
    # s * b * x + (1 - s) * grey is one 3x3 channel mix per sample, one batched matrix product. A sample that did not
    # draw it gets the identity (factors 1 and 0), which leaves x exactly as it was
    jit = coin(color_p)
    b = brightness[0] + (brightness[1] - brightness[0]) * rand()
    s = saturation[0] + (saturation[1] - saturation[0]) * rand()
    if color_p > 0:
        m, a = torch.where(jit, s * b, 1.0).view(B, 1, 1), torch.where(jit, 1 - s, 0.0).view(B, 1, 1)
        mix = m * torch.eye(C, device=dev) + a * torch.tensor(GREY, device=dev)  # rows: output channels
        with torch.autocast(dev.type, enabled=False):
            x = torch.bmm(mix, x.view(B, C, H * W)).view(B, C, H, W).clamp_(0, 255)

    # 4. Gaussian blur, separable, one kernel per sample, on the samples that drew it (CPU)
    blur = coin(blur_p)
    sigmas = torch.linspace(*blur_sigma, 10, device=dev)[(rand() * 10).long().clamp(max=9)]
    if blur_p > 0:
        taps = torch.arange(blur_kernel, device=dev) - blur_kernel // 2

        def gaussian(xs, i):
            k = torch.exp(-0.5 * (taps[None] / sigmas[i][:, None]) ** 2)
            k = k / k.sum(1, keepdim=True)
            return _correlate(_correlate(xs, k, 2), k, 3)
        x = _on_drawn(blur, x, gaussian)

    return _normalise(x, out_size)


def keep_freed_memory():
    """Process-wide, on Linux with glibc (a no-op elsewhere): keep freed memory for reuse instead of handing it back
    to the OS, and serve blocks up to 32 MB from the heap instead of fresh mmaps. Batch-sized CPU tensors (20 MB for
    256 images at 80x80) are then reused from one batch to the next instead of being page-faulted in anew: augment()
    on the CPU runs ~1.7x faster (~9,800 -> ~900 page faults a call for 256x3x80x80). The price: the process keeps
    its peak memory, as PyTorch's CUDA allocator does on a GPU. -> True when set."""
    import ctypes
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False


# named augmentation lists (the training scripts' augment=NAME): keyword overrides of augment(); None = prepare()
AUGMENTS = {
    "full": {},  # the original solution's whole list, as augment()'s defaults
    "weak": dict(rotate_p=0.0, erase_p=0.0, color_p=0.0, blur_p=0.0),  # random resized crop + flip only
    "none": None,  # resize + normalise: prepare()
}

AUGMENT_PARAMS = {k: p.default for k, p in inspect.signature(augment).parameters.items() if p.kind is p.KEYWORD_ONLY}


def augment_settings(name, overrides=""):
    """augment()'s keyword arguments for the named list AUGMENTS[name] with overrides "a=1,b=(0.3,1.0)" (checked
    and typed by configurator.parse_kw); None for "none", where prepare() alone runs."""
    kw = {**(AUGMENTS[name] or {}), **configurator.parse_kw("augment_kw", overrides, AUGMENT_PARAMS)}
    return None if AUGMENTS[name] is None else kw


# ----------------------------------------------------------------------------------------------------------------
# Image files: one decoder for the importers (sources.py) and for inference on any image (evaluate, attention)

def decode_image(src, size):
    """Path or bytes -> uint8 [size, size, 3] RGB: centre square crop, area resize (CelebA: 178x178 -> 80), any size
    or mode; 16-bit images are scaled to 8 bits, not clipped. src may also be (path or bytes, (cx, cy, side)): that
    square (a face box, sources.py's mafa) instead of the centre one, shrunk to the image's shorter side if larger
    and shifted inside the image. Returns the error text when it is not a readable image, or when the square's
    centre lies outside it."""
    from PIL import Image
    src, square = src if isinstance(src, tuple) else (src, None)
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            if im.mode.startswith("I"):  # 16/32-bit integer pixels: convert("RGB") would clip them all to white
                wide = np.asarray(im, np.float64)
                im = Image.fromarray(np.round(wide * 255 / (65535 if wide.max() > 255 else 255)).astype(np.uint8))
            im = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return f"{type(e).__name__}: {e}"
    w, h = im.size
    cx, cy, side = square or (w / 2, h / 2, min(w, h))
    if not (0 <= cx <= w and 0 <= cy <= h):
        return f"the box's centre ({cx:.0f}, {cy:.0f}) lies outside the {w}x{h} image"
    s = max(1, min(round(side), w, h))
    left, top = (min(max(math.floor(c - s / 2), 0), n - s) for c, n in ((cx, w), (cy, h)))
    if not s == w == h == size:
        im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.Resampling.BOX)
    return np.array(im, np.uint8)


def read_images(spec, size):
    """Image files for inference, `spec` a folder (its files, sorted) or comma-separated paths -> (uint8
    [N, 3, size, size], names, skipped [(path, why)]); each decoded as the importers do (decode_image)."""
    folder = spec if isinstance(spec, str) and os.path.isdir(spec) else None
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if not f.startswith(".")) if folder else \
        [p for p in (spec.split(",") if isinstance(spec, str) else spec) if p]
    images, names, skipped = [], [], []
    for path in paths:
        img = decode_image(path, size) if os.path.isfile(path) else "no such file"
        if isinstance(img, str):
            skipped.append((path, img))
        else:
            images.append(torch.from_numpy(img).permute(2, 0, 1))
            names.append(os.path.basename(path))
    return (torch.stack(images) if images else torch.zeros(0, 3, size, size, dtype=torch.uint8)), names, skipped


# ----------------------------------------------------------------------------------------------------------------
# Command line: `python data.py SOURCE ...` builds a data set (the sources live in sources.py), `python data.py show
# DATA_DIR ...` draws one with its augmentation

SHOW = dict(  # python data.py show DATA_DIR --key=value ...
    data_dir="",  # the data set folder (or the first argument)
    split="train",  # the split to draw from
    n_per_cell=4,  # images per label x group cell, one row each: the original, then its augmented copies
    n_aug=6,  # augmented copies of each image
    augment="full",  # an AUGMENTS list, as the training scripts' augment=
    augment_kw="",  # overrides of augment()'s parameters, as the training scripts' augment_kw=, e.g. "erase_p=0"
    out_size=0,  # side of the drawn images in pixels (0: the stored size)
    seed=0,  # which images, and the augmentation draws
    out_dir="runs/show",  # the PNG goes here, as <data set>_<split>_<augment>.png; or a file path ending in .png
)


def show(argv):
    """Originals beside augmented copies, a block of rows per label x group cell, written as one PNG: does the
    augmentation list leave the class visible? -> the PNG's path."""
    if argv and not argv[0].startswith("-"):
        argv = [f"--data_dir={argv[0]}", *argv[1:]]
    cfg = configurator.parse(argv, SHOW, __file__, choices={"split": SPLITS, "augment": tuple(AUGMENTS)},
                             aliases={"data": "data_dir", "out": "out_dir"}, required=("data_dir",))
    kw = augment_settings(cfg["augment"], cfg["augment_kw"])
    if min(cfg["n_per_cell"], cfg["n_aug"], cfg["out_size"] + 1) < 1:
        raise configurator.UserError("--n_per_cell and --n_aug want at least 1, --out_size 0 or more")
    data_dir, split = cfg["data_dir"], cfg["split"]
    meta = read_meta(data_dir, splits=(split,))
    labels, groups = load_labels(data_dir, split)
    name = lambda names, i, unknown: names[i] if 0 <= i < len(names) else unknown
    rng = np.random.default_rng(cfg["seed"])
    rows, row_names = [], []
    for lab, grp in sorted(set(zip(labels.tolist(), groups.tolist()))):
        idx = np.flatnonzero(((labels == lab) & (groups == grp)).numpy())
        pick = np.sort(rng.choice(idx, min(cfg["n_per_cell"], len(idx)), replace=False))
        rows += pick.tolist()
        row_names += [f"{name(meta['classes'], lab, 'unlabelled')}\n{name(meta['groups'], grp, 'no group')}"]
        row_names += [""] * (len(pick) - 1)
    x = torch.from_numpy(_read_beton(data_dir, split, ("image",), np.array(rows))["image"])
    size = cfg["out_size"] or x.shape[-1]
    gen = torch.Generator().manual_seed(cfg["seed"])
    draw = (lambda: augment(x, size, gen, **kw)) if kw is not None else (lambda: prepare(x, size))
    views = torch.stack([prepare(x, size)] + [draw() for _ in range(cfg["n_aug"])], 1)  # [rows, 1 + n_aug, 3, s, s]
    views = views * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    title = f"{data_dir} {split}: augment={cfg['augment']} {cfg['augment_kw']}".rstrip()
    stem = f"{os.path.basename(os.path.normpath(data_dir))}_{split}_{cfg['augment']}.png"
    out = cfg["out_dir"]
    path = out if out.lower().endswith(".png") else os.path.join(out, stem)  # --out=grid.png is the file itself
    _save_grid(views.clamp(0, 1).permute(0, 1, 3, 4, 2).numpy(), row_names, title, path)
    print(f"wrote {path} ({len(rows)} images from {sum(map(bool, row_names))} label x group cells)")
    return path


def _save_grid(views, row_names, title, path):
    """views float [rows, cols, H, W, 3] in 0..1 -> a PNG grid, column 0 titled original, each row block named."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = views.shape[:2]
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(n_cols + 1.5, n_rows + 0.4), squeeze=False,
                             layout="constrained")
    for r in range(n_rows):
        for c in range(n_cols):
            axes[r, c].imshow(views[r, c], interpolation="nearest")
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(row_names[r], rotation=0, ha="right", va="center", fontsize=8)
    for c in range(n_cols):
        axes[0, c].set_title("original" if c == 0 else "augmented", fontsize=8)
    fig.suptitle(title, fontsize=9)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    run.write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)


@configurator.cli
def main(argv=None):
    """`python data.py show DATA_DIR ...` draws a data set; `python data.py SOURCE --key=value ...` builds one and
    `python data.py merge DIR[:CLASS] ... --out_dir=OUT` merges built ones (sources.main)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["show"]:
        show(argv[1:])
        return
    import sources  # the builders and their imports (OpenCV, PIL, pyarrow, the Hub client) load for this command only
    return sources.main(argv)


if __name__ == "__main__":
    main()
