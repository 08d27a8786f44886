"""Bad input to the data builders (data.py SOURCE ..., sources.py, beton.py) and to the readers of a built data set:
each case ends in one `error:` line and a non-zero exit, no traceback, and nothing left behind that looks finished; a
build killed at any point leaves what the next build of the same out_dir finishes or removes, saying so. Cases run
in-process through data.main (conftest.data_fails: the SystemExit with the one line the CLI prints on stderr); a few
run as real processes, to check stderr and to kill a build at a chosen step. Every test runs under a deadline, so none
can hang. (The training scripts' bad inputs live in test_bad_input.py.)"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import beton
import data
from conftest import ROOT
from conftest import data_fails as fails

SMALL = ["synthetic", "--n=30", "--size=16"]  # 24 / 3 / 3 images: a build in about a second
CELEBA_40 = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
             "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
             "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
             "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
             "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()


@pytest.fixture(autouse=True)
def deadline():
    """No case may hang (a full disk once made the FFCV writer wait forever): fail it after 60 s."""
    def expired(*_):
        pytest.fail("the case ran past 60 s: a hang")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def cli(*args):
    """data.py as a real process -> (return code, stdout, stderr)."""
    r = subprocess.run([sys.executable, "data.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    return r.returncode, r.stdout, r.stderr


def one_error_line(stderr):
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and "Traceback" not in stderr, stderr
    return stderr.strip()


def hidden(folder):
    """What builds leave next to their out_dir: hidden folders (.NAME.*.tmp)."""
    return sorted(f for f in os.listdir(folder) if f.startswith("."))


def whole(out):
    """out is a complete data set: meta.json and every split, each file as meta.json records it. -> meta."""
    meta = data.read_meta(out, verify="full")
    for s in data.SPLITS:
        assert len(data.load_labels(out, s)[0]) == meta["splits"][s]["n"]
    return meta


def save(rng, path, h=24, w=24):
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One small synthetic data set (seed 0); tests copy it before changing anything."""
    out = str(tmp_path_factory.mktemp("built") / "set")
    data.main([*SMALL, f"--out_dir={out}"])
    return out


def challenge_folder(root, rng, names, lines, encoding="utf-8", bom=False):
    """A challenge folder: train/ with `names`, train.txt with `lines` (in `encoding`), test/ with 3 images."""
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    for nm in names:
        save(rng, root / "train" / nm)
    for i in range(3):
        save(rng, root / "test" / f"t{i}.jpg")
    (root / "train.txt").write_bytes(b"\xef\xbb\xbf" * bom + ("\n".join(lines) + "\n").encode(encoding))


def rows(names):
    """One train.txt row per image, cycling through the four label x genre cells."""
    return [f"{nm}\t{1 if i % 4 < 2 else -1}\t{1 if i % 2 else -1}" for i, nm in enumerate(names)]


# ---------------------------------------------------------------------------------------------------------------
# issue 15 §1: --force replaces atomically; what a kill leaves, the next build finishes or removes

def test_force_rebuild_failing_between_the_moves_keeps_a_whole_data_set(built, tmp_path, monkeypatch):
    """The step that used to lose data: the old folder gone, the new one not yet moved in. A failure there now puts
    the old version back; nothing hidden is left."""
    out = str(tmp_path / "set")
    shutil.copytree(built, out)
    before = data.read_meta(out)["content_hash"]
    real, calls = os.replace, []

    def replace(src, dst):  # the move of the new version into out_dir fails, once
        if dst == out and os.path.basename(src).startswith(".set.") and not calls:
            calls.append(src)
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        data.main([*SMALL, "--seed=1", "--force", f"--out_dir={out}"])
    assert calls and whole(out)["content_hash"] == before
    assert hidden(tmp_path) == []


KILL = """
import os, shutil, signal, sys
import beton, data
out, at, template = sys.argv[1:]
name = os.path.basename(out)
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
written = []
def write_beton(path, split):  # the files are not what is tested here: copy them (and skip FFCV's start-up)
    if at == "write" and written:
        die()
    written.append(path)
    shutil.copyfile(os.path.join(template, os.path.basename(path)), path)
beton.write_beton = write_beton
real_replace, real_rmtree = os.replace, shutil.rmtree
def replace(src, dst):  # "swap": killed as the new version is moved into out_dir
    if at == "swap" and dst == out and os.path.basename(src).startswith("." + name + ".") and ".old-" not in src:
        die()
    real_replace(src, dst)
def rmtree(path, *a, **k):  # "cleanup": killed as the old version, moved aside, is deleted
    if at == "cleanup" and ".old-" in str(path):
        die()
    real_rmtree(path, *a, **k)
os.replace, shutil.rmtree = replace, rmtree
data.main(["synthetic", "--n=30", "--size=16", "--seed=1", "--force", f"--out_dir={out}"])
"""


