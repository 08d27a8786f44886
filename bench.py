"""Speed benchmarks a skeptic can check: every comparison is timed in this process as interleaved rounds (A B A B ...,
warm-up excluded), and reported as the median of the per-round ratios with their spread (min-max and quartiles),
beside the median throughput of each side. A shared machine's load drifts; it hits both sides of a round alike.

    python bench.py                   # full run (GPU when there is one; CPU otherwise)
    python bench.py --quick           # a few minutes on a 2-core CPU
    python bench.py --only=augment    # a subset: loader, augment, model, e2e
    python bench.py --gpu_check       # make gpu-check: the GPU acceptance (a dry run at tiny sizes on a CPU)

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
(train_vit.py --config=recipe: CelebA train, 162,770 images) at 224 and 80. The process first calls
data.keep_freed_memory() (glibc reuses freed memory instead of page-faulting batch-sized tensors in anew; it applies to
every side alike; --keep_freed_memory=false measures the allocator's defaults).
5. gpu_check (make gpu-check on a CUDA machine; its budget: 8 minutes on one H100/H200): the CUDA tests, the augment and
   model benchmarks at 80 and 224, one epoch of the recipe at 224 (bf16 + compile) on a synthetic set of CelebA's
   split sizes, the same over every GPU with torchrun when there are several, the peak memory -> OUT_DIR/gpu_check.md
   and gpu_check.json. On a CPU the same steps run at tiny sizes (CI runs this dry run).
Writes OUT_DIR/bench.json ({name: {ours, baseline, unit, ratio, ratio_min, ratio_max, ratio_q1, ratio_q3, pairs,
note}}) and OUT_DIR/bench.md.
"""

import contextlib
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import configurator
import data
import model
from sing import SING

CONFIG = dict(
    quick=False,  # small sizes, fewer rounds: a few minutes on a 2-core CPU
    only="loader,augment,model,e2e",  # comma-separated subset of the benchmarks
    device="auto",  # auto (CUDA when there is one, else the CPU), cpu, cuda, cuda:1, ...
    out_dir="runs",  # bench.json and bench.md go here
    pairs=0,  # interleaved rounds per comparison after warm-up (0: each benchmark's default, fewer with quick)
    keep_freed_memory=True,  # data.keep_freed_memory() first (glibc keeps freed memory: no page faults per batch)
    gpu_check=False,  # make gpu-check: the GPU acceptance (see gpu_check) -> out_dir/gpu_check.md; a dry run on a CPU
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


def cpu_peak(info=None, cores=None):
    """-> (fp32 GFLOP/s, how it was reckoned) for this process's cores: cores (os.sched_getaffinity) x clock x fp32
    FLOP per cycle per core. Clock: cpufreq's cpuinfo_max_freq when the kernel exposes it, else /proc/cpuinfo's
    "cpu MHz" (a VM's nominal clock; turbo may run faster). FLOP/cycle from the ISA flags: AVX-512 = 2 FMA units x 16
    lanes x 2 = 64 (AMD family 25, Zen 4, splits 512-bit ops into two 256-bit halves: 32), AVX2 + FMA = 2 x 8 x 2 =
    32, AVX = 16, SSE = 8. (None, why) where it cannot tell (not x86, no clock)."""
    info = _cpuinfo() if info is None else info
    cores = len(os.sched_getaffinity(0)) if cores is None else cores
    field = lambda key: next((line.split(":", 1)[1].strip() for line in info.splitlines()
                              if line.split(":", 1)[0].strip() == key), "")
    flags = set(field("flags").split())
    if not flags:
        return None, "peak unknown: no x86 flags in /proc/cpuinfo"
    try:
        mhz, clock_from = int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1e3, \
            "cpufreq max"
    except (OSError, ValueError):
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
    peak = cores * mhz / 1e3 * per_cycle
    return peak, (f"CPU peak {peak:.0f} GFLOP/s = {cores} cores x {mhz / 1e3:.3g} GHz ({clock_from}) x {per_cycle} "
                  f"fp32 FLOP/cycle ({isa})")


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

def bench_augment(results, x_u8, run):
    from PIL import Image
    per_sample = torchvision_transform(run.out_size)
    images = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in x_u8]
    x_dev = x_u8.to(run.device)
    gen = torch.Generator(device=run.device).manual_seed(0)
    fns = {"ours": lambda: len(data.augment(x_dev, run.out_size, generator=gen)),
           "torchvision": lambda: len(torch.stack([per_sample(im) for im in images]))}
    where = f"{run.device.type}" + ("" if run.device.type == "cpu" else ", torchvision on the CPU")
    r = interleaved(fns, run.pairs_augment)
    row(results, f"augment: batched vs per-sample torchvision ({len(x_u8)} imgs, {where})", r["ours"],
        r["torchvision"], note=f"{torch.get_num_threads()} torch threads, out {run.out_size}")
    if run.device.type == "cpu" and torch.get_num_threads() > 1:
        with threads(1):
            r = interleaved(fns, run.pairs_augment)
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


