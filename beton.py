"""
The write side of the data set format (data.py reads it): a source's data set in memory ->
OUT_DIR/{train,val,test}.beton and meta.json, written as one transaction so that a reader never sees half a data set.

    meta = atomic_build(out_dir, force, write)   # write(folder) -> meta fills a hidden temporary folder beside out_dir
    meta = write_dataset(ds, folder, source, cfg)   # ds: a source's data set (its layout: sources.py, above SOURCES)

atomic_build writes into a hidden temporary folder next to OUT_DIR (data.temp_folder names it), renamed at the very
end; --force swaps an existing OUT_DIR for the new one so that a data set is always either the old one or the new
one, whole. Whatever a killed build leaves (its temporary folder, or the old version moved aside) is finished or
removed by the next build of the same OUT_DIR, which says so. The .beton files are FFCV's, written by its writer with
the failure modes of FFCV 1.0.2's worker loop closed (_ffcv_write); meta.json is written last, so a folder with one is
whole. Problems the user can fix (a full disk, an unwritable or occupied out_dir, an empty split) raise DataError
(data.py's). The importers (sources.py, celeba.py) read their input files with the helpers of the section "Reading
a source's files": decode_images, hub_parquet (a Hub data set's parquet shards at a pinned revision, resumable,
checked), list_files, need_dir, read_text, relative_path, shards_by_split.
"""

import codecs
import errno
import hashlib
import json
import os
import queue
import shutil
import time
import traceback
import types
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
from tqdm import tqdm

import data
import run
from data import SPLITS, DataError


def need_space(folder, need, what):
    """Refuse early what would fill the disk (FFCV's writer and memory-mapped scratch files die on a full disk)."""
    free = shutil.disk_usage(folder).free
    if free < need:
        raise DataError(f"not enough free space in {os.path.dirname(folder)}: {what} needs about "
                        f"{need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free; free some space or choose another "
                        "--out_dir")


# ----------------------------------------------------------------------------------------------------------------
# Reading a source's files (every importer but synthetic): images, folders, label files, the paths they list, the
# Hub's parquet shards

def decode_images(sources, names, size, desc, out=None, skipped=None, where=None):
    """Decode many images with a thread pool (PIL releases the GIL while decoding and resizing). Unreadable ones are
    skipped and listed in `skipped`. Returns (images [k, size, size, 3] (a view of `out` when given), kept indices).
    where: the folder or label file they come from; when given, a non-empty list with no readable image is an error
    that names it (rather than an empty split further on)."""
    out = np.empty((len(sources), size, size, 3), np.uint8) if out is None else out
    kept, first_bad = [], None
    with ThreadPoolExecutor(data.cores()) as pool:
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


