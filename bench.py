"""Speed benchmarks: every number is a ratio of two things timed in this process, warm-up excluded, median of repeats.

    python bench.py                   # full run (GPU when there is one; CPU otherwise)
    python bench.py --quick           # a few minutes on a 2-core CPU
    python bench.py --only=augment    # a subset: loader, augment, model, e2e

1. loader: data.make_loader (FFCV and resident backends) + data.augment vs torchvision ImageFolder + PIL DataLoader
   with the same augmentation list, same 80x80 images, batch size and workers: img/s
2. augment: data.augment on a 256x3x80x80 uint8 batch vs the same list with torchvision, per sample: img/s
3. model: train step (forward + backward + SING) of model.ViT vs timm's vit_small_patch8_224 built alike, at 80 and
   224; inference with and without returning attention: img/s
4. end to end: the training loop (loader + augment + step) vs the step alone on a resident batch: img/s
On CUDA also bf16 autocast + torch.compile, model FLOPs utilisation against the GPU's peak, and the estimated time of
one epoch of the original recipe (train_vit.py --config=recipe: CelebA train, 162,770 images, batch 64) at 224 and 80.
Writes OUT_DIR/bench.json ({name: {ours, baseline, unit, ratio}}) and OUT_DIR/bench.md.
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

import torch
import torch.nn.functional as F

import configurator
import data
import model
from sing import SING

CONFIG = dict(
    quick=False,  # small sizes: a few minutes on a 2-core CPU
    only="loader,augment,model,e2e",  # comma-separated subset of the benchmarks
    device="auto",  # auto (CUDA when there is one, else the CPU), cpu, cuda, cuda:1, ...
    out_dir="runs",  # bench.json and bench.md go here
)
BENCHMARKS = ("loader", "augment", "model", "e2e")
CELEBA_TRAIN = 162_770
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks, no sparsity


def timeit(fn, repeats, warmup=1):
    """Median wall time of fn() over `repeats` calls after `warmup` calls (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def row(results, name, ours, baseline, unit="img/s"):
    results[name] = dict(ours=round(ours, 2), baseline=round(baseline, 2), unit=unit, ratio=round(ours / baseline, 3))
    print(f"{name:42s} ours {ours:12.1f}  baseline {baseline:12.1f} {unit:7s} ratio {ours / baseline:7.2f}x",
          flush=True)


# ---------------------------------------------------------------------------------------------------------------
# The baselines: the same augmentation list per sample with torchvision, and the data as an ImageFolder tree

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


# ---------------------------------------------------------------------------------------------------------------
# 1. loaders

def epoch_rate(loader, transform, epochs):
    """img/s of full passes over `loader`, each batch put through `transform` (median over epochs)."""
    def one_epoch():
        n = 0
        for x, *_ in loader:
            transform(x).sum().item()  # force the work, as a training step would
            n += len(x)
        return n
    n = one_epoch()  # warm-up: FFCV's JIT, worker start-up, page cache
    return n / timeit(one_epoch, epochs, warmup=0)


def bench_loaders(results, data_dir, device, run):
    import torchvision
    gen = torch.Generator(device=device).manual_seed(0)
    aug = lambda x: data.augment(x, run.out_size, generator=gen)
    workers = len(os.sched_getaffinity(0))
    rates = {}
    for backend in ("ffcv", "resident"):
        loader = data.make_loader(data_dir, "train", run.batch, train=True, device=device, backend=backend)
        rates[backend] = epoch_rate(loader, aug, run.epochs)
    with tempfile.TemporaryDirectory() as root:
        export_image_folder(data_dir, "train", root)
        folder = torchvision.datasets.ImageFolder(root, transform=torchvision_transform(run.out_size))
        tv = torch.utils.data.DataLoader(folder, batch_size=run.batch, shuffle=True, num_workers=workers,
                                         persistent_workers=True, drop_last=True)
        rates["torchvision"] = epoch_rate(tv, lambda x: x.to(device), run.epochs)
    row(results, f"loader: ffcv + augment vs ImageFolder/PIL ({workers} workers)", rates["ffcv"],
        rates["torchvision"])
    row(results, "loader: resident + augment vs ImageFolder/PIL", rates["resident"], rates["torchvision"])


# ---------------------------------------------------------------------------------------------------------------
# 2. augmentation alone

def bench_augment(results, x_u8, run):
    from PIL import Image
    per_sample = torchvision_transform(run.out_size)
    images = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in x_u8]
    tv_s = timeit(lambda: torch.stack([per_sample(im) for im in images]), run.repeats)
    x_dev = x_u8.to(run.device)
    gen = torch.Generator(device=run.device).manual_seed(0)
    ours_s = timeit(lambda: data.augment(x_dev, run.out_size, generator=gen), run.repeats * 3)
    row(results, f"augment: batched vs per-sample torchvision ({len(x_u8)} imgs, {run.device})",
        len(x_u8) / ours_s, len(x_u8) / tv_s)