@pytest.fixture
def copied_betons(monkeypatch):
    """killed_build's data sets hold the template's .beton files under a seed-1 meta.json, so their content hashes
    disagree on purpose: those tests are about the transaction, so they read with the size check alone."""
    monkeypatch.setenv("DATA_VERIFY", "size")


def killed_build(out, at, template):
    """Run a --force build of out (seed 1) in a process that SIGKILLs itself at step `at`."""
    r = subprocess.run([sys.executable, "-c", KILL, out, at, template], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr


def test_force_rebuild_killed_between_the_moves_is_finished_by_the_next_build(built, tmp_path, capsys, copied_betons):
    out = str(tmp_path / "set")
    shutil.copytree(built, out)
    killed_build(out, "swap", built)
    assert not os.path.exists(out) and hidden(tmp_path)  # both versions whole, aside
    assert "a --force rebuild of it was killed" in fails(["show", out])  # readers say what happened
    assert "already exists" in fails([*SMALL, f"--out_dir={out}"])  # the next build finishes the swap first
    assert "finished the --force rebuild" in capsys.readouterr().out
    assert data.read_meta(out)["args"]["seed"] == 1 and hidden(tmp_path) == []


def test_force_rebuild_killed_while_deleting_the_old_version(built, tmp_path, capsys, copied_betons):
    out = str(tmp_path / "set")
    shutil.copytree(built, out)
    killed_build(out, "cleanup", built)
    assert data.read_meta(out)["args"]["seed"] == 1 and hidden(tmp_path)
    assert "already exists" in fails([*SMALL, f"--out_dir={out}"])
    assert "removed the previous version" in capsys.readouterr().out
    assert data.read_meta(out)["args"]["seed"] == 1 and hidden(tmp_path) == []


def test_killed_builds_leave_temporary_folders_the_next_build_removes(built, tmp_path, capsys, copied_betons):
    out = str(tmp_path / "set")
    killed_build(out, "write", built)
    other = tmp_path / ".settings.build-1-x.tmp"  # another out_dir's: not this build's business
    other.mkdir()
    assert not os.path.exists(out) and len(hidden(tmp_path)) == 2
    shutil.copytree(built, out)
    assert "already exists" in fails([*SMALL, f"--out_dir={out}"])
    assert "removed 1 temporary folder left by killed builds" in capsys.readouterr().out
    assert hidden(tmp_path) == [".settings.build-1-x.tmp"]


# ---------------------------------------------------------------------------------------------------------------
# issue 15 §4: importers

def test_challenge_label_file_with_a_byte_order_mark(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"{i:06d}.jpg" for i in range(8)]
    challenge_folder(tmp_path / "ch", rng, names, rows(names), bom=True)
    data.main(["challenge", f"--root={tmp_path / 'ch'}", f"--out_dir={tmp_path / 'out'}", "--val_frac=0.5"])
    meta = data.read_meta(str(tmp_path / "out"))
    assert meta["splits"]["train"]["n"] + meta["splits"]["val"]["n"] == 8 and meta["n_skipped"] == 0


def test_challenge_label_file_in_latin_1(tmp_path, capsys):
    rng = np.random.default_rng(1)
    names = [f"café_{i}.jpg" for i in range(8)]  # UTF-8 names on disk, Latin-1 in the label file
    challenge_folder(tmp_path / "ch", rng, names, rows(names), encoding="latin-1")
    data.main(["challenge", f"--root={tmp_path / 'ch'}", f"--out_dir={tmp_path / 'out'}", "--val_frac=0.5"])
    assert "is not UTF-8 (byte" in capsys.readouterr().out
    meta = data.read_meta(str(tmp_path / "out"))
    assert meta["splits"]["train"]["n"] + meta["splits"]["val"]["n"] == 8
    (tmp_path / "ch" / "train.txt").write_bytes(b"\xff\xfe" + "a.jpg\t1\t1\n".encode("utf-16-le"))
    assert "is UTF-16 text; save it as UTF-8" in fails(["challenge", f"--root={tmp_path / 'ch'}",
                                                        f"--out_dir={tmp_path / 'o2'}"])


def test_challenge_duplicate_rows_are_kept_once(tmp_path, capsys):
    rng = np.random.default_rng(2)
    names = [f"{i:06d}.jpg" for i in range(8)]
    lines = rows(names)
    challenge_folder(tmp_path / "ch", rng, names, lines + lines[:3] + [f"./{lines[3]}"])
    out = str(tmp_path / "out")
    data.main(["challenge", f"--root={tmp_path / 'ch'}", f"--out_dir={out}", "--val_frac=0.5"])
    assert "lists 4 images more than once" in capsys.readouterr().out
    meta = data.read_meta(out)
    assert meta["splits"]["train"]["n"] + meta["splits"]["val"]["n"] == 8
    train, val = (data.load_split(out, s)[0].flatten(1) for s in ("train", "val"))
    assert not (train[:, None] == val[None]).all(-1).any()  # no image in both
    (tmp_path / "ch" / "train.txt").write_text("\n".join(lines + [f"{names[0]}\t-1\t-1"]) + "\n")
    assert "listed again with other labels" in fails(["challenge", f"--root={tmp_path / 'ch'}",
                                                      f"--out_dir={tmp_path / 'o2'}"])
    assert not os.path.exists(tmp_path / "o2")


def test_label_files_naming_paths_outside_the_root_are_refused(tmp_path):
    rng = np.random.default_rng(3)
    save(rng, tmp_path / "secret.jpg")  # exists, outside the data folder
    names = [f"{i:06d}.jpg" for i in range(8)]
    challenge_folder(tmp_path / "ch", rng, names, rows(names) + ["../../secret.jpg\t1\t1"])
    msg = fails(["challenge", f"--root={tmp_path / 'ch'}", f"--out_dir={tmp_path / 'out'}"])
    assert "train.txt:9: '../../secret.jpg' is outside" in msg
    (tmp_path / "ch" / "train.txt").write_text("\n".join(rows(names) + [f"{tmp_path}/secret.jpg\t1\t1"]) + "\n")
    assert "is outside" in fails(["challenge", f"--root={tmp_path / 'ch'}", f"--out_dir={tmp_path / 'out'}"])
    tree = tmp_path / "tree"
    for cls in ("a", "b"):
        (tree / cls).mkdir(parents=True)
        save(rng, tree / cls / "x.png")
    (tmp_path / "groups.csv").write_text("path,group\na/x.png,f\n../secret.jpg,m\n")
    assert "'../secret.jpg' is outside" in fails(["folder", f"--root={tree}", f"--groups={tmp_path / 'groups.csv'}",
                                                  f"--out_dir={tmp_path / 'out'}"])
    assert sorted(os.listdir(tmp_path)) == ["ch", "groups.csv", "secret.jpg", "tree"]


def test_folder_tree_of_junk_files(tmp_path):
    for cls in ("mask", "no_mask"):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        (tmp_path / "tree" / cls / "notes.txt").write_text("not an image")
        (tmp_path / "tree" / cls / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    code, _, err = cli("folder", f"--root={tmp_path / 'tree'}", f"--out_dir={tmp_path / 'out'}")
    assert code != 0 and "none of the 4 files from" in one_error_line(err) and "is a readable image" in err
    assert sorted(os.listdir(tmp_path)) == ["tree"]


def test_one_class_is_refused_at_build_time(tmp_path):
    rng = np.random.default_rng(4)
    (tmp_path / "tree" / "mask").mkdir(parents=True)
    for i in range(10):
        save(rng, tmp_path / "tree" / "mask" / f"{i}.png")
    assert "one class subfolder in" in fails(["folder", f"--root={tmp_path / 'tree'}", f"--out_dir={tmp_path / 'o'}"])
    msg = fails([*SMALL, "--criterion=Male & ~Male", f"--out_dir={tmp_path / 'o'}"])
    assert "holds one class" in msg and "has the same value on every image" in msg
    assert "holds one class" in fails([*SMALL, "--cells=1,0,0,0", f"--out_dir={tmp_path / 'o'}"])
    names = [f"{i:06d}.jpg" for i in range(8)]
    challenge_folder(tmp_path / "ch", rng, names, [f"{nm}\t1\t{1 if i % 2 else -1}" for i, nm in enumerate(names)])
    assert "every image is '1'" in fails(["challenge", f"--root={tmp_path / 'ch'}", f"--out_dir={tmp_path / 'o'}"])
    aaf = tmp_path / "aaf"  # women only
    aaf.mkdir()
    for i in range(10):
        save(rng, aaf / f"{i:05d}A20.jpg")
    assert "every image is 'female'" in fails(["aaf", f"--root={aaf}", f"--out_dir={tmp_path / 'o'}"])
    assert not os.path.exists(tmp_path / "o") and hidden(tmp_path) == []


@pytest.mark.parametrize("arg", ["--size=0", "--size=-3", "--size=5000"])
def test_image_size_out_of_range(arg, tmp_path):
    assert fails([*SMALL[:2], arg, f"--out_dir={tmp_path / 'o'}"]).startswith(f"error: {arg}: the stored image side")
    assert os.listdir(tmp_path) == []


def test_image_size_zero_in_a_real_process(tmp_path):
    code, out, err = cli(*SMALL[:2], "--size=0", f"--out_dir={tmp_path / 'o'}")
    assert code != 0 and one_error_line(err).startswith("error: --size=0: the stored image side in pixels")
    assert os.listdir(tmp_path) == []


def test_out_dir_that_is_a_file_or_unwritable(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("keep me")
    for force in ([], ["--force"]):
        assert "is a file, not a folder" in fails([*SMALL, f"--out_dir={tmp_path / 'file'}", *force])
    assert (tmp_path / "file").read_text() == "keep me"
    assert "cannot write there" in fails([*SMALL, f"--out_dir={tmp_path / 'file' / 'sub'}"])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a data set")
    assert "--force replaces data sets only" in fails([*SMALL, f"--out_dir={tmp_path / 'mine'}", "--force"])
    assert (tmp_path / "mine" / "notes.txt").exists()

    real_mkdir = os.mkdir

    def denied(path, *a, **k):  # the build's temporary folder cannot be made
        if os.path.basename(path).startswith(".out."):
            raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "ro"))
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", denied)  # root writes anywhere: a read-only folder, mocked
    msg = fails([*SMALL, f"--out_dir={tmp_path / 'ro' / 'out'}"])
    assert "cannot write there (Permission denied" in msg
    assert sorted(os.listdir(tmp_path)) == ["file", "mine", "ro"] and os.listdir(tmp_path / "ro") == []


def celeba_official(root, rng, n=9, part=(0, 0, 0, 0, 1, 1, 2, 2, 2)):
    """The official layout with all 40 attribute names; every attribute of image i is 1 when i % 2, so each
    attribute is a two-class criterion."""
    (root / "img_align_celeba").mkdir(parents=True)
    for i in range(n):
        save(rng, root / "img_align_celeba" / f"{i + 1:06d}.jpg", 30, 24)
    lines = [str(n), " ".join(CELEBA_40)] + [f"{i + 1:06d}.jpg " + " ".join(["1" if i % 2 else "-1"] * 40)
                                            for i in range(n)]
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("".join(f"{i + 1:06d}.jpg {p}\n" for i, p in enumerate(part)))
    return lines


def test_celeba_malformed_official_files(tmp_path):
    root = tmp_path / "celeba"
    lines = celeba_official(root, np.random.default_rng(5))
    out = f"--out_dir={tmp_path / 'out'}"
    attr, part = root / "list_attr_celeba.txt", root / "list_eval_partition.txt"
    attr.write_text("\n".join(lines[:3] + [lines[3].replace(" 1", " x", 1)] + lines[4:]) + "\n")
    assert "list_attr_celeba.txt:4: expected a file name and 40 values of -1 or 1" in fails(["celeba", f"--root={root}",
                                                                                           out])
    attr.write_text("")
    assert "list_attr_celeba.txt: expected the number of images" in fails(["celeba", f"--root={root}", out])
    attr.write_text("\n".join(["12"] + lines[1:]) + "\n")
    assert "line 1 says 12 images, the file has 9 rows" in fails(["celeba", f"--root={root}", out])
    attr.write_text("\n".join(lines) + "\n")
    good = part.read_text()
    part.write_text(good.replace("000005.jpg 1", "000005.jpg 1 extra"))
    assert "list_eval_partition.txt:5: expected 'image.jpg 0|1|2'" in fails(["celeba", f"--root={root}", out])
    part.write_text(good.replace("000005.jpg 1", "000005.jpg 7"))
    assert "list_eval_partition.txt:5:" in fails(["celeba", f"--root={root}", out])
    assert sorted(os.listdir(tmp_path)) == ["celeba"]


def test_every_celeba_attribute_works_in_a_criterion(tmp_path):
    rng = np.random.default_rng(6)
    attrs = {nm: rng.integers(0, 2, 16).astype(bool) for nm in CELEBA_40}
    for nm in CELEBA_40:
        for expr, want in ((nm, attrs[nm]), (f"{nm} ^ Male", attrs[nm] ^ attrs["Male"]),
                           (f"not {nm} and Young", ~attrs[nm] & attrs["Young"]), (f"~({nm} | Bald)", ~(attrs[nm] |
                                                                                                       attrs["Bald"]))):
            assert np.array_equal(data.parse_criterion(expr, CELEBA_40)(attrs), want), expr
    root = tmp_path / "celeba"
    celeba_official(root, rng)
    out = str(tmp_path / "out")
    data.main(["celeba", f"--root={root}", "--criterion=5_o_Clock_Shadow", "--group=Male", "--size=16",
               f"--out_dir={out}"])
    meta = data.read_meta(out)
    assert meta["classes"] == ["not 5_o_Clock_Shadow", "5_o_Clock_Shadow"] and meta["attributes"] == CELEBA_40
    assert data.load_labels(out, "train")[0].tolist() == [0, 1, 0, 1]


def test_folder_importer_scales_16_bit_pngs(tmp_path):
    import cv2
    tree = tmp_path / "tree"
    for k, cls in enumerate(("dark", "light")):
        (tree / cls).mkdir(parents=True)
        for i in range(4):
            level = (8000, 40000)[k]
            Image.fromarray(np.full((20, 20), level, np.uint16)).save(tree / cls / f"grey{i}.png")  # mode I;16
            cv2.imwrite(str(tree / cls / f"rgb{i}.png"), np.full((20, 20, 3), level, np.uint16))  # 48-bit RGB
    out = str(tmp_path / "out")
    data.main(["folder", f"--root={tree}", "--split=0.5,0.25,0.25", "--size=16", f"--out_dir={out}"])
    assert data.read_meta(out)["n_skipped"] == 0
    for s in data.SPLITS:
        x, y, _ = data.load_split(out, s)
        for xi, yi in zip(x, y):
            want = round((8000, 40000)[int(yi)] * 255 / 65535)  # 31 and 156, not white
            assert abs(int(xi.float().mean()) - want) <= 1, (s, int(yi), xi.float().mean())


# ---------------------------------------------------------------------------------------------------------------
# issue 16: a full disk, fractions, criteria, changed files

def test_not_enough_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(beton.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 1 << 20))
    msg = fails([*SMALL, f"--out_dir={tmp_path / 'o'}"])
    assert "not enough free space in" in msg and "MiB are free" in msg
    assert os.listdir(tmp_path) == []


