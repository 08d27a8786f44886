"""attention.py: CLS->patch maps, DINO mass-threshold masks, parity with transformers, the CLI and its errors."""

import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import attention
import data
import model
from conftest import ROOT, error_line

TINY = model.ViTConfig(img_size=32, patch_size=8, dim=32, depth=2, heads=2, num_classes=2)  # 4x4 patches


def peaked_vit(cfg=TINY, seed=0):
    """A random tiny ViT whose attention is far from uniform (the default 0.02 init gives near-flat maps, which would
    let a wrong row or a head swap pass)."""
    torch.manual_seed(seed)
    m = model.ViT(cfg)
    for name, p in m.named_parameters():
        if "norm" not in name:
            nn.init.normal_(p, std=0.3)
    return m.eval()


def dino_mask(attn, threshold):
    """facebookresearch/dino visualize_attention.py L186-197, verbatim apart from names: [heads, n] -> bool."""
    val, idx = torch.sort(attn)
    val /= torch.sum(val, dim=1, keepdim=True)
    cumval = torch.cumsum(val, dim=1)
    th_attn = cumval > (1 - threshold)
    idx2 = torch.argsort(idx)
    for head in range(attn.shape[0]):
        th_attn[head] = th_attn[head][idx2[head]]
    return th_attn


# -----------------------------------------------------------------------------
# pure functions


def test_maps_are_the_cls_row_over_patches_and_sum_to_one():
    torch.manual_seed(0)
    attn = torch.randn(2, 3, 17, 17).mul(3).softmax(-1)
    maps, cls_self = attention.cls_attention_maps(attn, (4, 4))
    assert maps.shape == (2, 3, 4, 4)
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(2, 3))
    torch.testing.assert_close(cls_self, attn[:, :, 0, 0])
    # renormalised CLS row, patches in row-major order: maps * (1 - cls share) is the raw row
    torch.testing.assert_close(maps.flatten(-2) * (1 - cls_self[..., None]), attn[:, :, 0, 1:])
    with pytest.raises(ValueError, match="tokens"):
        attention.cls_attention_maps(attn, (4, 5))


def test_model_maps_sum_to_one_per_head():
    m = peaked_vit()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        maps, cls_self, masks, mean_masks = attention.attention_maps(m, x, 0.6)
    assert maps.shape == (3, TINY.heads, 4, 4) and masks.shape == maps.shape and mean_masks.shape == (3, 4, 4)
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(3, TINY.heads))
    assert maps.amax() > 2 / 16  # not flat, so the parity test below has teeth


@pytest.mark.parametrize("threshold", [0.05, 0.3, 0.6, 0.9, 1.0])
def test_mask_keeps_the_mass_and_is_minimal(threshold):
    torch.manual_seed(1)
    # float64 so that "mass" is exact enough to judge a threshold of 1.0
    maps = torch.distributions.Dirichlet(torch.full((64,), 0.3, dtype=torch.float64)).sample((5, 6)).view(5, 6, 8, 8)
    masks = attention.mass_threshold_masks(maps, threshold)
    assert masks.dtype == torch.bool and masks.shape == maps.shape
    kept = torch.where(masks, maps, torch.zeros(())).flatten(-2)
    mass = kept.sum(-1)
    smallest = torch.where(masks.flatten(-2), maps.flatten(-2), torch.full((), float("inf"))).amin(-1)
    assert (mass >= threshold - 1e-12).all()
    assert (mass - smallest < threshold).all()  # dropping the smallest kept patch falls below the mass
    # and it is DINO's mask
    for b in range(5):
        assert torch.equal(masks[b].flatten(-2), dino_mask(maps[b].flatten(-2).clone(), threshold))


def test_mask_rejects_thresholds_outside_0_1():
    for t in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="threshold"):
            attention.mass_threshold_masks(torch.rand(1, 2, 2), t)


def test_nearest_upsampling_is_one_square_per_patch():
    maps = torch.rand(2, 3, 4, 4)
    up = attention.upsample(maps, 32, "nearest")
    assert up.shape == (2, 3, 32, 32)
    torch.testing.assert_close(up, maps.repeat_interleave(8, -2).repeat_interleave(8, -1))
    assert attention.upsample(maps, 32, "bicubic").shape == (2, 3, 32, 32)


