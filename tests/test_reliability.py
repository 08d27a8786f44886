"""Reliability, round 3 (issue 23): each class of bad input the round found, tested at its root. Every test names
its class; each failed on the code before the fix."""

import pytest
import torch

import data
import evaluate
import model
import robust
import train_mixmatch
import train_vit
from conftest import VIT_TINY, error_line

# -----------------------------------------------------------------------------
# class 3: inputs that lie about their own sanity

@pytest.mark.parametrize("main, arg", [
    (train_vit.main, "--lr=inf"), (train_vit.main, "--weight_decay=nan"), (train_vit.main, "--dro_step=inf"),
    (train_vit.main, "--augment_kw=crop_p=inf"), (train_mixmatch.main, "--T=inf"), (train_mixmatch.main, "--lr=-inf"),
    (evaluate.main, "--threshold_tolerance=nan")])
def test_class3_non_finite_numbers_are_refused_at_parse_time(main, arg):
    # inf passes every "> 0" check and nan fails none: both used to run (T=inf made every guess uniform, exit 0)
    message = error_line(main, [arg])
    assert message.endswith(f"={arg.split('=')[-1]} is not a finite number"), message


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_class3_non_finite_weights_are_refused_on_loading(tmp_path, tiny_data, bad):
    net = model.ViT(model.ViTConfig(img_size=32, dim=32, depth=1, heads=2, num_classes=2))
    with torch.no_grad():
        net.blocks[0].mlp.fc1.weight[0, 0] = bad
    ckpt = str(tmp_path / "diverged.safetensors")
    model.save_checkpoint(ckpt, net)
    message = error_line(evaluate.main, ["--ckpt", ckpt, "--data", tiny_data])  # was scored: accuracy 0.80, exit 0
    assert "1 weight tensors hold inf or nan (first: blocks.0.mlp.fc1.weight)" in message
    with pytest.raises(model.UserError, match="hold inf or nan"):  # a pretrained backbone file, the same
        model.load_pretrained(ckpt)


@pytest.mark.parametrize("arch, config, tags, base", [
    ("small", {"net": "small", "pretrained": ""}, ["cnn"], None),  # was: base_model false, a vision-transformer tag
    ("wrn50_2", {"net": "wrn50_2", "pretrained": "torchvision"}, ["cnn", "wide-resnet"], None),
    ("vit", {"init": "dino", "pretrained": "facebook/dino-vits8"}, ["vision-transformer"], "facebook/dino-vits8"),
    ("vit", {"init": "scratch", "pretrained": "facebook/dino-vits8"}, ["vision-transformer"], None)])
def test_class3_model_card_follows_the_real_architecture(tiny_data, tmp_path, arch, config, tags, base):
    yaml = pytest.importorskip("yaml")
    if arch == "vit":
        net = model.ViT(model.ViTConfig(img_size=32, dim=32, depth=1, heads=2, num_classes=2))
    else:
        net = model.SmallCNN(img_size=32, num_classes=2, width=4) if arch == "small" else None
    if net is None:  # the card is read from the checkpoint's metadata; the Wide-ResNet itself is too big to build here
        card = evaluate.model_card({"ckpt": "x", "split": "test", "data": "d", "n": 1, "accuracy": 1.0, "f1": 1.0},
                                   {"config": config}, {"classes": ["a", "b"], "splits": {}}, arch)
    else:
        ckpt = str(tmp_path / "run" / "best.safetensors")
        (tmp_path / "run").mkdir()
        model.save_checkpoint(ckpt, net, meta={"config": config})
        evaluate.main(["--ckpt", ckpt, "--data", tiny_data, "--out", str(tmp_path / "eval"), "--card", "--n_boot=0"])
        card = (tmp_path / "eval" / "README.md").read_text()
    front = yaml.safe_load(str(card).split("---")[1])
    assert [t for t in front["tags"] if t in ("cnn", "wide-resnet", "vision-transformer")] == tags
    assert front.get("base_model") == base


# -----------------------------------------------------------------------------
# class 5: messages

def test_class5_push_to_hub_without_a_network_is_one_line(tiny_data, tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    class ConnectError(Exception):  # as httpx's (newer huggingface_hub releases use httpx): not an OSError
        pass
    net = model.ViT(model.ViTConfig(img_size=32, dim=32, depth=1, heads=2, num_classes=2))
    ckpt = str(tmp_path / "tiny.safetensors")
    model.save_checkpoint(ckpt, net)

    def no_network(self, repo_id, exist_ok):  # what huggingface_hub raises with no route to the Hub
        raise ConnectError("[Errno 101] Network is unreachable")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", no_network)
    message = error_line(evaluate.main, ["--ckpt", ckpt, "--data", tiny_data, "--out", str(tmp_path / "out"),
                                         "--push_to_hub=me/x", "--n_boot=0"])
    assert message.startswith("error: cannot push to the Hub repo me/x (ConnectError)")  # was an httpx traceback


# -----------------------------------------------------------------------------
# class 4: long jobs that die late

def test_class4_a_table_checks_every_row_before_the_first_trains(tiny_data, tmp_path):
    # 320 train faces, the smallest label x group cell 16: subsampling keeps 64, fewer than a batch of 80. The table
    # used to train ERM, reweighting and oversampling first, then stop at the fourth row.
    out = tmp_path / "table"
    message = error_line(robust.main, ["--table=robust", *VIT_TINY, f"--data={tiny_data}", f"--out_dir={out}",
                                       "--batch_size=80", "--table_seeds=1"])
    assert message.startswith("error: robust table row 'subsampling (sampler=subsample)' (seed 0): --batch_size=80 is "
                              "larger than the 64 training samples")
    assert not out.exists() or not any(out.iterdir())  # nothing trained


def test_class4_a_sweep_checks_every_seed_before_the_first_trains(tiny_data, tmp_path):
    args = [*VIT_TINY, f"--data={tiny_data}", f"--sweep_dir={tmp_path}"]
    assert error_line(train_vit.main, [*args, "--sweep=0 1 0"]) == \
        'error: --sweep=0 1 0: seed 0 is listed twice; each seed is one run'
    (tmp_path / "seed1").mkdir()
    (tmp_path / "seed1" / "log.jsonl").write_text("{}\n")  # an earlier run of seed 1: refused before seed 0 trains
    message = error_line(train_vit.main, [*args, "--sweep=0 1"])
    assert message.startswith(f"error: --sweep seed 1: {tmp_path / 'seed1'} holds an earlier run")
    assert not (tmp_path / "seed0").exists()


def test_class5_show_out_png_is_the_file_and_augment_kw_suggests_a_form_that_works(tiny_data, tmp_path):
    grid = tmp_path / "grid.png"
    data.main(["show", tiny_data, f"--out={grid}", "--n_per_cell=1", "--n_aug=1"])
    assert grid.is_file() and grid.read_bytes()[:4] == b"\x89PNG"  # was a folder named grid.png
    message = error_line(data.main, ["show", tiny_data, "--augment_kw=crop_scale=0.5"])
    assert message.endswith("needs 2 comma-separated values, like (0.5,1.0)")  # was "like 0.5,1.0", which fails
    data.main(["show", tiny_data, "--augment_kw=crop_scale=(0.5,1.0)", f"--out={tmp_path / 'ok.png'}",
               "--n_per_cell=1", "--n_aug=1"])  # the suggested form works
