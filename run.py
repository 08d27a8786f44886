"""One training run's plumbing, shared by the scripts: its files, its folder, its signals, its ranks.

    write_atomic(path, write)           every file a script writes: temp name, then rename (never half a file)
    check_writable(folder, need, what)  before the work: the folder takes files and has room for them
    with saving(out_dir, unit, n): ...  a checkpoint write that fails names the last good checkpoint (saved())
    with run_dir(out_dir, resume, force, master): ...   one run per folder, its lock, a clean stop on Ctrl-C
    device = pick_device("auto")        cuda under torchrun's LOCAL_RANK if there is one, else the CPU
    warn_slow_bf16(device, amp)         bf16 autocast on a CPU that emulates bf16: say so before the work
    with ddp(device_name): ...          torchrun's process group (NCCL on CUDA, gloo on the CPU), torn down after
    gather(t, world), rng_states(...)   what the ranks share: predictions, RNG states for an exact resume
    write_table(path, intro, header, rows), mean_std(values)   the seed tables (sweep, ssl-table, robust table)
    write_log(out_dir, rows)            a run's log.jsonl, rewritten whole from its records
    with Events(out_dir, enabled) as e: e.add(record, step)   the same records as TensorBoard scalars (tensorboard=)

Nothing here knows about models or data: model.py saves its checkpoints through write_atomic.
"""

import contextlib
import gc
import json
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from configurator import UserError


def write_atomic(path, write):
    """write(tmp) into a temporary name beside `path`, then rename it over `path`: a reader (or a crash) never sees
    half a file, and a failed write leaves neither a partial `path` nor the temporary file. Every file the scripts
    write goes through here; a data set's .beton files are made atomic a folder at a time (beton.py)."""
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a read-only or vanished folder: one line naming the file and the cause
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def saved(out_dir, unit, n):
    """What a run that stops now leaves behind, for its last message: its last good checkpoint, last.safetensors
    holding `unit` n ("epoch", 3), else (n = 0) a best.safetensors written just before (a disk that filled between
    the two), or that there is none."""
    if n:
        return f"the last good checkpoint is {os.path.join(out_dir, 'last.safetensors')} ({unit} {n})"
    best = os.path.join(out_dir, "best.safetensors")
    return f"the last good checkpoint is {best} (the first weights, with no state to resume from)" \
        if os.path.exists(best) else "no checkpoint was written yet"


@contextlib.contextmanager
def saving(out_dir, unit, n):
    """Around a checkpoint write: one that fails (a full disk) ends the run with the write's one line plus what the
    run leaves behind (saved(out_dir, unit, n)); write_atomic keeps the files written before whole."""
    try:
        yield
    except UserError as e:
        raise UserError(f"{e}; {saved(out_dir, unit, n)}") from None


