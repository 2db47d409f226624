"""The downstream task (load_task: ImageNet-like splits with distribution shifts), the ARF retrieval pool
(write_pool) and a picture grid of examples for human eyes (show)."""
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from .text import captions
from .world import (BACKGROUNDS, COLOURS, PATTERNS, SHAPES, STYLES, _digest, cache_dir,
                    render_batch, render_many, world_config)

# ----------------------------------------------------------------------------------------------------
# Knobs
# The task's classes are fine-grained: (shape, colour, fill pattern) triples, so two classes can differ in
# the pattern alone, which the captions seldom name as the class's own phrase ("a yellow diamond with stripes").
# Chosen by studies/choose_classes.py (zero-shot accuracy of the committed mini CLIP on fresh renders only;
# docs/choose_classes.md): the best 4 x 2 x 3 set, zero-shot ~63% photo / ~52% other styles there.
TASK_SHAPES = ["diamond", "ring", "heart", "bar"]
TASK_COLOURS = ["yellow", "blue"]
TASK_PATTERNS = ["solid", "striped", "dotted"]
ZS_SHAPES = ["circle", "cross", "crescent", "arrow"]  # never seen in fine-tuning ...
ZS_COLOURS = ["orange", "cyan", "purple", "pink"]   # ... and neither are these colours
TASK_SIZES = dict(train=10_000, heldout=1_000, id=2_000, ood=1_500, zeroshot=1_500)
TASK_TEMPLATES = ["a photo of the {}.", "a photograph of a {}.", "a sketch of the {}.",
                  "a pencil drawing of a {}.", "a cartoon of the {}.", "an illustration of a {}.",
                  "a painting of the {}.", "a pixel art of the {}.", "a photo of the {} on the grass.",
                  "a photo of the {} in the snow.", "a photo of the {} at night.",
                  "a photo of a small {}.", "a photo of a large {}.", "a photo of the {} in dim light."]
# zs_scene: where the object is, read from the background, which the task never needs (and which varies
# at random in every fine-tuning image); one phrase per background, from the caption grammar
SCENE_NAMES = ["on the grass", "on the sand", "in the sky", "on a brick wall", "in the snow", "at night",
               "on wood", "in the water"]
SCENE_TEMPLATES = ["a photo of an object {}.", "a photo of a shape {}.", "a picture of a thing {}.",
                   "there is an object {}.", "a photo of something {}.", "an object {}."]

POOL_SEED = 2

# ----------------------------------------------------------------------------------------------------
# Downstream task (ImageNet-like, with distribution shifts) and the ARF retrieval pool
TASK_CLASSES = [(s, c, p) for s in TASK_SHAPES for c in TASK_COLOURS for p in TASK_PATTERNS]
ZS_CLASSES = [(s, c) for s in ZS_SHAPES for c in ZS_COLOURS]
# name: (kind, size key, style, label set); every split's background, size, position, angle and light are random
TASK_SPLITS = {"train": ("train", "train", "photo", "task"),
               "heldout": ("heldout", "heldout", "photo", "task"),
               "id": ("id", "id", "photo", "task"),
               "sketch": ("ood", "ood", "sketch", "task"),
               "cartoon": ("ood", "ood", "cartoon", "task"),
               "painting": ("ood", "ood", "painting", "task"),
               "pixel": ("ood", "ood", "pixel", "task"),
               "zs_classes": ("zeroshot", "zeroshot", "photo", "zs"),
               "zs_scene": ("zeroshot", "zeroshot", "photo", "scene")}


def class_name(shape: str, colour: str, pattern: str = None) -> str:
    """A class's name in the caption grammar's word order: 'striped red triangle', or 'red triangle'."""
    return " ".join(w for w in (pattern, colour, shape) if w)


def class_attrs(classes: list, labels: np.ndarray) -> dict:
    """The renderer's fixed attributes for images of `classes` [(shape, colour[, pattern])] at `labels`:
    shape and colour indices, and the pattern's where the classes name one (otherwise it stays random)."""
    fixed = dict(shape=np.array([SHAPES.index(classes[k][0]) for k in labels]),
                 colour=np.array([list(COLOURS).index(classes[k][1]) for k in labels]))
    if any(len(c) > 2 and c[2] for c in classes):
        fixed["pattern"] = np.array([PATTERNS.index(classes[k][2]) for k in labels])
    return fixed


def _task_split(name: str, seed: int, stream: int):
    kind, size_key, style, labelset = TASK_SPLITS[name]
    n = TASK_SIZES[size_key]
    idx = np.arange(n)
    fixed = dict(style=STYLES.index(style))
    if labelset == "scene":
        labels = idx % len(BACKGROUNDS)
        fixed["bg"] = labels
    else:
        classes = ZS_CLASSES if labelset == "zs" else TASK_CLASSES
        labels = idx % len(classes)
        fixed.update(class_attrs(classes, labels))
    images, attrs = render_many(stream, idx, **fixed)
    split = dict(images=images, labels=labels.astype(np.int64), kind=kind)
    if labelset == "zs":
        split["classnames"] = [class_name(*c) for c in ZS_CLASSES]
    if labelset == "scene":
        split["classnames"], split["templates"] = list(SCENE_NAMES), list(SCENE_TEMPLATES)
    if kind == "train":  # stand-in for a pretrained captioner's output (used by ARF)
        split["captions"] = captions(attrs, stream, idx)
    return split


def load_task(seed: int = 0) -> dict:
    """The downstream task: {"classnames", "templates", "splits": {name: {"images", "labels", "kind", ...}}}.
    Rendered once (well under a minute) and cached under cache_dir()."""
    cfg = [world_config(), seed, TASK_CLASSES, ZS_CLASSES, TASK_SPLITS, TASK_SIZES, TASK_TEMPLATES, SCENE_NAMES,
           SCENE_TEMPLATES]
    path = cache_dir() / f"task-{_digest(cfg)}.npz"
    if path.exists():
        flat = np.load(path, allow_pickle=False)
        meta = json.loads(str(flat["meta"]))
        for name, split in meta["splits"].items():
            split.update(images=flat[f"{name}/images"], labels=flat[f"{name}/labels"])
        return meta
    splits = {name: _task_split(name, seed, 1000 + 100 * seed + k) for k, name in enumerate(TASK_SPLITS)}
    task = dict(classnames=[class_name(*c) for c in TASK_CLASSES], templates=list(TASK_TEMPLATES), splits=splits)
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

