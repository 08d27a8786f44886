"""k groups on the data side (issue 21): attribute expressions that give k groups (data.labels_from_attrs,
data.groups_from_attrs), gender-like group names (sources.group_ids), the painter's skin tones, and the sources
fairface (the released CSVs and the Hub's parquet), utkface and csv, each on a tiny fake layout written here that
mimics the real one (the real malformed UTKFace names included); nothing touches the network."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

import beton
import configurator
import data
import faces
import fairface
import sources
from conftest import data_fails as fails

NAMES = ["Male", "Young", "Race", "Blond_Hair"]
VALUES = {"Race": ["A", "B", "C"]}
ATTRS = np.array([[0, 0, 0, 1], [0, 1, 1, 0], [1, 0, 2, 1], [1, 1, 255, 0]], np.uint8)  # row 3: race unknown


def solid(path, r, g, b=90, size=20, fmt=None):
    """A one-colour image: the stored copy's colour tells which row it came from (JPEG keeps a flat colour)."""
    Image.fromarray(np.full((size, size, 3), (r, g, b), np.uint8)).save(path, fmt)


def jpeg(r, g, b=90):
    buf = io.BytesIO()
    solid(buf, r, g, b, fmt="JPEG")
    return buf.getvalue()


def colours(out, split, channel):
    """The mean value of one channel of every stored image of a split, rounded."""
    return np.round(data.load_split(out, split)[0][:, channel].float().mean((1, 2)).numpy()).astype(int)


def everything(out, what):
    """One per-sample array of all three splits: labels, groups or attrs."""
    if what == "attrs":
        return np.concatenate([data.load_attrs(out, s)[0] for s in data.SPLITS])
    k = {"labels": 1, "groups": 2}[what]
    return np.concatenate([data.load_split(out, s)[k].numpy() for s in data.SPLITS])


# ---------------------------------------------------------------------------------------------------------------
# expressions: one grammar at build time and at evaluation time

def test_products_are_mixed_radix_with_gender_first():
    ids, names = data.groups_from_attrs("Male*Young", ATTRS, NAMES, VALUES)
    assert ids.tolist() == [0, 1, 2, 3]
    assert names == ["women & not Young", "women & Young", "men & not Young", "men & Young"]
    ids, names = data.groups_from_attrs("  Male * Race ", ATTRS, NAMES, VALUES)
    assert ids.tolist() == [0, 1, 5, -1]  # an unknown factor makes the whole id unknown
    assert names == [f"{g} & {r}" for g in ("women", "men") for r in "ABC"]
    ids, names = data.groups_from_attrs("Race", ATTRS, NAMES, VALUES)
    assert ids.tolist() == [0, 1, 2, -1] and names == ["A", "B", "C"]
    ids, names = data.groups_from_attrs("Young*Male", ATTRS, NAMES, VALUES)
    assert ids.tolist() == [0, 2, 1, 3] and names[1] == "not Young & men"
    ids, names = data.groups_from_attrs("Blond_Hair ^ Male", ATTRS, NAMES, VALUES)
    assert ids.tolist() == [1, 0, 0, 1] and names == ["not (Blond_Hair ^ Male)", "Blond_Hair ^ Male"]
    ids, names = data.groups_from_attrs(" None ", ATTRS, NAMES, VALUES)
    assert ids.tolist() == [-1] * 4 and names == []
    ids, names = data.groups_from_attrs("Male", ATTRS, NAMES, None)  # a data set built before attribute_values
    assert ids.tolist() == [0, 0, 1, 1] and names == ["women", "men"]