def test_full_disk_while_writing_ends_in_one_line(tmp_path, monkeypatch, capfd):
    """The FFCV writer's worker dies with ENOSPC (the disk filled after the free-space check): one line, nothing left,
    no traceback from the worker; before, the parent waited forever."""
    from ffcv.memory_allocator import MemoryAllocator

    def full(self):  # runs in the writer's worker processes (forked: they inherit the patch)
        if self.my_page >= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(MemoryAllocator, "flush_page", full)
    msg = fails([*SMALL, f"--out_dir={tmp_path / 'o'}"])
    assert "no space left on the device" in msg and "train.beton" in msg
    assert os.listdir(tmp_path) == [] and "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("arg, allowed", [
    ("--noise=7", "a fraction in 0..1"),
    ("--both=1.5", "a fraction in 0..1"),
    ("--glasses_share=-0.1", "a fraction in 0..1"),
    ("--shift=3", "a fraction in 0..1"),
    ("--split=0.8,0.8,0.8", "3 fractions in 0..1 that sum to 1"),
    ("--split=2,-0.5,-0.5", "3 fractions in 0..1 that sum to 1"),
    ("--cells=2,1,1,1", "4 fractions in 0..1 that sum to 1"),
    ("--n=0", "a number of images, 1 or more"),
    ("--seed=-1", "0 or more"),
])
def test_fractions_and_counts_are_bounded(arg, allowed, tmp_path):
    assert fails([*SMALL, arg, f"--out_dir={tmp_path / 'o'}"]).endswith(allowed)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("source, arg", [("challenge", "--val_frac=0"), ("challenge", "--val_frac=1"),
                                         ("folder", "--split=0.5,0.6,0.1"), ("aaf", "--split=1,1,1")])
