"""
MAFA (Ge, Li, Ye and Luo, "Detecting Masked Faces in the Wild with LLE-CNNs", CVPR 2017): whole Internet photos and
the boxes of the faces in them, in two MATLAB files. sources.py's `mafa` source splits what load() returns and decodes
each face's square into its split.

    faces = load(root, enlarge, skipped)

The release unpacks to ROOT/{train-images/images/train_*.jpg, test-images/images/test_*.jpg,
MAFA-Label-Train/LabelTrainAll.mat, MAFA-Label-Test/LabelTestAll.mat}. The train file holds the struct array
label_train (fields imgName and label), the test file LabelTest (fields name and label); label holds one row per
face. The rows, as the release's readme describes them (quoted in
https://github.com/the-house-of-black-and-white/morghulis/blob/master/morghulis/mafa/__init__.py; the field names as
https://github.com/dhyxy/MAFAExtractor/blob/master/mafaextractor/extractor.py reads them):
    train, 21 values: x, y, w, h, eyes x1, y1, x2, y2, occluder x3, y3, w3, h3, occ_type, occ_degree, gender, race,
                      orientation, glasses x4, y4, w4, h4
    test, 18 values:  x, y, w, h, face_type, occluder x1, y1, w1, h1, occ_type, occ_degree, gender, race,
                      orientation, glasses x2, y2, w2, h2
occ_type: 1 simple, 2 complex, 3 human body (a hand); occ_degree: the number of occluded face parts; face_type:
1 masked, 2 unmasked, 3 invalid; orientation: 1 left, 2 left frontal, 3 frontal, 4 right frontal, 5 right. The
readme gives no meaning to the gender and race codes, so they are not kept.

The label rule is NVIDIA's (https://github.com/NVIDIA-AI-IOT/face-mask-detection/blob/master/data_utils/mafa2kitti.py),
the same "mask" on both files:
    train: mask if occ_type != 3 and occ_degree > 2; no mask if occ_type == 3 and occ_degree < 2
    test:  mask if face_type == 1 and occ_type != 3 and occ_degree > 2; no mask if face_type == 2
Every other face (an invalid one, a mask that covers two parts or fewer, a hand over more of the face) is skipped,
with the reason.

faces: dict(sources=[(photo path, (cx, cy, side))] for data.decode_image, names=[photo/face k], labels int64 (1 mask,
0 no mask), attrs uint8 [n, 3] in ATTRS' order (data.UNKNOWN where a row holds no valid code), values (ATTRS'
value names), photo int64 (which photo: faces of one photo stay in one split), released int64 (0 train, 1 test)).
"""

import os

import numpy as np

import data
from beton import DataError

CLASSES = ("no mask", "mask")
ATTRS = ("occ_type", "occ_degree", "orientation")
OCC_TYPES = ("simple", "complex", "human body")  # codes 1, 2, 3
ORIENTATIONS = ("left", "left frontal", "frontal", "right frontal", "right")  # codes 1..5
HUMAN_BODY = 3
# per released split: where its photos and labels are, the struct and its name field, the values per face and the
# (0-based) columns of the fields the rule and the attributes read; train rows have no face_type
LAYOUT = {
    "train": dict(photos="train-images/images", labels="MAFA-Label-Train/LabelTrainAll.mat", struct="label_train",
                  name="imgName", width=21, face_type=None, occ_type=12, occ_degree=13, orientation=16),
    "test": dict(photos="test-images/images", labels="MAFA-Label-Test/LabelTestAll.mat", struct="LabelTest",
                 name="name", width=18, face_type=4, occ_type=9, occ_degree=10, orientation=13),
}
WHERE = "--root is the folder holding train-images/, test-images/, MAFA-Label-Train/ and MAFA-Label-Test/"


def read_labels(path, struct, name_field, width):
    """One MAFA label file -> [(photo name, face rows float [k, width])], in the file's order."""
    try:
        import scipy.io
    except ImportError:
        raise DataError("reading MAFA's .mat label files needs scipy: pip install scipy") from None
    if not os.path.isfile(path):
        raise DataError(f"label file not found: {path} ({WHERE})")
    try:
        mat = scipy.io.loadmat(path)
    # what scipy raises on a file that is not a MATLAB v5 file: a damaged or truncated one, or a v7.3 (HDF5) one
    except (scipy.io.matlab.MatReadError, ValueError, IndexError, NotImplementedError) as e:
        raise DataError(f"{path} is not a readable MATLAB file ({type(e).__name__}: {e})") from None
    table = mat.get(struct)
    fields = (table.dtype.names or ()) if isinstance(table, np.ndarray) else ()
    if not {name_field, "label"} <= set(fields):
        found = ", ".join(k for k in mat if not k.startswith("__")) or "nothing"
        raise DataError(f"{path}: no struct array {struct} with fields {name_field} and label (found: {found}); is it "
                        f"MAFA's {os.path.basename(path)}?")
    out = []
    for k, entry in enumerate(table.ravel()):
        name, rows = np.asarray(entry[name_field]).ravel(), np.asarray(entry["label"], np.float64)
        if len(name) != 1 or (rows.size and rows.size % width):
            raise DataError(f"{path}: entry {k + 1} of {struct} is not one photo name and rows of {width} values "
                            f"(MAFA's layout)")
        out.append((str(name[0]), rows.reshape(-1, width)))
    if not out:
        raise DataError(f"{path}: {struct} lists no photos")
    return out


