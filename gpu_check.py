"""The GPU acceptance in one command (make gpu-check; its budget: 8 minutes on one H100/H200):

    python gpu_check.py                 # on a CUDA machine
    python gpu_check.py --device=cpu    # the dry run: the same steps at tiny sizes (CI runs it; the times mean nothing)

1. the CUDA-marked tests (pytest -m cuda; in a dry run they are collected and skipped)
2. bench.py's augmentation and model benchmarks at 80 and 224 (bf16 + compile), the peak memory
3. a synthetic face set with CelebA's split sizes (162,770 / 19,867 / 19,962)
4. one epoch of the recipe (train_vit.py --config=recipe: ViT-S/8 at 224 from a DINO-layout file, SING, bf16 +
   compile) on one device
5. the same over every visible GPU with torchrun (NCCL) when there are several
Every number and command -> OUT_DIR/gpu_check.md and OUT_DIR/gpu_check.json; the recipe runs' logs and checkpoints
-> OUT_DIR/gpu_check/. A failed step does not stop the others; the exit names every step that failed.

The dry run (a CPU): one ViT block at 32x32, a few hundred images, and 2 gloo ranks for step 5. Its DDP step runs
eager in fp32 (compile=false, amp=none): compile + bf16 on the CPU is covered by step 4, and once, on a fresh 2-core
machine, rank 1 of a compiled bf16 gloo run aborted inside native code ("terminate called without an active
exception", SIGABRT, at the last step of epoch 1); 12 further runs under load did not repeat it. Python cannot raise
that abort: it comes from native code (torch, gloo, or inductor's kernels and compile workers), and CI must not fail
by chance. On GPUs step 5 runs the recipe as it is (bf16 + compile, NCCL).
"""

import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import bench
import configurator
import data
import model
import run

CONFIG = dict(
    device="auto",  # auto (CUDA when there is one; else the CPU: the dry run), cpu, cuda, cuda:1, ...
    out_dir="runs",  # gpu_check.md, gpu_check.json and gpu_check/ (the recipe runs) go here
)
ROOT = os.path.dirname(os.path.abspath(__file__))
DRY_RECIPE = ["--img_size=32", "--eval_batch_size=32"]  # the dry run's recipe epoch: 32x32, with the depth-1 weights
DRY_DDP = ["--compile=false", "--amp=none"]  # the dry run's DDP step: eager fp32, see the docstring


def bench_plan(device_name, dry):
    """bench.py's sizes for this device; the dry run: every benchmark once, at the smallest sizes."""
    plan = bench.settings(bench.CONFIG | {"device": device_name, "only": "augment,model"})
    if dry:
        vars(plan).update(pairs_augment=1, pairs_model=1, model_batch_80=2, model_batch_224=2, model_depth=1,
                          augment_n=32)
    return plan


def dino_layout_file(path, depth):
    """A ViT-S/8 weights file in DINO's layout with random values (the Hub may be out of reach; speed and memory do
    not depend on the values) -> path."""
    torch.manual_seed(0)
    net = model.ViT(model.ViTConfig(depth=depth))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    return path


def recipe_run(cmd, out_dir, env=None):
    """Run one recipe epoch (train_vit.py in a subprocess, its output on this terminal) -> (ok, seconds, the epoch's
    log.jsonl record or {})."""
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})})
    seconds = time.time() - t0
    log = os.path.join(out_dir, "log.jsonl")
    record = json.loads(Path(log).read_text().splitlines()[-1]) if proc.returncode == 0 and os.path.exists(log) \
        else {}
    return proc.returncode == 0 and bool(record), seconds, record


def recipe_numbers(record, seconds, n_devices=1, compiled=True):
    """One recipe epoch's log record -> the line gpu_check.md shows."""
    if not record:
        return "-"
    train_s = record["train_s"]
    memory = f", peak {record['peak_mem_gib']:.1f} GiB a GPU" if "peak_mem_gib" in record else ""
    devices = f"{n_devices} device{'s' if n_devices > 1 else ''}"
    return (f"{record['img_per_s']:,.0f} img/s on {devices}; epoch {train_s:.0f} s train + "
            f"{record['time_s'] - train_s:.0f} s validation ({seconds:.0f} s with start-up{' and compile' * compiled})"
            f"{memory}")


class Steps(list):
    """The steps done so far, each {step, ok, seconds, numbers, command}, printed as they are recorded."""

    def record(self, name, ok, seconds, numbers, command=""):
        self.append(dict(step=name, ok=ok, seconds=round(seconds, 1), numbers=numbers, command=command))
        print(f"gpu-check: {name}: {'ok' if ok else 'FAILED'} ({seconds:.0f} s) {numbers}", flush=True)


def cuda_tests(steps):
    """1. The tests that need a GPU (skipped in a dry run: it checks that they are collected)."""
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "tests"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    summary = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    print(proc.stdout[-3000:] if proc.returncode else "", end="")
    steps.record("CUDA tests", proc.returncode == 0, time.time() - t0, summary, shlex.join(["python", *cmd[1:]]))


