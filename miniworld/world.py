"""The world itself: its knobs, the cache key, the counter-based hash RNG, attribute sampling and the renderer.

Everything the rendered pixels depend on is here; world_config() lists it and its hash keys every cache.
"""
import hashlib
import json
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------------
# Knobs
RENDER_VERSION = 3  # bump when the renderer changes so cached arrays are rebuilt

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
LIGHTS = {"dim": 0.72, "normal": 1.0, "bright": 1.22}  # a global gain: one more captioned nuisance factor


def cache_dir() -> Path:
    path = Path(os.environ.get("ROBUSTFT_CACHE", Path.home() / ".cache" / "robust-ft"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def world_config() -> dict:
    """Everything the rendered pixels depend on; its hash keys the caches."""
    return dict(version=RENDER_VERSION, size=IMAGE_SIZE, ss=SUPERSAMPLE, shapes=SHAPES, colours=COLOURS,
                styles=STYLES, backgrounds=BACKGROUNDS, patterns=PATTERNS, sizes=SIZES, tilt=MAX_TILT, lights=LIGHTS)


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
             light=(u("light") * len(LIGHTS)).astype(np.int64),
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
def _polygon(n: int, R: float, r, ang, phase=-math.pi / 2):
    """Inside a regular n-gon whose corners lie at radius R, a corner at angle `phase`; (r, ang) polar."""
    a = np.mod(ang - phase, 2 * math.pi / n) - math.pi / n
    return r * np.cos(a) < R * math.cos(math.pi / n)


def _star(k: int, inner: float, r, ang, outer: float = 1.0):
    """Inside a k-pointed star, tips at radius `outer` (one pointing up), notches at `inner`; (r, ang) polar."""
    p = np.mod((ang + math.pi / 2) * k / (2 * math.pi), 1.0)
    d = 2 * np.minimum(p, 1 - p)  # 0 at a tip, 1 between tips
    return r < outer * (1 - d) + inner * d


def _shape_mask(shape: str, u, v):
    """Inside-test in object-local coordinates (unit radius, y down)."""
    r, ang = np.hypot(u, v), np.arctan2(v, u)
    if shape == "circle":
        return r < 0.9
    if shape == "square":
        return np.maximum(abs(u), abs(v)) < 0.72
    if shape == "triangle":
        return _polygon(3, 0.98, r, ang)
    if shape == "star":
        return _star(5, 0.42, r, ang)
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
        return _polygon(6, 0.92, r, ang, 0.0)
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
            shading = 1.1 - 0.25 * (u[sel] + v[sel])[..., None] / 2  # lit from the top left
            o = np.where(mk, f * np.clip(shading, 0.7, 1.3), bg)
            o = o + (noise(kk, "grain") - 0.5) * 0.12
        elif style == "sketch":
            paper = 0.94 + 0.04 * (noise(kk, "paper")[..., :1] - 0.5)
            o = paper * 0.78 + bg * 0.22  # the background survives as a faint wash
            edge = _dilate(mask[sel], 1) & _dilate(~mask[sel], 1)  # a thin band across the contour
            hatch = np.mod((xx + yy) * 8, 1.0)[None, ..., None] < 0.3
            ink = f / np.maximum(f.max(-1, keepdims=True), 1e-3)  # full-strength hue of the fill
            body = mk & ~pat[sel][..., None]
            o = np.where(mk, o * 0.85 + 0.15 * f, o)
            o = np.where(body & hatch, o * 0.55 + 0.45 * ink * 0.8, o)  # light hatching of the body ...
            o = np.where((mk & pat[sel][..., None]) | edge[..., None], ink * 0.55, o)  # ... the pattern inked in dark
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

    out = out * np.array(list(LIGHTS.values()), np.float32)[attrs["light"]][:, None, None, None]
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

