"""
The synthetic faces: an offline stand-in for CelebA with the challenge's task. Each face gets attributes (SYNTH_ATTRS)
drawn per label x group cell in the proportions asked, so a data set hits the challenge's label x gender cells; it is
then painted with OpenCV: hair colour, glasses, face shape, beard, lipstick, with skin, pose, light, background and
distractors drawn independently of the label. The label (by default Blond_Hair XOR Eyeglasses, CelebA's hidden rule
in the challenge) is thus visible only as hair colour AND glasses combined. sources.py's `synthetic` source turns the
attributes into labels and splits; bench.py and the tests draw faces directly.

    attrs = synth_attributes(n, rng, cells, glasses_share, both)    # uint8 [n, len(SYNTH_ATTRS)]
    images = draw_faces(attrs, rng, size=80)                        # uint8 [n, size, size, 3]

With skin_tones=K (2..8) every face also gets a skin tone bin 0..K-1, a last attribute column SKIN_ATTR drawn
independently of the label and the gender: the darkest bin holds DARKEST_SHARE of the faces and is lit dimly through
a veil (less light, less contrast), so its hair colour and glasses are harder to see: a small group that scores
lower, for the k-group checks. K = 0 (the default) draws exactly what it drew before the tones existed.
"""

import math

import cv2
import numpy as np
from tqdm import tqdm

SYNTH_ATTRS = ("Blond_Hair", "Eyeglasses", "Male", "Long_Hair", "Beard", "Wearing_Lipstick", "Sunglasses")
BLOND = np.array([(238, 218, 165), (224, 192, 122), (203, 168, 98), (246, 232, 192), (214, 176, 110)], np.float32)
OTHER_HAIR = np.array([(28, 22, 20), (62, 42, 30), (98, 66, 42), (132, 64, 34), (150, 148, 145), (208, 206, 200),
                       (120, 90, 60)], np.float32)  # black, dark/mid brown, auburn, grey, white, light brown
SKIN = np.array([(252, 224, 198), (96, 60, 42)], np.float32)  # lightest, darkest; tones are mixed in between
SKIN_ATTR, SKIN_TONES = "Skin", range(2, 9)  # the tone bin's attribute name; the bin counts allowed
DARKEST_SHARE = 0.1  # of the faces in the darkest tone bin; the other bins share the rest equally
DARK_GAIN, DARK_VEIL = 0.55, 45.0  # the darkest bin's light: exposure x0.55, plus a flat grey veil (lower contrast)
FRAMES = np.array([(18, 18, 20), (70, 44, 30), (196, 164, 84), (172, 172, 178), (128, 24, 34), (30, 40, 110)],
                  np.float32)  # black, tortoise, gold, silver, red, blue


def cell_counts(fracs, n):
    """Exact counts per cell (largest remainder), so every split hits the asked proportions."""
    fracs = np.asarray(fracs, float) / np.sum(fracs)
    counts = np.floor(fracs * n).astype(int)
    counts[np.argsort(counts - fracs * n)[: n - counts.sum()]] += 1
    return counts


def tone_names(skin_tones):
    """The names of the skin tone bins, lightest first: the values of the categorical attribute SKIN_ATTR."""
    return [f"tone {k + 1}" + (" (lightest)" if k == 0 else " (darkest)" if k == skin_tones - 1 else "")
            for k in range(skin_tones)]


def synth_attributes(n, rng, cells, glasses_share, both, skin_tones=0):
    """uint8 [n, len(SYNTH_ATTRS)], plus the column SKIN_ATTR (tone bin 0..skin_tones-1) when skin_tones > 0.
    `cells` = fractions of (xor 0, women), (1, women), (0, men), (1, men); `glasses_share` = fraction of positives
    that wear glasses (the rest are blond); `both` = fraction of negatives that are blond AND wear glasses (the case
    that tells XOR from OR). The tone is drawn last, from its own share per bin, so it is independent of the label and
    the gender and leaves every earlier draw as it was without tones.

    The command line's defaults (sources.SYNTHETIC) follow CelebA (blond ~15%, glasses ~6.5%: about 30% of the XOR
    positives wear glasses), except that `both` is 10x CelebA's ~0.5%, so the cell that tells XOR from OR holds 4% of
    a test split. At both=0.25 neither attribute alone moves a prediction past the class prior (a pure XOR puzzle): a
    tiny ViT from scratch then stays at the trivial classifier for many CPU epochs."""
    cell = rng.permutation(np.repeat(np.arange(4), cell_counts(cells, n)))
    xor, male = cell % 2 == 1, cell >= 2
    glasses_side, has_both = rng.random(n) < glasses_share, rng.random(n) < both
    blond = np.where(xor, ~glasses_side, has_both)
    glasses = np.where(xor, glasses_side, has_both)
    long_hair = rng.random(n) < np.where(male, 0.1, 0.8)
    beard = male & (rng.random(n) < 0.4)
    lipstick = ~male & (rng.random(n) < 0.5)
    sunglasses = glasses & (rng.random(n) < 0.15)
    columns = [blond, glasses, male, long_hair, beard, lipstick, sunglasses]
    if skin_tones:
        share = [(1 - DARKEST_SHARE) / (skin_tones - 1)] * (skin_tones - 1) + [DARKEST_SHARE]
        columns.append(rng.permutation(np.repeat(np.arange(skin_tones), cell_counts(share, n))))
    return np.stack(columns, 1).astype(np.uint8)