def test_labels_from_a_boolean_or_a_categorical_criterion():
    labels, classes = data.labels_from_attrs("Male", ATTRS, NAMES, VALUES)
    assert labels.tolist() == [0, 0, 1, 1] and classes == ["not Male", "Male"]  # no women/men for the label
    labels, classes = data.labels_from_attrs("Race", ATTRS, NAMES, VALUES)
    assert labels.tolist() == [0, 1, 2, -1] and classes == ["A", "B", "C"]
    labels, classes = data.labels_from_attrs("not Young and Blond_Hair", ATTRS, NAMES, VALUES)
    assert labels.tolist() == [1, 0, 1, 0] and classes == ["not (not Young and Blond_Hair)", "not Young and Blond_Hair"]


@pytest.mark.parametrize("expr, words", [
    ("Hat", ["unknown attribute 'Hat'", "known: Male Young Race Blond_Hair"]),
    ("Male*Hat", ["unknown attribute 'Hat'"]),
    ("Male*", ["an empty factor"]),
    ("Male**Young", ["an empty factor"]),
    ("Race ^ Male", ["Race is categorical (3 values)", "Male*Race"]),
    ("Race*Race*Race*Race*Race*Race", ["more than 256 groups"]),
    ("~" * 300 + "Male", ["nested 301 levels deep, at most 50"]),
    ("(" * 300 + "Male" + ")" * 300, ["parentheses nested more than 50 levels deep"]),
    ("Male | " * 200 + "Male", ["1404 characters long, at most 1000"]),
    ("Male +", ["cannot parse the group"]),
    ("__import__('os')", ["only attribute names"]),
])
def test_bad_group_expressions_are_one_line(expr, words):
    with pytest.raises(data.DataError) as e:
        data.groups_from_attrs(expr, ATTRS, NAMES, VALUES)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
    assert isinstance(e.value, configurator.UserError) and beton.DataError is data.DataError


def test_group_ids_give_gender_names_their_meaning():
    ids, names = sources.group_ids(["Male", " female", "", "Male", "  "])
    assert names == ["female", "Male"] and ids.tolist() == [1, 0, -1, 1, -1]
    ids, names = sources.group_ids(["men", "women", "men"])  # sorted, men would come first
    assert names == ["women", "men"] and ids.tolist() == [1, 0, 1]
    ids, names = sources.group_ids(["M", "m", "F"])  # two spellings of one group: ours names it
    assert names == ["F", "men"] and ids.tolist() == [1, 1, 0]
    ids, names = sources.group_ids(["male", "male"])  # men stay 1 without women
    assert names == ["women", "male"] and ids.tolist() == [1, 1]
    ids, names = sources.group_ids(["", " "])
    assert names == [] and ids.tolist() == [-1, -1]


def test_group_ids_place_other_names_only_by_group_names():
    ids, names = sources.group_ids(["child", "adult", "", "senior"], order="adult, child,senior")
    assert names == ["adult", "child", "senior"] and ids.tolist() == [1, 0, -1, 2]
    ids, names = sources.group_ids(["men"], order="men,women")  # the list wins over our convention
    assert names == ["men", "women"] and ids.tolist() == [0]
    with pytest.raises(data.DataError, match=r"g.csv: cannot place the group names 'x': .*=F,M,x \(id order\)"):
        sources.group_ids(["M", "F", "x"], where="g.csv")
    with pytest.raises(data.DataError, match=r"g.csv: group names not in --group_names: 'senior'"):
        sources.group_ids(["adult", "senior"], order="adult,child", where="g.csv")
    for order in ("a,,b", "a,b,a"):
        with pytest.raises(data.DataError, match="a blank name or a name given twice"):
            sources.group_ids(["a"], order=order)


# ---------------------------------------------------------------------------------------------------------------
# the painter's skin tones: k groups offline, one small and harder

