"""Speed benchmarks a skeptic can check: every comparison is timed in this process as interleaved rounds (A B A B ...,
warm-up excluded), and reported as the median of the per-round ratios with their spread (min-max and quartiles),
beside the median throughput of each side. A shared machine's load drifts; it hits both sides of a round alike.

    python bench.py                   # full run (GPU when there is one; CPU otherwise)
    python bench.py --quick           # a few minutes on a 2-core CPU
    python bench.py --only=augment    # a subset: loader, augment, model, e2e

1. augment: data.augment on a 256x3x80x80 uint8 batch vs the same list with torchvision, per sample on PIL images:
   img/s, with the process's threads and (CPU) with one thread each
2. loader: data.make_loader (FFCV and resident backends) + data.augment vs torchvision ImageFolder + PIL DataLoader
   with the same augmentation list, same 80x80 images, batch size and workers: img/s per epoch
3. model: the ViT-S/8 train step (forward + backward + SING, the same optimizer for all) of model.ViT vs timm's
   vit_small_patch8_224 and vs transformers' ViTForImageClassification (the facebook/dino-vits8 config, SDPA
   attention), random weights, at 80 and 224: fp32 eager on the CPU, bf16 autocast + torch.compile on CUDA. The step's
   FLOPs (torch.utils.flop_counter) over its time, against the CPU's peak (cores x clock x FLOP/cycle, stated) and a
   measured fp32 matmul, or on CUDA against the GPU's dense bf16 peak (MFU). Inference with and without attention.
4. e2e: the training loop (loader + augment + step) vs the step alone on a resident batch: img/s
On CUDA also ours in bf16 + compile vs fp32 eager, and the estimated time of one epoch of the original recipe
(train_vit.py --config=recipe: CelebA train, 162,770 images) at 224 and 80.

The process first calls data.keep_freed_memory(), as the training scripts do at start (glibc reuses freed memory
instead of page-faulting batch-sized tensors in anew): the numbers are those of the allocator a training run has, for
every side alike. The GPU acceptance that runs some of these benchmarks is gpu_check.py (make gpu-check).
Writes OUT_DIR/bench.json ({name: {ours, baseline, unit, ratio, ratio_min, ratio_max, ratio_q1, ratio_q3, pairs,
note}}) and OUT_DIR/bench.md.
"""

import contextlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import beton
import configurator
import data
import model
import run
import sources
from sing import SING

CONFIG = dict(
    quick=False,  # small sizes, fewer rounds: a few minutes on a 2-core CPU
    only="loader,augment,model,e2e",  # comma-separated subset of the benchmarks
    device="auto",  # auto (CUDA when there is one, else the CPU), cpu, cuda, cuda:1, ...
    out_dir="runs",  # bench.json and bench.md go here
    pairs=0,  # interleaved rounds per comparison after warm-up (0: each benchmark's default, fewer with quick)
)
BENCHMARKS = ("loader", "augment", "model", "e2e")
CELEBA_SPLITS = (162_770, 19_867, 19_962)  # CelebA's official train / val / test sizes
CELEBA_TRAIN = CELEBA_SPLITS[0]
ROOT = os.path.dirname(os.path.abspath(__file__))
# dense bf16 tensor-core peaks (no sparsity), TFLOP/s; the first name contained in the device's name wins
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


# ---------------------------------------------------------------------------------------------------------------
# Timing: interleaved rounds, the median ratio and its spread