def test_fractions_of_the_importers_are_bounded(source, arg, tmp_path):
    assert arg.split("=")[0] in fails([source, f"--root={tmp_path}", arg, f"--out_dir={tmp_path / 'o'}"])


def test_changed_beton_is_refused(built, tmp_path, monkeypatch):
    out = str(tmp_path / "set")
    shutil.copytree(built, out)
    path = os.path.join(out, "train.beton")
    meta = data.read_meta(out)
    ptr = int(data._open_beton(out, "train", meta)[2]["image"]["data_ptr"][5])
    original = open(path, "rb").read()
    before = os.stat(path)
    with open(path, "r+b") as fh:  # one pixel of one image: same size, same structure
        fh.seek(ptr + 7)
        fh.write(bytes([original[ptr + 7] ^ 0x40]))
    # issue 23, class 3: the default (DATA_VERIFY=once) hashed the file on its first read above and recorded its size
    # and mtime; an edit in place changes the mtime (set here, as the file system's clock may be coarser than the
    # test), so the file is hashed again and refused
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    for verify in ("once", "full"):
        monkeypatch.setenv("DATA_VERIFY", verify)
        msg = fails(["show", out])
        assert f"{path}: its content (sha256" in msg and "rebuild it: python data.py synthetic" in msg
    monkeypatch.setenv("DATA_VERIFY", "size")
    assert len(data.load_split(out, "train")[0]) == 24  # the cheapest check cannot see one byte
    monkeypatch.delenv("DATA_VERIFY")
    open(path, "ab").write(b"\0" * 100)  # appended bytes
    msg = fails(["show", out])
    recorded = meta["splits"]["train"]["bytes"]
    assert f"train.beton has {recorded + 100} bytes, meta.json records {recorded}: it changed after the build" in msg
    with pytest.raises(data.DataFileError, match="changed after the build"):
        data.load_split(out, "train")
    open(path, "wb").write(b"\0" * 64 + original[64:])  # a damaged header, same size
    assert "train.beton is not a readable .beton" in fails(["show", out])
    open(path, "wb").write(original)
    assert data.read_meta(out, verify="full")["splits"]["train"]["n"] == 24