def _face_params(attrs, rng, size, shift, skin_tones):
    """Everything random about each face, drawn vectorised. `shift` > 0 makes light, noise, blur and pose harsher;
    skin_tones > 0: attrs' last column is the tone bin, which sets the skin colour's range and the darkest bin's
    dim light."""
    n = len(attrs)
    blond, glasses, male, long_hair, beard, lipstick, sunglasses = attrs[:, :len(SYNTH_ATTRS)].T.astype(bool)
    tone = attrs[:, len(SYNTH_ATTRS)] if skin_tones else None
    u = lambda lo, hi, k=None: rng.uniform(lo, hi, n if k is None else (n, k)).astype(np.float32)
    pick = lambda palette: palette[rng.integers(len(palette), size=n)]
    jitter = lambda c, s: np.clip(c + rng.normal(0, s, (n, 3)), 0, 255).astype(np.float32)
    hair = jitter(np.where(blond[:, None], pick(BLOND), pick(OTHER_HAIR)), 10)
    # without tones, light skin is commoner (u ** 1.5); with tones, each bin spans its equal part of the range
    shade = u(0, 1) ** 1.5 if tone is None else (tone + u(0, 1)) / skin_tones
    skin = jitter(SKIN[0] + (SKIN[1] - SKIN[0]) * shade[:, None], 6)
    dark = np.zeros(n, bool) if tone is None else tone == skin_tones - 1
    lips = np.where(lipstick[:, None], jitter(np.float32([(175, 25, 45)]), 20), skin * np.float32([0.85, 0.6, 0.6]))
    fw = size * 0.18 * u(0.88, 1.12) * np.where(male, 1.07, 1.0)
    return dict(
        blond=blond, glasses=glasses, long_hair=long_hair, beard=beard, lipstick=lipstick, sunglasses=sunglasses,
        bg0=u(0, 255, 3), bg1=u(0, 255, 3), bg_angle=u(0, 2 * np.pi),
        distractor=rng.integers(0, 3, n), dis_xy=u(0, size, 2), dis_r=u(0.06, 0.2) * size, dis_col=u(0, 255, 3),
        cloth=u(0, 255, 3),
        cx=size * (0.5 + u(-0.06, 0.06)), cy=size * (0.47 + u(-0.05, 0.05)),
        fw=fw, fh=fw * u(1.22, 1.38), roll=u(-0.2, 0.2) * (1 + shift), yaw=u(-1, 1),
        jaw=np.where(male, u(0.55, 0.8), u(0.28, 0.5)),
        skin=skin, hair=hair, lips=lips,
        hair_w=np.where(male, u(1.02, 1.1), u(1.08, 1.2)), hair_h=u(0.95, 1.15), hairline=u(-0.02, 0.18),
        eye=pick(np.array([(40, 28, 20), (70, 50, 30), (60, 90, 120), (70, 100, 60)], np.float32)),
        frame=jitter(pick(FRAMES), 8), lens_r=u(0.26, 0.34), lens_aspect=u(0.7, 1.0), frame_th=rng.integers(1, 3, n),
        blur=u(0, 0.9) + shift, light_angle=u(0, 2 * np.pi), light=u(0, 0.35) + 0.3 * shift,
        gain=(u(0.8, 1.15) - 0.25 * shift) * np.where(dark, DARK_GAIN, 1).astype(np.float32),
        veil=np.where(dark, DARK_VEIL, 0).astype(np.float32), noise=u(2, 7) + 8 * shift,
    )