def test_maps_equal_transformers_output_attentions(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, layer_norm_eps=1e-6,
                                 attn_implementation="eager")  # the path that returns the probabilities
    torch.manual_seed(0)
    hf = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    for name, p in hf.named_parameters():
        if "layernorm" not in name:
            nn.init.normal_(p, std=0.3)
    hf.save_pretrained(tmp_path)
    ours = model.load_pretrained(str(tmp_path)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=x, output_attentions=True).attentions[-1][:, :, 0]  # [B, heads, T]: CLS row
        maps, cls_self, _, _ = attention.attention_maps(ours, x, 0.6)
    ref_maps = (ref[..., 1:] / ref[..., 1:].sum(-1, keepdim=True)).view(2, 2, 4, 4)
    torch.testing.assert_close(maps, ref_maps, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cls_self, ref[..., 0], atol=1e-5, rtol=1e-4)
    assert ref_maps.amax() > 2 / 16


def test_row_title_names_what_is_known():
    classes, groups = ["plain", "blond"], ["women", "men"]
    assert attention.row_title("val[3]", 1, 0, 0, 0.875, classes, groups) == \
        "val[3]  true: blond  group: women  pred: plain (0.88)"
    assert attention.row_title("a.png", -1, -1, 1, 0.5, classes, groups) == "a.png  pred: blond (0.50)"
    assert attention.row_title("a.png", -1, -1, -1, float("nan"), [], []) == "a.png"


# -----------------------------------------------------------------------------
# CLI


@pytest.fixture(scope="module")
def tiny(tiny_data, tmp_path_factory):
    """(data dir, classifier checkpoint) on the shared 32x32 synthetic faces."""
    meta = data.read_meta(tiny_data)
    ckpt = str(tmp_path_factory.mktemp("attn") / "tiny.safetensors")
    model.save_checkpoint(ckpt, peaked_vit(), meta={"data": {k: meta[k] for k in ("classes", "groups")}})
    return tiny_data, ckpt


def grid_px(path):
    with Image.open(path) as im:
        return im.size


def test_cli_data_writes_grids_and_maps(tiny, tmp_path):
    data_dir, ckpt = tiny
    out = tmp_path / "out"
    attention.main(["--ckpt", ckpt, "--data", data_dir, "--split", "val", "--n", "5", "--batch_size", "4",
                    "--out", str(out)])
    assert sorted(os.listdir(out)) == ["grid_000.png", "grid_001.png", "maps.safetensors"]
    # a grid per batch of 4: rows = images; the layout's own arithmetic gives the size (2 heads, 32 px input)
    assert grid_px(out / "grid_000.png") == attention.grid_size_px(4, 2, 32)
    assert grid_px(out / "grid_001.png") == attention.grid_size_px(1, 2, 32)
    saved = load_file(out / "maps.safetensors")
    assert saved["maps"].shape == (5, 2, 4, 4) and saved["masks"].dtype == torch.bool
    torch.testing.assert_close(saved["maps"].sum((-2, -1)), torch.ones(5, 2))
    _, labels, groups = data.load_split(data_dir, "val")
    idx = saved["indices"]
    assert len(set(idx.tolist())) == 5 and idx.max() < len(labels)
    assert torch.equal(saved["labels"], labels[idx]) and torch.equal(saved["groups"], groups[idx])
    assert ((saved["preds"] >= 0) & (saved["confidence"] >= 0.5)).all()  # a 2-class head: softmax max >= 0.5
    with safe_open(out / "maps.safetensors", "pt") as f:
        assert f.metadata()["threshold"] == "0.6"
    assert not [p for p in os.listdir(tmp_path) if p != "out"]  # nothing written beside it


@pytest.mark.parametrize("show", ["errors", "correct"])
def test_cli_show_and_cell(tiny, tmp_path, show):
    data_dir, ckpt = tiny
    attention.main(["--ckpt", ckpt, "--data", data_dir, "--split", "train", "--n", "3", "--show", show,
                    "--cell", "1,0", "--out", str(tmp_path)])
    saved = load_file(tmp_path / "maps.safetensors")
    assert len(saved["indices"]) > 0
    assert (saved["labels"] == 1).all() and (saved["groups"] == 0).all()
    wrong = saved["preds"] != saved["labels"]
    assert wrong.all() if show == "errors" else (~wrong).all()