def bench_loaders(results, data_dir, run):
    import torchvision
    dev = run.device
    gen = torch.Generator(device=dev).manual_seed(0)
    aug = lambda x: data.augment(x, run.out_size, generator=gen)
    workers = len(os.sched_getaffinity(0))
    fns = {backend: epoch_fn(data.make_loader(data_dir, "train", run.batch, train=True, device=dev, backend=backend),
                             aug) for backend in ("ffcv", "resident")}
    with tempfile.TemporaryDirectory() as root:
        export_image_folder(data_dir, "train", root)
        folder = torchvision.datasets.ImageFolder(root, transform=torchvision_transform(run.out_size))
        tv = torch.utils.data.DataLoader(folder, batch_size=run.batch, shuffle=True, num_workers=workers,
                                         persistent_workers=True, drop_last=True)
        fns["torchvision"] = epoch_fn(tv, lambda x: x.to(dev))
        r = interleaved(fns, run.pairs_loader)  # warm-up epoch: FFCV's JIT, worker start-up, page cache
    row(results, f"loader: ffcv + augment vs ImageFolder/PIL ({workers} workers)", r["ffcv"], r["torchvision"])
    row(results, "loader: resident + augment vs ImageFolder/PIL", r["resident"], r["torchvision"])


# ---------------------------------------------------------------------------------------------------------------
# 3. model

def bench_model(results, img_size, batch, run):
    dev, cuda = run.device, run.device.type == "cuda"
    nets = {name: net.to(dev).train() for name, net in vit_trio(img_size, run.model_depth).items()}
    steps = {name: train_step_fn(net, batch, img_size, dev, amp=cuda, compile=cuda) for name, net in nets.items()}
    how = "bf16 + compile" if cuda else "fp32 eager"
    mm = dict(dtype=torch.bfloat16, n=8192, repeats=20) if cuda else dict(dtype=torch.float32, n=2048, repeats=3)
    r = interleaved({**steps, "matmul": matmul_fn(dev, **mm)}, run.pairs_model, warmup=3 if cuda else 1)
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
                        run.pairs_model)
    row(results, f"model: inference vs with attention @{img_size} (batch {batch}, fp32)", r["plain"], r["attn"])
    if cuda:
        ours.train()
        r = interleaved({"fast": steps["ours"], "eager": train_step_fn(ours, batch, img_size, dev)}, run.pairs_model,
                        warmup=3)
        row(results, f"model: bf16 + compile vs fp32 eager @{img_size} (batch {batch})", r["fast"], r["eager"])
        rate = statistics.median(r["fast"])
        row(results, f"recipe epoch @{img_size} (estimated from the step rate)", CELEBA_TRAIN / rate, None, unit="s",
            note=f"{CELEBA_TRAIN} images at {rate:.0f} img/s")
    del nets, steps


# ---------------------------------------------------------------------------------------------------------------
# 4. end to end

def bench_end_to_end(results, data_dir, run):
    dev, img_size, batch, steps = run.device, run.e2e_size, run.e2e_batch, run.e2e_steps
    cuda = dev.type == "cuda"
    net = model.ViT(model.ViTConfig(img_size=img_size, num_classes=2)).to(dev).train()
    step_alone = train_step_fn(net, batch, img_size, dev, amp=cuda)
    opt = SING(net.parameters(), lr=5e-4, weight_decay=5e-3)
    gen = torch.Generator(device=dev).manual_seed(0)
    loader = data.make_loader(data_dir, "train", batch, train=True, device=dev, backend=run.e2e_backend)

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

    r = interleaved({"loop": loop, "alone": alone}, run.pairs_e2e)
    row(results, f"end to end: training loop vs step alone @{img_size} (batch {batch}, {run.e2e_backend})", r["loop"],
        r["alone"], note=f"{steps} steps a round")


