"""data.py, sources.py, celeba.py, faces.py and beton.py: building (synthetic, challenge, folder, aaf, adience,
celeba), the command line, the .beton round trip, both loader backends, the batched augmentation, `data.py show` and
the error paths. Most tests read the session's tiny synthetic set (conftest's tiny_data); the importers build their
own from files they write. FFCV's JIT costs seconds per process, so only two FFCV loaders are made."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import beton
import celeba
import data
import faces
import sources
from conftest import AUGMENT_OFF as OFF
from conftest import ROOT
from conftest import data_fails as fails


def rand_image(rng, h=80, w=80):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def build_config(meta):
    """The config a data set was built with, from its meta.json (JSON turned the tuples into lists)."""
    return {**sources.SOURCES[meta["source"]][1],
            **{k: tuple(v) if isinstance(v, list) else v for k, v in meta["args"].items()}}


# ---------------------------------------------------------------------------------------------------------------
# the split: importing data loads none of the builders

def test_import_data_loads_no_builder():
    heavy = ("sources", "cv2", "PIL", "pyarrow", "huggingface_hub", "matplotlib", "ffcv")
    code = f"import sys, data; print(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]", r.stdout


# ---------------------------------------------------------------------------------------------------------------
# synthetic generation

def test_synthetic_is_deterministic_per_seed():
    cfg = dict(sources.SYNTHETIC, n=60, size=32)
    a, b = sources.synthetic_source(cfg), sources.synthetic_source(cfg)
    c = sources.synthetic_source(dict(cfg, seed=1))
    for s in data.SPLITS:
        for k in ("images", "labels", "groups", "attrs"):
            assert np.array_equal(a["splits"][s][k], b["splits"][s][k])
    assert not np.array_equal(a["splits"]["train"]["images"], c["splits"]["train"]["images"])


def test_synthetic_hits_cells_and_follows_the_rule(tiny_data):
    meta = data.read_meta(tiny_data)
    asked = dict(zip([(0, 0), (1, 0), (0, 1), (1, 1)], sources.CHALLENGE_CELLS))
    for s in data.SPLITS:
        n = meta["splits"][s]["n"]
        cells = {(c["label"], c["group"]): c["n"] for c in meta["splits"][s]["cells"]}
        assert sum(cells.values()) == n and set(cells) == set(asked)
        for cell, frac in asked.items():
            assert abs(cells[cell] / n - frac) <= 1 / n, (s, cell, cells[cell], n)
        attrs, names = data.load_attrs(tiny_data, s)
        _, y, g = data.load_split(tiny_data, s)
        blond, glasses, male = (attrs[:, names.index(a)].astype(bool) for a in ("Blond_Hair", "Eyeglasses", "Male"))
        assert np.array_equal(y.numpy(), blond ^ glasses) and np.array_equal(g.numpy(), male)


def test_synthetic_label_noise_and_xor_cases():
    rng = np.random.default_rng(0)
    attrs = faces.synth_attributes(20000, rng, sources.CHALLENGE_CELLS, sources.SYNTHETIC["glasses_share"], both=0.25)
    blond, glasses = attrs[:, 0].astype(bool), attrs[:, 1].astype(bool)
    negatives = ~(blond ^ glasses)
    assert abs((blond & glasses)[negatives].mean() - 0.25) < 0.02  # the cell that tells XOR from OR is populated
    split = sources.synthetic_source(dict(sources.SYNTHETIC, n=2000, size=32, noise=0.2))["splits"]
    for s, rate in (("train", 0.2), ("test", 0.0)):  # noise on train/val only
        a = split[s]["attrs"]
        flipped = split[s]["labels"] != (a[:, 0] ^ a[:, 1])
        assert abs(flipped.mean() - rate) < 0.04, (s, flipped.mean())


def test_readme_and_makefile_invocations_still_work(tmp_path, capsys):
    """The space-separated forms, --out and --target, as in `make data/ssl/meta.json` (a smaller n)."""
    out = str(tmp_path / "ssl")
    data.main(["synthetic", "--n", "60", "--size", "32", "--target", "Male", "--group", "none", "--out", out])
    assert f"wrote {out}" in capsys.readouterr().out
    meta = data.read_meta(out)
    assert meta["criterion"] == "Male" and meta["classes"] == ["not Male", "Male"] and meta["groups"] == []
    assert meta["args"]["n"] == 60 and meta["args"]["split"] == [0.8, 0.1, 0.1]
    attrs, names = data.load_attrs(out, "test")  # the clean split: train and val have 3% label noise
    _, y, g = data.load_split(out, "test")
    assert np.array_equal(y.numpy(), attrs[:, names.index("Male")]) and (g == -1).all()


# ---------------------------------------------------------------------------------------------------------------
# storage and loading

def test_beton_round_trip_is_exact(tiny_data):
    meta = data.read_meta(tiny_data)
    src = sources.synthetic_source(build_config(meta))["splits"]  # rebuilt from meta.json's record alone
    for s in data.SPLITS:
        x, y, g = data.load_split(tiny_data, s)
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, *meta["image_size"]) and y.dtype == g.dtype == torch.int64
        assert np.array_equal(x.permute(0, 2, 3, 1).numpy(), src[s]["images"])
        assert np.array_equal(y.numpy(), src[s]["labels"]) and np.array_equal(g.numpy(), src[s]["groups"])
        assert np.array_equal(data.load_attrs(tiny_data, s)[0], src[s]["attrs"])
        y2, g2 = data.load_labels(tiny_data, s)
        assert torch.equal(y2, y) and torch.equal(g2, g)


def test_backends_give_the_same_batches(tiny_data):
    n = data.read_meta(tiny_data)["splits"]["val"]["n"]
    x, y, g = data.load_split(tiny_data, "val")
    threads = torch.get_num_threads()
    ffcv = data.make_loader(tiny_data, "val", 16, False, "cpu", backend="ffcv")
    res = data.make_loader(tiny_data, "val", 16, False, torch.device("cpu"))
    fb = [tuple(t.clone() for t in b) for b in ffcv]  # ffcv batches are views of reused buffers
    rb = list(res)
    assert torch.get_num_threads() == threads  # ffcv's set_num_threads was undone
    assert len(fb) == len(rb) == len(ffcv) == len(res) == -(-n // 16)
    for a, b in zip(fb, rb):
        for t, u in zip(a, b):
            assert torch.equal(t, u)
    assert torch.equal(torch.cat([b[0] for b in rb]), x) and torch.equal(torch.cat([b[1] for b in rb]), y)
    assert torch.equal(torch.cat([b[2] for b in fb]), g)
    # training order: drawn from (seed, epoch), the same for both backends
    tr_f = data.make_loader(tiny_data, "train", 32, True, "cpu", backend="ffcv", seed=3)
    tr_r = data.make_loader(tiny_data, "train", 32, True, "cpu", seed=3)
    for epoch in (0, 1):
        tr_f.set_epoch(epoch)
        tr_r.set_epoch(epoch)
        assert torch.equal(torch.cat([b[0].clone() for b in tr_f]), torch.cat([b[0] for b in tr_r]))


def test_resident_order_subsets_and_ranks(tiny_data):
    x, y, g = data.load_split(tiny_data, "train")
    n = len(x)
    L = data.make_loader(tiny_data, "train", 32, True, "cpu", seed=1)
    assert len(L) == n // 32
    pos = L.order()
    assert len(pos) == n // 32 * 32 and len(set(pos.tolist())) == len(pos)
    assert torch.equal(torch.cat([b[0] for b in L]), x[pos])  # iterating uses that order, then moves on an epoch
    assert not torch.equal(L.order(), pos)
    L.set_epoch(0)
    assert torch.equal(L.order(), pos)
    # subsets by index, and DDP ranks: one global permutation per (seed, epoch), rank r takes positions r, r + world..
    idx = torch.arange(0, n, 3)
    everything = data.make_loader(tiny_data, "train", 1, True, "cpu", indices=idx, seed=1).order()
    assert sorted(everything.tolist()) == list(range(len(idx)))
    for r in (0, 1):
        rl = data.make_loader(tiny_data, "train", 8, True, "cpu", indices=idx, seed=1, rank=r, world_size=2)
        assert len(rl) == (len(idx) // 2) // 8
        pos = rl.order()
        assert torch.equal(pos, everything[r::2][: len(rl) * 8])  # full batches only, equal counts on every rank
        assert torch.equal(torch.cat([b[1] for b in rl]), y[idx][pos])
    ev = [data.make_loader(tiny_data, "val", 7, False, "cpu", rank=r, world_size=2) for r in (0, 1)]
    got = torch.cat([torch.cat([b[1] for b in e]) for e in ev])
    assert len(got) == data.read_meta(tiny_data)["splits"]["val"]["n"]  # evaluation: every sample exactly once


# ---------------------------------------------------------------------------------------------------------------
# augmentation


@pytest.fixture(scope="module")
def batch(tiny_data):
    return data.load_split(tiny_data, "val")[0][:32]


def test_augment_shapes_range_and_identity(batch):
    lo = (0 - torch.tensor(data.IMAGENET_MEAN) * 255) / (torch.tensor(data.IMAGENET_STD) * 255)
    hi = (255 - torch.tensor(data.IMAGENET_MEAN) * 255) / (torch.tensor(data.IMAGENET_STD) * 255)
    for out in (batch.shape[-1], 80):
        a = data.augment(batch, out, torch.Generator().manual_seed(0))
        assert a.shape == (32, 3, out, out) and a.dtype == torch.float32 and torch.isfinite(a).all()
        assert (a >= lo.view(1, 3, 1, 1) - 1e-5).all() and (a <= hi.view(1, 3, 1, 1) + 1e-5).all()
        assert torch.equal(data.augment(batch, out, **OFF), data.prepare(batch, out))
    p = data.prepare(batch, batch.shape[-1])  # at native size prepare is exactly (x / 255 - mean) / std
    ref = (batch.float() / 255 - torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        data.IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(p, ref, atol=1e-5)


def test_augment_is_per_sample_and_seedable(batch):
    size = batch.shape[-1]
    same = batch[:1].repeat(64, 1, 1, 1)
    a = data.augment(same, size, torch.Generator().manual_seed(1))
    assert len(torch.unique(a.flatten(1), dim=0)) == 64  # every copy drew its own parameters
    assert torch.equal(a, data.augment(same, size, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, data.augment(same, size, torch.Generator().manual_seed(2)))
    x = batch.repeat(8, 1, 1, 1)
    flips = data.augment(x, size, torch.Generator().manual_seed(3), **{**OFF, "flip_p": 0.5})
    ref = data.prepare(x, size)
    flipped = (flips == ref.flip(-1)).flatten(1).all(1)
    kept = (flips == ref).flatten(1).all(1)
    assert (flipped | kept).all() and 0.35 < flipped.float().mean() < 0.65


def test_augment_ops_do_what_they_say(batch):
    size = batch.shape[-1]
    x = batch.repeat(4, 1, 1, 1)
    ref = data.prepare(x, size)
    fill = ((torch.tensor(data.ERASE_FILL) / 255 - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(
        data.IMAGENET_STD)).view(1, 3, 1, 1)
    er = data.augment(x, size, torch.Generator().manual_seed(4), **{**OFF, "erase_p": 1.0})
    frac = (er != ref).any(1).float().mean((1, 2))
    boxed = torch.isclose(er, fill, atol=1e-5).all(1).float().mean((1, 2))
    assert (boxed >= frac - 1e-6).all() and (frac <= 0.4 + 0.05).all() and (boxed > 0.01).float().mean() > 0.8
    rot = data.augment(x, size, torch.Generator().manual_seed(5), **{**OFF, "rotate_p": 1.0, "max_angle": 0.5})
    black = ((0 - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(data.IMAGENET_STD)).view(1, 3)
    corners = rot[:, :, [0, 0, -1, -1], [0, -1, 0, -1]].permute(0, 2, 1)  # [B, 4, 3]
    assert torch.isclose(corners, black, atol=1e-5).all(-1).any(-1).float().mean() > 0.7  # black fill
    col = data.augment(x, size, torch.Generator().manual_seed(6), **{**OFF, "color_p": 1.0, "saturation": (1.0, 1.0)})
    brighter = (col * torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)).mean((1, 2, 3)) >= (
        ref * torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)).mean((1, 2, 3)) - 1e-4
    assert brighter.all()
    bl = data.augment(x, size, torch.Generator().manual_seed(7), **{**OFF, "blur_p": 1.0, "blur_sigma": (1.5, 2.0)})
    inner = lambda t: t[..., 2:-2, 2:-2]  # the zero padding darkens a border as wide as half the kernel
    tv = lambda t: (inner(t)[..., 1:, :] - inner(t)[..., :-1, :]).abs().mean((1, 2, 3))
    assert (tv(bl) < tv(ref)).all()  # smoother


def test_crop_is_a_resampled_sub_box_within_scale_and_ratio():
    """An image whose red and green channels are 8x the column and row index: after a crop alone, each output row
    (column) is a straight line in red (green) whose slope gives the box width (height) and whose offset its corner."""
    H = W = 32
    cols, rows = torch.meshgrid(torch.arange(W), torch.arange(H), indexing="xy")
    img = torch.stack([8 * cols, 8 * rows, torch.full_like(cols, 128)]).to(torch.uint8)
    scale, ratio = (0.5, 1.0), (3 / 4, 4 / 3)
    out = data.augment(img.expand(64, 3, H, W), W, torch.Generator().manual_seed(0),
                       **{**OFF, "crop_p": 1.0, "crop_scale": scale, "crop_ratio": ratio})
    px = out * torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1) * 255 + torch.tensor(data.IMAGENET_MEAN).view(
        1, 3, 1, 1) * 255
    i = torch.arange(2, W - 2, dtype=torch.float64)  # inner pixels: the outermost may blend in the zero padding
    boxes = []
    for p in px.double():
        fits = []
        for line in (p[0, H // 2, 2:-2], p[1, 2:-2, W // 2]):  # sample at i: 8 * (corner + (i + 0.5) * side / 32 - 0.5)
            slope, offset = np.polyfit(i.numpy(), line.numpy(), 1)
            assert np.abs(np.polyval([slope, offset], i.numpy()) - line.numpy()).max() < 1.0  # a linear resample
            side = slope * W / 8
            fits.append((offset / 8 + 0.5 - 0.5 * side / W, side))
        (left, w), (top, h) = fits
        across = p[1, H // 2, 2:-2], p[0, 2:-2, W // 2]  # green along the row, red along the column: constant
        assert max(float(a.max() - a.min()) for a in across) <= 1.0  # an axis-aligned box: no rotation, no shear
        assert -0.2 < left and left + w < W + 0.2 and -0.2 < top and top + h < H + 0.2  # inside the image
        boxes.append((w * h / (H * W), w / h))
    area, aspect = np.array(boxes).T
    assert (area > scale[0] - 0.03).all() and (area < scale[1] + 0.03).all()
    assert (aspect > ratio[0] - 0.03).all() and (aspect < ratio[1] + 0.03).all()
    assert area.min() < 0.6 and area.max() > 0.9 and np.std(aspect) > 0.05  # the draws span the ranges


# ---------------------------------------------------------------------------------------------------------------
# data.py show

def test_show_writes_a_grid_per_cell(tiny_data, tmp_path, capsys):
    n_cells = len(data.read_meta(tiny_data)["splits"]["val"]["cells"])
    path = data.show([tiny_data, "--split=val", "--n_per_cell=2", "--n_aug=3", "--augment=weak",
                      "--augment_kw=crop_scale=(0.3,1.0),blur_kernel=3", f"--out={tmp_path}"])
    assert os.path.dirname(path) == str(tmp_path) and os.listdir(tmp_path) == [os.path.basename(path)]
    assert f"from {n_cells} label x group cells" in capsys.readouterr().out
    with Image.open(path) as im:
        w, h = im.size
    assert im.format == "PNG" and 100 < w < 4000 and 100 < h < 4000
    assert h > w  # 8 rows (4 cells x 2 images) of 4 columns (the original and 3 copies)
    data.main(["show", tiny_data, "--n_per_cell=1", "--n_aug=1", "--augment=none", f"--out_dir={tmp_path}"])
    assert len(os.listdir(tmp_path)) == 2
    assert "blur_size" in fails(["show", tiny_data, "--augment_kw=blur_size=3", f"--out={tmp_path}"])
    assert "meta.json" in fails(["show", str(tmp_path / "missing"), f"--out={tmp_path}"])
    assert "--data_dir is required" in fails(["show"])
    assert len(os.listdir(tmp_path)) == 2


# ---------------------------------------------------------------------------------------------------------------
# importers

def test_criterion_parser_is_safe():
    names = ["Blond_Hair", "Eyeglasses", "Male", "Young"]
    a = {n: np.array([0, 1, 1, 0, 1]) > 0 for n in names}
    a["Eyeglasses"] = np.array([0, 0, 1, 1, 1]) > 0
    f = data.parse_criterion("Blond_Hair ^ Eyeglasses", names)
    assert f(a).tolist() == [False, True, False, True, False]
    g = data.parse_criterion("not Male and ~Eyeglasses | Young", names)  # Python precedence: | before and
    assert g(a).tolist() == [True, False, False, False, False]
    for bad in ("__import__('os').system('true')", "Blond_Hair + 1", "Hat", "Male.real", "Male ^", "[Male]"):
        with pytest.raises(data.DataError):
            data.parse_criterion(bad, names)


def test_challenge_importer(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "challenge"
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    lines = []
    for i in range(16):
        rand_image(rng).save(root / "train" / f"{i:06d}.jpg")
        lines.append(f"{i:06d}.jpg\t{1 if i % 4 < 2 else -1}\t{1 if i % 2 else -1}")
    (root / "train" / "000099.jpg").write_bytes(b"\xff\xd8 not really a jpeg")  # corrupt, listed
    lines.append("000099.jpg\t1\t1")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    for i in range(5):
        rand_image(rng).save(root / "test" / f"{i:06d}.jpg")
    (root / "test" / "notes.txt").write_text("not an image")
    out = str(tmp_path / "out")
    data.main(["challenge", f"--root={root}", f"--out_dir={out}", "--val_frac=0.25"])
    meta = data.read_meta(out)
    assert meta["classes"] == ["-1", "1"] and meta["groups"] == ["women", "men"]
    assert sorted(s["file"] for s in meta["skipped"]) == ["000099.jpg", "notes.txt"] and meta["n_skipped"] == 2
    assert meta["splits"]["train"]["n"] == 12 and meta["splits"]["val"]["n"] == 4  # one per label x group cell
    assert {(c["label"], c["group"]) for c in meta["splits"]["val"]["cells"]} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert meta["splits"]["test"]["files"] == [f"{i:06d}.jpg" for i in range(5)]
    assert not meta["splits"]["test"]["labelled"]
    x, y, g = data.load_split(out, "test")
    assert (y == -1).all() and (g == -1).all()
    assert np.array_equal(x[2].permute(1, 2, 0).numpy(), np.asarray(Image.open(root / "test" / "000002.jpg")))
    x, y, g = data.load_split(out, "train")
    for xi, yi, gi in zip(x, y, g):  # find each stored image's source row and check its label and group
        i = next(i for i in range(16) if np.array_equal(
            xi.permute(1, 2, 0).numpy(), np.asarray(Image.open(root / "train" / f"{i:06d}.jpg"))))
        assert (int(yi), int(gi)) == (int(i % 4 < 2), i % 2)


def test_folder_importer(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "masks"
    rows = ["path,group"]
    for cls in ("mask", "no_mask"):
        for i in range(8):
            sub = root / cls / f"person{i % 2}"
            sub.mkdir(parents=True, exist_ok=True)
            rand_image(rng, 100, 120).save(sub / f"{i}.png")  # not square, not 80: centre crop + resize
            rows.append(f"{cls}/person{i % 2}/{i}.png,{'female' if i % 2 else 'male'}")
    (root / "mask" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (root / "no_mask" / "list.csv").write_text("a,b\n")
    (tmp_path / "groups.csv").write_text("\n".join(rows) + "\n")
    out = str(tmp_path / "out")
    data.main(["folder", f"--root={root}", f"--groups={tmp_path / 'groups.csv'}", "--split=0.5,0.25,0.25",
               f"--out_dir={out}"])
    meta = data.read_meta(out)
    assert meta["classes"] == ["mask", "no_mask"] and meta["groups"] == ["female", "male"]
    assert sorted(s["file"] for s in meta["skipped"]) == ["mask/broken.png", "no_mask/list.csv"]
    assert [meta["splits"][s]["n"] for s in data.SPLITS] == [8, 4, 4]
    x, y, g = data.load_split(out, "train")
    assert x.shape[1:] == (3, 80, 80) and sorted(set(g.tolist())) == [0, 1] and sorted(set(y.tolist())) == [0, 1]


def test_aaf_importer(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "All-Age-Faces Dataset" / "aligned faces"
    folder.mkdir(parents=True)
    names = [f"{s:05d}A{age:02d}.jpg" for s, age in [(0, 2), (12, 30), (500, 41), (7380, 77), (7381, 5), (8000, 19),
                                                    (9000, 50), (13321, 80)]]
    for nm in names:
        rand_image(rng).save(folder / nm)
    (folder / "00013A22.jpg").write_bytes(b"garbage")
    (folder / "readme.txt").write_text("hello")
    out = str(tmp_path / "out")
    data.main(["aaf", f"--root={tmp_path / 'All-Age-Faces Dataset'}", "--split=0.5,0.25,0.25", f"--out_dir={out}"])
    meta = data.read_meta(out)
    assert meta["classes"] == ["female", "male"] and meta["attributes"] == ["Male", "Age"]
    assert sorted(s["file"] for s in meta["skipped"]) == ["00013A22.jpg", "readme.txt"]
    labels, ages = [], []
    for s in data.SPLITS:
        labels += data.load_split(out, s)[1].tolist()
        ages += data.load_attrs(out, s)[0][:, 1].tolist()
    assert sorted(labels) == [0] * 4 + [1] * 4 and sorted(ages) == [2, 5, 19, 30, 41, 50, 77, 80]


ADIENCE_HEADER = ("user_id\toriginal_image\tface_id\tage\tgender\tx\ty\tdx\tdy\ttilt_ang\tfiducial_yaw_angle\t"
                  "fiducial_score")


def test_adience_importer(tmp_path, capsys):
    """Five fold files; per fold two faces with a gender, one with u or none (skipped), and in fold 0 one listed face
    whose file is missing (skipped too). The folds are the splits: test = 4, val = 3, train = 0-2 by default."""
    rng = np.random.default_rng(5)
    root = tmp_path / "adience"
    files = {}  # (fold, gender) -> image file
    for k in range(5):
        rows = [ADIENCE_HEADER]
        for j, gender in enumerate(("f", "m", "u" if k % 2 else "")):
            user, face, orig = f"{k}{j}@N0{k}", str(100 + j), f"{k}{j}_9a_o.jpg"
            (root / "aligned" / user).mkdir(parents=True, exist_ok=True)
            files[k, gender] = root / "aligned" / user / f"landmark_aligned_face.{face}.{orig}"
            rand_image(rng, 96, 96).save(files[k, gender])
            rows.append(f"{user}\t{orig}\t{face}\t(25, 32)\t{gender}\t0\t0\t96\t96\t0\t0\t50")
        if k == 0:
            rows.append("gone@N00\tx.jpg\t7\t(25, 32)\tm\t0\t0\t96\t96\t0\t0\t50")
            rows.append("cut@N00\tc.jpg\t8")  # a truncated line (issue 23, class 2): malformed, not "gender empty"
        (root / f"fold_{k}_data.txt").write_text("\n".join(rows) + "\n")
    out = str(tmp_path / "out")
    data.main(["adience", f"--root={root}", f"--out_dir={out}", "--size=48"])
    assert "adience: 5 rows without a gender (u or empty) and 1 malformed rows skipped" in capsys.readouterr().out
    meta = data.read_meta(out)
    assert meta["classes"] == ["female", "male"] and meta["groups"] == [] and meta["attributes"] == ["Male", "Fold"]
    assert meta["n_skipped"] == 7 and "gone@N00/landmark_aligned_face.7.x.jpg" in [s["file"] for s in meta["skipped"]]
    assert {"file": "fold_0_data.txt:6", "reason": "malformed row: 3 of 12 fields"} in meta["skipped"]
    assert [meta["splits"][s]["n"] for s in data.SPLITS] == [6, 2, 2]
    for s, folds in (("train", [0, 0, 1, 1, 2, 2]), ("val", [3, 3]), ("test", [4, 4])):
        x, y, g = data.load_split(out, s)
        attrs, _ = data.load_attrs(out, s)
        assert sorted(attrs[:, 1].tolist()) == folds and np.array_equal(y.numpy(), attrs[:, 0]) and (g == -1).all()
        for xi, yi, k in zip(x, y, attrs[:, 1]):  # each stored face is its fold's f or m file, resized
            with Image.open(files[int(k), "m" if yi else "f"]) as im:
                want = np.asarray(im.convert("RGB").resize((48, 48), Image.Resampling.BOX))
            assert np.array_equal(xi.permute(1, 2, 0).numpy(), want)
    assert "two different folds" in fails(["adience", f"--root={root}", f"--out_dir={out}2", "--val_fold=4"])


CELEBA_ATTRS = ["Attractive", "Blond_Hair", "Eyeglasses", "Male", "Young"]


def celeba_rows(rng, n):
    """n random 178x218 'aligned faces' (JPEG bytes) and attribute rows."""
    imgs = []
    for _ in range(n):
        buf = io.BytesIO()
        rand_image(rng, 218, 178).save(buf, "JPEG")
        imgs.append(buf.getvalue())
    return imgs, rng.integers(0, 2, (n, len(CELEBA_ATTRS))).astype(bool)


def expected_80(jpeg):
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB").crop((0, 20, 178, 198)).resize(
        (80, 80), Image.Resampling.BOX))


def check_celeba(out, per_split):
    meta = data.read_meta(out)
    assert meta["attributes"] == CELEBA_ATTRS and meta["groups"] == ["women", "men"]
    for s, (imgs, attrs) in per_split.items():
        x, y, g = data.load_split(out, s)
        a, _ = data.load_attrs(out, s)
        assert np.array_equal(a, attrs.astype(np.uint8))
        assert np.array_equal(y.numpy(), attrs[:, 1] ^ attrs[:, 2]) and np.array_equal(g.numpy(), attrs[:, 3])
        assert np.array_equal(x[0].permute(1, 2, 0).numpy(), expected_80(imgs[0]))
    return meta


def test_celeba_from_parquet_shards(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(3)
    folder = tmp_path / "hf" / celeba.CELEBA_CONFIG
    folder.mkdir(parents=True)
    kept = {}
    for s, prefix, n in (("train", "train", 5), ("val", "valid", 3), ("test", "test", 3)):
        imgs, attrs = celeba_rows(rng, n)
        if s == "train":  # one corrupt row: skipped, listed
            imgs[2] = b"broken"
        cols = {"image": pa.array([{"bytes": b, "path": f"{s}{i}.jpg"} for i, b in enumerate(imgs)]),
                "celeb_id": pa.array(np.arange(n))}
        cols.update({a: pa.array(attrs[:, k]) for k, a in enumerate(CELEBA_ATTRS)})
        pq.write_table(pa.table(cols), folder / f"{prefix}-00000-of-00001.parquet")
        ok = [i for i in range(n) if imgs[i] != b"broken"]
        kept[s] = ([imgs[i] for i in ok], attrs[ok])
    out = str(tmp_path / "out")
    data.main(["celeba", f"--root={tmp_path / 'hf'}", f"--out_dir={out}"])
    meta = check_celeba(out, kept)
    assert [s["file"] for s in meta["skipped"]] == ["train2.jpg"]


def test_celeba_from_official_files(tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "celeba"
    (root / "img_align_celeba").mkdir(parents=True)
    imgs, attrs = celeba_rows(rng, 9)
    part = [0, 0, 0, 0, 1, 1, 2, 2, 2]
    for i, b in enumerate(imgs):
        (root / "img_align_celeba" / f"{i + 1:06d}.jpg").write_bytes(b)
    lines = ["9", " ".join(CELEBA_ATTRS)] + [f"{i + 1:06d}.jpg " + " ".join(f"{1 if v else -1:>2}" for v in row)
                                            for i, row in enumerate(attrs)]
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("".join(f"{i + 1:06d}.jpg {p}\n" for i, p in enumerate(part)))
    out = str(tmp_path / "out")
    data.main(["celeba", f"--root={tmp_path}", "--target=Male", f"--out_dir={tmp_path / 'gender'}"])
    _, y, _ = data.load_split(str(tmp_path / "gender"), "train")
    assert np.array_equal(y.numpy(), attrs[:4, 3])  # --target=Male: a gender task
    data.main(["celeba", f"--root={root}", f"--out_dir={out}"])
    sel = {s: [i for i, p in enumerate(part) if p == k] for k, s in enumerate(data.SPLITS)}
    check_celeba(out, {s: ([imgs[i] for i in ix], attrs[ix]) for s, ix in sel.items()})


# ---------------------------------------------------------------------------------------------------------------
# errors: one line, nothing left behind

def test_celeba_offline_names_the_ways_on(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_tree", offline)
    msg = fails(["celeba", f"--out_dir={tmp_path / 'celeba'}"])
    assert "--root" in msg and "make data DATA=synthetic" in msg and "ConnectionError" in msg
    assert os.listdir(tmp_path) == []


def test_error_paths_leave_nothing(tmp_path, monkeypatch):
    out = f"--out_dir={tmp_path / 'out'}"
    assert "not found" in fails(["challenge", f"--root={tmp_path / 'missing'}", out])
    (tmp_path / "empty" / "a").mkdir(parents=True)
    assert "no files" in fails(["folder", f"--root={tmp_path / 'empty'}", out])
    ch = tmp_path / "ch"
    (ch / "train").mkdir(parents=True)
    (ch / "test").mkdir()
    rand_image(np.random.default_rng(0)).save(ch / "train" / "a.jpg")
    (ch / "train.txt").write_text("a.jpg\t1\t-1\nb.jpg\t-1\t1\n")
    assert "does not match" in fails(["challenge", f"--root={ch}", out])
    (ch / "train.txt").write_text("a.jpg 1\n")
    assert "train.txt:1" in fails(["challenge", f"--root={ch}", out])
    assert "--val_frac" in fails(["challenge", f"--root={ch}", out, "--val_frac=1.5"])
    assert "unknown attribute" in fails(["synthetic", "--n=30", "--criterion=Smiling", out])
    assert "--split" in fails(["synthetic", "--n=30", "--split=0.5,-0.25,0.25", out])
    assert "--split=0.5,0.5 needs 3" in fails(["synthetic", "--n=30", "--split=0.5,0.5", out])
    assert "--root is required" in fails(["aaf", out])
    assert "--out_dir is required" in fails(["synthetic", "--n=30"])
    assert "unknown key --target" in fails(["aaf", f"--root={ch}", "--target=Male", out])  # aaf has no criterion
    assert "did you mean --glasses_share" in fails(["synthetic", "--glasses-share=0.5", out])
    assert sorted(os.listdir(tmp_path)) == ["ch", "empty"]

    def crash(path, split):  # a build killed while writing leaves no output and no temporary folder
        raise KeyboardInterrupt

    monkeypatch.setattr(beton, "write_beton", crash)
    with pytest.raises(KeyboardInterrupt):
        data.main(["synthetic", "--n=30", out])
    assert sorted(os.listdir(tmp_path)) == ["ch", "empty"]
    os.mkdir(tmp_path / "out")
    assert "--force" in fails(["synthetic", "--n=30", out])


def test_cli_help_lists_sources_and_keys(tmp_path, capsys):
    data.main(["--help"])  # the overview: data.py's and sources.py's docstrings
    text = capsys.readouterr().out
    assert all(w in text for w in [*sources.SOURCES, "show"]), text
    for argv, wanted in ((["synthetic", "--help"], ["--glasses_share=0.3", "--out_dir=", "(also --out)", "--target"]),
                         (["adience", "--help"], ["Adience", "--val_fold=3", "--test_fold=4"]),
                         (["show", "--help"], ["--n_per_cell=4", "--augment_kw="])):
        with pytest.raises(SystemExit) as e:
            data.main(argv)
        text = capsys.readouterr().out
        assert e.value.code == 0 and all(w in text for w in wanted), (argv, text)
    assert "unknown source 'bogus'" in fails(["bogus", f"--out_dir={tmp_path}"])
    assert "name a source" in fails([])
    r = subprocess.run([sys.executable, "data.py", "aaf", f"--root={tmp_path / 'nope'}", "--out",
                        str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ")
    with pytest.raises(data.DataFileError, match="meta.json"):
        data.read_meta(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# augmentation: the fast paths (an op is computed only where it was drawn) against plain references

def drawn_or_untouched(out, ref, plain):
    """Each sample of an augmentation run with one op at p = 0.5 and its parameters fixed: either the op's reference
    (drawn) or the plain prepared image, bit for bit (untouched). -> the drawn mask."""
    drawn = ~(out == plain).flatten(1).all(1)
    assert torch.allclose(out[drawn], ref[drawn], atol=1e-4)
    return drawn


@pytest.mark.parametrize("kernel", [1, 3, 7])
def test_blur_of_the_drawn_samples_equals_a_plain_2d_convolution(batch, kernel):
    x = batch[:12]
    B, C, H, W = x.shape
    sigma = 1.5  # one sigma (blur_sigma=(s, s)): the reference needs no replay of the draws
    out = data.augment(x, W, torch.Generator().manual_seed(9),
                       **{**OFF, "blur_p": 0.5, "blur_kernel": kernel, "blur_sigma": (sigma, sigma)})
    taps = torch.arange(kernel) - kernel // 2
    k = torch.exp(-0.5 * (taps / sigma) ** 2).double()
    k2 = (k[:, None] * k[None]) / k.sum() ** 2  # the separable kernel as one 2-D kernel, zero padding
    ref = torch.nn.functional.conv2d(x.double(), k2.expand(C, 1, kernel, kernel), padding=kernel // 2, groups=C)
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) * 255 for v in (data.IMAGENET_MEAN,
                                                                                     data.IMAGENET_STD))
    drawn = drawn_or_untouched(out, ((ref - mean) / std).float(), data.prepare(x, W))
    assert kernel == 1 or 0 < drawn.sum() < B  # a 1-tap kernel changes nothing: drawn and untouched look alike


def test_per_sample_and_batched_ways_agree(batch, monkeypatch):
    """The CPU computes erasing and blur only for the samples that drew them; other devices compute every sample and
    keep the drawn ones (data._PER_SAMPLE_DEVICES). Both ways, run here on the CPU, give the same batch."""
    x = batch.repeat(2, 1, 1, 1)

    def both(**kw):
        a = data.augment(x, 48, torch.Generator().manual_seed(10), **kw)
        with monkeypatch.context() as m:
            m.setattr(data, "_PER_SAMPLE_DEVICES", ())
            b = data.augment(x, 48, torch.Generator().manual_seed(10), **kw)
        return a, b
    a, b = both()
    assert torch.allclose(a, b, atol=1e-4) and not torch.equal(a, data.prepare(x, 48))
    assert torch.equal(*both(**{**OFF, "erase_p": 0.5}))


def test_augment_draws_every_parameter_whatever_the_probabilities(batch):
    """An op with probability 0 is skipped, but its parameters are still drawn: a seed gives the same stream (and the
    same parameters for the other ops) under any *_p."""
    states = []
    for kw in ({}, OFF, data.AUGMENTS["weak"], {"blur_p": 0.0, "erase_p": 1.0}):
        g = torch.Generator().manual_seed(11)
        data.augment(batch, 40, g, **kw)
        states.append(g.get_state())
    assert all(torch.equal(states[0], s) for s in states[1:])


def test_augment_checks_the_kernel_and_ignores_autocast(batch):
    with pytest.raises(ValueError, match="blur_kernel=4"):
        data.augment(batch, 32, blur_kernel=4)
    plain = data.augment(batch, 32, torch.Generator().manual_seed(12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(data.augment(batch, 32, torch.Generator().manual_seed(12)), plain)


def test_colour_jitter_of_the_drawn_samples_equals_the_formula(batch):
    x = batch[:16]
    b, s = 1.3, 1.2  # fixed factors (brightness=(b, b), saturation=(s, s)): no replay of the draws needed
    out = data.augment(x, x.shape[-1], torch.Generator().manual_seed(13),
                       **{**OFF, "color_p": 0.5, "brightness": (b, b), "saturation": (s, s)})
    px = x.double()
    grey = sum(w * px[:, c:c + 1] for c, w in enumerate(data.GREY))
    ref = data.prepare((s * b * px + (1 - s) * grey).clamp(0, 255).float(), x.shape[-1])
    drawn = drawn_or_untouched(out, ref, data.prepare(x, x.shape[-1]))
    assert 0 < drawn.sum() < len(x)


def test_keep_freed_memory_sets_glibc_malloc_or_does_nothing():
    import platform
    code = "import data; print(data.keep_freed_memory(), data.keep_freed_memory())"  # own process: it is process-wide
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert r.stdout.split() == [str(glibc)] * 2