def check_writable(folder, need=0, what="the output"):
    """UserError unless `folder` can take new files (it, or the nearest folder above it that exists, since the work
    makes the rest) with `need` bytes free: checked before the work and leaving nothing behind, so a read-only
    folder, a path through a file or a full disk is one line naming the folder, not a traceback after the work."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        if not os.path.isdir(existing):
            raise NotADirectoryError(f"{existing} is a file")
        if existing == os.path.abspath(folder):  # the folder itself: a real write, which also catches a full disk
            probe = os.path.join(existing, f".write-check.{os.getpid()}")
            with open(probe, "wb"):
                pass
            os.remove(probe)
        elif not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(f"{existing} is not writable")
        free = shutil.disk_usage(existing).free
    except OSError as e:
        raise UserError(f"cannot write {what} to {folder}: {e.strerror or e}") from None
    if free < need:
        raise UserError(f"{folder} has {free / 2**20:.1f} MiB free, and {what} needs about {need / 2**20:.1f} MiB")


def write_text(path, text):
    """write_atomic for a str."""
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


# a run's folder: one run at a time, never over an earlier run by accident, and a clean stop on Ctrl-C / SIGTERM

RUN_FILES = ("last.safetensors", "best.safetensors", "log.jsonl")  # what makes a folder hold a run
STOP = threading.Event()  # set by SIGINT / SIGTERM inside run_dir: the training loops stop at the next step


class Stopped(UserError):
    """A SIGINT / SIGTERM ended the run between two steps; its last checkpoint is intact (not an error: no prefix)."""
    prefix = ""


def check_out_dir(path, resume=False, force=False):
    """Refuse (UserError) a folder that holds an earlier run unless resume (continue it) or force (replace it)."""
    earlier = [f for f in RUN_FILES if os.path.exists(os.path.join(path, f))]
    if earlier and not (resume or force):
        raise UserError(f"{path} holds an earlier run ({', '.join(earlier)}): pass --resume=true to continue it, "
                        "--force=true to replace it, or choose another --out_dir")


@contextlib.contextmanager
def run_dir(path, resume=False, force=False, master=True):
    """Claim `path` for one training run. Refuses a folder holding an earlier run (check_out_dir); a lock file
    (path/.lock, the owner's pid) keeps a second run out, and a lock whose process is gone is taken over with a
    message. While inside, SIGINT / SIGTERM set STOP instead of killing the process, so the loop can stop between
    steps with its last checkpoint intact. Non-master DDP ranks only get the signal handling."""
    lock = os.path.join(path, ".lock")
    if master:
        check_out_dir(path, resume, force)
        os.makedirs(path, exist_ok=True)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = Path(lock).read_text().strip()
            why = lock_owner(int(owner), lock) if owner.isdigit() else "is not a pid"
            if why is None:
                raise UserError(f"another run (pid {owner}) is writing to {path}; wait for it, or choose another "
                                f"--out_dir; if no run is writing there, delete {lock}") from None
            print(f"taking over {lock}: its pid {owner or '?'} {why}")
            fd = os.open(lock, os.O_WRONLY | os.O_TRUNC)
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        _HELD.add(os.path.abspath(lock))
    STOP.clear()
    previous = {s: signal.signal(s, lambda *_: STOP.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if master and os.path.exists(lock):
            os.remove(lock)
        _HELD.discard(os.path.abspath(lock))


def stop_requested(world=1, device="cpu"):
    """Whether a SIGINT / SIGTERM arrived (under DDP: on any rank; every rank gets the same answer)."""
    if world == 1:
        return STOP.is_set()
    flag = torch.tensor([float(STOP.is_set())], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


_HELD = set()  # the lock files this process holds: its own pid in any other lock was left by a killed process
SCRIPTS = ("train_vit.py", "train_mixmatch.py", "robust.py", "gpu_check.py")  # what writes a run folder


def lock_owner(pid, lock):
    """None when `pid`, found in `lock`, is a live run of this repo (the lock holds), else why it is stale: gone, a
    process that is no run of ours (pids are reused), or this very process's own pid in a lock it never took (a
    container restarted after a kill -9 reuses small pids). Without /proc a live pid is trusted."""
    if pid == os.getpid():
        return None if os.path.abspath(lock) in _HELD else "is this process's own, left by a killed run"
    if not alive(pid):
        return "is gone"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            args = fh.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    return None if any(os.path.basename(a) in SCRIPTS for a in args) else "is no run of this repo"


def alive(pid):
    """Whether process pid exists (a lock's or a build folder's owner)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


# the device and the ranks

def pick_device(name):
    """auto -> this process's CUDA device (LOCAL_RANK under torchrun) if there is one, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={name} but torch sees no CUDA device here; use --device=cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device={name} is not a device (auto, cpu, cuda, cuda:1, ...)") from None


def native_bf16():
    """Whether this CPU computes in bf16 natively (AVX-512 BF16 or AMX), as oneDNN, behind CPU autocast, sees it
    (a private torch op: a torch without it counts as not native, which costs a warning at most)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def warn_slow_bf16(device, amp):
    """bf16 autocast on a CPU without native bf16 is emulated: on an AVX2 CPU a ViT-S/8 train step at 224 (batch 2)
    took 51 s in bf16 against 2.2 s in fp32. Say so before the work rather than let a run crawl."""
    if amp == "bf16" and device.type == "cpu" and not native_bf16():
        print(f"warning: --amp=bf16 on this CPU ({torch.backends.cpu.get_cpu_capability()}, no native bf16) is "
              "emulated and runs about 20x slower than --amp=none (fp32)", file=sys.stderr)


@contextlib.contextmanager
def ddp(device_name):
    """Under torchrun (RANK set): the process group for the block, NCCL on CUDA and gloo on the CPU, each rank on
    its LOCAL_RANK's GPU; torn down after (also on an error), once every rank is done. Without torchrun: nothing."""
    launched = "RANK" in os.environ
    if launched:
        cuda = torch.cuda.is_available() and device_name != "cpu"
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    try:
        yield
        if launched:  # after a success only: a rank that failed must not wait for the others
            dist.barrier()  # the ranks leave together: none closes its connections while another still uses them
    finally:
        if launched:
            # DDP's reducer sits in reference cycles and holds the process group: free it now, while Python is whole,
            # so the group's worker threads end here and not in the interpreter's shutdown
            gc.collect()
            dist.destroy_process_group()


