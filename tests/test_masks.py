"""The mask sets, read as they ship (issue 22): the mafa source on a tiny fake MAFA written here with scipy.io.savemat
in the real label files' layout, folder's guard against trees that are not one folder per class and its
--split_by=identity on an RMFD-like tree, and `python data.py merge` with its source attribute. Photos and people are
painted in one flat colour each, so a stored image's colour tells where it came from."""

import os
import sys

import numpy as np
import pytest
import scipy.io
from PIL import Image

import beton
import data
import mafa
import sources
from conftest import data_fails as fails

SIZE = 16


def flat(path, colour, w=120, h=90):
    """A photo of one colour (JPEG keeps a flat colour to within a step or two)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), colour, np.uint8)).save(path, quality=95)


def red(out, split, known=None):
    """The mean red of every stored image of a split, rounded, or the nearest of `known` reds (JPEG's rounding)."""
    got = np.round(data.load_split(out, split)[0][:, 0].float().mean((1, 2)).numpy()).astype(int)
    return got if known is None else np.array(known)[np.abs(got[:, None] - np.array(known)).argmin(1)]


# ---------------------------------------------------------------------------------------------------------------
# A square cut about a face box, fitted inside the photo (data.decode_image)

def test_a_face_square_is_fitted_inside_the_photo(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (60, 100, 3), dtype=np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(pixels).save(path)
    cut = lambda left, top, side: np.array(Image.fromarray(pixels).crop((left, top, left + side, top + side))
                                           .resize((SIZE, SIZE), Image.Resampling.BOX))
    assert np.array_equal(data.decode_image((str(path), (50, 30, 20)), SIZE), cut(40, 20, 20))  # inside: as asked
    assert np.array_equal(data.decode_image((str(path), (95, 5, 30)), SIZE), cut(70, 0, 30))  # over a corner: shifted
    assert np.array_equal(data.decode_image((str(path), (50, 30, 300)), SIZE), cut(20, 0, 60))  # too big: shrunk
    assert np.array_equal(data.decode_image(str(path), SIZE), cut(20, 0, 60))  # no box: the centre square, as before
    assert "lies outside the 100x60 image" in data.decode_image((str(path), (130, 30, 20)), SIZE)


# ---------------------------------------------------------------------------------------------------------------
# MAFA: the label files in the release's layout (mafa.py's top docstring), a few photos with 1-3 faces each

def row_train(box, occ_type, occ_degree, orientation=3):
    """21 values: x, y, w, h, eyes (4), occluder (4, relative to the face), occ_type, occ_degree, gender, race,
    orientation, glasses (4; -1 without)."""
    x, y, w, h = box
    return [x, y, w, h, x + w / 3, y + h / 3, x + 2 * w / 3, y + h / 3, 0, h / 2, w, h / 2, occ_type, occ_degree, 1, 1,
            orientation, -1, -1, -1, -1]


def row_test(box, face_type, occ_type, occ_degree, orientation=3):
    """18 values: x, y, w, h, face_type, occluder (4), occ_type, occ_degree, gender, race, orientation, glasses (4)."""
    x, y, w, h = box
    return [x, y, w, h, face_type, 0, h / 2, w, h / 2, occ_type, occ_degree, 1, 1, orientation, -1, -1, -1, -1]


BOX = (30, 20, 40, 40)
EDGE = (100, 60, 40, 40)  # partly outside the 120x90 photo: its square is shifted inside
# train photos: (red, [rows]); mask = occ_type != 3 and occ_degree > 2, no mask = occ_type 3 and occ_degree < 2
TRAIN = [(10, [row_train(BOX, 1, 3), row_train(EDGE, 2, 4, orientation=1)]),
         (20, [row_train(BOX, 3, 1)]),
         (30, [row_train(BOX, 1, 3), row_train(EDGE, 1, 2), row_train(BOX, 3, 1)]),  # (1, 2): neither rule
         (40, [row_train(BOX, 3, 3), row_train((10, 10, 0, 30), 1, 3)]),  # a hand over 3 parts; an empty box
         *[(50 + 10 * i, [row_train(BOX, 1 + i % 2, 3 + i % 2)] * (1 + i % 2) + [row_train(EDGE, 3, 1)] * (i % 3 == 0))
           for i in range(10)]]
TEST = [(200, [row_test(BOX, 1, 1, 3), row_test(EDGE, 2, -1, -1), row_test(BOX, 3, 1, 3)]),  # mask, no mask, invalid
        (210, [row_test(BOX, 1, 3, 4), row_test(BOX, 2, -1, -1), row_test((500, 20, 40, 40), 2, -1, -1)]),  # a hand
        (220, [row_test(BOX, 2, -1, -1), row_test(BOX, 1, 2, 2)])]  # (1, 2, 2): a mask below the rule
LABELLED = dict(train=(18, 6), test=(1, 3))  # (mask, no mask) faces kept: train + val; test (one box is off its photo)
SKIPS = 3 + 3 + 1 + 1  # train: (1, 2), a hand (3, 3), the empty box; test: invalid, a hand, a mask below the rule;
# the box off its photo; the missing photo's face


def write_mafa(root, missing=()):
    """A fake MAFA release: photos named as the real ones, the two .mat files as struct arrays with the real field
    names. The train struct has a field before imgName, as the real one (readers index imgName as its 2nd field)."""
    for split, photos, width, key, fields in (("train", TRAIN, 21, "label_train", ("orgImgName", "imgName", "label")),
                                               ("test", TEST, 18, "LabelTest", ("name", "label"))):
        table = np.zeros((1, len(photos) + len(missing) * (split == "train")), [(f, "O") for f in fields])
        names = [f"{split}_{k + 1:08d}.jpg" for k in range(table.shape[1])]
        rows = [np.array(r, np.float64).reshape(-1, width) for _, r in photos] + \
            [np.array([row_train(BOX, 1, 3)])] * (table.shape[1] - len(photos))
        for k, (name, r) in enumerate(zip(names, rows)):
            table[0, k] = (f"orig_{name}", name, r) if split == "train" else (name, r)
        for name, (colour, _) in zip(names, photos):
            flat(root / f"{split}-images" / "images" / name, (colour, 100, 50))
        label_dir = root / f"MAFA-Label-{split.title()}"
        label_dir.mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(label_dir / f"Label{split.title()}All.mat", {key: table})


def test_mafa_faces_labels_and_splits(tmp_path, monkeypatch, capsys):
    root, out = tmp_path / "MAFA", str(tmp_path / "mafa")
    write_mafa(root, missing=["train_00000015.jpg"])
    monkeypatch.setattr(beton, "MAX_SKIPPED", 4)
    data.main(["mafa", f"--root={root}", f"--size={SIZE}", "--val_frac=0.3", f"--out_dir={out}"])
    meta = data.read_meta(out, verify="full")
    assert meta["classes"] == ["no mask", "mask"] and meta["groups"] == [] and meta["source"] == "mafa"
    assert meta["attributes"] == ["occ_type", "occ_degree", "orientation"]
    assert meta["attribute_values"]["occ_type"] == ["simple", "complex", "human body"]
    assert meta["attribute_values"]["occ_degree"] == ["1", "3", "4"]  # the codes the kept faces carry
    labels = {s: data.load_labels(out, s)[0].numpy() for s in data.SPLITS}
    train_val = np.concatenate([labels["train"], labels["val"]])
    assert (int(train_val.sum()), int((train_val == 0).sum())) == LABELLED["train"]
    assert (int(labels["test"].sum()), int((labels["test"] == 0).sum())) == LABELLED["test"]
    # every face of a photo in one split: photos are told apart by their red
    reds = [colour for colour, _ in TRAIN + TEST]
    photos = {s: set(red(out, s, reds).tolist()) for s in data.SPLITS}
    assert photos["train"] and photos["val"] and not photos["train"] & photos["val"]
    assert photos["test"] == {200, 210, 220} and all(r < 200 for r in photos["train"] | photos["val"])
    # skipped: faces the rule leaves out, the empty box, the box off the photo and the missing photo, all counted
    assert meta["n_skipped"] == SKIPS and len(meta["skipped"]) == 4  # all counted, the first MAX_SKIPPED listed
    printed = capsys.readouterr().out
    assert f"{SKIPS - 1} skipped" in printed and "classes: no mask 9, mask 19" in printed
    # an unmasked test face's occluder fields hold no code: unknown, not a value
    attrs, names = data.load_attrs(out, "test")
    assert (attrs[labels["test"] == 0, 0] == data.UNKNOWN).all() and (attrs[labels["test"] == 1, 0] == 0).all()
    # the split is by photo, seeded: another seed gives another split
    again = str(tmp_path / "again")
    data.main(["mafa", f"--root={root}", f"--size={SIZE}", "--val_frac=0.3", "--seed=1", f"--out_dir={again}"])
    assert set(red(again, "val", reds).tolist()) != photos["val"]


def test_mafa_skip_reasons_name_the_rule():
    labels, reasons = mafa.label_rule(None, np.array([1, 3, 1, 3, 2]), np.array([3, 1, 2, 3, 4]))
    assert labels.tolist() == [1, 0, -1, -1, 1]
    assert "occ_type 1, occ_degree 2: neither mask" in reasons[2] and "occ_type 3, occ_degree 3" in reasons[3]
    labels, reasons = mafa.label_rule(np.array([1, 1, 2, 3, 4]), np.array([1, 3, -1, 1, 1]), np.array([3, 3, -1, 3, 3]))
    assert labels.tolist() == [1, -1, 0, -1, -1]
    assert reasons[3] == "invalid face (face_type 3)" and "face_type 4 is not 1, 2 or 3" == reasons[4]
    assert "masked face with occ_type 3, occ_degree 3" in reasons[1]


def test_mafa_bad_input_is_one_line(tmp_path, monkeypatch):
    root, out = tmp_path / "MAFA", f"--out_dir={tmp_path / 'o'}"
    write_mafa(root)
    with monkeypatch.context() as m:  # scipy is optional: without it, the one line names the package
        m.setitem(sys.modules, "scipy", None)
        m.setitem(sys.modules, "scipy.io", None)
        assert "pip install scipy" in fails(["mafa", f"--root={root}", out])
    train_mat = root / "MAFA-Label-Train" / "LabelTrainAll.mat"
    scipy.io.savemat(train_mat, {"labels": np.zeros(3)})
    assert "no struct array label_train with fields imgName and label (found: labels)" in \
        fails(["mafa", f"--root={root}", out])
    train_mat.write_bytes(b"garbage" * 20)
    assert "LabelTrainAll.mat is not a readable MATLAB file" in fails(["mafa", f"--root={root}", out])
    table = np.zeros((1, 1), [("imgName", "O"), ("label", "O")])
    table[0, 0] = ("train_00000001.jpg", np.zeros((1, 18)))  # a test row in the train file
    scipy.io.savemat(train_mat, {"label_train": table})
    assert "entry 1 of label_train is not one photo name and rows of 21 values" in \
        fails(["mafa", f"--root={root}", out])
    train_mat.unlink()
    assert "label file not found" in fails(["mafa", f"--root={root}", out])
    assert "--enlarge=0.5: the face box's enlargement, 1 to 4" in fails(["mafa", f"--root={root}", "--enlarge=0.5",
                                                                         out])
    assert not os.path.exists(tmp_path / "o")


# ---------------------------------------------------------------------------------------------------------------
# folder: the guard, --classes, --split_by=identity

def test_folder_refuses_trees_that_are_not_classes(tmp_path):
    out = f"--out_dir={tmp_path / 'o'}"
    mafa_root = tmp_path / "MAFA"
    for d in ("train-images/images", "test-images/images", "MAFA-Label-Train", "MAFA-Label-Test"):
        flat(mafa_root / d / "x.jpg", (1, 2, 3), 20, 20)
    msg = fails(["folder", f"--root={mafa_root}", out])
    assert "looks like MAFA's root" in msg and "python data.py mafa" in msg and "--classes=a,b" in msg
    people = tmp_path / "RWMFD_part_1"
    for k in range(3):
        flat(people / f"{k:04d}" / "0001.jpg", (k, 2, 3), 20, 20)
    assert "holds 3 folders (0000, 0001, 0002): more than 10, or numbers like 0001, look like a folder per person" \
        in fails(["folder", f"--root={people}", out])
    many = tmp_path / "many"
    for k in range(sources.FOLDER_MAX_CLASSES + 1):
        flat(many / f"person_{k}" / "a.jpg", (10 * k, 2, 3), 20, 20)
    assert "holds 11 folders (person_0, person_1, person_10, person_2, ...)" in fails(["folder", f"--root={many}", out])
    assert "--classes=person_1,nobody: no folder 'nobody'" in fails(["folder", f"--root={many}",
                                                                     "--classes=person_1,nobody", out])
    assert "a class named twice" in fails(["folder", f"--root={many}", "--classes=person_1,person_1", out])
    assert not os.path.exists(tmp_path / "o")


def test_folder_classes_names_the_folders_in_label_order(tmp_path, capsys):
    root = tmp_path / "tree"
    for k, cls in enumerate(("mask", "no mask", "other1", "other2", *[f"x{i}" for i in range(9)])):
        for i in range(6):
            flat(root / cls / f"{i}.png", (10 * k, 5 * i, 0), 20, 20)
    out = str(tmp_path / "out")
    data.main(["folder", f"--root={root}", "--classes=no mask,mask", "--split=0.5,0.25,0.25", f"--size={SIZE}",
               f"--out_dir={out}"])
    meta = data.read_meta(out)
    assert meta["classes"] == ["no mask", "mask"]
    for s in data.SPLITS:  # class 0 is the first named: "no mask", painted red 10
        y = data.load_labels(out, s)[0].numpy()
        assert np.array_equal(np.where(y == 0, 10, 0), red(out, s))
    assert "classes: no mask 6, mask 6" in capsys.readouterr().out


def rmfd(root, n_people=12, seed=0):
    """An RMFD-like tree: AFDB_face_dataset/<person>/ for every person (2-7 images), AFDB_masked_face_dataset/<person>/
    for every other one (1-2 images); each person painted their own red. -> the red of each person."""
    rng = np.random.default_rng(seed)
    reds = {f"person{p:02d}": 10 + 15 * p for p in range(n_people)}
    for p, (person, r) in enumerate(reds.items()):
        for i in range(rng.integers(2, 8)):
            flat(root / "AFDB_face_dataset" / person / f"1_0_{person}_{i:04d}.jpg", (r, 50, 50), 24, 24)
        for i in range(rng.integers(1, 3) if p % 2 else 0):
            flat(root / "AFDB_masked_face_dataset" / person / f"{i}.jpg", (r, 50, 200), 24, 24)
    return reds


def test_folder_split_by_identity_keeps_each_person_in_one_split(tmp_path, capsys):
    root = tmp_path / "self-built-masked-face-recognition-dataset"
    reds = rmfd(root)
    flat(root / "AFDB_face_dataset" / "stray.jpg", (1, 1, 1), 24, 24)  # no person's folder: skipped
    out = str(tmp_path / "out")
    data.main(["folder", f"--root={root}", "--split_by=identity", "--split=0.6,0.2,0.2", f"--size={SIZE}",
               f"--out_dir={out}"])
    meta = data.read_meta(out)
    assert meta["classes"] == ["AFDB_face_dataset", "AFDB_masked_face_dataset"]
    assert meta["skipped"] == [dict(file=os.path.join("AFDB_face_dataset", "stray.jpg"),
                                    reason="not in a person's folder (--split_by=identity)")]
    people = {s: set(red(out, s, list(reds.values())).tolist()) for s in data.SPLITS}
    assert all(people.values()) and sum(map(len, people.values())) == len(reds)  # each person in exactly one split
    assert f"folder: {len(reds)} people" in capsys.readouterr().out
    (tmp_path / "presplit" / "train").mkdir(parents=True)
    msg = fails(["folder", f"--root={tmp_path / 'presplit'}", "--split_by=identity", f"--out_dir={tmp_path / 'o'}"])
    assert "already split into train/, val/ and test/" in msg


def test_unit_parts_keep_units_whole_and_fractions_close():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 6, 800)
    units = np.repeat(np.arange(800), sizes)
    keys = rng.integers(0, 3, len(units))  # a unit's rows in several cells, as a person under two classes
    part = sources._unit_parts(units, keys, [0.7, 0.2, 0.1], seed=0)
    assert all(len(set(part[units == u])) == 1 for u in range(0, 800, 7))
    for key in range(3):
        share = np.bincount(part[keys == key], minlength=3) / (keys == key).sum()
        assert np.allclose(share, [0.7, 0.2, 0.1], atol=0.02), share
    assert not np.array_equal(part, sources._unit_parts(units, keys, [0.7, 0.2, 0.1], seed=1))


# ---------------------------------------------------------------------------------------------------------------
# merge: built sets as one, the source attribute

@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """A "masked" set (synthetic faces, class = Eyeglasses, gender groups) and an "unmasked" one (a folder tree, no
    groups) at the same size; and a third at another size."""
    base = tmp_path_factory.mktemp("merge")
    glasses = str(base / "glasses")
    data.main(["synthetic", "--n=60", f"--size={SIZE}", "--criterion=Eyeglasses", f"--out_dir={glasses}"])
    tree = base / "tree"
    for k, cls in enumerate(("a", "b")):
        for i in range(8):
            flat(tree / cls / f"{i}.png", (200 + k, 10 * i, 0), 20, 20)
    plain = str(base / "plain")
    data.main(["folder", f"--root={tree}", "--split=0.5,0.25,0.25", f"--size={SIZE}", f"--out_dir={plain}"])
    bigger = str(base / "bigger")
    data.main(["folder", f"--root={tree}", "--split=0.5,0.25,0.25", f"--size={SIZE + 8}", f"--out_dir={bigger}"])
    return glasses, plain, bigger


def test_merge_relabels_and_keeps_each_images_source(two_sets, tmp_path, capsys):
    glasses, plain, _ = two_sets
    out = str(tmp_path / "mask")
    data.main(["merge", glasses, f"{plain}:no glasses", "--group=source", f"--out_dir={out}"])
    meta = data.read_meta(out, verify="full")
    assert meta["source"] == "merge" and meta["classes"] == ["not Eyeglasses", "Eyeglasses", "no glasses"]
    assert meta["attributes"] == ["source"] and meta["attribute_values"] == {"source": ["glasses", "plain"]}
    assert meta["groups"] == ["glasses", "plain"] and meta["criterion"] is None
    metas = [data.read_meta(d) for d in (glasses, plain)]
    assert [(i["path"], i["relabel"], i["content_hash"]) for i in meta["inputs"]] == \
        [(glasses, None, metas[0]["content_hash"]), (plain, "no glasses", metas[1]["content_hash"])]
    for s in data.SPLITS:
        n = [m["splits"][s]["n"] for m in metas]
        x, y, g = data.load_split(out, s)
        attrs, names = data.load_attrs(out, s)
        assert len(y) == sum(n)
        assert np.array_equal(data.groups_from_attrs("source", attrs, names, meta["attribute_values"])[0],
                              np.repeat([0, 1], n))
        assert np.array_equal(g.numpy(), np.repeat([0, 1], n))  # --group=source
        assert np.array_equal(y[:n[0]], data.load_split(glasses, s)[1]) and (y[n[0]:] == 2).all()
        assert np.array_equal(x[n[0]:], data.load_split(plain, s)[0])
    printed = capsys.readouterr().out
    assert "Eyeglasses / glasses" in printed and "no glasses / plain 16" in printed
    assert "attributes not stored by every input are dropped: Beard, Blond_Hair, Eyeglasses" in printed
    assert "classes: not Eyeglasses" in printed and "no glasses 16" in printed
    # a merge of a merge keeps its images' sources, and adds the new input's folder name
    again = str(tmp_path / "again")
    data.main(["merge", out, plain, "--group=none", f"--out_dir={again}"])
    meta2 = data.read_meta(again)
    assert meta2["attribute_values"]["source"] == ["glasses", "plain"] and meta2["groups"] == []
    attrs, _ = data.load_attrs(again, "train")
    n = [m["splits"]["train"]["n"] for m in metas]
    assert attrs[:, -1].tolist() == [0] * n[0] + [1] * n[1] + [1] * n[1]
    assert meta2["classes"] == ["not Eyeglasses", "Eyeglasses", "no glasses", "a", "b"]


def test_merge_refusals_are_one_line(two_sets, tmp_path):
    glasses, plain, bigger = two_sets
    out = f"--out_dir={tmp_path / 'o'}"
    msg = fails(["merge", glasses, plain, out])
    assert "the inputs' groups differ" in msg and "women, men" in msg and "--group=source" in msg
    msg = fails(["merge", plain, bigger, out])
    assert f"stores {SIZE}x{SIZE} images" in msg and f"{SIZE + 8}x{SIZE + 8}" in msg
    assert "merge needs two or more built data sets, got 1" in fails(["merge", plain, out])
    assert "names no class after the colon" in fails(["merge", plain, f"{glasses}:", out])
    assert "is not a data.py output" in fails(["merge", plain, str(tmp_path / "nothing"), out])
    twin = tmp_path / "x" / "plain"
    twin.parent.mkdir()
    os.symlink(plain, twin)
    assert "two inputs are folders named plain" in fails(["merge", plain, str(twin), out])
    assert "unknown attribute 'Male'" in fails(["merge", glasses, plain, "--group=Male", out])
    assert not os.path.exists(tmp_path / "o")


def test_help_names_the_new_sources(capsys):
    data.main(["--help"])
    for argv in (["mafa", "--help"], ["merge", "--help"], ["folder", "--help"]):
        with pytest.raises(SystemExit) as e:
            data.main(argv)
        assert e.value.code == 0
    text = capsys.readouterr().out
    assert "mafa " in text and "merge DIR[:CLASS] DIR[:CLASS]" in text and "occ_type != 3" in text
    assert "--split_by=image" in text and "--classes=" in text and "--enlarge=1.3" in text

