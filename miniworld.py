"""miniworld: a procedural image-text world and a tiny CLIP pretrained on it.

Stand-in for (CLIP, LAION, ImageNet and its shifts) on a machine with no GPU and no downloads.

The world. Every 32x32 RGB image shows one object: SHAPE x COLOUR = 12 x 8 = 96 classes ("red star"),
drawn in one of 5 STYLES (photo: textured background, shading, drop shadow, sensor noise; sketch: paper,
hatching and outline strokes in the object's colour; cartoon: flat fill, thick dark outline; painting:
blur, colour jitter, brush streaks; pixel: blocky, posterised), on one of 8 named BACKGROUNDS (grass,
sand, sky, brick, snow, night, wood, water), with a fill PATTERN (solid/striped/dotted/checkered), a
size, a position and a rotation. Rendering is vectorised numpy, deterministic from (seed, index) via a
counter-based hash RNG, and cached as .npy under cache_dir(), keyed by a hash of the world config.
Every image has captions re-sampled from a grammar of style/background/pattern/size/position phrases,
synonyms and filler sentences (a vocabulary of several hundred words, see WordTokenizer).

The tiny CLIP is open_clip's own CLIP class, config `miniclip` (assets/miniclip.json: ViT patch 8, width
128, 4 layers, embed 128; 2-layer text tower, context 24) with the word-level WordTokenizer (421 ids,
<eot> highest, unknown words raise). Pretrained with open_clip's ClipLoss on 60k captioned corpus images of
all styles / classes / attributes, batches made of groups of 8 images sharing (style, background, colour)
so that shape, pattern, size and position must be read too. Rebuild the committed checkpoint with

    python miniworld.py pretrain            # writes assets/miniclip.pt (1500 steps x 256)

(8.0 min on this 2-core machine when it is otherwise idle). The learned logit scale ended at 24.8.
PREPROCESS gives the normalisation.

The downstream task (load_task), shaped like ImageNet and its shifts (chance level in brackets):
  train     kind train    20 classes = 5 shapes x 4 colours, photo style, 10k images, spurious cue: 90% of
                          each class on its own background. Its "captions" stand in for a captioner's
                          output (ARF's text-compensated anchors), sampled from the same caption grammar.
  heldout   kind heldout  1k, same distribution as train, for model selection (never select on test).
  id        kind id       2k, same distribution as train (5%).
  sketch / cartoon / painting / pixel   kind ood   1.5k each, the 20 classes in the other styles, random
                          background (5%).
  anticue   kind ood      1.5k, photo style, every image on a background that is NOT its class's (5%).
  zs_classes  kind zeroshot  1.5k, 16 classes whose shapes AND colours never occur in fine-tuning (6.25%).
  zs_pattern  kind zeroshot  1.5k, 4-way fill pattern (solid/striped/dotted/checkered) of large objects of
                          any class, own templates: an attribute the downstream task does not need (25%).
The task shapes were chosen (from the checkpoint's per-shape zero-shot accuracy) so zero-shot sits near
70%: room for fine-tuning to gain 20+ points in distribution.

Measured with the repo's own recipes (`python bench/reproduce.py`, RESULTS.md; FT = baselines.py
--method ft: image tower + head initialised from the zero-shot head, 300 steps x batch 128, lr 1e-4,
RandomResizedCrop scale (0.5, 1); mean of seeds 0, 1, 2):
                 id    sketch cartoon painting pixel anticue | OOD mean | zs_classes zs_pattern
  zero-shot      69.2  69.5   74.9    72.7     67.6  76.6    | 72.3     | 72.7       52.1
  FT (3 seeds)   95.3  43.3   58.6    59.8     58.4  55.9    | 55.2     | 61.6       47.4
  FT - ZS       +26.1                                        | -17.1    | -11.1      -4.7

Other entry points: write_pool(out_dir) (ARF retrieval pool, PNG + TSV), `python miniworld.py pool --out
DIR`, `python miniworld.py show --out grid.png`.
"""
import argparse
import hashlib
import json
import math
import os
import random
import re
import time
import zlib
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------------
# Knobs
ASSETS = Path(__file__).resolve().parent / "assets"
CONFIG_JSON = ASSETS / "miniclip.json"
CHECKPOINT = ASSETS / "miniclip.pt"
RENDER_VERSION = 2  # bump when the renderer changes so cached arrays are rebuilt

IMAGE_SIZE = 32
SUPERSAMPLE = 2  # draw at 2x and average-pool: anti-aliased edges
SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond",
          "ring", "crescent", "heart", "arrow", "hexagon", "bar"]
COLOURS = {"red": (0.88, 0.12, 0.10), "orange": (0.98, 0.55, 0.08), "yellow": (0.97, 0.88, 0.12),
           "green": (0.15, 0.70, 0.20), "cyan": (0.10, 0.80, 0.85), "blue": (0.12, 0.25, 0.90),
           "purple": (0.55, 0.18, 0.78), "pink": (0.98, 0.50, 0.72)}
STYLES = ["photo", "sketch", "cartoon", "painting", "pixel"]
BACKGROUNDS = ["grass", "sand", "sky", "brick", "snow", "night", "wood", "water"]
PATTERNS = ["solid", "striped", "dotted", "checkered"]
SIZES = {"small": 0.50, "medium": 0.64, "large": 0.80}  # object radius, in half-image units
MAX_TILT = 35  # degrees; free rotation makes shapes too hard for a tiny ViT to learn in minutes

CONTEXT_LENGTH = 24
PREPROCESS = dict(size=IMAGE_SIZE, mean=(0.50, 0.50, 0.45), std=(0.26, 0.25, 0.28))
AUG_SCALE = (0.7, 1.0)  # RandomResizedCrop scale range used in pretraining (and the FT preset)

PRETRAIN_SEED = 1
POOL_SEED = 2
PRETRAIN_IMAGES = 60_000
PRETRAIN_STEPS = 1500
PRETRAIN_BATCH = 256
PRETRAIN_LR = 1e-3
PRETRAIN_WD = 0.1
PRETRAIN_GROUP = 8  # images per (style, background, colour) group in a pretraining batch

TASK_SHAPES = ["triangle", "diamond", "ring", "hexagon", "bar"]
TASK_COLOURS = ["red", "yellow", "green", "blue"]
ZS_SHAPES = ["circle", "cross", "crescent", "arrow"]  # never seen in fine-tuning ...
ZS_COLOURS = ["orange", "cyan", "purple", "pink"]   # ... and neither are these colours
CUE_STRENGTH = 0.9  # fraction of train images on their class's own background
TASK_SIZES = dict(train=10_000, heldout=1_000, id=2_000, ood=1_500, zeroshot=1_500)
TASK_TEMPLATES = ["a photo of the {}.", "a photograph of a {}.", "a sketch of the {}.",
                  "a pencil drawing of a {}.", "a cartoon of the {}.", "an illustration of a {}.",
                  "a painting of the {}.", "a pixel art of the {}.", "a photo of the {} on the grass.",
                  "a photo of the {} in the snow.", "a photo of the {} at night.",
                  "a photo of a small {}.", "a photo of a large {}.", "a photo of a striped {}."]