# ---------------------------------------------------------------------------------------------------------------
# 5. make gpu-check: the GPU acceptance in one command

def celeba_size_set(folder, sizes, draw=20_000):
    """A synthetic data set with the given train / val / test sizes, built in about a minute: `draw` faces are drawn
    (sources.synthetic_source) and tiled to the sizes (which faces repeat does not change the speed) -> folder."""
    import sources  # the data builders: only this check needs them
    cfg = {**sources.SYNTHETIC, "n": min(draw, sum(sizes)), "out_dir": folder}
    ds = sources.synthetic_source(cfg)
    for split, n in zip(data.SPLITS, sizes):
        arrays = ds["splits"][split]
        idx = np.arange(n) % len(arrays["labels"])
        ds["splits"][split] = {k: v[idx] for k, v in arrays.items()}
    os.makedirs(folder)
    sources.write_dataset(ds, folder, "synthetic", cfg)
    return folder


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


def recipe_numbers(record, seconds, n_devices=1):
    """One recipe epoch's log record -> the line gpu_check.md shows."""
    if not record:
        return "-"
    train_s = record["train_s"]
    memory = f", peak {record['peak_mem_gib']:.1f} GiB a GPU" if "peak_mem_gib" in record else ""
    devices = f"{n_devices} device{'s' if n_devices > 1 else ''}"
    return (f"{record['img_per_s']:,.0f} img/s on {devices}; epoch {train_s:.0f} s train + "
            f"{record['time_s'] - train_s:.0f} s validation ({seconds:.0f} s with start-up and compile){memory}")


def gpu_check(run):
    """The GPU acceptance: the CUDA-marked tests, the model benchmark at 80 and 224 (and the augmentation) on the
    GPU, one epoch of the recipe (train_vit.py --config=recipe: ViT-S/8 at 224, SING, bf16 + compile) on a synthetic
    set of CelebA's size, the same over every visible GPU with torchrun (NCCL) when there are several, the peak
    memory; every number and command into out_dir/gpu_check.md and gpu_check.json. On a CPU it is a dry run: the same
    steps at tiny sizes (one block, 32x32, a few hundred images, 2 gloo ranks), which CI runs so that none of it rots;
    its times mean nothing."""
    cuda = run.device.type == "cuda"
    dry = not cuda
    check_dir = os.path.join(run.out_dir, "gpu_check")  # the recipe runs' logs and checkpoints
    t_start, steps, results = time.time(), [], {}

    def record(name, ok, seconds, numbers, command=""):
        steps.append(dict(step=name, ok=ok, seconds=round(seconds, 1), numbers=numbers, command=command))
        print(f"gpu-check: {name}: {'ok' if ok else 'FAILED'} ({seconds:.0f} s) {numbers}", flush=True)

    # 1. the tests that need a GPU (skipped in a dry run: it checks that they are collected)
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "tests"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    summary = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    print(proc.stdout[-3000:] if proc.returncode else "", end="")
    record("CUDA tests", proc.returncode == 0, time.time() - t0, summary, shlex.join(["python", *cmd[1:]]))

    with tempfile.TemporaryDirectory() as tmp:  # the data sets (~4 GB at CelebA's size) and the weights file
        # 2. the benchmarks (this process; settings() sized them for a dry run)
        t0 = time.time()
        if cuda:
            torch.cuda.reset_peak_memory_stats(run.device)
        bench_augment(results, data.load_split(make_synthetic(tmp, 300), "train")[0][:run.augment_n], run)
        bench_model(results, 80, run.model_batch_80, run)
        bench_model(results, 224, run.model_batch_224, run)
        memory = f"peak {torch.cuda.max_memory_allocated(run.device) / 2**30:.1f} GiB" if cuda else ""
        record("bench: augment, model at 80 and 224", True, time.time() - t0, memory or "see the table below",
               "python bench.py --only=augment,model")

        # 3. the data: CelebA's split sizes
        sizes = (96, 32, 32) if dry else CELEBA_SPLITS
        t0 = time.time()
        data_dir = celeba_size_set(os.path.join(tmp, "celeba_size"), sizes)
        record("data: synthetic faces at CelebA's split sizes", True, time.time() - t0,
               " / ".join(f"{n:,}" for n in sizes) + " images (train / val / test), 80x80")

        # 4. the recipe, one epoch on one device
        weights = dino_layout_file(os.path.join(tmp, "dino_vits8.safetensors"), run.model_depth)
        args = ["train_vit.py", "--config=recipe", f"--pretrained={weights}", f"--data={data_dir}", "--epochs=1",
                "--force", f"--device={run.device}"]
        if dry:
            args += ["--img_size=32", "--eval_batch_size=32"]
        out = os.path.join(check_dir, "recipe")
        cmd = [*args, f"--batch_size={16 if dry else 64}", f"--out_dir={out}"]
        ok, seconds, epoch = recipe_run([sys.executable, *cmd], out)
        record("recipe: one epoch at " + ("32 (dry run)" if dry else "224") + ", bf16 + compile", ok, seconds,
               recipe_numbers(epoch, seconds), shlex.join(["python", *cmd]))

        # 5. DDP over every GPU (NCCL); the dry run: 2 gloo ranks on the CPU
        n = 2 if dry else torch.cuda.device_count()
        if n > 1:
            batch = 16 if dry else 64 - 64 % n  # the recipe's global batch, split evenly
            out = os.path.join(check_dir, "recipe_ddp")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args,
                   f"--batch_size={batch}", f"--out_dir={out}"]
            ok, seconds, epoch = recipe_run(cmd, out, env={"OMP_NUM_THREADS": "1"} if dry else None)
            record(f"DDP: the same over {n} " + ("gloo ranks (dry run)" if dry else "GPUs (NCCL)"), ok, seconds,
                   recipe_numbers(epoch, seconds, n), shlex.join(["torchrun", *cmd[3:]]))
        else:
            record("DDP", True, 0, "skipped: one GPU visible")
    write_gpu_check(run, steps, results, time.time() - t_start, dry)
    failed = [st["step"] for st in steps if not st["ok"]]
    if failed:
        sys.exit(f"error: gpu-check: {'; '.join(failed)} failed (see {os.path.join(run.out_dir, 'gpu_check.md')})")