def rank_world():
    """(this process's rank, the number of ranks): (0, 1) outside torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def gather(t, world):
    """All ranks' tensors [n_r, ...] concatenated (rank order); pads to the largest n_r for all_gather."""
    if world == 1:
        return t
    n = torch.tensor([len(t)], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    padded = torch.zeros((int(max(sizes)), *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: len(t)] = t
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s)] for o, s in zip(out, sizes)])


def rng_states(generator, device, world):
    """Every rank's RNG states (torch, CUDA, the augmentation generator), gathered so rank 0 can save them all in
    the resume state. A collective: every rank calls it."""
    states = {"torch": torch.get_rng_state(), "augment": generator.get_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    comm = device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")
    return {k: [s.cpu() for s in gather(v.to(comm)[None], world)] for k, v in states.items()}


def set_rng_states(states, generator, device, rank):
    """Restore this rank's RNG states from rng_states()'s record (resume)."""
    r = rank % len(states["torch"])
    torch.set_rng_state(states["torch"][r].cpu())
    generator.set_state(states["augment"][r].cpu())
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"][r].cpu(), device)


# a run's log: log.jsonl, and the same records as TensorBoard scalars

def write_log(out_dir, rows):
    """out_dir/log.jsonl rewritten whole from the rows (JSON records), atomically: a resumed run's log is the
    uninterrupted run's."""
    write_text(os.path.join(out_dir, "log.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))


def tensorboard_writer():
    """torch's TensorBoard SummaryWriter class. TensorBoard is an optional dependency: without it, one UserError
    naming the package (the trainers ask for it while checking their config, before any work)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard=true needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def scalars(record, prefix=""):
    """A log record's numeric fields as {tag: number}, nested dicts and lists flattened into "/"-joined tags
    (group_accuracy/women, fair_score_ci/0); strings, booleans and None are left out."""
    out = {}
    for key, value in record.items() if isinstance(record, dict) else enumerate(record):
        tag = f"{prefix}{key}"
        if isinstance(value, (dict, list, tuple)):
            out |= scalars(value, tag + "/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[tag] = value
    return out


class Events:
    """TensorBoard's copy of a run's log.jsonl, event files in out_dir: add(record, step) writes every numeric field
    of the record (scalars()) at the record's step and flushes, so a killed run keeps what it logged. enabled=False
    (tensorboard=false, and every DDP rank but 0) makes it a no-op.

    One stream across resumes, each step once: a session's first add opens its event file with SummaryWriter's
    purge_step at that step, and a resumed run's first add is the record it resumed from (the last one its
    last.safetensors holds). Whatever an interrupted session wrote from that step on is then dropped by both of
    TensorBoard's readers: the Python one (EventAccumulator, tensorboard --load_fast=false) on the purge_step marker,
    the Rust data server on the repeated step, which preempts the later points of each tag it repeats
    (https://github.com/tensorflow/tensorboard/blob/master/tensorboard/data/server/reservoir.rs). A context manager:
    leaving it closes the writer's file and thread."""

    def __init__(self, out_dir, enabled):
        self.out_dir, self.enabled, self.writer = out_dir, enabled, None

    def add(self, record, step):
        if not self.enabled:
            return
        if self.writer is None:
            self.writer = tensorboard_writer()(self.out_dir, purge_step=step)
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.writer is not None:
            self.writer.close()


# the seed tables: one markdown writer for train_vit.py's sweep, train_mixmatch.py's ssl-table and robust.py's table

def mean_std(values):
    """'mean ± std' over seeds, 4 decimals: the sample standard deviation (n - 1), 0 for one seed; nan counts."""
    v = torch.tensor(values, dtype=torch.float64)
    return f"{v.mean():.4f} ± {v.std(correction=int(len(v) > 1)):.4f}"


def write_table(path, intro, header, rows):
    """intro (paragraphs) and a markdown table (header: column names; rows: lists of cells, a float shown with 4
    decimals) -> path, atomically, and printed."""
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = [*(p for paragraph in intro for p in (paragraph, "")), "| " + " | ".join(header) + " |",
             "|---" * len(header) + "|", *("| " + " | ".join(map(cell, r)) + " |" for r in rows)]
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_text(path, text)
    print(text)
    return text