def hub_parquet(repo, folder, revision, offline):
    """Fetch the parquet shards under `folder` of the Hub data set `repo` at `revision` (a commit: pinned), one at a
    time into the Hugging Face cache (resumable: finished shards are reused, an interrupted one continues), and check
    each one's size and sha256 against the Hub's listing. -> their local paths, sorted. Any failure to reach the Hub
    raises DataError with `offline`, a message whose {} takes the cause and which names the offline alternatives."""
    try:
        from huggingface_hub import HfApi, hf_hub_download
        listing = [f for f in HfApi().list_repo_tree(repo, folder, recursive=True, revision=revision,
                                                     repo_type="dataset") if f.path.endswith(".parquet")]
    except Exception as e:  # offline, HF_HUB_OFFLINE, DNS, proxy, gated, moved: all end the same way
        raise DataError(offline.format(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")) from None
    if not listing:
        raise DataError(offline.format(f"no parquet shards under {folder}/ in {repo} at {revision}"))
    paths = []
    for f in tqdm(sorted(listing, key=lambda f: f.path), desc=f"{repo} shards", unit="shard", disable=None):
        try:
            path = hf_hub_download(repo, f.path, repo_type="dataset", revision=revision)
        except Exception as e:
            raise DataError(offline.format(f"{f.path}: {type(e).__name__}")) from None
        if os.path.getsize(path) != f.size or (f.lfs and _sha256(path) != f.lfs.sha256):
            raise DataError(f"{path} does not match the Hub listing (size or sha256); delete it and run again")
        paths.append(path)
    return paths


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def shards_by_split(paths, splits):
    """Parquet shards named as the Hub names them (train-00000-of-00002-*.parquet) -> {split: [paths]}; `splits`
    maps a file name's first word (train, valid, validation, test) to our split; other files are left out."""
    shards = {}
    for p in paths:
        split = splits.get(os.path.basename(p).split("-")[0]) if p.endswith(".parquet") else None
        if split:
            shards.setdefault(split, []).append(p)
    return shards


def list_files(folder):
    """Every file under folder (recursive, sorted, hidden files ignored), as paths relative to folder."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.relpath(os.path.join(dirpath, f), folder) for f in sorted(filenames) if not f.startswith(".")]
    return found


def need_dir(path, what="folder"):
    if not os.path.isdir(path):
        raise DataError(f"{what} not found: {path}")
    return path


def read_text(path):
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


def relative_path(name, where, folder):
    """A path from a label file (`where`), normalised; refused when absolute or leading out of `folder` (../)."""
    norm = os.path.normpath(name)
    if os.path.isabs(norm) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
        raise DataError(f"{where}: {name!r} is outside {folder}; listed images must be inside it")
    return norm


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
    return page, max(1, min(data.cores(), 8, -(-len(split["labels"]) // 256)))


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
    """One FFCV writer worker (a process's entry point): an error goes to the parent (the errno of an OS error, else
    the traceback) instead of a traceback on stderr, and the worker process ends with exit status 1."""
    try:
        work_fn(*args)
    except BaseException as e:
        errors.put((e.errno if isinstance(e, OSError) else None, traceback.format_exc()))
        raise SystemExit(1) from None  # multiprocessing prints no traceback for SystemExit


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


MAX_SKIPPED = 1000  # skipped inputs listed in meta.json (MAFA skips thousands of faces); n_skipped counts them all


def write_dataset(ds, folder, source, cfg):
    """Write the three splits of `ds` (a source's data set: its layout is documented in sources.py, above SOURCES)
    and meta.json into `folder`; meta records the build's config (bar out_dir, force), each file's size and content
    hash, the skipped inputs (the first MAX_SKIPPED, and their number) and a merge's inputs. meta.json is written
    last, and atomically: a folder with one is whole. -> meta."""
    sizes = {ds["splits"][s]["images"].shape[1:3] for s in SPLITS}
    assert len(sizes) == 1, sizes
    meta = dict(source=source, criterion=ds["criterion"], classes=ds["classes"], groups=ds["groups"],
                attributes=ds["attributes"], attribute_values=ds.get("attribute_values", {}),
                image_size=list(sizes.pop()), splits={},
                args={k: v for k, v in cfg.items() if k not in ("out_dir", "force")})
    for s in SPLITS:
        if len(ds["splits"][s]["labels"]) == 0:
            raise DataError(f"split {s!r} would be empty; give more images or other --split fractions")
    need_space(folder, sum(_beton_bytes(ds["splits"][s]) for s in SPLITS) + (1 << 20), "the data set")
    for s in SPLITS:
        split, path = ds["splits"][s], os.path.join(folder, f"{s}.beton")
        write_beton(path, split)
        meta["splits"][s] = dict(n=len(split["labels"]), labelled=bool((split["labels"] >= 0).all()),
                                 cells=_cells(split["labels"], split["groups"]), bytes=os.path.getsize(path),
                                 sha256=_split_hash(split))
        if "files" in split:  # the challenge's test order, for submissions
            meta["splits"][s]["files"] = split["files"]
    meta["content_hash"] = hashlib.sha256("".join(meta["splits"][s]["sha256"] for s in SPLITS).encode()).hexdigest()
    meta["n_skipped"], meta["skipped"] = len(ds["skipped"]), ds["skipped"][:MAX_SKIPPED]
    if "inputs" in ds:  # a merge's: the built sets it was made of
        meta["inputs"] = ds["inputs"]
    run.write_text(os.path.join(folder, "meta.json"), json.dumps(meta, indent=1))
    return meta


# ----------------------------------------------------------------------------------------------------------------
# The transaction: a temporary folder, the swap, and the recovery of what a killed build left

def _leftovers(out):
    """Hidden folders next to `out` that builds of it made, whose process is gone: [(path, kind, pid)], kind
    "build" (a build's temporary folder) or "old" (the version a --force rebuild moved aside)."""
    parent, name = os.path.split(out)
    found = []
    for entry in sorted(os.listdir(parent)):
        kind_pid = data.parse_temp_folder(entry, name)
        if kind_pid and os.path.isdir(os.path.join(parent, entry)) and not run.alive(kind_pid[1]):
            found.append((os.path.join(parent, entry), *kind_pid))
    return found


def _whole(folder):
    """Is `folder` a finished build (meta.json is written last; every file it lists there, at its size)?"""
    try:
        data.read_meta(folder, verify="size")
        return True
    except data.DataFileError:
        return False


def _drop_scratch(folder):
    for f in os.listdir(folder):  # celeba's memory-mapped images
        if f.endswith(".npy"):
            os.remove(os.path.join(folder, f))


def _recover(out):
    """Finish or remove what killed builds of `out` left next to it (their processes are gone). -> one line per
    thing done, for the user."""
    notes, left = [], _leftovers(out)
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
    old = os.path.join(parent, data.temp_folder(name, "old", os.getpid(), time.time_ns()))
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


def atomic_build(out_dir, force, write):
    """Build a data set into out_dir as one transaction: write(folder) -> meta fills a hidden temporary folder next
    to out_dir (.NAME.build-PID-*.tmp), swapped in only when everything is written (_swap); first finish or remove
    what killed builds of the same out_dir left (_recover). An existing out_dir is replaced only with `force`, and
    only when it holds a data set. OS errors (a full disk, an unwritable folder) raise DataError. -> write's meta."""
    out = os.path.abspath(out_dir)
    parent, name = os.path.split(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"--out_dir={out_dir} is a file, not a folder")
    try:
        os.makedirs(parent, exist_ok=True)
        for note in _recover(out):
            print(note)
        if os.path.isdir(out):
            if not force:
                raise DataError(f"{out_dir} already exists; pass --force to rebuild it")
            if os.listdir(out) and not os.path.isfile(os.path.join(out, "meta.json")):
                raise DataError(f"{out_dir} holds other things than a data set (no meta.json): --force replaces data "
                                "sets only; choose another --out_dir")
        tmp = os.path.join(parent, data.temp_folder(name, "build", os.getpid(), time.time_ns()))
        os.mkdir(tmp)  # an ordinary folder (the umask's mode), like the data set it becomes
    except OSError as e:
        raise DataError(f"--out_dir={out_dir}: cannot write there ({_os_error(e, out_dir)})") from None
    try:
        meta = write(tmp)
        _drop_scratch(tmp)
        _swap(tmp, out)
    except OSError as e:
        raise DataError(_os_error(e, out_dir)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left behind on failure (a no-op after the swap)
    return meta