def test_skin_tones_are_a_categorical_attribute_drawn_last():
    cells = sources.CHALLENGE_CELLS
    plain = faces.synth_attributes(500, np.random.default_rng(3), cells, 0.3, 0.05)
    toned = faces.synth_attributes(500, np.random.default_rng(3), cells, 0.3, 0.05, skin_tones=5)
    assert np.array_equal(toned[:, :-1], plain) and toned.shape[1] == len(faces.SYNTH_ATTRS) + 1
    counts = np.bincount(toned[:, -1], minlength=5)
    assert counts[4] == 50 and sorted(counts[:4]) == [112, 112, 113, 113]  # 10 % in the darkest bin, the rest equally
    assert faces.tone_names(3) == ["tone 1 (lightest)", "tone 2", "tone 3 (darkest)"]
    images = faces.draw_faces(toned[:200], np.random.default_rng(4), 32, skin_tones=5)
    contrast = images.reshape(200, -1).astype(float).std(1)
    dark = toned[:200, -1] == 4
    assert contrast[dark].mean() < 0.7 * contrast[~dark].mean()  # dim light through a veil


def test_synthetic_k_groups_by_skin_tone(tmp_path):
    out = str(tmp_path / "tones")
    data.main(["synthetic", "--n=200", "--size=16", "--skin_tones=3", "--group=Skin", f"--out_dir={out}"])
    meta = data.read_meta(out)
    assert meta["groups"] == ["tone 1 (lightest)", "tone 2", "tone 3 (darkest)"]
    assert meta["attributes"][-1] == "Skin" and meta["attribute_values"] == {"Skin": meta["groups"]}
    groups, attrs = everything(out, "groups"), everything(out, "attrs")
    assert np.array_equal(groups, attrs[:, -1]) and np.bincount(groups).tolist() == [90, 90, 20]
    out2 = str(tmp_path / "product")
    data.main(["synthetic", "--n=200", "--size=16", "--skin_tones=3", "--group=Male*Skin", f"--out_dir={out2}"])
    meta = data.read_meta(out2)
    assert len(meta["groups"]) == 6 and meta["groups"][0] == "women & tone 1 (lightest)"
    attrs = everything(out2, "attrs")
    assert np.array_equal(everything(out2, "groups"), attrs[:, 2] * 3 + attrs[:, -1])
    assert "unknown attribute 'Skin'" in fails(["synthetic", "--n=30", "--group=Skin", f"--out_dir={tmp_path / 'x'}"])
    assert "--skin_tones=1: 0 (none)" in fails(["synthetic", "--n=30", "--skin_tones=1", f"--out_dir={tmp_path / 'x'}"])
    plain = sources.synthetic_source(dict(sources.SYNTHETIC, n=60, size=16))
    assert plain["attributes"] == list(faces.SYNTH_ATTRS) and plain["attribute_values"] == {}


# ---------------------------------------------------------------------------------------------------------------
# FairFace: the released CSVs, and the Hub's parquet

RACES = list(fairface.FAIRFACE_RACES)
AGES = list(fairface.FAIRFACE_AGES)


