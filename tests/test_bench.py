"""bench.py without the benchmarks themselves (minutes each): its baselines, its command line and its report."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import bench
import data


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


def test_cli_settings_and_report(tmp_path, capsys):
    run = bench.settings(bench.CONFIG | {"quick": True, "only": "augment,model", "device": "cpu",
                                         "out_dir": str(tmp_path)}, ["--quick", "--only=augment,model"])
    full = bench.settings(bench.CONFIG | {"device": "cpu"})
    assert run.only == ["augment", "model"] and run.n < full.n and run.repeats < full.repeats
    assert run.command == "python bench.py --quick --only=augment,model"
    results = {}
    bench.row(results, "augment: test", 300.0, 100.0)
    bench.write_report(results, run, 90.0)
    assert json.loads((tmp_path / "bench.json").read_text())["augment: test"]["ratio"] == 3.0
    md = (tmp_path / "bench.md").read_text()
    assert "`python bench.py --quick --only=augment,model`" in md and "| augment: test | 300.0 | 100.0 |" in md
    assert sorted(os.listdir(tmp_path)) == ["bench.json", "bench.md"]
    for argv, wanted in ((["--only=augment,speed"], "--only=augment,speed"), (["--quik"], "did you mean --quick")):
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        assert str(e.value.code).startswith("error: ") and wanted in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0 and "--only=loader,augment,model,e2e" in capsys.readouterr().out