def _draw_face(img, f):
    """Draw one face on img (uint8 HxWx3, background already there) with cv2 primitives, antialiased and placed with
    sub-pixel precision (coordinates in 1/16 pixel, cv2's shift=4). f: this face's parameters (Python scalars)."""
    cx, cy, fw, fh, yaw = f["cx"], f["cy"], f["fw"], f["fh"], f["yaw"]
    c, s, deg = math.cos(f["roll"]), math.sin(f["roll"]), math.degrees(f["roll"])

    def at(u, v):  # face coordinates (pixels, x right, y down, origin at the face centre) -> fixed-point image point
        return round((cx + c * u - s * v) * 16), round((cy + s * u + c * v) * 16)

    def ell(u, v, a, b, col, th=-1, a0=0, a1=360):
        cv2.ellipse(img, at(u, v), (round(a * 16), round(b * 16)), deg, a0, a1, col, th, cv2.LINE_AA, 4)

    def line(u0, v0, u1, v1, col, th=1):
        cv2.line(img, at(u0, v0), at(u1, v1), col, th, cv2.LINE_AA, 4)

    skin, hair = f["skin"], f["hair"]
    shade = lambda col, k: tuple(x * k for x in col)
    if f["distractor"]:  # a ring or a blob behind the person: rings and yellow patches alone mean nothing
        p = (round(f["dis_xy"][0] * 16), round(f["dis_xy"][1] * 16))
        r = round(f["dis_r"] * 16)
        cv2.circle(img, p, r, f["dis_col"], 2 if f["distractor"] == 1 else -1, cv2.LINE_AA, 4)
    ell(0, 2.2 * fh, 2.1 * fw, 0.95 * fh, f["cloth"])  # shoulders
    ell(0, 1.05 * fh, 0.48 * fw, 0.6 * fh, shade(skin, 0.85))  # neck
    if f["long_hair"]:
        ell(0, 0.5 * fh, 1.45 * fw, 1.4 * fh, shade(hair, 0.9))  # hair falling behind the shoulders
    for side in (-1, 1):
        ell(side * 0.98 * fw, 0.05 * fh, 0.16 * fw, 0.22 * fh, shade(skin, 0.93))  # ears
    ell(0, 0, fw, fh, skin)
    jaw = f["jaw"] * fw  # men: wide square jaw; women: narrow chin
    cv2.fillConvexPoly(img, np.array([at(-0.97 * fw, 0), at(0.97 * fw, 0), at(jaw, 0.92 * fh), at(-jaw, 0.92 * fh)]),
                       skin, cv2.LINE_AA, 4)
    ell(0, -0.05 * fh, f["hair_w"] * fw, f["hair_h"] * fh, hair, a0=180, a1=360)  # hair on top of the head
    ell(0, f["hairline"] * fh, 0.9 * fw, 0.8 * fh, skin, a0=180, a1=360)  # forehead below the hairline
    if f["long_hair"]:
        for side in (-1, 1):
            ell(side * 1.0 * fw, 0.3 * fh, 0.26 * fw, 0.8 * fh, hair)  # locks framing the face
    if f["beard"]:
        ell(0, 0.3 * fh, 0.93 * fw, 0.72 * fh, shade(hair, 0.8), a0=0, a1=180)
    ex, ey = 0.4 * fw, -0.12 * fh
    dx = 0.18 * yaw * fw  # turning the head moves the features sideways
    for side in (-1, 1):
        line(dx + side * ex - 0.2 * fw, ey - 0.2 * fh, dx + side * ex + 0.2 * fw, ey - 0.23 * fh, shade(hair, 0.75), 2)
        ell(dx + side * ex, ey, 0.17 * fw, 0.08 * fh, (236, 236, 232))
        ell(dx + side * ex, ey, 0.075 * fw, 0.075 * fw, f["eye"])
    line(1.5 * dx, -0.02 * fh, 1.8 * dx, 0.28 * fh, shade(skin, 0.72))  # nose
    ell(1.2 * dx, 0.56 * fh, 0.3 * fw, 0.07 * fh, f["lips"])
    if f["glasses"]:
        rx = f["lens_r"] * fw
        ry = rx * f["lens_aspect"]
        for side in (-1, 1):
            if f["sunglasses"]:
                ell(dx + side * ex, ey, rx, ry, (22, 22, 26))
            ell(dx + side * ex, ey, rx, ry, f["frame"], f["frame_th"])
            line(dx + side * (ex + rx), ey, side * 0.98 * fw, ey - 0.03 * fh, f["frame"], f["frame_th"])  # temples
        line(dx - ex + rx, ey, dx + ex - rx, ey, f["frame"], f["frame_th"])  # bridge
    if f["blur"] > 0.3:
        cv2.GaussianBlur(img, (0, 0), f["blur"], dst=img)


def draw_faces(attrs, rng, size=80, shift=0.0, chunk=32, skin_tones=0):
    """uint8 [n, size, size, 3] faces showing `attrs` (rows of SYNTH_ATTRS, then the tone bin when skin_tones > 0).
    Shapes are drawn per image with cv2 (fast C primitives); background, light and noise are computed with numpy a
    chunk of images at a time (small enough to stay in cache, which makes them several times faster than over the
    whole batch)."""
    p = _face_params(attrs, rng, size, shift, skin_tones)
    rows = {k: v.tolist() for k, v in p.items()}
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    ramp = lambda angle: np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy  # [n, H, W] in +-0.71
    out = np.empty((len(attrs), size, size, 3), np.uint8)
    for i in tqdm(range(0, len(attrs), chunk), desc="drawing faces", unit="chunk", mininterval=1, leave=False,
                  disable=None):
        j = slice(i, i + chunk)
        t = ramp(p["bg_angle"][j])[..., None] + 0.5
        out[j] = np.clip(p["bg0"][j, None, None] + (p["bg1"][j] - p["bg0"][j])[:, None, None] * t, 0, 255)
        for k in range(i, min(i + chunk, len(attrs))):
            _draw_face(out[k], {key: v[k] for key, v in rows.items()})
        light = p["gain"][j, None, None] * (1 + p["light"][j, None, None] * ramp(p["light_angle"][j]))  # exposure
        x = rng.standard_normal(out[j].shape, np.float32)  # sensor noise
        x *= p["noise"][j, None, None, None]
        x += out[j] * light[..., None] + p["veil"][j, None, None, None]
        out[j] = np.clip(x, 0, 255, out=x)
    return out
