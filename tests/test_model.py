"""model.py against the references: transformers' ViTModel and timm's vit_small_patch8_224 (random weights, depth 2),
position-embedding interpolation conventions, the Hub loader (hf_hub_download monkeypatched), checkpoints."""

import argparse
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import httpx2  # huggingface_hub's HTTP client, to build a genuine "file not in this repo" error
import huggingface_hub
import pytest
import timm
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed

import model
from configurator import UserError
from model import PRESETS, ViT, ViTConfig, load_checkpoint, load_pretrained, resize_pos_embed, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
DEPTH = 2
# config.json of facebook/dino-vits8 (https://huggingface.co/facebook/dino-vits8/blob/main/config.json), depth reduced
DINO_VITS8 = dict(image_size=224, patch_size=8, hidden_size=384, num_hidden_layers=DEPTH, num_attention_heads=6,
                  intermediate_size=1536, hidden_act="gelu", layer_norm_eps=1e-12, qkv_bias=True)
ATOL = 1e-5


def randomise_(module, seed=0):
    """Every tensor random (biases too, LayerNorm weights near 1, attention clearly non-uniform), so a tensor loaded
    into the wrong place, transposed or left at its init changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * r if p.ndim == 1 and "norm" in name and name.endswith("weight") else
                    0.1 * r if p.ndim == 1 else 0.05 * r)
    return module.eval()


def images(h, w, n=2, seed=0):
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def hf_vit(**config):
    cfg = transformers.ViTConfig(**{**DINO_VITS8, **config}, attn_implementation="eager")
    return randomise_(transformers.ViTModel(cfg, add_pooling_layer=False))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):  # (transformers ViTModel, the folder save_pretrained wrote: model.safetensors, config.json)
    ref, folder = hf_vit(), tmp_path_factory.mktemp("hf")
    ref.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    return ref, folder


@pytest.fixture(scope="module")
def tm(tmp_path_factory):  # (timm vit_small_patch8_224 with a 2-class head, its state dict as a .safetensors file)
    ref = randomise_(timm.create_model("vit_small_patch8_224", pretrained=False, depth=DEPTH, num_classes=2))
    path = tmp_path_factory.mktemp("timm") / "vit_small_patch8_224.safetensors"
    save_file(ref.state_dict(), path)
    return ref, path


def hf_outputs(ref, x, **kw):
    with torch.no_grad():
        out = ref(x, output_attentions=True, **kw)
    return out.last_hidden_state[:, 0], out.attentions[-1]


def our_outputs(ours, x):
    with torch.no_grad():
        return ours.forward_features(x), ours.get_last_selfattention(x)


def assert_close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4)


def layernorm_eps(m):
    return {mod.eps for mod in m.modules() if isinstance(mod, torch.nn.LayerNorm)}


# ---------------------------------------------------------------------------------------------------------------
# same numbers as the references


def test_matches_transformers_at_224(hf):
    ref, folder = hf
    ours = load_pretrained(str(folder)).eval()
    assert (ours.cfg.dim, ours.cfg.depth, ours.cfg.heads, ours.cfg.patch_size, ours.cfg.img_size) == (384, 2, 6, 8, 224)
    assert layernorm_eps(ours) == {1e-12}  # config.json's layer_norm_eps
    feats, attn = our_outputs(ours, images(224, 224))
    ref_feats, ref_attn = hf_outputs(ref, images(224, 224))
    assert attn.shape == (2, 6, 785, 785) and attn.amax() > 20 / 785  # far from uniform: a wrong q/k would show
    assert_close(feats, ref_feats)
    assert_close(attn, ref_attn)


def test_matches_timm_at_224_and_head_is_new(tm):
    ref, path = tm
    ours = load_pretrained(path, num_classes=2).eval()
    assert layernorm_eps(ours) == {1e-6}  # DINO/timm layout
    blk = ref.blocks[-1].attn
    blk.fused_attn, seen = False, []
    hook = blk.attn_drop.register_forward_hook(lambda mod, inp, out: seen.append(out))  # timm's softmax output
    with torch.no_grad():
        ref_feats = ref.forward_features(images(224, 224))[:, 0]
    hook.remove()
    feats, attn = our_outputs(ours, images(224, 224))
    assert_close(feats, ref_feats)
    assert_close(attn, seen[0])
    # the file's head is ignored: ours is DINO-initialised (zero bias), the file's is random
    assert ours.head.weight.shape == (2, 384) and torch.all(ours.head.bias == 0) and torch.all(ref.head.bias != 0)


# ---------------------------------------------------------------------------------------------------------------
# position embedding at 80x80 (10x10 patches)


def test_size_interpolation_matches_transformers_at_80(hf):
    ref, folder = hf
    ref_feats, ref_attn = hf_outputs(ref, images(80, 80), interpolate_pos_encoding=True)
    for img_size in (224, 80):  # resized on the fly in forward, and resized once at load time
        ours = load_pretrained(folder, img_size=img_size, pos_interp="size").eval()
        feats, attn = our_outputs(ours, images(80, 80))
        assert attn.shape == (2, 6, 101, 101)
        assert_close(feats, ref_feats)
        assert_close(attn, ref_attn)
    # timm's resampler is the same "size" convention once its antialiasing is off
    pos = ref.embeddings.position_embeddings.detach()
    assert_close(resize_pos_embed(pos, (10, 10), "size"), resample_abs_pos_embed(pos, [10, 10], antialias=False))


def test_dino_interpolation_at_80(hf):
    ref, folder = hf
    pos = ref.embeddings.position_embeddings.detach()
    grid = pos[:, 1:].reshape(1, 28, 28, 384).permute(0, 3, 1, 2)
    # DINO vision_transformer.py interpolate_pos_encoding, written out: scale factor (10 + 0.1) / 28
    expected = F.interpolate(grid, scale_factor=(10.1 / 28, 10.1 / 28), mode="bicubic")
    expected = torch.cat([pos[:, :1], expected.permute(0, 2, 3, 1).reshape(1, 100, 384)], dim=1)
    at80 = load_pretrained(folder, img_size=80).eval()  # "dino" is the default
    assert at80.cfg.pos_interp == "dino" and at80.pos_embed.shape == (1, 101, 384)
    torch.testing.assert_close(at80.pos_embed.detach(), expected, atol=1e-6, rtol=0)
    # the two conventions really differ, so the checks above tell them apart
    assert (resize_pos_embed(pos, (10, 10), "size") - expected).abs().max() > 1e-3
    # forward-time interpolation of the 224 model = load-time interpolation
    assert_close(our_outputs(load_pretrained(folder).eval(), images(80, 80))[0], our_outputs(at80, images(80, 80))[0])


# ---------------------------------------------------------------------------------------------------------------
# the model alone


def test_sdpa_equals_explicit_softmax():
    cfg = PRESETS["vit_tiny"]
    attn = randomise_(model.Attention(cfg))
    x = 3 * torch.randn(3, 17, cfg.dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast, none = attn(x)
        slow, probs = attn(x, return_attention=True)
    assert none is None and probs.shape == (3, cfg.heads, 17, 17)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, cfg.heads, 17))
    assert probs.amax() > 0.3  # peaked, not uniform
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5)


def test_forward_any_multiple_of_the_patch():
    ours = ViT(replace(PRESETS["vit_tiny"], num_classes=3)).eval()
    assert ours.cfg.img_size == 80
    for h, w in [(80, 80), (224, 224), (48, 72)]:
        with torch.no_grad():
            assert ours(images(h, w)).shape == (2, 3)
            assert ours.get_last_selfattention(images(h, w)).shape == (2, 3, 1 + h * w // 64, 1 + h * w // 64)
    with pytest.raises(ValueError, match="multiple of the patch"):
        ours(images(80, 84))
    assert ViT(PRESETS["vit_tiny"])(images(32, 32)).shape == (2, 192)  # num_classes 0: the CLS feature


def test_drop_path_per_sample_in_training_only():
    torch.manual_seed(0)
    cfg = replace(PRESETS["vit_tiny"], depth=2, drop_path=0.5, num_classes=2)
    ours, plain = ViT(cfg), ViT(replace(cfg, drop_path=0.0))
    plain.load_state_dict(ours.state_dict())
    assert [b.drop_path.p for b in ours.blocks] == [0.0, 0.5]  # linear over depth, from 0
    x = images(32, 32, n=1).expand(16, -1, -1, -1)  # 16 copies of one image
    ours.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(ours(x), plain(x))
        ours.train()
        y = ours(x)
    assert len({tuple(r.round(decimals=4).tolist()) for r in y}) > 1  # samples drop independently


# ---------------------------------------------------------------------------------------------------------------
# load_pretrained: Hub, files, errors


def fake_hub(monkeypatch, files, raise_offline=None):
    """hf_hub_download serving `files` {name: path}; records (repo_id, filename)."""
    calls = []

    def download(repo_id, filename, **kw):
        calls.append((repo_id, filename))
        if raise_offline is not None:
            raise raise_offline
        if filename not in files:
            url = f"https://huggingface.co/{repo_id}/resolve/main/{filename}"
            response = httpx2.Response(404, request=httpx2.Request("HEAD", url))
            raise huggingface_hub.errors.RemoteEntryNotFoundError(f"{filename} not found", response=response)
        return str(files[filename])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return calls


def test_hub_download_prefers_safetensors_and_reads_config(monkeypatch, tmp_path):
    # 12 heads and eps 1e-5 exist only in config.json: the tensors alone would give 6 heads and 1e-12
    ref = hf_vit(num_hidden_layers=1, num_attention_heads=12, layer_norm_eps=1e-5, image_size=32)
    ref.save_pretrained(tmp_path)
    calls = fake_hub(monkeypatch, {"model.safetensors": tmp_path / "model.safetensors",
                                   "config.json": tmp_path / "config.json"})
    ours = load_pretrained("facebook/dino-vits8").eval()
    assert calls == [("facebook/dino-vits8", "model.safetensors"), ("facebook/dino-vits8", "config.json")]
    assert ours.cfg.heads == 12 and layernorm_eps(ours) == {1e-5}
    assert_close(our_outputs(ours, images(32, 32))[1], hf_outputs(ref, images(32, 32))[1])


def test_hub_falls_back_to_bin_with_weights_only(monkeypatch, hf, tmp_path):
    ref, folder = hf
    torch.save(load_file(folder / "model.safetensors"), tmp_path / "pytorch_model.bin")
    calls = fake_hub(monkeypatch, {"pytorch_model.bin": tmp_path / "pytorch_model.bin"})
    loads, torch_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(kw) or torch_load(*a, **kw))
    ours = load_pretrained("facebook/dino-vits8", num_classes=2).eval()
    assert calls == [("facebook/dino-vits8", f) for f in ("model.safetensors", "pytorch_model.bin", "config.json")]
    assert loads and all(kw.get("weights_only") is True for kw in loads)
    assert layernorm_eps(ours) == {1e-12}  # transformers' default when the repo has no config.json
    assert_close(ours.forward_features(images(224, 224)), hf_outputs(ref, images(224, 224))[0])


@pytest.mark.parametrize("error", [huggingface_hub.errors.LocalEntryNotFoundError("no connection, not cached"),
                                   huggingface_hub.errors.OfflineModeIsEnabled("HF_HUB_OFFLINE=1")])
def test_hub_unreachable_gives_one_clear_line(monkeypatch, error):
    calls = fake_hub(monkeypatch, {}, raise_offline=error)
    with pytest.raises(UserError) as info:
        load_pretrained()
    msg = str(info.value)
    assert "\n" not in msg and "unreachable" in msg and "load_pretrained('/path/to/model.safetensors')" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert calls == [("facebook/dino-vits8", "model.safetensors")]  # no second slow round of retries


def test_offline_for_real_in_a_fresh_process(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}  # empty cache, no network
    run = subprocess.run([sys.executable, "-c", "import model; model.load_pretrained('facebook/dino-vits8')"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("configurator.UserError: the Hugging Face Hub is unreachable")
    assert "load_pretrained('/" in last


def test_local_bin_nested_and_prefixed_loads_but_pickled_objects_are_refused(tm, tmp_path):
    ref, path = tm
    sd = load_file(path)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ckpt.pth")
    ours = load_pretrained(tmp_path / "ckpt.pth").eval()
    with torch.no_grad():
        assert_close(ours.forward_features(images(224, 224)), ref.forward_features(images(224, 224))[:, 0])
    torch.save({"args": argparse.Namespace(arch="vit_small"), **sd}, tmp_path / "full.pth")  # DINO full checkpoint
    with pytest.raises(UserError, match="full.pth: holds Python objects other than tensors"):
        load_pretrained(tmp_path / "full.pth")


def test_head_count_is_never_guessed(tmp_path):
    # a 4-head width-128 model: dim // 64 would say 2 heads and give other outputs without any error
    net = randomise_(ViT(ViTConfig(img_size=32, dim=128, depth=1, heads=4)))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "w.safetensors")
    with pytest.raises(UserError, match="cannot tell its number of attention heads .* pass heads=N"):
        load_pretrained(tmp_path / "w.safetensors")
    loaded = load_pretrained(tmp_path / "w.safetensors", heads=4).eval()
    with torch.no_grad():
        assert_close(loaded.forward_features(images(32, 32)), net.forward_features(images(32, 32)))
    # our own checkpoints carry the count in their metadata
    save_checkpoint(tmp_path / "ours.safetensors", net)
    assert load_pretrained(tmp_path / "ours.safetensors").cfg.heads == 4


def test_bad_keys_are_named(tm, tmp_path):
    sd = load_file(tm[1])
    sd.pop("blocks.1.norm1.bias")
    sd["blocks.0.extra.weight"] = torch.zeros(3)
    sd["norm.weight"] = torch.ones(383)
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(UserError) as info:
        load_pretrained(tmp_path / "bad.safetensors")
    msg = str(info.value)
    assert "missing keys: blocks.1.norm1.bias" in msg and "unexpected keys: blocks.0.extra.weight" in msg
    assert "misshaped keys (file vs model): norm.weight (383,) vs (384,)" in msg
    save_file({"foo": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="not a ViT checkpoint"):
        load_pretrained(tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="nothing.safetensors: no such file or folder"):
        load_pretrained(tmp_path / "nothing.safetensors")


def test_overrides(tm):
    ours = load_pretrained(tm[1], img_size=80, num_classes=2, drop_path=0.1)
    assert (ours.cfg.img_size, ours.cfg.num_classes, ours.cfg.drop_path) == (80, 2, 0.1)
    assert ours.pos_embed.shape == (1, 101, 384) and ours.head.out_features == 2
    assert [b.drop_path.p for b in ours.blocks] == [0.0, 0.1]
    assert ours(images(80, 80)).shape == (2, 2)
    with pytest.raises(TypeError, match="bogus"):
        load_pretrained(tm[1], bogus=1)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def assert_same(a, b, where="state"):
    assert type(a) is type(b), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert [(type(k), k) for k in a] == [(type(k), k) for k in b], where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}.{i}")
    else:
        assert repr(a) == repr(b), where  # repr: -0.0, nan and 1 vs True stay apart


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    net = ViT(replace(PRESETS["vit_tiny"], depth=2, num_classes=2))
    adam = torch.optim.Adam(net.parameters(), lr=1e-3)
    sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(images(32, 32)).sum().backward()
    adam.step(), sgd.step()
    base = torch.arange(6.0)
    state = {
        "optimizer": adam.state_dict(), "sgd": sgd.state_dict(), "epoch": 3,  # int keys, 0-d step tensors
        "rng": {"torch": torch.get_rng_state(), "none": None},  # uint8
        "views": [base, base[2:4], base.view(2, 3).t(), torch.zeros(0), torch.tensor(True)],  # shared memory
        "mixed": {1: "int key", "1": "str key", (0, "x"): (1, 2.5, None, True), "__tensor__": "a marker-like key"},
        "floats": [0.1, -0.0, float("inf"), float("nan"), 1e-300, 2**70],
    }
    meta = {"config": {"lr": 5e-4, "name": "seed_recipe"}, "metrics": {"fair_score": 0.875}, "note": "x"}
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, torch.compile(net), meta=meta, state=state)  # a compiled module saves the plain names
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]
    back, meta_back, state_back = load_checkpoint(path)
    assert type(back) is ViT and back.cfg == net.cfg and meta_back == meta
    assert_same(back.state_dict(), net.state_dict())
    assert_same(state_back, state)
    adam2 = torch.optim.Adam(back.parameters(), lr=1e-3)
    adam2.load_state_dict(state_back["optimizer"])  # resumable
    assert_same(adam2.state_dict(), adam.state_dict())


def test_checkpoint_rejects_foreign_files(tmp_path):
    save_file({"x": torch.zeros(2)}, tmp_path / "plain.safetensors")
    (tmp_path / "text.safetensors").write_text("hello")
    save_file({"x": torch.zeros(2)}, tmp_path / "alien.safetensors", metadata={"arch": "alien", "model_config": "{}"})
    for name, match in [("plain", "not a checkpoint of ours"), ("text", "not a checkpoint of ours"),
                        ("alien", "unknown arch 'alien'")]:
        with pytest.raises(UserError, match=match):
            load_checkpoint(tmp_path / f"{name}.safetensors")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    net, path = ViT(PRESETS["vit_tiny"]), tmp_path / "ckpt.safetensors"
    save_checkpoint(path, net, meta={"epoch": 1})
    with pytest.raises(TypeError):  # not JSON: fails before anything is written
        save_checkpoint(path, net, meta={"epoch": object()})

    def crash(tensors, filename, metadata):  # dies half way through writing
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_file", crash)
    with pytest.raises(model.UserError, match=f"cannot write {path}: disk full"):  # one line naming the file
        save_checkpoint(path, net, meta={"epoch": 2})
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]  # no .tmp left behind
    assert load_checkpoint(path)[1] == {"epoch": 1}  # the old checkpoint is intact