def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved(fns, rounds, warmup=1):
    """{name: fn} -> {name: [items/s, one per round]}. Each fn() does one unit of work and returns how many items it
    processed. After `warmup` calls of each, `rounds` rounds call them in turn (A B A B ... for two, A B C A B C ...
    for three): a change in the machine's load hits every contender of a round alike. CUDA is synchronised around
    every call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    rates = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            t = time.perf_counter()
            n = fn()
            sync()
            rates[name].append(n / (time.perf_counter() - t))
    return rates


def spread(values):
    """-> (median, min, max, first quartile, third quartile) of a list of numbers."""
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return statistics.median(values), min(values), max(values), q1, q3


def _round(v):
    return None if v is None else float(f"{v:.4g}")


def row(results, name, ours, baseline, unit="img/s", note=""):
    """Record and print one comparison. ours, baseline: one number, or one per round (paired by position; a single
    baseline stands for every round). The ratio is the median of the per-round ratios ours/baseline, with its spread;
    ours and baseline are the medians of each side. baseline None: a number without a comparison."""
    ours = list(ours) if isinstance(ours, list | tuple) else [ours]
    if baseline is None:
        results[name] = dict(ours=_round(statistics.median(ours)), baseline=None, unit=unit, ratio=None, note=note)
        print(f"{name:58s} {results[name]['ours']:>10} {unit}  {note}", flush=True)
        return results[name]
    baseline = list(baseline) if isinstance(baseline, list | tuple) else [baseline] * len(ours)
    if len(baseline) != len(ours):
        raise ValueError(f"{name}: {len(ours)} values of ours vs {len(baseline)} of the baseline")
    ratios = [a / b for a, b in zip(ours, baseline)]
    mid, lo, hi, q1, q3 = spread(ratios)
    results[name] = dict(ours=_round(statistics.median(ours)), baseline=_round(statistics.median(baseline)), unit=unit,
                         ratio=round(mid, 3), ratio_min=round(lo, 3), ratio_max=round(hi, 3), ratio_q1=round(q1, 3),
                         ratio_q3=round(q3, 3), pairs=len(ratios), note=note)
    print(f"{name:58s} ours {results[name]['ours']:>10} baseline {results[name]['baseline']:>10} {unit:8s} "
          f"ratio {mid:6.2f}x  (min-max {lo:.2f}-{hi:.2f}, IQR {q1:.2f}-{q3:.2f}, {len(ratios)} pairs)", flush=True)
    return results[name]


@contextlib.contextmanager
def threads(n):
    """torch's intra-op threads set to n inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------------
# FLOPs and peaks

def _sdpa_cpu_flops():
    """FLOP formulas for the CPU's fused attention kernels, which torch.utils.flop_counter does not list (it counts the
    CUDA ones): the same formulas as theirs."""
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten
    if not hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return {}
    return {aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v),
            aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, q, k, v, *args, out_shape=None, **kw: fc.sdpa_backward_flop_count(grad, q, k, v)}


def count_flops(fn):
    """FLOPs of one call of fn(), counted by torch.utils.flop_counter: matrix products, convolutions and attention,
    forward and backward, 2 per multiply-add. Elementwise work (norms, activations, the optimizer) is not counted,
    which is how MFU is usually reckoned."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False, custom_mapping=_sdpa_cpu_flops()) as counter:
        fn()
    return counter.get_total_flops()


def _cpuinfo():
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpufreq_max_mhz():
    """The CPU's max clock in MHz from cpufreq (cpuinfo_max_freq), or None where the kernel does not expose it."""
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1e3
    except (OSError, ValueError):
        return None