def benchmarks(steps, results, plan, tmp):
    """2. bench.py's augmentation and model benchmarks, in this process, into results."""
    cuda = plan.device.type == "cuda"
    t0 = time.time()
    if cuda:
        torch.cuda.reset_peak_memory_stats(plan.device)
    bench.bench_augment(results, data.load_split(bench.make_synthetic(tmp, 300), "train")[0][:plan.augment_n], plan)
    bench.bench_model(results, 80, plan.model_batch_80, plan)
    bench.bench_model(results, 224, plan.model_batch_224, plan)
    memory = f"peak {torch.cuda.max_memory_allocated(plan.device) / 2**30:.1f} GiB" if cuda else ""
    steps.record("bench: augment, model at 80 and 224", True, time.time() - t0, memory or "see the table below",
                 "python bench.py --only=augment,model")


def celeba_size_data(steps, tmp, dry):
    """3. A synthetic set with CelebA's split sizes (a few hundred images in a dry run) -> its folder."""
    sizes = (96, 32, 32) if dry else bench.CELEBA_SPLITS
    t0 = time.time()
    data_dir = bench.synthetic_set(os.path.join(tmp, "celeba_size"), sizes)
    steps.record("data: synthetic faces at CelebA's split sizes", True, time.time() - t0,
                 " / ".join(f"{n:,}" for n in sizes) + " images (train / val / test), 80x80")
    return data_dir


def recipe_epochs(steps, device, data_dir, weights, check_dir, dry):
    """4. One recipe epoch on one device; 5. the same over every GPU (NCCL), or in a dry run over 2 gloo ranks."""
    args = ["train_vit.py", "--config=recipe", f"--pretrained={weights}", f"--data={data_dir}", "--epochs=1",
            "--force", f"--device={device}", *(DRY_RECIPE if dry else [])]
    out = os.path.join(check_dir, "recipe")
    cmd = [*args, f"--batch_size={16 if dry else 64}", f"--out_dir={out}"]
    ok, seconds, epoch = recipe_run([sys.executable, *cmd], out)
    steps.record("recipe: one epoch at " + ("32 (dry run)" if dry else "224") + ", bf16 + compile", ok, seconds,
                 recipe_numbers(epoch, seconds), shlex.join(["python", *cmd]))

    n = 2 if dry else torch.cuda.device_count()
    if n < 2:
        steps.record("DDP", True, 0, "skipped: one GPU visible")
        return
    batch = 16 if dry else 64 - 64 % n  # the recipe's global batch, split evenly
    out = os.path.join(check_dir, "recipe_ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args,
           *(DRY_DDP if dry else []), f"--batch_size={batch}", f"--out_dir={out}"]
    env = {"PYTHONFAULTHANDLER": "1", **({"OMP_NUM_THREADS": "1"} if dry else {})}  # a native abort shows its stack
    ok, seconds, epoch = recipe_run(cmd, out, env=env)
    steps.record(f"DDP: the same over {n} " + ("gloo ranks (dry run, eager fp32)" if dry else "GPUs (NCCL)"), ok,
                 seconds, recipe_numbers(epoch, seconds, n, compiled=not dry), shlex.join(["torchrun", *cmd[3:]]))


def write_report(out_dir, command, steps, results, seconds, dry, device):
    """OUT_DIR/gpu_check.json and gpu_check.md (the steps, then bench's table), each written atomically."""
    machine = f"{platform.machine()} CPU (dry run: tiny sizes, the times mean nothing)" if dry else \
        f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(device)}"
    lines = [f"# gpu-check ({time.strftime('%Y-%m-%d')}, {machine}, torch {torch.__version__}, `{command}`, "
             f"{seconds / 60:.1f} min)", "", "| step | result | seconds | numbers | command |", "|---" * 5 + "|"]
    lines += [f"| {st['step']} | {'ok' if st['ok'] else '**FAILED**'} | {st['seconds']:.0f} | {st['numbers']} | "
              f"{'`' + st['command'] + '`' if st['command'] else ''} |" for st in steps]
    lines += ["", "## bench (interleaved rounds, median ratio and spread)", "", *bench.table(results)]
    os.makedirs(out_dir, exist_ok=True)
    run.write_text(os.path.join(out_dir, "gpu_check.json"),
                   json.dumps(dict(steps=steps, bench=results, minutes=seconds / 60, dry_run=dry), indent=1))
    run.write_text(os.path.join(out_dir, "gpu_check.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


@configurator.cli
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = configurator.parse(argv, CONFIG, __file__)
    device = run.pick_device(cfg["device"])
    dry = device.type != "cuda"
    plan = bench_plan(cfg["device"], dry)
    data.keep_freed_memory()  # as bench.py and the training scripts do
    torch.manual_seed(0)
    t0, steps, results = time.time(), Steps(), {}
    cuda_tests(steps)
    with tempfile.TemporaryDirectory() as tmp:  # the data sets (~4 GB at CelebA's size) and the weights file
        benchmarks(steps, results, plan, tmp)
        data_dir = celeba_size_data(steps, tmp, dry)
        weights = dino_layout_file(os.path.join(tmp, "dino_vits8.safetensors"), plan.model_depth)
        recipe_epochs(steps, device, data_dir, weights, os.path.join(cfg["out_dir"], "gpu_check"), dry)
    write_report(cfg["out_dir"], " ".join(["python gpu_check.py", *argv]), steps, results, time.time() - t0, dry,
                 device)
    failed = [st["step"] for st in steps if not st["ok"]]
    if failed:
        raise configurator.UserError(f"gpu-check: {'; '.join(failed)} failed "
                                     f"(see {os.path.join(cfg['out_dir'], 'gpu_check.md')})")


if __name__ == "__main__":
    main()