def label_rule(face_type, occ_type, occ_degree):
    """Face rows' fields (face_type None for train rows) -> (labels int64: 1 mask, 0 no mask, -1 skipped; the reason
    of each skipped face, "" for the others). NVIDIA's rule: see the top of this file."""
    covered = (occ_type != HUMAN_BODY) & (occ_degree > 2)
    if face_type is None:
        labels = np.select([covered, (occ_type == HUMAN_BODY) & (occ_degree < 2)], [1, 0], -1)
    else:
        labels = np.select([(face_type == 1) & covered, face_type == 2], [1, 0], -1)
    code = lambda v: f"{v:g}"
    reasons = []
    for i in range(len(labels)):
        if labels[i] >= 0:
            reasons.append("")
        elif face_type is None:
            reasons.append(f"occ_type {code(occ_type[i])}, occ_degree {code(occ_degree[i])}: neither mask (occ_type "
                           "!= 3, occ_degree > 2) nor no mask (occ_type 3, occ_degree < 2)")
        elif face_type[i] == 1:
            reasons.append(f"masked face with occ_type {code(occ_type[i])}, occ_degree {code(occ_degree[i])}: not "
                           "mask by the rule (occ_type != 3, occ_degree > 2)")
        else:
            reasons.append("invalid face (face_type 3)" if face_type[i] == 3 else
                           f"face_type {code(face_type[i])} is not 1, 2 or 3")
    return labels.astype(np.int64), reasons


def _codes(column, codes):
    """Values as a label file writes them -> each one's index in `codes`, data.UNKNOWN for any other value."""
    index = {c: i for i, c in enumerate(codes)}
    return np.array([index.get(v, data.UNKNOWN) for v in column.tolist()], np.uint8)


def load(root, enlarge, skipped):
    """Every face of both label files that the rule labels, with its photo, its square (the box's longer side times
    `enlarge`, about the box's centre) and its attributes; the faces it skips, those with an empty box and those of
    photos not on disk go to `skipped` with the reason. -> faces (see the top of this file)."""
    sources, names, table, photo = [], [], [], 0
    for released, (split, lay) in enumerate(LAYOUT.items()):
        photos = os.path.join(root, lay["photos"])
        if not os.path.isdir(photos):
            raise DataError(f"folder not found: {photos} ({WHERE})")
        for name, rows in read_labels(os.path.join(root, lay["labels"]), lay["struct"], lay["name"], lay["width"]):
            path, photo = os.path.join(photos, name), photo + 1
            face = [f"{lay['photos']}/{name} face {k + 1}" for k in range(len(rows))]
            if not os.path.isfile(path):
                skipped += [dict(file=f, reason=f"photo not in {lay['photos']}/") for f in face]
                continue
            face_type = rows[:, lay["face_type"]] if lay["face_type"] is not None else None
            labels, reasons = label_rule(face_type, rows[:, lay["occ_type"]], rows[:, lay["occ_degree"]])
            empty = ~((rows[:, 2] > 0) & (rows[:, 3] > 0))
            for k in np.flatnonzero(empty | (labels < 0)):
                why = f"an empty face box ({rows[k, 2]:g}x{rows[k, 3]:g})" if empty[k] else f"{split}: {reasons[k]}"
                skipped.append(dict(file=face[k], reason=why))
            keep = np.flatnonzero(~empty & (labels >= 0))
            x, y, w, h = rows[keep, :4].T
            sources += [(path, square) for square in zip(x + w / 2, y + h / 2, enlarge * np.maximum(w, h))]
            names += [face[k] for k in keep]
            table.append(np.column_stack([labels[keep], np.full((len(keep), 2), (photo, released)),
                                          rows[keep][:, [lay["occ_type"], lay["occ_degree"], lay["orientation"]]]]))
    if not names:
        raise DataError(f"no face in MAFA's label files under {root} is labelled by the rule and has its photo there")
    labels, photo, released, occ_type, occ_degree, orientation = np.concatenate(table).T
    degrees = sorted({d for d in occ_degree.tolist() if 0 <= d < 256 and d == int(d)})  # the codes the files use
    attrs = np.stack([_codes(occ_type, (1, 2, 3)), _codes(occ_degree, degrees), _codes(orientation, (1, 2, 3, 4, 5))],
                     1)
    values = dict(occ_type=list(OCC_TYPES), occ_degree=[f"{d:g}" for d in degrees], orientation=list(ORIENTATIONS))
    return dict(sources=sources, names=names, labels=labels.astype(np.int64), attrs=attrs, values=values,
                photo=photo.astype(np.int64), released=released.astype(np.int64))