PATTERN_TEMPLATES = ["a photo of a {} object.", "a {} shape.", "the shape is {}.", "the object is {}.",
                     "an object with a {} pattern.", "a picture of a {} thing."]


def cache_dir() -> Path:
    path = Path(os.environ.get("ROBUSTFT_CACHE", Path.home() / ".cache" / "robust-ft"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def world_config() -> dict:
    """Everything the rendered pixels depend on; its hash keys the caches."""
    return dict(version=RENDER_VERSION, size=IMAGE_SIZE, ss=SUPERSAMPLE, shapes=SHAPES, colours=COLOURS,
                styles=STYLES, backgrounds=BACKGROUNDS, patterns=PATTERNS, sizes=SIZES, tilt=MAX_TILT)


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------------
# Counter-based RNG: U[0,1) = hash(keys). Any pixel's noise depends only on (seed, index, salt, y, x),
# so rendering is deterministic whatever the batch composition, and fully vectorised.
def _key(k):
    if isinstance(k, str):
        return np.uint64(zlib.crc32(k.encode()))
    return np.asarray(k).astype(np.uint64)


def _uniform(*keys) -> np.ndarray:
    with np.errstate(over="ignore"):
        h = np.uint64(0x9E3779B97F4A7C15)
        for k in keys:
            h = h ^ (_key(k) + np.uint64(0x632BE59BD9B4E019))
            h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)  # splitmix64 finaliser
            h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            h = h ^ (h >> np.uint64(31))
    return ((h >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / 2 ** 24))


def _value_noise(key, salt, cells, yy, xx) -> np.ndarray:
    """Smooth noise in [0,1): hashed lattice values, bilinearly interpolated. key [B,1,1] -> [B,H,W]."""
    cy, cx = (cells, cells) if np.isscalar(cells) else cells
    gy, gx = np.broadcast_arrays(yy * cy, xx * cx)
    iy, ix = np.floor(gy).astype(np.int64), np.floor(gx).astype(np.int64)
    fy, fx = gy - iy, gx - ix
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)
    y0, x0 = iy.min(), ix.min()  # hash only the lattice points in range (keys offset to stay >= 0)
    lat = _uniform(key, salt, np.arange(y0, iy.max() + 2)[:, None] + 1000,
                   np.arange(x0, ix.max() + 2)[None, :] + 1000)  # [B,ny,nx]
    b = np.arange(lat.shape[0]).reshape(-1, *([1] * (iy.ndim - 1 if iy.ndim == 3 else 2)))
    iy, ix = iy - y0, ix - x0
    c00, c01, c10, c11 = lat[b, iy, ix], lat[b, iy, ix + 1], lat[b, iy + 1, ix], lat[b, iy + 1, ix + 1]
    top, bot = c00 + (c01 - c00) * fx, c10 + (c11 - c10) * fx
    return top + (bot - top) * fy


def _mix(a, b, t):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a + (b - a) * t


# ----------------------------------------------------------------------------------------------------
# Attributes
def sample_attrs(seed: int, index, **fixed) -> dict:
    """Attributes of images `index` (uniform over everything unless fixed, e.g. style=np.zeros(N))."""
    idx = np.asarray(index, dtype=np.int64)
    u = lambda salt: _uniform(seed, idx, salt)  # noqa: E731
    a = dict(shape=(u("shape") * len(SHAPES)).astype(np.int64),
             colour=(u("colour") * len(COLOURS)).astype(np.int64),
             style=(u("style") * len(STYLES)).astype(np.int64),
             bg=(u("bg") * len(BACKGROUNDS)).astype(np.int64),
             pattern=(u("pattern") * len(PATTERNS)).astype(np.int64),
             size=(u("size") * len(SIZES)).astype(np.int64),
             # a quarter stand exactly upright ("upright" in a caption means something); the rest lean a little
             angle=np.where(u("upright") < 0.25, 0.0, (u("angle") - 0.5) * 2 * math.radians(MAX_TILT)))
    for k, v in fixed.items():
        a[k] = np.broadcast_to(np.asarray(v), idx.shape).copy()
    radius = np.array(list(SIZES.values()))[a["size"]] * (0.92 + 0.16 * u("rjit"))
    a.setdefault("radius", radius)
    a.setdefault("cx", (u("cx") * 2 - 1) * (1 - radius) * 0.9)  # keep most of the object inside
    a.setdefault("cy", (u("cy") * 2 - 1) * (1 - radius) * 0.9)
    return a


# ----------------------------------------------------------------------------------------------------
# Renderer
def _shape_mask(shape: str, u, v):
    """Inside-test in object-local coordinates (unit radius, y down)."""
    r, ang = np.hypot(u, v), np.arctan2(v, u)

    def polygon(n, R, phase=-math.pi / 2):
        a = np.mod(ang - phase, 2 * math.pi / n) - math.pi / n
        return r * np.cos(a) < R * math.cos(math.pi / n)

    if shape == "circle":
        return r < 0.9
    if shape == "square":
        return np.maximum(abs(u), abs(v)) < 0.72
    if shape == "triangle":
        return polygon(3, 0.98)
    if shape == "star":
        p = np.mod((ang + math.pi / 2) * 5 / (2 * math.pi), 1.0)
        d = 2 * np.minimum(p, 1 - p)  # 0 at a tip, 1 between tips
        return r < 1.0 * (1 - d) + 0.42 * d
    if shape == "cross":
        return ((abs(u) < 0.3) & (abs(v) < 0.92)) | ((abs(v) < 0.3) & (abs(u) < 0.92))
    if shape == "diamond":  # a narrow rhombus: a rotated square would be a "square"
        return abs(u) / 0.58 + abs(v) / 1.0 < 1
    if shape == "ring":
        return (r < 0.92) & (r > 0.52)
    if shape == "crescent":
        return (r < 0.92) & (np.hypot(u - 0.42, v - 0.1) > 0.72)
    if shape == "heart":
        x, y = u * 1.2, -v * 1.2 + 0.25
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 < 0
    if shape == "arrow":
        shaft = (u > -0.95) & (u < 0.1) & (abs(v) < 0.2)
        head = (u >= 0.0) & (u < 0.95) & (abs(v) < (0.95 - u) * 0.7)
        return shaft | head
    if shape == "hexagon":
        return polygon(6, 0.92, 0.0)
    if shape == "bar":
        return (abs(u) < 0.95) & (abs(v) < 0.3)
    raise ValueError(shape)