def write_gpu_check(run, steps, results, seconds, dry):
    machine = f"{platform.machine()} CPU (dry run: tiny sizes, the times mean nothing)" if dry else \
        f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(run.device)}"
    lines = [f"# gpu-check ({time.strftime('%Y-%m-%d')}, {machine}, torch {torch.__version__}, `{run.command}`, "
             f"{seconds / 60:.1f} min)", "", "| step | result | seconds | numbers | command |", "|---" * 5 + "|"]
    lines += [f"| {st['step']} | {'ok' if st['ok'] else '**FAILED**'} | {st['seconds']:.0f} | {st['numbers']} | "
              f"{'`' + st['command'] + '`' if st['command'] else ''} |" for st in steps]
    lines += ["", "## bench (interleaved rounds, median ratio and spread)", "", *table(results)]
    os.makedirs(run.out_dir, exist_ok=True)
    report = json.dumps(dict(steps=steps, bench=results, minutes=seconds / 60, dry_run=dry), indent=1)
    for name, text in (("gpu_check.json", report), ("gpu_check.md", "\n".join(lines) + "\n")):
        model.write_atomic(os.path.join(run.out_dir, name), lambda tmp, text=text: Path(tmp).write_text(text))
    print("\n".join(lines))


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


def write_report(results, run, seconds, load=None):
    """OUT_DIR/bench.json and a markdown table, OUT_DIR/bench.md, each written atomically. load: the 1-minute load
    averages at the start and the end, for the record."""
    when = time.strftime("%Y-%m-%d")
    cores = len(os.sched_getaffinity(0))
    machine = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {cores} cores"
    busy = "" if load is None else (f" The machine's 1-minute load average was {load[0]:.1f} at the start and "
                                    f"{load[1]:.1f} at the end, on {cores} cores" +
                                    # the end's figure includes this run's own threads: the start tells of others
                                    (": other work shared the cores, so expect a wide spread." if load[0] > cores / 2
                                     else "."))
    lines = [f"# bench ({when}, {machine}, torch {torch.__version__}, `{run.command}`, {seconds / 60:.1f} min)", "",
             "Each ratio is the median over interleaved rounds (A B A B ...) of ours / baseline, with its spread; "
             "ours and baseline are the medians of each side." + busy +
             (" glibc's malloc kept freed memory for reuse (data.keep_freed_memory(), for every side alike)."
              if getattr(run, "malloc", False) else ""), "",
             *table(results)]
    os.makedirs(run.out_dir, exist_ok=True)
    for name, text in (("bench.json", json.dumps(results, indent=1)), ("bench.md", "\n".join(lines) + "\n")):
        model.write_atomic(os.path.join(run.out_dir, name), lambda tmp, text=text: Path(tmp).write_text(text))
    print("\n".join(lines))