def cpu_peak(info=None, n_cores=None):
    """-> (fp32 GFLOP/s, how it was reckoned) for this process's cores: cores (os.sched_getaffinity) x clock x fp32
    FLOP per cycle per core. Clock: cpufreq's cpuinfo_max_freq when the kernel exposes it, else /proc/cpuinfo's
    "cpu MHz" (a VM's nominal clock; turbo may run faster). FLOP/cycle from the ISA flags: AVX-512 = 2 FMA units x 16
    lanes x 2 = 64 (AMD family 25, Zen 4, splits 512-bit ops into two 256-bit halves: 32), AVX2 + FMA = 2 x 8 x 2 =
    32, AVX = 16, SSE = 8. (None, why) where it cannot tell (not x86, no clock)."""
    info = _cpuinfo() if info is None else info
    n_cores = data.cores() if n_cores is None else n_cores
    field = lambda key: next((line.split(":", 1)[1].strip() for line in info.splitlines()
                              if line.split(":", 1)[0].strip() == key), "")
    flags = set(field("flags").split())
    if not flags:
        return None, "peak unknown: no x86 flags in /proc/cpuinfo"
    mhz, clock_from = cpufreq_max_mhz(), "cpufreq max"
    if mhz is None:
        mhz, clock_from = float(field("cpu MHz") or 0), "/proc/cpuinfo cpu MHz, no max clock exposed"
    if not mhz:
        return None, "peak unknown: no clock in cpufreq or /proc/cpuinfo"
    vendor, family = field("vendor_id"), int(field("cpu family") or 0)
    if "avx512f" in flags:
        per_cycle, isa = (32, "AVX-512 as 2x256-bit (AMD family 25): 2 FMA x 8 lanes x 2") \
            if vendor == "AuthenticAMD" and family <= 25 else (64, "AVX-512: 2 FMA x 16 lanes x 2")
    elif "avx2" in flags and "fma" in flags:
        per_cycle, isa = 32, "AVX2 + FMA: 2 FMA x 8 lanes x 2"
    elif "avx" in flags:
        per_cycle, isa = 16, "AVX: 8-lane add + 8-lane mul"
    else:
        per_cycle, isa = 8, "SSE: 4-lane add + 4-lane mul"
    peak = n_cores * mhz / 1e3 * per_cycle
    return peak, (f"CPU peak {peak:.0f} GFLOP/s = {n_cores} cores x {mhz / 1e3:.3g} GHz ({clock_from}) x "
                  f"{per_cycle} fp32 FLOP/cycle ({isa})")


