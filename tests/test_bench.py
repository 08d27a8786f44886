"""bench.py without the benchmarks themselves (minutes each): its timing and statistics, FLOP counting and peaks, its
baselines, its data, its command line and its report; and gpu_check.py (make gpu-check), whose CPU dry run runs every
step. No timing assertions: speed targets live in `make bench`."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import bench
import data
import gpu_check
import model
from conftest import error_line, read_log


def test_torchvision_baseline_is_normalised_like_ours(tiny_data):
    x = data.load_split(tiny_data, "val")[0][:8]
    transform = bench.torchvision_transform(48, size=x.shape[-1])
    out = torch.stack([transform(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in x])
    lo = (0 - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(data.IMAGENET_STD)
    hi = (1 - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(data.IMAGENET_STD)
    assert out.shape == (8, 3, 48, 48) and out.dtype == torch.float32
    assert (out >= lo.view(1, 3, 1, 1) - 1e-5).all() and (out <= hi.view(1, 3, 1, 1) + 1e-5).all()


def test_export_image_folder_writes_every_image_under_its_label(tiny_data, tmp_path):
    x, y, _ = data.load_split(tiny_data, "val")
    bench.export_image_folder(tiny_data, "val", tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted({str(int(v)) for v in y})
    for i in (0, len(x) - 1):
        with Image.open(tmp_path / str(int(y[i])) / f"{i:06d}.png") as im:
            assert np.array_equal(np.asarray(im), x[i].permute(1, 2, 0).numpy())
    assert sum(len(os.listdir(tmp_path / d)) for d in os.listdir(tmp_path)) == len(x)


def test_interleaved_rounds_alternate_and_the_ratio_is_the_median_of_pairs():
    calls = []
    fns = {"a": lambda: calls.append("a") or 4, "b": lambda: calls.append("b") or 2}
    rates = bench.interleaved(fns, rounds=3, warmup=1)
    assert calls == ["a", "b"] * 4 and [len(v) for v in rates.values()] == [3, 3]
    assert all(r > 0 for v in rates.values() for r in v)
    results = {}
    r = bench.row(results, "toy", [4.0, 6.0, 10.0, 3.0, 9.0], [2.0, 2.0, 2.0, 1.0, 1.0])  # ratios 2, 3, 5, 3, 9
    assert (r["ratio"], r["ratio_min"], r["ratio_max"], r["ratio_q1"], r["ratio_q3"], r["pairs"]) == (3, 2, 9, 3, 5, 5)
    assert (r["ours"], r["baseline"]) == (6.0, 2.0)  # medians of each side
    assert bench.row(results, "one peak", [50.0, 100.0], 200.0)["ratio"] == 0.375  # a single baseline for all rounds
    assert bench.row(results, "no baseline", 7.0, None, unit="s")["ratio"] is None
    with pytest.raises(ValueError):
        bench.row(results, "unpaired", [1.0, 2.0], [1.0, 2.0, 3.0])


def test_flops_are_counted_on_the_cpu_attention_too():
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8, requires_grad=True)
    assert bench.count_flops(lambda: lin(x).sum().backward()) == 3 * 2 * 2 * 8 * 4  # forward, grad input, grad weight
    q = torch.randn(1, 2, 5, 8)
    assert bench.count_flops(lambda: F.scaled_dot_product_attention(q, q, q)) == 2 * (2 * 2 * 5 * 5 * 8)
    products = bench.matmul_fn(torch.device("cpu"), n=4, repeats=2)
    assert products() == 2 * 2 * 4 ** 3 / 1e9 == bench.count_flops(products) / 1e9


def test_the_three_vits_are_one_model():
    trio = bench.vit_trio(16, depth=2)  # the bench's have 12 blocks: 21.4M parameters
    counts = {name: sum(p.numel() for p in net.parameters()) for name, net in trio.items()}
    c = trio["ours"].cfg  # ViT-S/8: width 384, MLP 4x, 8x8 patches, here 16x16 images and 2 classes
    d, mlp = c.dim, int(c.dim * c.mlp_ratio)
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * mlp + mlp) + (mlp * d + d)  # norms, qkv, proj, MLP
    positions = (c.img_size // c.patch_size) ** 2 + 1  # the patches and the CLS token
    rest = (3 * c.patch_size ** 2 * d + d) + d + positions * d + 2 * d + (d * c.num_classes + c.num_classes)
    assert (block, rest) == (1_774_464, 77_954)  # patch conv, CLS, positions, final norm, head
    assert len(set(counts.values())) == 1 and counts["ours"] == c.depth * block + rest, counts
    cfg = trio["transformers"].net.config
    assert (cfg.layer_norm_eps, cfg._attn_implementation, cfg.qkv_bias) == (1e-12, "sdpa", True)
    cpu = torch.device("cpu")
    flops = {name: bench.count_flops(bench.train_step_fn(net, 2, 16, cpu)) for name, net in trio.items()}
    assert len(set(flops.values())) == 1, flops


def test_cpu_peak_is_cores_clock_and_isa(monkeypatch):
    info = "vendor_id\t: {}\ncpu family\t: {}\ncpu MHz\t\t: 2500.000\nflags\t\t: fpu sse2 {}\n"
    monkeypatch.setattr(bench, "cpufreq_max_mhz", lambda: None)  # a VM: no max clock, the text's cpu MHz counts
    peak, how = bench.cpu_peak(info.format("AuthenticAMD", 25, "avx avx2 fma avx512f"), n_cores=2)
    assert peak == 2 * 2.5 * 32 and "2 cores" in how and "cpu MHz" in how
    assert bench.cpu_peak(info.format("GenuineIntel", 6, "avx avx2 fma avx512f"), n_cores=4)[0] == 4 * 2.5 * 64
    assert bench.cpu_peak(info.format("GenuineIntel", 6, "avx avx2 fma"), n_cores=1)[0] == 2.5 * 32
    assert bench.cpu_peak(info.format("GenuineIntel", 6, "avx"), n_cores=1)[0] == 2.5 * 16
    assert bench.cpu_peak(info.format("GenuineIntel", 6, ""), n_cores=1)[0] == 2.5 * 8
    assert bench.cpu_peak("processor : 0\n", n_cores=1)[0] is None
    monkeypatch.setattr(bench, "cpufreq_max_mhz", lambda: 3500.0)  # cpufreq's max clock wins over the text's
    peak, how = bench.cpu_peak(info.format("GenuineIntel", 6, "avx avx2 fma"), n_cores=2)
    assert peak == 2 * 3.5 * 32 and "cpufreq max" in how
    assert bench.cpu_peak(info.format("GenuineIntel", 6, "avx avx2 fma").replace("2500.000", ""), n_cores=1)[0] \
        == 3.5 * 32
    monkeypatch.setattr(bench, "cpufreq_max_mhz", lambda: None)
    assert bench.cpu_peak(info.format("GenuineIntel", 6, "avx").replace("2500.000", ""), n_cores=1) == \
        (None, "peak unknown: no clock in cpufreq or /proc/cpuinfo")
    assert bench.gpu_peak("NVIDIA H100 PCIe")[0] == 756 and bench.gpu_peak("NVIDIA H200")[0] == 989
    assert bench.gpu_peak("Some GPU") == (None, "peak unknown for Some GPU (bench.PEAK_BF16_TFLOPS lists "
                                          + ", ".join(bench.PEAK_BF16_TFLOPS) + ")")


def test_cli_settings_and_report(tmp_path, capsys):
    plan = bench.settings(bench.CONFIG | {"quick": True, "only": "augment,model", "device": "cpu",
                                          "out_dir": str(tmp_path)}, ["--quick", "--only=augment,model"])
    full = bench.settings(bench.CONFIG | {"device": "cpu"})
    assert plan.only == ["augment", "model"] and plan.n < full.n and plan.pairs_augment < full.pairs_augment
    assert plan.command == "python bench.py --quick --only=augment,model"
    assert bench.settings(bench.CONFIG | {"device": "cpu", "pairs": 4}).pairs_model == 4
    results = {}
    bench.row(results, "augment: test", [300.0, 330.0], [100.0, 100.0])
    bench.row(results, "model: flops", 50.0, 100.0, unit="GFLOP/s", note="peak by a method")
    plan.malloc = True
    bench.write_report(results, plan, 90.0, load=(3.5, 1.0))
    saved = json.loads((tmp_path / "bench.json").read_text())["augment: test"]
    assert (saved["ratio"], saved["ratio_min"], saved["ratio_max"], saved["pairs"]) == (3.15, 3.0, 3.3, 2)
    md = (tmp_path / "bench.md").read_text()
    assert "`python bench.py --quick --only=augment,model`" in md and "load average was 3.5 at the start" in md
    assert "data.keep_freed_memory(), called at start as the training scripts do" in md
    assert "| augment: test | 315.0 | 100.0 | img/s | **3.15x** | 3.0-3.3 |" in md and "- model: flops: peak by" in md
    assert sorted(os.listdir(tmp_path)) == ["bench.json", "bench.md"]
    for argv, wanted in ((["--only=augment,speed"], "--only=augment,speed"), (["--quik"], "did you mean --quick"),
                         (["--pairs=-1"], "--pairs=-1"), (["--keep_freed_memory=false"], "--keep_freed_memory")):
        assert wanted in error_line(bench.main, argv)
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0 and "--only=loader,augment,model,e2e" in capsys.readouterr().out


def test_main_runs_only_what_it_is_asked(tmp_path, monkeypatch):
    """`bench.py --quick --only=augment --device=cpu` end to end, with the benchmark itself stubbed out; the allocator
    is set up as the training scripts set it up, once, before anything is measured."""
    seen = {"malloc": 0}
    monkeypatch.setattr(bench.data, "keep_freed_memory", lambda: seen.update(malloc=seen["malloc"] + 1) or True)
    monkeypatch.setattr(bench, "make_synthetic", lambda root, n: seen.setdefault("n", n) and "unused")
    images = torch.zeros(300, 3, 8, 8, dtype=torch.uint8)
    monkeypatch.setattr(bench.data, "load_split", lambda data_dir, split: (images,))

    def fake_augment(results, x, plan):
        seen["x"], seen["pairs"], seen["malloc_first"] = x.shape, plan.pairs_augment, plan.malloc
        bench.row(results, "augment: stub", [2.0, 4.0], [1.0, 1.0])
    monkeypatch.setattr(bench, "bench_augment", fake_augment)
    for name in ("bench_loaders", "bench_model", "bench_end_to_end"):
        monkeypatch.setattr(bench, name, lambda *a: pytest.fail("not asked for"))
    bench.main(["--quick", "--only=augment", "--device=cpu", f"--out_dir={tmp_path}"])
    quick = bench.settings(bench.CONFIG | {"quick": True, "device": "cpu"})
    assert seen == {"malloc": 1, "n": 300, "x": (256, 3, 8, 8), "pairs": quick.pairs_augment, "malloc_first": True}
    assert json.loads((tmp_path / "bench.json").read_text())["augment: stub"]["ratio"] == 3.0
    assert "called at start as the training scripts do" in (tmp_path / "bench.md").read_text()


def test_synthetic_sets_have_the_asked_split_sizes(tmp_path):
    """One way to build the benchmarks' sets: a few faces drawn, tiled to any split sizes (CelebA's for gpu_check)."""
    folder = bench.synthetic_set(str(tmp_path / "set"), (50, 7, 9), draw=20)
    meta = data.read_meta(folder)
    assert [meta["splits"][s]["n"] for s in data.SPLITS] == [50, 7, 9] and meta["source"] == "synthetic"
    x = data.load_split(folder, "train")[0]
    assert len(x) == 50 and len({im.numpy().tobytes() for im in x}) < 20  # at most 20 faces drawn: they repeat
    assert bench.make_synthetic(str(tmp_path), 40).endswith("synthetic")
    assert [data.read_meta(str(tmp_path / "synthetic"))["splits"][s]["n"] for s in data.SPLITS] == [36, 2, 2]


def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    """make gpu-check's CPU half, which keeps the GPU script from rotting: every step for real at tiny sizes (the
    CUDA tests collected and skipped, augment and model benchmarks, a set with CelebA's split layout, one recipe
    epoch compiled in bf16 from a DINO-layout file, the same on 2 gloo ranks, eager) and its report."""
    gpu_check.main([f"--out_dir={tmp_path}", "--device=cpu"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and [st["ok"] for st in report["steps"]] == [True] * 5
    assert "skipped" in report["steps"][0]["numbers"] and "passed" not in report["steps"][0]["numbers"]
    assert {"model: train step ours vs timm @224 (batch 2, fp32 eager)",
            "model: train step ours vs transformers @80 (batch 2, fp32 eager)"} <= report["bench"].keys()
    # the single-process epoch runs the recipe as on a GPU (compile + bf16); the 2 gloo ranks run it eager in fp32
    for run, step, fast in (("recipe", report["steps"][3], (True, "bf16")),
                            ("recipe_ddp", report["steps"][4], (False, "none"))):
        log = read_log(tmp_path / "gpu_check" / run)
        assert len(log) == 1 and log[0]["n"] == 32 and np.isfinite(log[0]["train_loss"])  # val: 32 images
        _, meta, _ = model.load_checkpoint(str(tmp_path / "gpu_check" / run / "last.safetensors"))
        assert (meta["config"]["compile"], meta["config"]["amp"], meta["config"]["opt"]) == (*fast, "sing")
        assert meta["data"]["source"] == "synthetic"
        assert ("on 1 device;" if run == "recipe" else "on 2 devices;") in step["numbers"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "dry run" in md and "FAILED" not in md and "`python gpu_check.py --out_dir=" in md
    assert "`torchrun --standalone --nproc_per_node=2 train_vit.py" in md


def test_gpu_check_names_what_failed(tmp_path, monkeypatch):
    """A failed step: every other step still runs, the report marks it, the exit is one line naming it."""
    monkeypatch.setattr(gpu_check, "recipe_run", lambda cmd, out_dir, env=None: (False, 1.0, {}))
    for name in ("bench_augment", "bench_model"):
        monkeypatch.setattr(bench, name, lambda *a, **k: None)
    message = error_line(gpu_check.main, [f"--out_dir={tmp_path}", "--device=cpu"])
    assert message == ("error: gpu-check: recipe: one epoch at 32 (dry run), bf16 + compile; DDP: the same over 2 "
                       f"gloo ranks (dry run, eager fp32) failed (see {tmp_path / 'gpu_check.md'})")
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.count("**FAILED**") == 2 and "| CUDA tests | ok |" in md