def test_cli_images_are_resized_to_img_size(tiny, tmp_path, capsys):
    _, ckpt = tiny
    paths = []
    for i, size in enumerate([48, 80]):
        p = tmp_path / f"face{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    out = tmp_path / "out"
    attention.main(["--ckpt", ckpt, "--images", ",".join(paths), "--upsample", "bicubic", "--out", str(out)])
    assert "32x32" in capsys.readouterr().out
    assert grid_px(out / "grid_000.png") == attention.grid_size_px(2, 2, 32)
    # a folder, with a non-square 16-bit grey image (centre-cropped, scaled to 8 bits) and a junk file (skipped)
    Image.fromarray(np.full((40, 64), 30000, np.uint16)).save(tmp_path / "wide16.png")
    (tmp_path / "notes.txt").write_text("not an image")
    attention.main(["--ckpt", ckpt, "--images", str(tmp_path), "--out", str(tmp_path / "folder")])
    assert "skipped" in capsys.readouterr().out
    saved = load_file(tmp_path / "folder" / "maps.safetensors")
    assert saved["maps"].shape == (3, 2, 4, 4)
    saved = load_file(out / "maps.safetensors")
    assert saved["maps"].shape == (2, 2, 4, 4) and (saved["labels"] == -1).all()


# -----------------------------------------------------------------------------
# errors: one line, non-zero exit, nothing written


class NotAViT(nn.Module):
    arch = "mlp"

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def config_dict(self):
        return {"img_size": 32, "num_classes": 2}


def test_errors_are_one_line_and_write_nothing(tiny, tmp_path, monkeypatch):
    data_dir, ckpt = tiny
    monkeypatch.setitem(model.ARCHS, "mlp", lambda config: NotAViT())
    other = str(tmp_path / "mlp.safetensors")
    model.save_checkpoint(other, NotAViT())
    (tmp_path / "garbage.jpg").write_bytes(b"not an image")
    backbone = str(tmp_path / "backbone.safetensors")
    model.save_checkpoint(backbone, peaked_vit(replace(TINY, num_classes=0)))
    three = str(tmp_path / "three.safetensors")
    model.save_checkpoint(three, peaked_vit(replace(TINY, num_classes=3)))
    out = str(tmp_path / "out")
    cases = {
        "predicts 3 classes": ["--ckpt", three, "--data", data_dir],
        "not a ViT": ["--ckpt", other, "--data", data_dir],
        "no checkpoint file": ["--ckpt", str(tmp_path / "missing.safetensors"), "--data", data_dir],
        "cannot read any image": ["--ckpt", ckpt, "--images", str(tmp_path / "garbage.jpg")],
        "empty selection": ["--ckpt", ckpt, "--data", data_dir, "--cell", "1,7"],
        "no classifier head": ["--ckpt", backbone, "--data", data_dir, "--show", "errors"],
        "--cell=1 needs 2 comma-separated values": ["--ckpt", ckpt, "--data", data_dir, "--cell", "1"],
        "exactly one of --data_dir": ["--ckpt", ckpt],
        "--show=all is not one of: random, errors, correct": ["--ckpt", ckpt, "--data", data_dir, "--show", "all"],
    }
    for expected, argv in cases.items():
        msg = error_line(attention.main, [*argv, "--out", out])
        assert msg.startswith("error: ") and expected in msg and "\n" not in msg, msg
    assert not os.path.exists(out)


def test_failure_mid_run_leaves_no_partial_file(tiny, tmp_path, monkeypatch):
    # every file is written atomically and maps.safetensors, written last, marks a finished run
    data_dir, ckpt = tiny
    real, calls = attention.plot_grid, []

    def fail_on_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        real(*args)

    monkeypatch.setattr(attention, "plot_grid", fail_on_second)
    with pytest.raises(RuntimeError, match="disk full"):
        attention.main(["--ckpt", ckpt, "--data", data_dir, "--n", "4", "--batch_size", "2",
                        "--out", str(tmp_path / "out")])
    assert os.listdir(tmp_path / "out") == ["grid_000.png"]  # complete, no temp file, no maps.safetensors


def test_cli_error_exit_status_and_stderr(tmp_path):
    argv = ["--ckpt", str(tmp_path / "none.safetensors"), "--images", "a.png", "--out", str(tmp_path / "out")]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "attention.py"), *argv], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "out").exists()