def matmul_fn(device, dtype=torch.float32, n=2048, repeats=3):
    """-> fn(): `repeats` n x n matrix products on `device`, returning the GFLOP done, so that interleaved() gives
    GFLOP/s: what the BLAS reaches here (a practical ceiling), measured in the same rounds as what it is compared to."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))

    def products():
        for _ in range(repeats):
            a @ b
        return repeats * 2 * n ** 3 / 1e9
    return products


def gpu_peak(name):
    """-> (dense bf16 TFLOP/s or None, how)."""
    key = next((k for k in PEAK_BF16_TFLOPS if k in name), None)
    if key is None:
        return None, f"peak unknown for {name} (bench.PEAK_BF16_TFLOPS lists {', '.join(PEAK_BF16_TFLOPS)})"
    return PEAK_BF16_TFLOPS[key], f"{key} dense bf16 peak {PEAK_BF16_TFLOPS[key]:.0f} TFLOP/s (datasheet, no sparsity)"


# ---------------------------------------------------------------------------------------------------------------
# The baselines: the same augmentation list per sample with torchvision, the data as an ImageFolder tree, and the
# same ViT-S/8 from timm and from transformers

def torchvision_transform(out_size, size=80):
    """The same augmentation list as data.augment(), per sample with torchvision on PIL images (ImageFolder-ready).
    Erasing runs last on the tensor, where torchvision has it; the box is drawn as an area fraction, so its
    distribution does not change with the resize."""
    import torchvision.transforms as T
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.RandomRotation(math.degrees(0.5), fill=0)], p=0.5),
        T.RandomApply([T.ColorJitter(brightness=(1.0, 1.5), saturation=(1.0, 1.5))], p=0.5),
        T.RandomApply([T.GaussianBlur(5, sigma=(0.1, 2.0))], p=0.5),
        T.Resize(out_size, interpolation=T.InterpolationMode.BICUBIC),
        T.PILToTensor(),
        T.RandomErasing(p=0.5, scale=(0.02, 0.4), ratio=(0.15, 6.0), value=list(data.ERASE_FILL)),
        T.ConvertImageDtype(torch.float32),
        T.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD),
    ])


def export_image_folder(data_dir, split, root):
    """Write a split as PNG files root/<label>/<index>.png (for torchvision's ImageFolder)."""
    from PIL import Image
    from tqdm import tqdm
    x, y, _ = data.load_split(data_dir, split)
    for i in tqdm(range(len(x)), desc=f"export {split}", unit="img"):
        os.makedirs(os.path.join(root, str(int(y[i]))), exist_ok=True)
        Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(os.path.join(root, str(int(y[i])), f"{i:06d}.png"))


class Logits(torch.nn.Module):
    """transformers' model -> a module whose forward(x) returns the logits tensor, as ours and timm's do."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(pixel_values=x).logits


def hf_dino_vits8(img_size, num_classes=2, depth=12):
    """transformers' ViTForImageClassification with facebook/dino-vits8's config.json written out (no download),
    SDPA attention, random weights. depth: fewer blocks for a quick test."""
    import transformers
    cfg = transformers.ViTConfig(hidden_size=384, num_hidden_layers=depth, num_attention_heads=6,
                                 intermediate_size=1536, hidden_act="gelu", hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0, patch_size=8, image_size=img_size,
                                 num_channels=3, qkv_bias=True, layer_norm_eps=1e-12, num_labels=num_classes,
                                 attn_implementation="sdpa")
    return Logits(transformers.ViTForImageClassification(cfg))


def vit_trio(img_size, depth=12):
    """{ours, timm, transformers}: the same ViT-S/8 (2-class head); ours and timm's share initial weights (a strict
    load: the same tensors). depth: fewer blocks for a quick test."""
    import timm
    ours = model.ViT(model.ViTConfig(img_size=img_size, num_classes=2, depth=depth))
    theirs = timm.create_model("vit_small_patch8_224", pretrained=False, img_size=img_size, num_classes=2, depth=depth)
    theirs.load_state_dict(ours.state_dict())
    return {"ours": ours, "timm": theirs, "transformers": hf_dino_vits8(img_size, depth=depth)}


def train_step_fn(net, batch, img_size, device, amp=False, compile=False):
    """-> step(): one forward + backward + SING step on a fixed random batch; returns the batch size."""
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    y = torch.randint(0, 2, (batch,), device=device)
    opt = SING(net.parameters(), lr=5e-4, weight_decay=5e-3)
    fwd = torch.compile(net) if compile else net

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(fwd(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return batch
    return step


# ---------------------------------------------------------------------------------------------------------------
# 1. augmentation alone

def bench_augment(results, x_u8, plan):
    from PIL import Image
    per_sample = torchvision_transform(plan.out_size)
    images = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in x_u8]
    x_dev = x_u8.to(plan.device)
    gen = torch.Generator(device=plan.device).manual_seed(0)
    fns = {"ours": lambda: len(data.augment(x_dev, plan.out_size, generator=gen)),
           "torchvision": lambda: len(torch.stack([per_sample(im) for im in images]))}
    where = f"{plan.device.type}" + ("" if plan.device.type == "cpu" else ", torchvision on the CPU")
    r = interleaved(fns, plan.pairs_augment)
    row(results, f"augment: batched vs per-sample torchvision ({len(x_u8)} imgs, {where})", r["ours"],
        r["torchvision"], note=f"{torch.get_num_threads()} torch threads, out {plan.out_size}")
    if plan.device.type == "cpu" and torch.get_num_threads() > 1:
        with threads(1):
            r = interleaved(fns, plan.pairs_augment)
        row(results, "augment: the same, 1 thread each", r["ours"], r["torchvision"])


# ---------------------------------------------------------------------------------------------------------------
# 2. loaders

def epoch_fn(loader, transform):
    """-> fn(): one full pass over `loader`, each batch put through `transform`; returns the images seen."""
    def one_epoch():
        n = 0
        for x, *_ in loader:
            transform(x).sum().item()  # force the work, as a training step would
            n += len(x)
        return n
    return one_epoch


def bench_loaders(results, data_dir, plan):
    import torchvision
    dev = plan.device
    gen = torch.Generator(device=dev).manual_seed(0)
    aug = lambda x: data.augment(x, plan.out_size, generator=gen)
    workers = data.cores()
    fns = {backend: epoch_fn(data.make_loader(data_dir, "train", plan.batch, train=True, device=dev, backend=backend),
                             aug) for backend in ("ffcv", "resident")}
    with tempfile.TemporaryDirectory() as root:
        export_image_folder(data_dir, "train", root)
        folder = torchvision.datasets.ImageFolder(root, transform=torchvision_transform(plan.out_size))
        tv = torch.utils.data.DataLoader(folder, batch_size=plan.batch, shuffle=True, num_workers=workers,
                                         persistent_workers=True, drop_last=True)
        fns["torchvision"] = epoch_fn(tv, lambda x: x.to(dev))
        r = interleaved(fns, plan.pairs_loader)  # warm-up epoch: FFCV's JIT, worker start-up, page cache
    row(results, f"loader: ffcv + augment vs ImageFolder/PIL ({workers} workers)", r["ffcv"], r["torchvision"])
    row(results, "loader: resident + augment vs ImageFolder/PIL", r["resident"], r["torchvision"])


# ---------------------------------------------------------------------------------------------------------------
# 3. model

def bench_model(results, img_size, batch, plan):
    dev, cuda = plan.device, plan.device.type == "cuda"
    nets = {name: net.to(dev).train() for name, net in vit_trio(img_size, plan.model_depth).items()}
    steps = {name: train_step_fn(net, batch, img_size, dev, amp=cuda, compile=cuda) for name, net in nets.items()}
    how = "bf16 + compile" if cuda else "fp32 eager"
    mm = dict(dtype=torch.bfloat16, n=8192, repeats=20) if cuda else dict(dtype=torch.float32, n=2048, repeats=3)
    r = interleaved({**steps, "matmul": matmul_fn(dev, **mm)}, plan.pairs_model, warmup=3 if cuda else 1)
    mm_note = f"{mm['repeats']} products {mm['n']}x{mm['n']} {str(mm['dtype'])[6:]} in every round"
    for other in ("timm", "transformers"):
        row(results, f"model: train step ours vs {other} @{img_size} (batch {batch}, {how})", r["ours"], r[other])

    # per image, the same for all three (tests/test_bench.py); counted on an eager step (compiled code hides its ops)
    flops = count_flops(train_step_fn(nets["ours"], batch, img_size, dev)) / batch
    achieved = [rate * flops / 1e9 for rate in r["ours"]]  # GFLOP/s, one per round
    if cuda:
        peak, how_peak = gpu_peak(torch.cuda.get_device_name(dev))
        tflops = [a / 1e3 for a in achieved]
        row(results, f"model: MFU, ours train step @{img_size} (bf16 + compile)", tflops, peak, unit="TFLOP/s",
            note=f"{flops / 1e9:.1f} GFLOP/img counted; {how_peak}")
        row(results, f"model: the same vs a measured bf16 matmul @{img_size}", tflops,
            [m / 1e3 for m in r["matmul"]], unit="TFLOP/s", note=mm_note)
    else:
        peak, how_peak = cpu_peak()
        row(results, f"model: CPU FLOP/s share, ours train step @{img_size}", achieved, peak, unit="GFLOP/s",
            note=f"{flops / 1e9:.1f} GFLOP/img counted; {how_peak}")
        row(results, f"model: the same vs a measured fp32 matmul @{img_size}", achieved, r["matmul"], unit="GFLOP/s",
            note=mm_note)

    ours = nets["ours"].eval()
    x = torch.randn(batch, 3, img_size, img_size, device=dev)
    with torch.no_grad():
        r = interleaved({"plain": lambda: len(ours(x)), "attn": lambda: len(ours.get_last_selfattention(x))},
                        plan.pairs_model)
    row(results, f"model: inference vs with attention @{img_size} (batch {batch}, fp32)", r["plain"], r["attn"])
    if cuda:
        ours.train()
        r = interleaved({"fast": steps["ours"], "eager": train_step_fn(ours, batch, img_size, dev)}, plan.pairs_model,
                        warmup=3)
        row(results, f"model: bf16 + compile vs fp32 eager @{img_size} (batch {batch})", r["fast"], r["eager"])
        rate = statistics.median(r["fast"])
        row(results, f"recipe epoch @{img_size} (estimated from the step rate)", CELEBA_TRAIN / rate, None, unit="s",
            note=f"{CELEBA_TRAIN} images at {rate:.0f} img/s")
    del nets, steps


# ---------------------------------------------------------------------------------------------------------------
# 4. end to end

def bench_end_to_end(results, data_dir, plan):
    dev, img_size, batch, steps = plan.device, plan.e2e_size, plan.e2e_batch, plan.e2e_steps
    cuda = dev.type == "cuda"
    net = model.ViT(model.ViTConfig(img_size=img_size, num_classes=2)).to(dev).train()
    step_alone = train_step_fn(net, batch, img_size, dev, amp=cuda)
    opt = SING(net.parameters(), lr=5e-4, weight_decay=5e-3)
    gen = torch.Generator(device=dev).manual_seed(0)
    loader = data.make_loader(data_dir, "train", batch, train=True, device=dev, backend=plan.e2e_backend)

    def batches():  # endless: a new epoch (and order) whenever one ends
        while True:
            yield from loader
    stream = batches()

    def loop():
        for _ in range(steps):
            x, y, _ = next(stream)
            inputs = data.augment(x, img_size, generator=gen)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                loss = F.cross_entropy(net(inputs).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return steps * batch

    def alone():
        return sum(step_alone() for _ in range(steps))

    r = interleaved({"loop": loop, "alone": alone}, plan.pairs_e2e)
    row(results, f"end to end: training loop vs step alone @{img_size} (batch {batch}, {plan.e2e_backend})", r["loop"],
        r["alone"], note=f"{steps} steps a round")


# ---------------------------------------------------------------------------------------------------------------
# report and command line

def table(results):
    """The rows of `results` as a markdown table, then their notes."""
    lines = ["| benchmark | ours | baseline | unit | ratio | min-max | IQR | pairs |", "|---" * 8 + "|"]
    notes = []
    for name, r in results.items():
        if r["ratio"] is None:
            lines.append(f"| {name} | {r['ours']} | - | {r['unit']} | - | - | - | - |")
        else:
            lines.append(f"| {name} | {r['ours']} | {r['baseline']} | {r['unit']} | **{r['ratio']}x** | "
                         f"{r['ratio_min']}-{r['ratio_max']} | {r['ratio_q1']}-{r['ratio_q3']} | {r['pairs']} |")
        if r.get("note"):
            notes.append(f"- {name}: {r['note']}")
    return lines + (["", *notes] if notes else [])


def write_report(results, plan, seconds, load=None):
    """OUT_DIR/bench.json and a markdown table, OUT_DIR/bench.md, each written atomically. load: the 1-minute load
    averages at the start and the end, for the record."""
    when = time.strftime("%Y-%m-%d")
    n_cores = data.cores()
    machine = torch.cuda.get_device_name(plan.device) if plan.device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {n_cores} cores"
    busy = "" if load is None else (f" The machine's 1-minute load average was {load[0]:.1f} at the start and "
                                    f"{load[1]:.1f} at the end, on {n_cores} cores" +
                                    # the end's figure includes this run's own threads: the start tells of others
                                    (": other work shared the cores, so expect a wide spread." if load[0] > n_cores / 2
                                     else "."))
    malloc = (" glibc's malloc kept freed memory for reuse (data.keep_freed_memory(), called at start as the training "
              "scripts do)." if plan.malloc else " data.keep_freed_memory() had no effect here (not Linux/glibc).")
    lines = [f"# bench ({when}, {machine}, torch {torch.__version__}, `{plan.command}`, {seconds / 60:.1f} min)", "",
             "Each ratio is the median over interleaved rounds (A B A B ...) of ours / baseline, with its spread; "
             "ours and baseline are the medians of each side." + busy + malloc, "", *table(results)]
    os.makedirs(plan.out_dir, exist_ok=True)
    for name, text in (("bench.json", json.dumps(results, indent=1)), ("bench.md", "\n".join(lines) + "\n")):
        run.write_text(os.path.join(plan.out_dir, name), text)
    print("\n".join(lines))


def settings(cfg, argv=()):
    """The config -> this run's plan: sizes (smaller with quick, larger on a GPU), rounds, device and command line."""
    dev = run.pick_device(cfg["device"])
    cpu, quick = dev.type == "cpu", cfg["quick"]
    only = [b.strip() for b in cfg["only"].split(",") if b.strip()]
    configurator.require(cfg, "only", lambda _: only and not set(only) - set(BENCHMARKS),
                         f"a comma-separated subset of {','.join(BENCHMARKS)}")
    configurator.require(cfg, "pairs", lambda n: n >= 0, "0 or more (0: each benchmark's default)")
    pairs = lambda quick_n, full_n: cfg["pairs"] or (quick_n if quick else full_n)
    return types.SimpleNamespace(
        device=dev, quick=quick, only=only, out_dir=cfg["out_dir"], malloc=False,
        command=" ".join(["python bench.py", *argv]),
        n=2048 if quick else (20000 if cpu else 100_000),  # synthetic images for the loader benchmarks
        batch=256, out_size=80 if cpu else 224,  # loader/augment: 80x80 out on the CPU; the GPU feeds the 224 model
        pairs_augment=pairs(7, 15), pairs_loader=pairs(3, 3), pairs_model=pairs(3, 5), pairs_e2e=pairs(5, 5),
        model_batch_80=8 if quick else (32 if cpu else 256),
        model_batch_224=2 if quick else (4 if cpu else 64),
        model_depth=12,  # ViT-S/8 blocks in the model benchmark
        augment_n=256,  # images in the augmentation benchmark
        e2e_size=80 if cpu else 224, e2e_batch=(16 if quick else 32) if cpu else 64,
        e2e_steps=2 if quick else (3 if cpu else 50),
        e2e_backend="resident",
    )