def test_default_check_hashes_a_file_once_per_size_and_mtime(built, tmp_path, monkeypatch):
    # issue 23, class 3: DATA_VERIFY=once (the default) reads every byte the first time, then trusts a file whose
    # size and mtime are those it hashed (a new process has no in-memory cache: the record is in .hashed.json)
    out = str(tmp_path / "set")
    shutil.copytree(built, out)
    hashed = []
    monkeypatch.setattr(data, "_verify_content", lambda d, split, meta: hashed.append(split))
    data.read_meta(out)
    assert sorted(hashed) == sorted(data.SPLITS)
    record = json.load(open(os.path.join(out, data.HASHED)))
    assert record["train"] == [os.path.getsize(os.path.join(out, "train.beton")),
                               os.stat(os.path.join(out, "train.beton")).st_mtime_ns]
    hashed.clear()
    data.read_meta(out)
    assert hashed == []  # unchanged files: a stat each
    st = os.stat(os.path.join(out, "val.beton"))
    os.utime(os.path.join(out, "val.beton"), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    data.read_meta(out)
    assert hashed == ["val"]  # touched: hashed again

    def read_only(path, text):
        raise data.configurator.UserError(f"cannot write {path}: Read-only file system")
    monkeypatch.setattr(data.run, "write_text", read_only)
    os.utime(os.path.join(out, "val.beton"), ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    assert data.read_meta(out)["splits"]  # a data set on a read-only disk still reads: the record is a cache


def test_reading_what_is_not_a_data_set(built, tmp_path):
    assert "does not exist" in fails(["show", str(tmp_path / "nothing")])
    (tmp_path / "file").write_text("x")
    assert "is a file" in fails(["show", str(tmp_path / "file")])
    assert "no meta.json" in fails(["show", str(tmp_path)])
    out = tmp_path / "set"
    shutil.copytree(built, out)
    (out / "val.beton").unlink()  # what a killed --force used to leave: meta.json, but not every split
    assert "val.beton is missing (meta.json lists split 'val')" in fails(["show", str(out), "--split=train"])
    (out / "meta.json").write_text('{"splits": ')
    assert "meta.json is not readable JSON" in fails(["show", str(out)])
    (out / "meta.json").write_text('{"classes": []}')
    assert "is not a data.py meta.json" in fails(["show", str(out)])
    with pytest.raises(data.DataFileError, match="no split 'dev'"):
        data.make_loader(built, "dev", 4, False, "cpu")