# ---------------------------------------------------------------------------------------------------------------
# 3. model

def vit_pair(img_size):
    """Our ViT-S/8 and timm's, same config (2-class head), same initial weights (ours loaded into timm's layout)."""
    import timm
    ours = model.ViT(model.ViTConfig(img_size=img_size, num_classes=2))
    theirs = timm.create_model("vit_small_patch8_224", pretrained=False, img_size=img_size, num_classes=2)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def train_step_fn(net, batch, img_size, device, amp=False):
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    y = torch.randint(0, 2, (batch,), device=device)
    opt = SING(net.parameters(), lr=5e-4, weight_decay=5e-3)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()

    def step():
        with autocast:
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def vit_flops(img_size, cfg=model.PRESETS["vit_small_patch8"]):
    """Forward FLOPs of one image (2 per multiply-add): patch conv, qkv, attention, proj, MLP."""
    t, d = 1 + (img_size // cfg.patch_size) ** 2, cfg.dim
    per_block = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * int(cfg.mlp_ratio * d)
    return cfg.depth * per_block + 2 * (t - 1) * d * 3 * cfg.patch_size ** 2


def bench_model(results, img_size, batch, run):
    dev = run.device
    ours, theirs = (m.to(dev).train() for m in vit_pair(img_size))
    rates = [batch / timeit(train_step_fn(m, batch, img_size, dev), run.repeats) for m in (ours, theirs)]
    row(results, f"model: train step ours vs timm @{img_size} (batch {batch}, fp32)", *rates)
    x = torch.randn(batch, 3, img_size, img_size, device=dev)
    ours.eval()
    with torch.no_grad():
        plain = batch / timeit(lambda: ours(x), run.repeats)
        attn = batch / timeit(lambda: ours.get_last_selfattention(x), run.repeats)
    row(results, f"model: inference vs with attention @{img_size}", plain, attn)
    if dev.type == "cuda":
        bench_cuda_fast_path(results, ours.train(), img_size, run)


def bench_cuda_fast_path(results, net, img_size, run):
    batch = run.gpu_batch
    eager = batch / timeit(train_step_fn(net, batch, img_size, run.device), run.repeats)
    fast_net = torch.compile(net)
    fast = batch / timeit(train_step_fn(fast_net, batch, img_size, run.device, amp=True), run.repeats, warmup=3)
    row(results, f"model: bf16 + compile vs fp32 eager @{img_size} (batch {batch})", fast, eager)
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    if peak:
        achieved = 3 * vit_flops(img_size) * fast / 1e12  # forward + backward = 3x forward
        row(results, f"model: MFU bf16 @{img_size} (TFLOP/s vs {name} peak)", achieved, peak, unit="TFLOP/s")
    epoch_s = CELEBA_TRAIN / fast
    results[f"recipe epoch @{img_size} (estimated from step rate)"] = dict(
        ours=round(epoch_s, 1), baseline=None, unit="s", ratio=None)
    print(f"recipe epoch @{img_size}: {epoch_s / 60:.1f} min at {fast:.0f} img/s", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# 4. end to end

def bench_end_to_end(results, data_dir, run):
    dev, img_size, batch = run.device, run.e2e_size, run.e2e_batch
    net = model.ViT(model.ViTConfig(img_size=img_size, num_classes=2)).to(dev).train()
    step_alone = train_step_fn(net, batch, img_size, dev, amp=dev.type == "cuda")
    opt = SING(net.parameters(), lr=5e-4, weight_decay=5e-3)
    gen = torch.Generator(device=dev).manual_seed(0)
    loader = data.make_loader(data_dir, "train", batch, train=True, device=dev, backend=run.e2e_backend)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    steps = min(len(loader), run.e2e_steps)

    def loop():
        for i, (x, y, _) in enumerate(loader):
            if i == steps:
                break
            with autocast:
                loss = F.cross_entropy(net(data.augment(x, img_size, generator=gen)), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    alone = batch / timeit(step_alone, run.repeats)
    full = steps * batch / timeit(loop, 2)
    row(results, f"end to end: training loop vs step alone @{img_size} ({run.e2e_backend})", full, alone)


def write_report(results, run, seconds):
    """OUT_DIR/bench.json and a markdown table, OUT_DIR/bench.md, each written atomically."""
    when = time.strftime("%Y-%m-%d")
    machine = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {len(os.sched_getaffinity(0))} cores"
    lines = [f"# bench ({when}, {machine}, torch {torch.__version__}, `{run.command}`, {seconds / 60:.1f} min)", "",
             "| benchmark | ours | baseline | unit | ratio |", "|---|---|---|---|---|"]
    for name, r in results.items():
        baseline, ratio = ("-", "-") if r["ratio"] is None else (r["baseline"], f"{r['ratio']}x")
        lines.append(f"| {name} | {r['ours']} | {baseline} | {r['unit']} | {ratio} |")
    os.makedirs(run.out_dir, exist_ok=True)
    for name, text in (("bench.json", json.dumps(results, indent=1)), ("bench.md", "\n".join(lines) + "\n")):
        model.write_atomic(os.path.join(run.out_dir, name), lambda tmp, text=text: Path(tmp).write_text(text))
    print("\n".join(lines))


def settings(cfg, argv=()):
    """The config -> this run's sizes (smaller with quick, larger on a GPU), device and command line."""
    dev = configurator.pick_device(cfg["device"])
    cpu, quick = dev.type == "cpu", cfg["quick"]
    only = [b.strip() for b in cfg["only"].split(",") if b.strip()]
    if not only or set(only) - set(BENCHMARKS):
        sys.exit(f"error: --only={cfg['only']} wants a comma-separated subset of {','.join(BENCHMARKS)}")
    return types.SimpleNamespace(
        device=dev, quick=quick, only=only, out_dir=cfg["out_dir"],
        command=" ".join(["python bench.py", *argv]),
        n=2048 if quick else (20000 if cpu else 100_000),  # synthetic images for the loader benchmarks
        batch=256, out_size=80 if cpu else 224,  # loader/augment: 80x80 out on the CPU; the GPU feeds the 224 model
        epochs=2 if quick else 3, repeats=3 if quick else 5,
        model_batch_80=8 if quick else (32 if cpu else 256), model_batch_224=2 if quick else (4 if cpu else 64),
        gpu_batch=256,
        e2e_size=80 if cpu else 224, e2e_batch=32 if cpu else 64, e2e_steps=4 if quick else (10 if cpu else 200),
        e2e_backend="resident",
    )


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    run = settings(configurator.parse(argv, CONFIG, __file__), argv)
    torch.manual_seed(0)
    results, t0 = {}, time.time()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = os.path.join(tmp, "synthetic")
        data.main(["synthetic", f"--n={run.n}", f"--out_dir={data_dir}", "--split=0.9,0.05,0.05"])
        if "augment" in run.only:
            bench_augment(results, data.load_split(data_dir, "train")[0][:256], run)
        if "loader" in run.only:
            bench_loaders(results, data_dir, run.device, run)
        if "model" in run.only:
            bench_model(results, 80, run.model_batch_80, run)
            bench_model(results, 224, run.model_batch_224, run)
        if "e2e" in run.only:
            bench_end_to_end(results, data_dir, run)
    write_report(results, run, time.time() - t0)


if __name__ == "__main__":
    main()
