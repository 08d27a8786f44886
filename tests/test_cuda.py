"""The CUDA-only paths, on a machine with a GPU (`make gpu-check` runs `pytest -m cuda`; skipped elsewhere): the
augmentation's generator on the device, FFCV's ToDevice, bf16 autocast with torch.compile and fused AdamW in a real
run, predict in bf16 against fp32, the ViT and SING on the GPU against the CPU."""

import pytest
import torch

import data
import evaluate
import model
import train_mixmatch
import train_vit
from conftest import AUGMENT_OFF, read_log
from sing import SING

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
TINY = ["--init=scratch", "--arch=vit_tiny", "--dim=64", "--depth=2", "--heads=2", "--img_size=32", "--epochs=2",
        "--batch_size=32", "--eval_batch_size=64", "--device=cuda"]


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 matmuls in full precision for the comparisons with the CPU (TF32 would differ by ~1e-3)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_augment_on_cuda(tiny_data):
    batch = data.load_split(tiny_data, "val")[0][:32]
    x = batch.cuda()
    a = data.augment(x, 224, torch.Generator("cuda").manual_seed(0))
    assert a.is_cuda and a.shape == (32, 3, 224, 224) and torch.isfinite(a).all()
    again = data.augment(x, 224, torch.Generator("cuda").manual_seed(0))
    assert torch.equal(a, again)  # the device generator makes the draws reproducible
    assert torch.equal(data.augment(x, 224, **AUGMENT_OFF), data.prepare(x, 224))
    assert torch.allclose(data.prepare(x, 224).cpu(), data.prepare(batch, 224), atol=1e-4)


@pytest.mark.parametrize("backend", ["resident", "ffcv"])
def test_loaders_put_batches_on_the_gpu(tiny_data, backend):
    ref = data.make_loader(tiny_data, "val", 16, train=False, device=torch.device("cpu"))
    gpu = data.make_loader(tiny_data, "val", 16, train=False, device=torch.device("cuda"), backend=backend)
    for (x, y, g), (xc, yc, gc) in zip(gpu, ref):
        assert x.is_cuda and x.dtype == torch.uint8 and y.is_cuda
        assert torch.equal(x.cpu(), xc) and torch.equal(y.cpu(), yc) and torch.equal(g.cpu(), gc)


def test_vit_on_the_gpu_matches_the_cpu():
    torch.manual_seed(0)
    net = model.ViT(model.ViTConfig(img_size=80, num_classes=2))
    x = torch.randn(4, 3, 80, 80)
    with torch.no_grad():
        cpu, cpu_attn = net(x), net.get_last_selfattention(x)
        net.cuda()
        gpu, gpu_attn = net(x.cuda()), net.get_last_selfattention(x.cuda())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = net(x.cuda()).float().cpu()
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-4) and torch.allclose(gpu_attn.cpu(), cpu_attn, atol=1e-5)
    assert (bf16 - cpu).abs().max() < 0.05 * cpu.abs().max()  # bf16 keeps ~3 significant digits


def test_sing_on_the_gpu_matches_the_cpu():
    make = lambda: torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))
    torch.manual_seed(0)
    cpu_net = make()
    gpu_net = make()
    gpu_net.load_state_dict(cpu_net.state_dict())
    gpu_net.cuda()
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    for net in (cpu_net, gpu_net):
        opt = SING(net.parameters(), lr=5e-4, weight_decay=5e-3)
        dev = next(net.parameters()).device
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x.to(dev)), y.to(dev)).backward()
            opt.step()
    for a, b in zip(cpu_net.parameters(), gpu_net.parameters()):
        assert torch.allclose(a, b.cpu(), atol=1e-5)


@pytest.mark.parametrize("opt", ["sing", "adamw"])  # adamw: fused=True, a CUDA-only kernel
def test_compiled_bf16_run_on_the_gpu(tiny_data, tmp_path, opt):
    """The recipe's GPU path (compile + bf16 autocast) in a real run: finite losses, the same validation as an eager
    fp32 run to within bf16's precision, checkpoints that load on the CPU, the peak memory logged."""
    train_vit.main([*TINY, f"--data={tiny_data}", f"--out_dir={tmp_path / 'fast'}", f"--opt={opt}", "--compile=true",
                    "--amp=bf16"])
    train_vit.main([*TINY, f"--data={tiny_data}", f"--out_dir={tmp_path / 'eager'}", f"--opt={opt}",
                    "--compile=false", "--amp=none"])
    fast, eager = read_log(tmp_path / "fast"), read_log(tmp_path / "eager")
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in fast)
    assert [h["train_loss"] for h in fast] == pytest.approx([h["train_loss"] for h in eager], rel=0.05)
    assert 0 < fast[-1]["peak_mem_gib"] < torch.cuda.get_device_properties(0).total_memory / 2**30
    net, meta, _ = model.load_checkpoint(str(tmp_path / "fast" / "last.safetensors"), device="cpu")
    assert meta["config"]["amp"] == "bf16" and next(net.parameters()).device.type == "cpu"


def test_predict_in_bf16_matches_fp32_on_the_gpu(tiny_data):
    torch.manual_seed(0)
    net = model.ViT(model.ViTConfig(img_size=32, patch_size=8, dim=64, depth=2, heads=2, num_classes=2)).cuda()
    loader = data.make_loader(tiny_data, "val", 16, train=False, device=torch.device("cuda"))
    fp32, labels, groups = evaluate.predict(net, loader, 32)
    bf16, labels16, _ = evaluate.predict(torch.compile(net), loader, 32, amp="bf16")
    assert fp32.dtype == bf16.dtype == torch.float32 and not fp32.is_cuda and torch.equal(labels, labels16)
    assert (bf16 - fp32).abs().max() < 0.05 * fp32.abs().max()


def test_mixmatch_on_the_gpu(tiny_data, tmp_path):
    """MixMatch's loop on the device (the small CNN: the ViT backbone would want the Hub's weights)."""
    train_mixmatch.main(["--config=cpu_small", f"--data={tiny_data}", f"--out_dir={tmp_path}", "--n_labeled=40",
                         "--steps=4", "--eval_every=2", "--batch_size=16", "--img_size=32", "--device=cuda"])
    log = read_log(tmp_path)
    assert [h["step"] for h in log[:2]] == [2, 4] and all(torch.isfinite(torch.tensor(h["loss_x"])) for h in log[:2])
