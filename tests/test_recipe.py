"""The recipe itself, end to end on the CPU: the real `recipe` configuration of train_vit.py (full DINO ViT-S/8
from a DINO-layout weights file, 80 -> 224 bicubic, SING, bce_smooth, warmup + cosine, the full augmentation list,
bf16 autocast, checked as configured) for two training steps on a tiny data set, validation, both checkpoints, then
evaluate.py and attention.py on the result; and MixMatch with the same ViT backbone for a few steps. The weights are
random values under the real key names and shapes (the Hub is unreachable here). Both run in fp32 (--amp=none): this
AVX2 CPU emulates bf16, ~20x slower (a ViT-S/8 step at 224: 51 s against 2.2 s); bf16 autocast is tested on a tiny
ViT (test_train.py) and with the recipe at 32 in gpu_check's dry run (test_bench.py). compile stays off: inductor
needs minutes to compile ViT-S/8 on 2 cores; test_train.py checks compile=true on a tiny ViT."""

import json

import pytest
import torch
from safetensors.torch import save_file

import attention
import data
import evaluate
import model
import train_mixmatch
import train_vit


@pytest.fixture(scope="module")
def dino_file(tmp_path_factory):
    """A ViT-S/8 weights file in DINO's layout (cls_token, pos_embed, patch_embed.proj, blocks.N.{norm1, attn.qkv,
    attn.proj, norm2, mlp.fc1, mlp.fc2}, norm), random values, no config.json beside it."""
    torch.manual_seed(0)
    net = model.ViT(model.PRESETS["vit_small_patch8"])
    path = tmp_path_factory.mktemp("weights") / "dino_vits8.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    return str(path)


@pytest.fixture(scope="module")
def recipe_data(tmp_path_factory):
    """20 synthetic faces at 80x80: 4 train (two steps of 2), 8 val, 8 test, both groups in val and test."""
    out = str(tmp_path_factory.mktemp("data") / "recipe")
    data.main(["synthetic", "--n=20", "--split=0.2,0.4,0.4", "--seed=1", f"--out_dir={out}"])
    return out


def test_recipe_end_to_end(dino_file, recipe_data, tmp_path, capsys):
    run = tmp_path / "run"
    train_vit.main(["--config=recipe", f"--pretrained={dino_file}", f"--data={recipe_data}", f"--out_dir={run}",
                    "--epochs=1", "--batch_size=2", "--eval_batch_size=8", "--compile=false", "--amp=none",
                    "--device=cpu"])
    cfg = train_vit.parse_config(["--config=recipe"])
    assert (cfg["img_size"], cfg["opt"], cfg["loss"], cfg["augment"], cfg["amp"]) == (224, "sing", "bce_smooth",
                                                                                     "full", "bf16")
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["n"] == 8 and "fair_score" in log[0] and "worst_group_accuracy" in log[0]
    assert torch.isfinite(torch.tensor(log[0]["train_loss"]))
    net, meta, _ = model.load_checkpoint(str(run / "best.safetensors"))
    assert (net.cfg.img_size, net.cfg.dim, net.cfg.depth, net.cfg.heads, net.cfg.patch_size) == (224, 384, 12, 6, 8)
    assert meta["config"]["pretrained"] == dino_file and meta["data"]["image_size"] == [80, 80]
    _, _, state = model.load_checkpoint(str(run / "last.safetensors"))
    assert state["epoch"] == 0 and state["optimizer"]["state"]
    assert "warning: the recipe at 224x224 on a CPU" in capsys.readouterr().err

    evaluate.main(["--ckpt", str(run / "best.safetensors"), "--data", recipe_data, "--out", str(tmp_path / "eval"),
                   "--n_boot=50", "--batch_size=8"])
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["n"] == 8 and "equalized_odds_difference" in report
    attention.main(["--ckpt", str(run / "best.safetensors"), "--data", recipe_data, "--n=2",
                    "--out", str(tmp_path / "attention")])
    assert (tmp_path / "attention" / "grid_000.png").exists()


def test_mixmatch_with_the_vit_backbone(dino_file, recipe_data, tmp_path):
    train_mixmatch.main([f"--pretrained={dino_file}", f"--data={recipe_data}", f"--out_dir={tmp_path}",
                         "--n_labeled=2", "--steps=2", "--eval_every=2", "--batch_size=2", "--img_size=80",
                         "--eval_batch_size=8", "--amp=none", "--device=cpu"])
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 2 and "test" in log[-1]
    net, meta, _ = model.load_checkpoint(str(tmp_path / "best.safetensors"))
    assert net.arch == "vit" and net.cfg.dim == 384 and meta["config"]["pretrained"] == dino_file