def _pattern_mask(pattern: str, u, v):
    if pattern == "solid":
        return np.zeros_like(u, dtype=bool)
    if pattern == "striped":
        return np.mod(u * 1.5, 1.0) < 0.5
    if pattern == "dotted":
        return np.hypot(np.mod(u / 0.62, 1) - 0.5, np.mod(v / 0.62, 1) - 0.5) < 0.3
    if pattern == "checkered":
        return (np.floor(u / 0.48) + np.floor(v / 0.48)) % 2 == 0
    raise ValueError(pattern)


BG_BASE = {"grass": (0.30, 0.55, 0.20), "sand": (0.85, 0.76, 0.52), "sky": (0.50, 0.70, 0.95),
           "brick": (0.62, 0.26, 0.18), "snow": (0.93, 0.95, 0.98), "night": (0.06, 0.07, 0.20),
           "wood": (0.56, 0.36, 0.18), "water": (0.14, 0.36, 0.62)}


def _background(kind: str, key, yy, xx) -> np.ndarray:
    """Textured background [B,H,W,3] in [0,1]; yy, xx in [0,1) of shape [H,W]; key [B,1,1]."""
    n = lambda salt, cells: _value_noise(key, salt, cells, yy, xx)[..., None]  # noqa: E731
    ph = lambda salt: _uniform(key, salt)[..., None]  # [B,1,1,1] per-image phase  # noqa: E731
    base = np.array(BG_BASE[kind], np.float32)
    if kind == "grass":  # vertical blades over clumps
        return _mix(base * 0.55, base * 1.45, 0.6 * n("blade", (3, 40)) + 0.4 * n("clump", 6))
    if kind == "sand":
        return base * (0.9 + 0.12 * n("dune", (3, 2)) + 0.1 * n("grain", 48) - 0.05)
    if kind == "sky":
        sky = _mix((0.30, 0.52, 0.92), (0.70, 0.84, 1.0), yy[..., None])
        cloud = np.clip((n("cloud", 5) - 0.55) * 4, 0, 1)
        return _mix(sky, (0.98, 0.98, 1.0), cloud)
    if kind == "brick":
        ry = yy[..., None] * 5 + ph("row")
        row = np.floor(ry)
        rx = xx[..., None] * 3 + ph("col") + 0.5 * (row % 2)
        mortar = (np.mod(ry, 1) < 0.14) | (np.mod(rx, 1) < 0.06)
        shade = 0.8 + 0.4 * _uniform(key[..., None], "brick", row + 100, np.floor(rx) + 100)
        return np.where(mortar, (0.80, 0.78, 0.72), base * shade)
    if kind == "snow":
        return base * (0.9 + 0.1 * n("drift", 4)) - 0.15 * (_uniform(key, "flake", yy * 999, xx * 999)[..., None] > 0.9) * (0.5, 0.4, 0.2)
    if kind == "night":
        star = _uniform(key, "star", yy * 999, xx * 999)[..., None] > 0.985
        return np.where(star, (0.95, 0.95, 0.8), base * (0.7 + 0.6 * n("haze", 3)))
    if kind == "wood":
        warp = 2.0 * n("warp", (2, 3))
        grain = 0.5 + 0.5 * np.sin((yy[..., None] * 14 + warp + ph("grain") * 6) * 2 * math.pi)
        return base * (0.75 + 0.35 * grain)
    if kind == "water":
        wave = np.sin((yy[..., None] * 9 + 0.6 * np.sin(xx[..., None] * 9 + ph("wave") * 6)) * 2 * math.pi)
        return _mix(base * 0.8, (0.55, 0.75, 0.95), np.clip(wave - 0.6, 0, 1) * 1.5 + 0.1 * n("ripple", 8))
    raise ValueError(kind)


def _dilate(mask, k):  # [B,H,W] bool -> bool, square structuring element of radius k
    t = torch.from_numpy(mask.astype(np.float32))[:, None]
    return F.max_pool2d(t, 2 * k + 1, 1, k)[:, 0].numpy() > 0.5


def _blur(img, k):  # [B,H,W,C] float -> box blur of radius k
    t = torch.from_numpy(img.astype(np.float32)).permute(0, 3, 1, 2)
    t = F.pad(t, (k, k, k, k), mode="replicate")
    t = F.avg_pool2d(F.avg_pool2d(t, (1, 2 * k + 1), 1), (2 * k + 1, 1), 1)  # separable: 2k+2 reads, not (2k+1)^2
    return t.permute(0, 2, 3, 1).numpy()


