"""The downstream task (load_task: ImageNet-like splits with distribution shifts), the ARF retrieval pool
(write_pool) and a picture grid of examples for human eyes (show)."""
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from .text import captions
from .world import (BACKGROUNDS, COLOURS, PATTERNS, SHAPES, SIZES, STYLES, _digest, _uniform, cache_dir,
                    render_batch, render_many, world_config)

# ----------------------------------------------------------------------------------------------------
# Knobs
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

POOL_SEED = 2

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

