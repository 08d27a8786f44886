"""What the test files share: one tiny synthetic data set (built once per test session), a tiny train_vit.py run
and its log, and the data CLI's one-line errors. Test files import the helpers: `from conftest import read_log`."""

import json
import os

import numpy as np
import pytest
import torch

import data
import model
import train_vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a one-block ViT at 32x32 from scratch, 2 epochs, eager fp32 on the CPU: seconds per run
VIT_TINY = ["--init=scratch", "--arch=vit_tiny", "--dim=32", "--depth=1", "--heads=2", "--img_size=32", "--epochs=2",
            "--batch_size=16", "--eval_batch_size=64", "--device=cpu", "--compile=false", "--amp=none"]
AUGMENT_OFF = dict(crop_p=0, flip_p=0, rotate_p=0, erase_p=0, color_p=0, blur_p=0)  # data.augment = resize + normalise
VOLATILE = {"time_s", "train_s", "img_per_s"}  # wall-clock numbers in log.jsonl; the rest must reproduce exactly


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same global RNG state: this torch draws a new default seed in each process, so a
    test that draws unseeded values (torch.randn) would see different ones each run, and fail by chance."""
    torch.manual_seed(0)
    np.random.seed(0)


def run_vit(tiny_data, out_dir, *args):
    train_vit.main([*VIT_TINY, f"--data={tiny_data}", f"--out_dir={out_dir}", *args])


def read_log(out_dir):
    """A run's log.jsonl without its wall-clock numbers."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE} for line in f]


def weights(path):
    return model.load_checkpoint(str(path))[0].state_dict()


def error_line(main, argv):
    """Run a script's main(argv) expecting its one `error:` line (exit status 1, no traceback); return the line."""
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    message = e.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


def data_fails(argv):
    """data.py's CLI, expecting its one-line error."""
    return error_line(data.main, argv)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A data.py folder of 400 synthetic 32x32 faces (320 / 40 / 40), clean labels, both groups in every split.
    Tests read it and never write into it."""
    out = str(tmp_path_factory.mktemp("data") / "tiny")
    data.main(["synthetic", "--n=400", "--size=32", "--noise=0", "--seed=0", f"--out_dir={out}"])
    return out