def fairface_rows(n):
    """(gender, age, race, service_test) of n faces: every race with both genders, ages cycling."""
    return [(("Male", "Female")[i % 2], AGES[i % 9], RACES[(i // 2) % 7], i % 3 == 0) for i in range(n)]


def fairface_release(root, n_train=42, n_val=14):
    """The released layout: train/ and val/ images, fairface_label_{train,val}.csv. An image's red channel says its
    released split (30 train, 220 val), its green channel its row. Plus one listed file that is missing."""
    rows = {}
    for which, n, red in (("train", n_train, 30), ("val", n_val, 220)):
        (root / which).mkdir(parents=True)
        lines = ["file,age,gender,race,service_test"]
        for i, (gender, age, race, service) in enumerate(fairface_rows(n)):
            solid(root / which / f"{i + 1}.jpg", red, 4 * i)
            lines.append(f"{which}/{i + 1}.jpg,{age},{gender},{race},{service}")
            rows[which, 4 * i] = (gender, age, race, service)
        lines.append(f"{which}/missing.jpg,20-29,Male,White,False")
        (root / f"fairface_label_{which}.csv").write_text("\n".join(lines) + "\n")
    return rows


def check_fairface(out, rows):
    """Every stored face against its released row: splits, the remapped gender, the attributes."""
    meta = data.read_meta(out)
    assert meta["attributes"] == ["Male", "Age", "Race", "service_test"]
    assert meta["attribute_values"] == {"Age": AGES, "Race": RACES}
    for s in data.SPLITS:
        red, green = colours(out, s, 0), colours(out, s, 1)
        assert (red > 128).all() if s == "test" else (red < 128).all(), s  # the released val is the test split
        attrs = data.load_attrs(out, s)[0]
        for (male, age, race, service), g in zip(attrs, green):
            gender, age_name, race_name, service_test = rows["val" if s == "test" else "train", 4 * round(g / 4)]
            assert (male, AGES[age], RACES[race], bool(service)) == (gender == "Male", age_name, race_name,
                                                                     service_test)
    return meta


def test_fairface_from_the_released_csvs(tmp_path):
    root = tmp_path / "fairface"
    rows = fairface_release(root)
    (root / "train" / "5.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # listed, unreadable
    out = str(tmp_path / "out")
    data.main(["fairface", f"--root={root}", "--size=16", "--val_frac=0.25", f"--out_dir={out}"])
    meta = check_fairface(out, rows)
    assert meta["classes"] == ["not Male", "Male"] and meta["groups"] == RACES  # gender across race by default
    # 3 released train rows per label x race cell: 2 to train, 1 to val (a quarter, rounded per cell); one unreadable
    assert [meta["splits"][s]["n"] for s in data.SPLITS] == [28, 13, 14]
    assert sorted(s["file"] for s in meta["skipped"]) == ["train/5.jpg", "train/missing.jpg", "val/missing.jpg"]
    for s in data.SPLITS:  # label = Male, group = Race, from the stored attributes
        _, y, g = data.load_split(out, s)
        attrs = data.load_attrs(out, s)[0]
        assert np.array_equal(y.numpy(), attrs[:, 0]) and np.array_equal(g.numpy(), attrs[:, 2])
    val = data.load_split(out, "val")
    assert len(set(zip(val[1].tolist(), val[2].tolist()))) >= 7  # stratified: the cells spread over val

    out2 = str(tmp_path / "gender_x_race")
    data.main(["fairface", f"--root={root}", "--size=16", "--criterion=Race", "--group=Male*Race", "--val_frac=0.25",
               f"--out_dir={out2}"])
    meta = data.read_meta(out2)
    assert meta["classes"] == RACES and len(meta["groups"]) == 14
    assert meta["groups"][:2] == ["women & East Asian", "women & Indian"] and meta["groups"][7] == "men & East Asian"
    attrs, groups = everything(out2, "attrs"), everything(out2, "groups")
    assert np.array_equal(groups, attrs[:, 0] * 7 + attrs[:, 2]) and np.array_equal(everything(out2, "labels"),
                                                                                      attrs[:, 2])
    out3 = str(tmp_path / "women_men")
    data.main(["fairface", f"--root={root}", "--size=16", "--criterion=Age", "--group=Male", "--val_frac=0.25",
               f"--out_dir={out3}"])
    meta = data.read_meta(out3)
    assert meta["groups"] == ["women", "men"] and meta["classes"] == AGES
    assert np.array_equal(everything(out3, "groups"), everything(out3, "attrs")[:, 0])  # Female -> 0, Male -> 1


def test_fairface_bad_release_files_are_one_line(tmp_path):
    root = tmp_path / "fairface"
    fairface_release(root)
    out = f"--out_dir={tmp_path / 'out'}"
    good = (root / "fairface_label_val.csv").read_text()
    (root / "fairface_label_val.csv").write_text(good.replace(",White,", ",Whyte,", 1))
    msg = fails(["fairface", f"--root={root}", out])
    assert "fairface_label_val.csv:" in msg and "race 'Whyte' is not one of East Asian" in msg
    (root / "fairface_label_val.csv").write_text(good.replace("service_test", "service"))
    assert "expected a header file,gender,age,race,service_test" in fails(["fairface", f"--root={root}", out])
    (root / "fairface_label_val.csv").unlink()
    assert "label file not found" in fails(["fairface", f"--root={root}", out])
    assert "--margin=2.5 is not one of: 0.25, 1.25" in fails(["fairface", "--margin=2.5", out])
    assert "unknown attribute 'Skin'" in fails(["fairface", "--group=Skin", out])  # checked before a download
    assert sorted(os.listdir(tmp_path)) == ["fairface"]


def write_fairface_shards(folder, n_train=28, n_val=14, broken=3):
    """The Hub's layout of one margin: train-*.parquet and validation-*.parquet with image {bytes, path}, age,
    gender (0 = Male), race, service_test as the card's class indices. Image colours as in fairface_release."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    folder.mkdir(parents=True)
    rows = {}
    for which, n, red, shards in (("train", n_train, 30, 2), ("validation", n_val, 220, 1)):
        for k, part in enumerate(np.array_split(np.arange(n), shards)):
            imgs, cols = [], {"age": [], "gender": [], "race": [], "service_test": []}
            for i in part.tolist():
                gender, age, race, service = fairface_rows(n)[i]
                imgs.append({"bytes": b"broken" if which == "train" and i == broken else jpeg(red, 4 * i),
                             "path": f"{i}.jpg"})
                for c, v in zip(cols, (AGES.index(age), int(gender == "Female"), RACES.index(race), service)):
                    cols[c].append(v)
                rows["train" if which == "train" else "val", 4 * i] = (gender, age, race, service)
            table = pa.table({"image": pa.array(imgs), **{c: pa.array(v) for c, v in cols.items()}})
            pq.write_table(table, folder / f"{which}-{k:05d}-of-{shards:05d}-abc.parquet")
    return rows


def test_fairface_from_the_hub_parquet(tmp_path, monkeypatch):
    rows = write_fairface_shards(tmp_path / "hub" / "0.25")
    write_fairface_shards(tmp_path / "hub" / "1.25", n_train=10, n_val=7)  # a snapshot holds both margins
    asked = []

    def download(repo, folder, revision, offline):  # the Hub, offline: the shards written above
        asked.append((repo, folder, revision))
        return sorted(str(p) for p in (tmp_path / "hub" / folder).iterdir())

    monkeypatch.setattr(beton, "hub_parquet", download)
    out = str(tmp_path / "out")
    data.main(["fairface", "--size=16", "--group=Male", f"--out_dir={out}"])
    assert asked == [("HuggingFaceM4/FairFace", "0.25", fairface.FAIRFACE_REVISION)]
    meta = check_fairface(out, rows)
    assert [s["file"] for s in meta["skipped"]] == ["train-00000-of-00002-abc.parquet:3"]
    n_train, n_val, n_test = (meta["splits"][s]["n"] for s in data.SPLITS)
    assert (n_train + n_val, n_test) == (27, 14) and n_val >= 1 and meta["groups"] == ["women", "men"]
    assert np.array_equal(everything(out, "groups"), everything(out, "attrs")[:, 0])  # the Hub's 0 = Male is men
    out2 = str(tmp_path / "root")
    data.main(["fairface", f"--root={tmp_path / 'hub'}", "--margin=1.25", "--group=Male", "--val_frac=0.25",
               "--size=16", f"--out_dir={out2}"])
    assert sum(data.read_meta(out2)["splits"][s]["n"] for s in data.SPLITS) == 16  # the 1.25 shards only


def test_fairface_shards_that_are_not_fairface(tmp_path, monkeypatch):
    import huggingface_hub
    import pyarrow as pa
    import pyarrow.parquet as pq
    folder = tmp_path / "shards"
    write_fairface_shards(folder)
    out = f"--out_dir={tmp_path / 'out'}"
    path = folder / "validation-00000-of-00001-abc.parquet"
    table = pq.read_table(path)
    pq.write_table(table.set_column(table.schema.get_field_index("race"), "race", pa.array([9] * len(table))), path)
    assert "not a HuggingFaceM4/FairFace shard" in fails(["fairface", f"--root={folder}", out])
    path.unlink()
    assert "need the train-* and validation-*.parquet shards, found ['train']" in fails(["fairface", f"--root={folder}",
                                                                                         out])

    def offline(*a, **k):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_tree", offline)
    msg = fails(["fairface", out])
    assert "cannot download FairFace" in msg and "--root" in msg and "ConnectionError" in msg
    assert sorted(os.listdir(tmp_path)) == ["shards"]


# ---------------------------------------------------------------------------------------------------------------
# UTKFace: the flat folder, its real malformed names skipped and counted

UTK_MALFORMED = {  # real names of the release: a missing race field, a space, a missing dot
    "39_1_20170116174525125.jpg.chip.jpg": "3 fields before .jpg.chip.jpg, not 4",
    "24_0_1_20170116220224657 .jpg.chip.jpg": "a field that is not a number",
    "55_0_0_20170116232725357jpg.chip.jpg": "name does not end in .jpg.chip.jpg",
}


def test_utkface_importer(tmp_path, capsys):
    folder = tmp_path / "UTKFace"
    folder.mkdir()
    ages = [1, 2, 3, 9, 10, 25, 69, 70, 116]
    rows = {}
    for i in range(40):
        age, gender, race = ages[i % 9], i % 2, (i // 2) % 5
        solid(folder / f"{age}_{gender}_{race}_2017011617452{i:04d}.jpg.chip.jpg", 100, 4 * i)
        rows[4 * i] = (age, gender, race)
    for name in UTK_MALFORMED:
        solid(folder / name, 100, 250)
    (folder / "19_1_4_20170103233712345.jpg.chip.jpg").write_bytes(b"not a jpeg")
    out = str(tmp_path / "out")
    data.main(["utkface", f"--root={tmp_path}", "--size=16", "--split=0.5,0.25,0.25", f"--out_dir={out}"])
    assert "utkface: 3 files with malformed names skipped, 41 kept" in capsys.readouterr().out
    meta = data.read_meta(out)
    reasons = {s["file"]: s["reason"] for s in meta["skipped"]}
    assert meta["n_skipped"] == 4 and "19_1_4_20170103233712345.jpg.chip.jpg" in reasons
    assert all(reasons[name].startswith(why) for name, why in UTK_MALFORMED.items()), reasons
    assert meta["groups"] == ["White", "Black", "Asian", "Indian", "Others"] and meta["classes"] == ["not Male", "Male"]
    assert meta["attribute_values"] == {"Age": AGES, "Race": meta["groups"]}
    assert [meta["splits"][s]["n"] for s in data.SPLITS] == [20, 10, 10]
    bins = dict(zip(ages, [0, 0, 1, 1, 2, 3, 7, 8, 8]))  # FairFace's bins: 0-2, 3-9, 10-19, ..., more than 70
    for s in data.SPLITS:
        _, y, g = data.load_split(out, s)
        for (male, age_bin, race), label, group, green in zip(data.load_attrs(out, s)[0], y, g, colours(out, s, 1)):
            age, gender, want_race = rows[4 * round(green / 4)]
            assert (male, age_bin, race) == (gender == 0, bins[age], want_race)  # UTKFace's gender 0 is male
            assert (int(label), int(group)) == (male, race)
    again = str(tmp_path / "again")
    data.main(["utkface", f"--root={folder}", "--size=16", "--split=0.5,0.25,0.25", f"--out_dir={again}"])
    assert data.read_meta(again)["content_hash"] == meta["content_hash"]  # seeded
    other = str(tmp_path / "other")
    data.main(["utkface", f"--root={folder}", "--size=16", "--split=0.5,0.25,0.25", "--seed=1", f"--out_dir={other}"])
    assert data.read_meta(other)["content_hash"] != meta["content_hash"]
    (tmp_path / "empty").mkdir()
    solid(tmp_path / "empty" / "face.jpg", 1, 2)
    assert "no UTKFace images (named like" in fails(["utkface", f"--root={tmp_path / 'empty'}",
                                                     f"--out_dir={tmp_path / 'o'}"])


# ---------------------------------------------------------------------------------------------------------------
# csv: any labelled set

def csv_layout(root, split_column=False):
    """24 images under root/img; a CSV with path, label (cat/dog), sex (women/men/blank), skin (3 values/blank) and
    maybe split; one row without a label and one naming a missing file. Green channel = row."""
    (root / "img").mkdir(parents=True)
    lines = ["path,label,sex,skin" + (",split" if split_column else "")]
    for i in range(24):
        solid(root / "img" / f"{i}.png", 10, 4 * i, fmt="PNG")
        sex = ("women", "men", "")[i % 3]
        skin = ("", "III", "I", "II")[i % 4]
        split = "," + ("train", "train", "val", "test")[i % 4] if split_column else ""
        lines.append(f"img/{i}.png,{('cat', 'dog')[i % 2]},{sex},{skin}{split}")
    lines.append("img/nolabel.png,,men,I" + (",train" if split_column else ""))
    lines.append("img/gone.png,cat,men,I" + (",test" if split_column else ""))
    (root / "list.csv").write_text("\n".join(lines) + "\n")
    return root / "list.csv"


def test_csv_importer(tmp_path):
    path = csv_layout(tmp_path / "set")
    solid(tmp_path / "set" / "img" / "nolabel.png", 1, 1, fmt="PNG")
    out = str(tmp_path / "out")
    data.main(["csv", f"--csv={path}", "--group_column=sex", "--attribute_columns=skin", "--size=16",
               "--split=0.5,0.25,0.25", f"--out_dir={out}"])
    meta = data.read_meta(out)
    assert meta["classes"] == ["cat", "dog"] and meta["groups"] == ["women", "men"]
    assert meta["attributes"] == ["skin"] and meta["attribute_values"] == {"skin": ["I", "II", "III"]}
    assert {s["file"]: s["reason"].split(" ")[0] for s in meta["skipped"]} == {"img/nolabel.png": "no",
                                                                               "img/gone.png": "listed"}
    assert [meta["splits"][s]["n"] for s in data.SPLITS] == [12, 6, 6]
    for s in data.SPLITS:
        _, y, g = data.load_split(out, s)
        for label, group, skin, green in zip(y, g, data.load_attrs(out, s)[0][:, 0], colours(out, s, 1)):
            i = round(green / 4)
            assert (int(label), int(group)) == (i % 2, (0, 1, -1)[i % 3])  # women 0, men 1, blank unknown
            assert skin == (255, 2, 0, 1)[i % 4]  # blank: data.UNKNOWN
    assert data.groups_from_attrs("skin", everything(out, "attrs"), meta["attributes"],
                                  meta["attribute_values"])[1] == ["I", "II", "III"]  # as evaluate.py regroups


def test_csv_importer_with_a_split_column_and_bad_files(tmp_path):
    path = csv_layout(tmp_path / "set", split_column=True)
    out = str(tmp_path / "out")
    data.main(["csv", f"--csv={path}", f"--root={tmp_path / 'set'}", "--size=16", "--split_column=split",
               f"--out_dir={out}"])
    meta = data.read_meta(out)
    assert [meta["splits"][s]["n"] for s in data.SPLITS] == [12, 6, 6] and meta["groups"] == []
    assert sorted(colours(out, "test", 1) // 4 % 4) == [3] * 6  # the rows the CSV puts in test
    o = f"--out_dir={tmp_path / 'o'}"
    assert "no column 'kind' (--label_column" in fails(["csv", f"--csv={path}", "--label_column=kind", o])
    assert "no column 'age' (--attribute_columns" in fails(["csv", f"--csv={path}", "--attribute_columns=skin,age", o])
    text = path.read_text()
    path.write_text(text.replace("img/1.png,dog,men,III,train", "img/1.png,dog,men,III,holdout"))
    assert "list.csv:3: split 'holdout' is not train, val or test" in fails(["csv", f"--csv={path}",
                                                                              "--split_column=split", o])
    path.write_text(text + "img/3.png,dog,men,I,train\n")
    assert "img/3.png is listed again (line 5)" in fails(["csv", f"--csv={path}", o])
    path.write_text(text + "../../etc/passwd,dog,men,I,train\n")
    assert "is outside" in fails(["csv", f"--csv={path}", o])
    path.write_text("path,label\n" + "".join(f"img/{i}.png,cat\n" for i in range(8)))
    assert "holds one class" in fails(["csv", f"--csv={path}", o])
    assert "--csv is required" in fails(["csv", o])
    assert "CSV file not found" in fails(["csv", f"--csv={tmp_path / 'nope.csv'}", o])
    assert not os.path.exists(tmp_path / "o")


def group_tree(tmp_path, names):
    """Two class folders of 12 one-colour images (green = 20 x index) and a groups CSV naming row i names[i % 3]."""
    root, lines = tmp_path / "tree", ["path,group"]
    for cls in ("mask", "no_mask"):
        (root / cls).mkdir(parents=True)
        for i in range(12):
            solid(root / cls / f"{i}.png", 10, 20 * i, fmt="PNG")
            lines.append(f"{cls}/{i}.png,{names[i % 3]}")
    (tmp_path / "groups.csv").write_text("\n".join(lines) + "\n")
    return ["folder", f"--root={root}", f"--groups={tmp_path / 'groups.csv'}", "--split=0.5,0.25,0.25", "--size=16"]


def stored_groups_follow(out, ids):
    """Every split's group of row i (its colour tells i) is ids[i % 3]."""
    for s in data.SPLITS:
        green = colours(out, s, 1)
        assert data.load_split(out, s)[2].tolist() == [ids[round(v / 20) % 3] for v in green]


def test_folder_groups_csv_keeps_women_first(tmp_path):
    out = str(tmp_path / "out")
    data.main([*group_tree(tmp_path, ("men", "women", "")), f"--out_dir={out}"])
    meta = data.read_meta(out)
    assert meta["groups"] == ["women", "men"]  # sorted names would make men 0
    stored_groups_follow(out, (1, 0, -1))
    assert json.loads(open(os.path.join(out, "meta.json")).read())["attribute_values"] == {}


def test_class2_group_names_we_cannot_place_are_refused_unless_group_names_places_them(tmp_path):
    # sorted names gave `adult` 0 and `child` 1 silently, and a women/men/other file put `other` at 2 by chance
    base, out = group_tree(tmp_path, ("child", "adult", "")), str(tmp_path / "out")
    message = fails([*base, f"--out_dir={out}"])
    assert message == (f"error: {tmp_path / 'groups.csv'}: cannot place the group names 'adult', 'child': only "
                       "women/female/f (0) and men/male/m (1) have a fixed id; give each name its id with "
                       "--group_names=adult,child (id order)")
    assert "not in --group_names: 'adult'" in fails([*base, "--group_names=child,senior", f"--out_dir={out}"])
    assert "--group_names names the groups of a --groups file" in fails([*base[:2], "--group_names=a",
                                                                          f"--out_dir={out}"])
    assert not os.path.exists(out)
    data.main([*base, "--group_names=child,adult,senior", f"--out_dir={out}"])
    assert data.read_meta(out)["groups"] == ["child", "adult", "senior"]
    stored_groups_follow(out, (0, 1, -1))