def settings(cfg, argv=()):
    """The config -> this run's sizes (smaller with quick, larger on a GPU), rounds, device and command line."""
    dev = configurator.pick_device(cfg["device"])
    cpu, quick = dev.type == "cpu", cfg["quick"]
    only = [b.strip() for b in cfg["only"].split(",") if b.strip()]
    if not only or set(only) - set(BENCHMARKS):
        sys.exit(f"error: --only={cfg['only']} wants a comma-separated subset of {','.join(BENCHMARKS)}")
    if cfg["pairs"] < 0:
        sys.exit(f"error: --pairs={cfg['pairs']} must be >= 0 (0: the defaults)")
    dry = cfg["gpu_check"] and cpu  # gpu_check's dry run: every step once, at the smallest sizes
    pairs = lambda quick_n, full_n: cfg["pairs"] or (1 if dry else quick_n if quick else full_n)
    return types.SimpleNamespace(
        device=dev, quick=quick, only=only, out_dir=cfg["out_dir"], keep_freed_memory=cfg["keep_freed_memory"],
        gpu_check=cfg["gpu_check"],
        command=" ".join(["python bench.py", *argv]),
        n=2048 if quick else (20000 if cpu else 100_000),  # synthetic images for the loader benchmarks
        batch=256, out_size=80 if cpu else 224,  # loader/augment: 80x80 out on the CPU; the GPU feeds the 224 model
        pairs_augment=pairs(7, 15), pairs_loader=pairs(3, 3), pairs_model=pairs(3, 5), pairs_e2e=pairs(5, 5),
        model_batch_80=2 if dry else 8 if quick else (32 if cpu else 256),
        model_batch_224=2 if dry else 2 if quick else (4 if cpu else 64),
        model_depth=1 if dry else 12,  # ViT-S/8 blocks in the model benchmark
        augment_n=32 if dry else 256,  # images in the augmentation benchmark
        e2e_size=80 if cpu else 224, e2e_batch=(16 if quick else 32) if cpu else 64,
        e2e_steps=2 if quick else (3 if cpu else 50),
        e2e_backend="resident",
    )


def make_synthetic(root, n):
    """The synthetic face set the benchmarks read (data.py synthetic, n images, 90% train) -> its folder."""
    data_dir = os.path.join(root, "synthetic")
    data.main(["synthetic", f"--n={n}", f"--out_dir={data_dir}", "--split=0.9,0.05,0.05"])
    return data_dir


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    run = settings(configurator.parse(argv, CONFIG, __file__), argv)
    torch.manual_seed(0)
    run.malloc = data.keep_freed_memory() if run.keep_freed_memory else False
    if run.gpu_check:
        return gpu_check(run)
    results, t0, load = {}, time.time(), os.getloadavg()[0]
    if load > len(os.sched_getaffinity(0)):
        print(f"note: load average {load:.1f} on {len(os.sched_getaffinity(0))} cores: other work shares them, the "
              "ratios will spread", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        # the augmentation alone needs 256 images, not the loader benchmarks' set
        data_dir = make_synthetic(tmp, run.n if {"loader", "e2e"} & set(run.only) else 300)
        if "augment" in run.only:
            bench_augment(results, data.load_split(data_dir, "train")[0][:run.augment_n], run)
        if "loader" in run.only:
            bench_loaders(results, data_dir, run)
        if "model" in run.only:
            bench_model(results, 80, run.model_batch_80, run)
            bench_model(results, 224, run.model_batch_224, run)
        if "e2e" in run.only:
            bench_end_to_end(results, data_dir, run)
    write_report(results, run, time.time() - t0, load=(load, os.getloadavg()[0]))


if __name__ == "__main__":
    main()