def render(attrs: dict, seed: int, index) -> np.ndarray:
    """Draw images for `attrs` (see sample_attrs); noise is keyed by (seed, index). -> uint8 [B,32,32,3]."""
    idx = np.asarray(index, dtype=np.int64)
    B, H = len(idx), IMAGE_SIZE * SUPERSAMPLE
    key = (_uniform(seed, idx, "image") * 2 ** 52).astype(np.int64)[:, None, None]  # [B,1,1]
    grid = ((np.arange(H) + 0.5) / H).astype(np.float32)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")  # [H,W]
    img = np.zeros((B, H, H, 3), np.float32)
    for b, kind in enumerate(BACKGROUNDS):
        sel = attrs["bg"] == b
        if sel.any():
            img[sel] = _background(kind, key[sel], yy, xx)

    # object-local coordinates: unit radius, rotated with the object
    X, Y = xx * 2 - 1, yy * 2 - 1  # [H,W] in [-1,1]
    col = lambda k: attrs[k].astype(np.float32)[:, None, None]  # noqa: E731
    c, s, r = np.cos(col("angle")), np.sin(col("angle")), col("radius")
    dx, dy = X - col("cx"), Y - col("cy")  # [B,H,W]
    u, v = (c * dx + s * dy) / r, (-s * dx + c * dy) / r
    sh = np.float32(0.09)  # drop-shadow offset (down-right)
    su, sv = (c * (dx - sh) + s * (dy - sh)) / r, (-s * (dx - sh) + c * (dy - sh)) / r
    mask, shadow, pat = (np.zeros((B, H, H), bool) for _ in range(3))
    for k, name in enumerate(SHAPES):
        sel = attrs["shape"] == k
        if sel.any():
            mask[sel] = _shape_mask(name, u[sel], v[sel])
            shadow[sel] = _shape_mask(name, su[sel], sv[sel])
    for k, name in enumerate(PATTERNS):
        sel = attrs["pattern"] == k
        if sel.any():
            pat[sel] = _pattern_mask(name, u[sel], v[sel])
    colour = np.array(list(COLOURS.values()), np.float32)[attrs["colour"]][:, None, None, :]  # [B,1,1,3]
    fill = np.where(pat[..., None], colour * 0.42, colour)  # dark pattern keeps the hue readable
    m = mask[..., None]
    noise = lambda kk, salt: _uniform(kk[..., None], salt, yy[..., None] * 999, xx[..., None] * 999, np.arange(3))  # noqa: E731

    out = np.empty_like(img)
    for k, style in enumerate(STYLES):
        sel = attrs["style"] == k
        if not sel.any():
            continue
        bg, f, mk, kk = img[sel], fill[sel], m[sel], key[sel]
        if style == "photo":
            soft = _blur(shadow[sel][..., None].astype(np.float32), 2)
            bg = bg * (1 - 0.5 * soft)
            light = 1.1 - 0.25 * (u[sel] + v[sel])[..., None] / 2  # lit from the top left
            o = np.where(mk, f * np.clip(light, 0.7, 1.3), bg)
            o = o + (noise(kk, "grain") - 0.5) * 0.12
        elif style == "sketch":
            paper = 0.94 + 0.04 * (noise(kk, "paper")[..., :1] - 0.5)
            o = paper * 0.78 + bg * 0.22  # the background survives as a faint wash
            edge = _dilate(mask[sel], 1) & _dilate(~mask[sel], 1)  # a thin band across the contour
            hatch = np.mod((xx + yy) * 8, 1.0)[None, ..., None] < 0.3
            cross = np.mod((xx - yy) * 8, 1.0)[None, ..., None] < 0.3
            ink = f / np.maximum(f.max(-1, keepdims=True), 1e-3) * 0.8  # full-strength hue of the fill
            strokes = mk & (hatch | (cross & pat[sel][..., None]))
            o = np.where(mk, o * 0.85 + 0.15 * f, o)
            o = np.where(strokes | edge[..., None], ink, o)
        elif style == "cartoon":
            flat = np.array([BG_BASE[b] for b in BACKGROUNDS], np.float32)[attrs["bg"][sel]][:, None, None, :]
            o = flat + (bg - flat) * 0.25  # simplified, almost flat backdrop
            outline = _dilate(mask[sel], 5) & ~mask[sel]
            o = np.where(mk, np.clip(f * 1.1, 0, 1), o)
            o = np.where(outline[..., None], 0.08, o)
        elif style == "painting":
            o = np.where(mk, f, bg)
            ang = _uniform(kk, "stroke")[..., None] * math.pi
            streak = _value_noise(kk, "streak", (3, 24), np.cos(ang[..., 0]) * yy + np.sin(ang[..., 0]) * xx + 1,
                                  -np.sin(ang[..., 0]) * yy + np.cos(ang[..., 0]) * xx + 1)[..., None]
            o = o * (0.82 + 0.36 * streak)
            gain = 0.85 + 0.3 * _uniform(kk[..., None], "jitter", np.arange(3))  # [b,1,1,3] colour jitter
            o = _blur(o * gain, 3)
        else:  # pixel: flat colours, then blocks and posterisation after downsampling
            flat = np.array([BG_BASE[b] for b in BACKGROUNDS], np.float32)[attrs["bg"][sel]][:, None, None, :]
            o = np.where(mk, f, flat + (bg - flat) * 0.5)
        out[sel] = o

    t = torch.from_numpy(np.clip(out, 0, 1).astype(np.float32)).permute(0, 3, 1, 2)
    t = F.avg_pool2d(t, SUPERSAMPLE)  # [B,3,32,32]
    pix = torch.from_numpy(attrs["style"] == STYLES.index("pixel"))
    if pix.any():
        blocks = F.interpolate(F.avg_pool2d(t[pix], 2), scale_factor=2, mode="nearest")
        t[pix] = torch.round(blocks * 4) / 4
    return (t.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


def render_batch(seed: int, index, **fixed):
    """Sample attributes and render: -> (uint8 [B,32,32,3], attrs)."""
    a = sample_attrs(seed, index, **fixed)
    return render(a, seed, index), a


def render_many(seed: int, index, chunk: int = 1024, progress: bool = False, **fixed):
    """render_batch in memory-bounded chunks (a 64x64 float canvas per image while drawing)."""
    index = np.asarray(index)
    a = sample_attrs(seed, index, **fixed)
    parts = []
    for i in tqdm(range(0, len(index), chunk), desc="render", disable=not progress):
        parts.append(render({k: v[i:i + chunk] for k, v in a.items()}, seed, index[i:i + chunk]))
    return np.concatenate(parts), a


# ----------------------------------------------------------------------------------------------------
# Captions: a small grammar with synonyms, so the text side can describe every nuisance factor.
STYLE_PHRASES = {
    "photo": ["a photo of", "a photograph of", "a snapshot of", "a close up photo of", "a camera picture of",
              "a realistic photo of", "a grainy photo of", "a bright photo of", "a digital photo of"],
    "sketch": ["a sketch of", "a pencil drawing of", "a line drawing of", "a pencil sketch of",
               "an ink drawing of", "a hand drawn sketch of", "a rough doodle of", "a hatched drawing of"],
    "cartoon": ["a cartoon of", "a clipart of", "an illustration of", "a comic drawing of",
                "a vector graphic of", "a flat icon of", "a sticker of", "an animated cartoon of"],
    "painting": ["a painting of", "an oil painting of", "a watercolor of", "an acrylic painting of",
                 "an impressionist painting of", "a canvas painting of", "an artwork of", "a brush painting of"],
    "pixel": ["a pixel art of", "a pixel art image of", "a retro game sprite of", "an eight bit image of",
              "a low resolution render of", "a blocky mosaic of", "a pixelated image of", "a video game sprite of"]}
STYLE_DETAILS = {
    "photo": ["with a soft shadow", "with natural lighting", "taken with a camera", "with realistic shading",
              "with film grain", "casting a shadow"],
    "sketch": ["drawn with thin lines", "with pencil hatching", "on white paper", "with scribbled strokes",
               "with coloured pencil lines", "with crosshatched shading"],
    "cartoon": ["with a thick black outline", "with flat colours", "with bold outlines", "in a simple flat style",
                "with crisp edges", "with a dark border"],
    "painting": ["with visible brush strokes", "with smeared paint", "with soft blurry edges",
                 "in an artistic style", "with rich textures", "with dabs of paint"],
    "pixel": ["with chunky pixels", "with jagged edges", "in a retro style", "with a limited palette",
              "with square blocks", "from an old computer game"]}
BG_PHRASES = {
    "grass": ["on the grass", "on a green lawn", "in a grassy meadow", "in a field of grass", "on the turf",
              "in a park"],
    "sand": ["on the sand", "on a sandy beach", "in the desert", "on golden dunes", "on dry sand",
             "near the seaside"],
    "sky": ["in the sky", "against a cloudy sky", "among the clouds", "up in the air", "under a bright sky",
            "high above the ground"],
    "brick": ["on a brick wall", "in front of bricks", "against a brick wall", "on old masonry",
              "beside a stone building", "on a wall of bricks"],
    "snow": ["in the snow", "on a snowy field", "on white snow", "in a winter landscape", "on frozen ground",
             "in a snowstorm"],
    "night": ["at night", "in the dark", "under a starry sky", "against the night sky", "at midnight",
              "in the darkness"],
    "wood": ["on wood", "on a wooden table", "on a plank floor", "on a timber board", "on an oak desk",
             "on the wooden floor"],
    "water": ["in the water", "on a lake", "floating on the sea", "on the waves", "in the ocean",
              "in a swimming pool"]}
SIZE_WORDS = {"small": ["small", "tiny", "little", "miniature", "petite"],
              "medium": ["medium", "medium sized", "regular sized", "ordinary", "average sized"],
              "large": ["large", "big", "huge", "giant", "enormous"]}
PATTERN_ADJS = {"solid": ["solid", "plain", "unpatterned", "uniformly coloured"],
                "striped": ["striped", "stripy", "banded", "pinstriped"],
                "dotted": ["dotted", "spotted", "polka dot", "speckled"],
                "checkered": ["checkered", "checked", "chequered", "plaid"]}
PATTERN_PHRASES = {"solid": ["with no pattern", "in a single plain colour", "with a solid fill"],
                   "striped": ["with stripes", "with a striped pattern", "covered in stripes"],
                   "dotted": ["with dots", "with a dotted pattern", "covered in polka dots"],
                   "checkered": ["with a checkerboard pattern", "with a checkered pattern", "covered in squares"]}
SHAPE_FACTS = {
    "circle": ["that is perfectly round", "shaped like a coin", "with a smooth curved outline"],
    "square": ["with four equal sides", "shaped like a tile", "with four sharp corners"],
    "triangle": ["with three sides", "with three pointy corners", "shaped like a pyramid"],
    "star": ["with five points", "that looks like a starfish", "with five sharp spikes"],
    "cross": ["with two crossing arms", "shaped like a plus sign", "with four short arms"],
    "diamond": ["shaped like a kite", "with two long sharp tips", "that looks like a rhombus"],
    "ring": ["with a hole in the middle", "that is hollow like a donut", "shaped like a wheel"],
    "crescent": ["curved like the moon", "that is a thin curved sliver", "shaped like a banana"],
    "heart": ["that is a symbol of love", "with two round lobes", "with a pointed bottom"],
    "arrow": ["with a pointed head", "pointing in one direction", "that looks like a signpost"],
    "hexagon": ["with six sides", "shaped like a honeycomb cell", "with six corners"],
    "bar": ["that is long and thin", "shaped like a stick", "that looks like a narrow rectangle"]}
COLOUR_FACTS = {
    "red": ["like a ripe tomato", "bright crimson", "the colour of fire"],
    "orange": ["like a pumpkin", "the colour of a carrot", "warm tangerine"],
    "yellow": ["like a lemon", "sunny golden", "the colour of a banana"],
    "green": ["like a fresh leaf", "the colour of emerald", "lime tinted"],
    "cyan": ["like a tropical lagoon", "turquoise tinted", "aqua coloured"],
    "blue": ["the colour of sapphire", "deep navy", "like a blueberry"],
    "purple": ["like a grape", "violet tinted", "the colour of lavender"],
    "pink": ["like bubblegum", "rosy tinted", "the colour of a flamingo"]}
ROTATION_WORDS = {True: ["upright", "standing straight", "not rotated", "level"],
                  False: ["tilted", "rotated", "slanted", "askew", "turned at an angle"]}
ROWS = {0: ["top", "upper"], 1: ["middle", "center"], 2: ["bottom", "lower"]}
COLS = {0: ["left"], 1: ["center", "middle"], 2: ["right"]}
OPENERS = ["here is", "there is", "this shows", "you can see", "look at", "we see", "i see", "here we have",
           "this image shows", "the picture shows", "someone made", "my friend made", "check out", "behold"]
COMMENTS = ["what a nice picture.", "i like it.", "it looks simple.", "very pretty.", "the colours are vivid.",
            "nothing else is visible.", "it is the only object.", "a lovely scene.", "quite a strange image.",
            "it looks cute.", "the object stands out.", "a clean composition.", "kids would love it.",
            "an old favourite.", "it seems to glow.", "simple but charming.", "not very detailed.",
            "a calm and quiet mood.", "the lighting is odd.", "i found it online.", "the edges are sharp.",
            "it was made quickly.", "a gift for my sister.", "an example from a textbook.", "a colourful little thing.",
            "it reminds me of summer.", "my teacher drew this.", "a nice example of geometry.", "the background is busy.",
            "the background is plain.", "hard to see at first.", "easy to recognise."]


def _an(words: list) -> list:
    """a -> an before a vowel."""
    return [("an" if w == "a" and i + 1 < len(words) and words[i + 1][0] in "aeiou"
             and not words[i + 1].startswith("uni") else w) for i, w in enumerate(words)]


def _position_phrase(cx, cy, rng) -> str:
    col, row = int(np.digitize(cx, [-0.25, 0.25])), int(np.digitize(cy, [-0.25, 0.25]))
    if row == 1 and col == 1:
        return rng.choice(["in the center", "in the middle", "right in the middle", "centered in the frame"])
    if row == 1:
        return rng.choice([f"on the {COLS[col][0]}", f"on the {COLS[col][0]} side", f"to the {COLS[col][0]}"])
    if col == 1:
        return rng.choice([f"at the {ROWS[row][0]}", f"near the {ROWS[row][0]}", f"in the {ROWS[row][1]} part"])
    return f"in the {rng.choice(ROWS[row])} {COLS[col][0]} corner"


def caption(a: dict, i: int, rng: random.Random) -> str:
    """One random caption of image i of attribute arrays a. Always contains the class name '<colour> <shape>'."""
    shape, colour = SHAPES[a["shape"][i]], list(COLOURS)[a["colour"][i]]
    style, bg, pattern = STYLES[a["style"][i]], BACKGROUNDS[a["bg"][i]], PATTERNS[a["pattern"][i]]
    adjs = []
    if rng.random() < 0.45:
        adjs.append(rng.choice(SIZE_WORDS[list(SIZES)[a["size"][i]]]))
    p = rng.random()
    if p < 0.35:
        adjs.append(rng.choice(PATTERN_ADJS[pattern]))
    obj = " ".join([rng.choice(["a", "a", "the", "one", "this"])] + adjs + [colour, shape])
    clauses = []
    if 0.35 <= p < 0.65:
        clauses.append(rng.choice(PATTERN_PHRASES[pattern]))
    if rng.random() < 0.75:
        clauses.append(rng.choice(BG_PHRASES[bg]))
    if rng.random() < 0.4:
        clauses.append(_position_phrase(a["cx"][i], a["cy"][i], rng))
    if rng.random() < 0.2:
        clauses.append(rng.choice(ROTATION_WORDS[bool(a["angle"][i] == 0)]))
    if rng.random() < 0.3:
        clauses.append(rng.choice(STYLE_DETAILS[style]))
    if rng.random() < 0.2:
        clauses.append(rng.choice(SHAPE_FACTS[shape]))
    if rng.random() < 0.15:
        clauses.append(rng.choice(COLOUR_FACTS[colour]))
    rng.shuffle(clauses)
    sty = rng.choice(STYLE_PHRASES[style])
    comment = rng.choice(COMMENTS) if rng.random() < 0.25 else ""
    if rng.random() < 0.2:  # a generic "the object is striped." sentence ties pattern words to any object
        comment = f"the {rng.choice(['object', 'shape', 'thing'])} is {rng.choice(PATTERN_ADJS[pattern])}. " + comment
    while True:
        body = " ".join([obj] + clauses)
        texts = [f"{sty} {body}.",                                    # a photo of a red star on the grass.
                 f"{body}, {sty[:-3]}.",                              # a red star on the grass, a photo.
                 f"{rng.choice(OPENERS)} {body}. it is {sty[:-3]}.",  # here is a red star. it is a photo.
                 f"{sty[:-3]} showing {body}.",
                 f"{sty} {body}"]
        text = rng.choice(texts) + (" " + comment if comment else "")
        words = _an(_split(text))
        if len(words) <= CONTEXT_LENGTH - 2 or not (clauses or comment):
            return " ".join(words).replace(" .", ".").replace(" ,", ",")
        if comment:
            comment = ""
        else:
            clauses.pop()


def captions(a: dict, seed: int, index, epoch: int = 0) -> list:
    """Deterministic captions for images `index` (re-sampled per epoch)."""
    return [caption(a, i, random.Random(int(_uniform(seed, int(j), epoch, "caption") * 2 ** 24)))
            for i, j in enumerate(np.asarray(index))]


def _split(text: str) -> list:
    return re.findall(r"[a-z0-9]+|[.,!?]", text.lower())


def caption_words() -> list:
    """Every word the caption grammar, the task templates and the class names can produce (sorted)."""
    banks = [STYLE_PHRASES, STYLE_DETAILS, BG_PHRASES, SIZE_WORDS, PATTERN_ADJS, PATTERN_PHRASES, SHAPE_FACTS,
             COLOUR_FACTS, ROTATION_WORDS, ROWS, COLS]
    texts = [t for bank in banks for v in bank.values() for t in v]
    texts += OPENERS + COMMENTS + SHAPES + list(COLOURS) + ["a an the one this it is showing object shape thing"
                                                            " on to at near in part side corner right middle"
                                                            " centered frame , ."]
    return sorted({w for t in texts for w in _split(t.replace("{}", ""))})


class WordTokenizer:
    """Word-level tokenizer over exactly the caption vocabulary, laid out like CLIP's BPE:
    pad 0, words 1..V-3, <sot> V-2, <eot> V-1 (highest id: open_clip pools the text tower at argmax).
    Lowercases, splits on words and . , ! ?; an unknown word raises ValueError (no <unk>)."""

    def __init__(self, words=None, context_length: int = CONTEXT_LENGTH):
        self.vocab = ["<pad>"] + list(words or caption_words()) + ["<sot>", "<eot>"]
        self.vocab_size = len(self.vocab)
        self.pad_token_id, self.sot_token_id, self.eot_token_id = 0, self.vocab_size - 2, self.vocab_size - 1
        self.context_length = context_length
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    def encode(self, text: str) -> list:
        words = _split(text)
        unknown = [w for w in words if w not in self.ids or self.ids[w] in (0, self.sot_token_id, self.eot_token_id)]
        if unknown:
            raise ValueError(f"words not in the miniworld vocabulary: {sorted(set(unknown))} (text: {text!r})")
        return [self.ids[w] for w in words]

    def __call__(self, texts, context_length=None) -> torch.LongTensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        n = context_length or self.context_length
        out = torch.zeros(len(texts), n, dtype=torch.long)  # [N, n], zero padded
        for i, t in enumerate(texts):
            ids = [self.sot_token_id] + self.encode(t)[:n - 2] + [self.eot_token_id]
            out[i, :len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        return " ".join(self.vocab[i] for i in ids if i not in (self.pad_token_id, self.sot_token_id,
                                                                 self.eot_token_id))


# ----------------------------------------------------------------------------------------------------
# Tiny CLIP (open_clip's own CLIP class)
_REGISTERED = set()


def create_miniclip(cfg: dict = None):
    """open_clip.create_model on the committed `miniclip` config, or on a custom cfg dict (tests)."""
    path = CONFIG_JSON
    if cfg is not None:
        path = cache_dir() / "configs" / f"miniclip_{_digest(cfg)}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(cfg, indent=1))
    cfg = json.loads(path.read_text())
    if cfg["text_cfg"]["vocab_size"] != WordTokenizer().vocab_size:
        raise ValueError(f"{path}: vocab_size {cfg['text_cfg']['vocab_size']} != tokenizer's "
                         f"{WordTokenizer().vocab_size}; the caption grammar changed, rebuild the config")
    if path not in _REGISTERED:
        open_clip.add_model_config(path)
        _REGISTERED.add(path)
    return open_clip.create_model(path.stem), cfg


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [B,32,32,3] -> normalised float [B,3,32,32] (the eval transform)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255  # [B,3,H,W]
    mean, std = torch.tensor(PREPROCESS["mean"]).view(1, 3, 1, 1), torch.tensor(PREPROCESS["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(x: torch.Tensor, gen: torch.Generator, scale=AUG_SCALE):
    """Per-image RandomResizedCrop(scale, ratio 3/4..4/3) + horizontal flip as one affine resample.
    x [B,3,H,W] -> (x', flipped bool [B])."""
    B = x.shape[0]
    r = lambda: torch.rand(B, generator=gen)  # noqa: E731
    area = scale[0] + (scale[1] - scale[0]) * r()
    ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * r())
    w, h = torch.sqrt(area * ratio).clamp(max=1), torch.sqrt(area / ratio).clamp(max=1)  # crop size / image
    tx, ty = (2 * r() - 1) * (1 - w), (2 * r() - 1) * (1 - h)
    flip = r() < 0.5
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = torch.where(flip, -w, w), tx
    theta[:, 1, 1], theta[:, 1, 2] = h, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False), flip


def pretrain_corpus(n: int = PRETRAIN_IMAGES, seed: int = PRETRAIN_SEED):
    """Captionable pretraining images of every style/class/attribute, cached: (uint8 [n,32,32,3], attrs)."""
    stem = cache_dir() / f"corpus-{_digest([world_config(), n, seed])}"
    if not Path(f"{stem}.npy").exists():
        images, attrs = render_many(seed, np.arange(n), progress=n > 10_000)
        np.savez(f"{stem}.tmp.npz", **attrs)
        os.replace(f"{stem}.tmp.npz", f"{stem}.npz")
        np.save(f"{stem}.tmp.npy", images)
        os.replace(f"{stem}.tmp.npy", f"{stem}.npy")
    attrs = dict(np.load(f"{stem}.npz"))
    return np.load(f"{stem}.npy"), attrs


def pretrain(steps: int = PRETRAIN_STEPS, batch_size: int = PRETRAIN_BATCH, lr: float = PRETRAIN_LR,
             n_images: int = PRETRAIN_IMAGES, cfg: dict = None, out=None, seed: int = 0, progress: bool = True):
    """Symmetric contrastive pretraining on captioned corpus images. -> (model in eval mode, losses list)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model, cfg = create_miniclip(cfg)
    tok = WordTokenizer(context_length=cfg["text_cfg"]["context_length"])
    images, attrs = pretrain_corpus(n_images)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=PRETRAIN_WD), dict(params=rest, weight_decay=0)],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup else
                                              0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    loss_fn, losses, t0 = open_clip.loss.ClipLoss(), [], time.time()
    model.train()
    # Hard-negative batches: GROUP images share (style, background, colour). With random batches the
    # contrastive loss is already low from colour/background/style alone and shape is never learned.
    combo = (attrs["style"] * len(BACKGROUNDS) + attrs["bg"]) * len(COLOURS) + attrs["colour"]
    order = np.argsort(combo, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(combo[order])) + 1)  # image indices per combination
    rng = np.random.default_rng(seed)
    bar = tqdm(range(steps), desc="pretrain miniclip", disable=not progress)
    for step in bar:
        idx = []
        for g in rng.permutation(len(groups)):
            idx.extend(rng.choice(groups[g], min(PRETRAIN_GROUP, len(groups[g]), batch_size - len(idx)), replace=False))
            if len(idx) == batch_size:
                break
        idx = np.array(idx)
        x, flip = augment(to_tensor(images[idx]), gen)  # [B,3,32,32]
        a = {k: v[idx] for k, v in attrs.items()}
        a["cx"] = np.where(flip.numpy(), -a["cx"], a["cx"])  # mirrored image: "left" becomes "right"
        text = tok(captions(a, PRETRAIN_SEED, idx, epoch=step))  # [B, context], captions re-sampled per draw
        img_f, txt_f, scale = model(x, text)
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", scale=f"{scale.item():.1f}")
    model.eval()
    if out is not None:
        save_miniclip(model, cfg, out, meta=dict(steps=steps, batch_size=batch_size, lr=lr, n_images=n_images,
                                                  final_loss=float(np.mean(losses[-50:])),
                                                  minutes=(time.time() - t0) / 60))
    return model, losses


def save_miniclip(model, cfg: dict, path, meta: dict = None):
    """Checkpoint with its config, vocabulary and preprocessing, written atomically (temp + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(dict(state_dict=model.state_dict(), config=cfg, vocab=WordTokenizer().vocab,
                    preprocess=PREPROCESS, meta=meta or {}), tmp)
    os.replace(tmp, path)


def load_miniclip(device="cpu", path=None):
    """-> (model in eval mode, WordTokenizer). Default: assets/miniclip.pt; if absent, pretrain one into
    cache_dir() (about 15 minutes, once)."""
    if path is None:
        path = CHECKPOINT if CHECKPOINT.exists() else cache_dir() / "miniclip.pt"
        if not Path(path).exists():
            pretrain(out=path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    tok = WordTokenizer(context_length=ckpt["config"]["text_cfg"]["context_length"])
    if ckpt["vocab"] != tok.vocab or ckpt["preprocess"] != PREPROCESS:
        raise ValueError(f"{path} was trained with another vocabulary/preprocessing than this miniworld.py; "
                         "rebuild it with `python miniworld.py pretrain`")
    cfg = ckpt["config"]
    model, _ = create_miniclip(None if cfg == json.loads(CONFIG_JSON.read_text()) else cfg)
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), tok


# ----------------------------------------------------------------------------------------------------
# Downstream task (ImageNet-like, with distribution shifts) and the ARF retrieval pool
TASK_CLASSES = [(s, c) for s in TASK_SHAPES for c in TASK_COLOURS]
ZS_CLASSES = [(s, c) for s in ZS_SHAPES for c in ZS_COLOURS]
# name: (kind, size key, style, background rule, label set)
TASK_SPLITS = {"train": ("train", "train", "photo", "cue", "task"),
               "heldout": ("heldout", "heldout", "photo", "cue", "task"),
               "id": ("id", "id", "photo", "cue", "task"),
               "sketch": ("ood", "ood", "sketch", "random", "task"),
               "cartoon": ("ood", "ood", "cartoon", "random", "task"),
               "painting": ("ood", "ood", "painting", "random", "task"),
               "pixel": ("ood", "ood", "pixel", "random", "task"),
               "anticue": ("ood", "ood", "photo", "anti", "task"),
               "zs_classes": ("zeroshot", "zeroshot", "photo", "random", "zs"),
               "zs_pattern": ("zeroshot", "zeroshot", "photo", "random", "pattern")}


def home_background(shape: int, colour: int) -> int:
    """The spurious cue: each task class's usual background. Classes sharing a shape (or a colour) get
    different backgrounds, so the background separates exactly the classes that look alike."""
    return (TASK_SHAPES.index(SHAPES[shape]) + 2 * TASK_COLOURS.index(list(COLOURS)[colour])) % len(BACKGROUNDS)


def _task_split(name: str, seed: int, stream: int):
    kind, size_key, style, rule, labelset = TASK_SPLITS[name]
    n = TASK_SIZES[size_key]
    idx = np.arange(n)
    u = lambda salt: _uniform(stream, idx, salt)  # noqa: E731
    fixed = dict(style=STYLES.index(style))
    if labelset == "pattern":
        labels = idx % len(PATTERNS)
        fixed.update(pattern=labels, size=list(SIZES).index("large"))  # large, so the pattern is legible
    else:
        classes = TASK_CLASSES if labelset == "task" else ZS_CLASSES
        labels = idx % len(classes)
        fixed["shape"] = np.array([SHAPES.index(classes[k][0]) for k in labels])
        fixed["colour"] = np.array([list(COLOURS).index(classes[k][1]) for k in labels])
    if rule != "random":
        home = np.array([home_background(s, c) for s, c in zip(fixed["shape"], fixed["colour"])])
        other = (home + 1 + (u("other") * (len(BACKGROUNDS) - 1)).astype(np.int64)) % len(BACKGROUNDS)
        fixed["bg"] = np.where((u("cue") < CUE_STRENGTH) & (rule == "cue"), home, other)
    images, attrs = render_many(stream, idx, **fixed)
    split = dict(images=images, labels=labels.astype(np.int64), kind=kind)
    if labelset == "zs":
        split["classnames"] = [f"{c} {s}" for s, c in ZS_CLASSES]
    if labelset == "pattern":
        split["classnames"], split["templates"] = list(PATTERNS), list(PATTERN_TEMPLATES)
    if kind == "train":  # stand-in for a pretrained captioner's output (used by ARF)
        split["captions"] = captions(attrs, stream, idx)
    return split


def load_task(seed: int = 0) -> dict:
    """The downstream task: {"classnames", "templates", "splits": {name: {"images", "labels", "kind", ...}}}.
    Rendered once (well under a minute) and cached under cache_dir()."""
    cfg = [world_config(), seed, TASK_CLASSES, ZS_CLASSES, TASK_SPLITS, TASK_SIZES, CUE_STRENGTH,
           TASK_TEMPLATES, PATTERN_TEMPLATES]
    path = cache_dir() / f"task-{_digest(cfg)}.npz"
    if path.exists():
        flat = np.load(path, allow_pickle=False)
        meta = json.loads(str(flat["meta"]))
        for name, split in meta["splits"].items():
            split.update(images=flat[f"{name}/images"], labels=flat[f"{name}/labels"])
        return meta
    splits = {name: _task_split(name, seed, 1000 + 100 * seed + k) for k, name in enumerate(TASK_SPLITS)}
    task = dict(classnames=[f"{c} {s}" for s, c in TASK_CLASSES], templates=list(TASK_TEMPLATES), splits=splits)
    arrays = {f"{n}/{k}": sp[k] for n, sp in splits.items() for k in ("images", "labels")}
    meta = dict(task, splits={n: {k: v for k, v in sp.items() if k not in ("images", "labels")}
                              for n, sp in splits.items()})
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, meta=json.dumps(meta), **arrays)
    os.replace(tmp, path)
    return task


def write_pool(out_dir, n: int = 50_000, seed: int = POOL_SEED) -> Path:
    """ARF retrieval pool: n captioned images from the pretraining distribution (all styles/classes, a
    different seed from the pretraining corpus) as PNGs plus `pool.tsv` (open_clip CSV layout: header
    filepath<TAB>title, paths RELATIVE to the TSV's folder). Idempotent: returns at once if complete."""
    out = Path(out_dir)
    tsv = out / "pool.tsv"
    if tsv.exists() and sum(1 for _ in open(tsv)) == n + 1:
        return tsv
    rows = ["filepath\ttitle"]
    for start in tqdm(range(0, n, 1000), desc="pool"):
        idx = np.arange(start, min(n, start + 1000))
        images, attrs = render_many(seed, idx)
        sub = out / "images" / f"{start // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        for i, (img, cap) in enumerate(zip(images, captions(attrs, seed, idx))):
            rel = f"images/{start // 1000:03d}/{idx[i]:06d}.png"
            Image.fromarray(img).save(out / rel)
            rows.append(f"{rel}\t{cap}")
    tmp = out / "pool.tsv.tmp"
    tmp.write_text("\n".join(rows) + "\n")
    os.replace(tmp, tsv)  # written last: its presence means the pool is complete
    return tsv


def show(out, per_style: int = 6, seed: int = 7):
    """A grid with `per_style` examples of every style (rows) and their captions, for human eyes."""
    tile, text_h = 160, 78
    sheet = Image.new("RGB", (tile * per_style, (tile + text_h) * len(STYLES)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, style in enumerate(STYLES):
        idx = np.arange(per_style) + 100 * r
        images, attrs = render_batch(seed, idx, style=r)
        for c, (img, cap) in enumerate(zip(images, captions(attrs, seed, idx))):
            x, y = c * tile, r * (tile + text_h)
            sheet.paste(Image.fromarray(img).resize((tile - 8, tile - 8), Image.NEAREST), (x + 4, y + 4))
            words, lines = cap.split(), [""]
            for w in words:  # greedy wrap to the tile width
                lines[-1] += ("" if not lines[-1] else " ") + w
                if len(lines[-1]) > 26:
                    lines[-1], carry = lines[-1].rsplit(" ", 1)
                    lines.append(carry)
            draw.multiline_text((x + 4, y + tile - 2), "\n".join(lines[:6]), fill="black", spacing=1)
    sheet.save(out)
    return out


# ----------------------------------------------------------------------------------------------------
# CLI
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("pretrain", help="pretrain the tiny CLIP and write assets/miniclip.pt")
    pp.add_argument("--steps", type=int, default=PRETRAIN_STEPS)
    pp.add_argument("--batch-size", type=int, default=PRETRAIN_BATCH)
    pp.add_argument("--lr", type=float, default=PRETRAIN_LR)
    pp.add_argument("--images", type=int, default=PRETRAIN_IMAGES)
    pp.add_argument("--seed", type=int, default=0)
    pp.add_argument("--out", default=str(CHECKPOINT))
    sub.add_parser("pool", help="write the ARF retrieval pool").add_argument("--out", required=True)
    ps = sub.add_parser("show", help="a grid of examples per style with captions")
    ps.add_argument("--out", default="grid.png")
    args = p.parse_args(argv)
    if args.cmd == "pretrain":
        pretrain(args.steps, args.batch_size, args.lr, args.images, out=args.out, seed=args.seed)
    elif args.cmd == "pool":
        print(write_pool(args.out))
    else:
        print(show(args.out))


if __name__ == "__main__":
    main()