def synthetic_set(folder, sizes, draw=20_000):
    """A synthetic face set (sources.synthetic_source with its defaults, written by beton.write_dataset) with the given
    train / val / test sizes -> folder. At most `draw` faces are drawn and tiled to the sizes (CelebA's 202,599 in
    about a minute): which faces repeat does not change the speed."""
    cfg = {**sources.SYNTHETIC, "n": min(draw, sum(sizes)), "split": tuple(n / sum(sizes) for n in sizes),
           "out_dir": folder}
    ds = sources.synthetic_source(cfg)
    for split, n in zip(data.SPLITS, sizes):
        arrays = ds["splits"][split]
        idx = np.arange(n) % len(arrays["labels"])
        ds["splits"][split] = {k: v[idx] for k, v in arrays.items()}
    os.makedirs(folder)
    beton.write_dataset(ds, folder, "synthetic", cfg)
    return folder


def make_synthetic(root, n):
    """The synthetic face set the benchmarks read: n images, 90 % of them train -> its folder."""
    return synthetic_set(os.path.join(root, "synthetic"), (n - 2 * (n // 20), n // 20, n // 20))


@configurator.cli
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    plan = settings(configurator.parse(argv, CONFIG, __file__), argv)
    plan.malloc = data.keep_freed_memory()  # once at start, as train_vit.py and train_mixmatch.py do
    torch.manual_seed(0)
    results, t0, load = {}, time.time(), os.getloadavg()[0]
    if load > data.cores():
        print(f"note: load average {load:.1f} on {data.cores()} cores: other work shares them, the ratios will spread",
              flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        # the augmentation alone needs 256 images, not the loader benchmarks' set
        data_dir = make_synthetic(tmp, plan.n if {"loader", "e2e"} & set(plan.only) else 300)
        if "augment" in plan.only:
            bench_augment(results, data.load_split(data_dir, "train")[0][:plan.augment_n], plan)
        if "loader" in plan.only:
            bench_loaders(results, data_dir, plan)
        if "model" in plan.only:
            bench_model(results, 80, plan.model_batch_80, plan)
            bench_model(results, 224, plan.model_batch_224, plan)
        if "e2e" in plan.only:
            bench_end_to_end(results, data_dir, plan)
    write_report(results, plan, time.time() - t0, load=(load, os.getloadavg()[0]))


if __name__ == "__main__":
    main()
