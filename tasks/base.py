"""What every dataset of the tasks package is made of: image lists (in memory or on disk), splits, tasks,
and the folder rules they share (hidden folders, image extensions, empty classes, the held-out slice, the
--shots draw)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
KINDS = ("train", "heldout", "id", "ood", "zeroshot")
SHOTS_STREAM = 29  # the --shots draws' own random stream, apart from the held-out slice's (seed + 12345)


class ArrayImages:
    """Images held in memory as uint8 [N, H, W, 3] (miniworld)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, captions: Optional[list] = None):
        self.images, self.labels, self.captions = images, np.asarray(labels, dtype=np.int64), captions

    def __len__(self):
        return len(self.labels)

    def load(self, i: int):
        from PIL import Image

        return Image.fromarray(self.images[i])

    def subset(self, idx):
        idx = np.asarray(idx)
        caps = [self.captions[i] for i in idx] if self.captions is not None else None
        return ArrayImages(self.images[idx], self.labels[idx], caps)


def load_rgb(path: str):
    """Open any image as 8-bit RGB (CMYK, palette, alpha, grayscale, 16-bit); None if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: rescale to 8 bits
                arr = np.asarray(img, dtype=np.float64)
                arr = (255.0 * arr / max(arr.max(), 1.0)).astype(np.uint8)
                return Image.fromarray(arr).convert("RGB")
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError):
        return None


class FileImages:
    """Images on disk given as (path, label) pairs; unreadable files load as None (the loaders skip and
    count them). `border` pixels are cut from every edge on load (ObjectNet's frame)."""

    def __init__(self, paths: list, labels, border: int = 0):
        self.paths, self.labels, self.border = list(paths), np.asarray(labels, dtype=np.int64), border

    def __len__(self):
        return len(self.labels)

    def load(self, i: int):
        img = load_rgb(self.paths[i])
        if img is None or not self.border:
            return img
        b = self.border
        return img.crop((b, b, img.width - b, img.height - b))

    def subset(self, idx):
        return FileImages([self.paths[i] for i in idx], self.labels[np.asarray(idx)], self.border)


@dataclass
class Split:
    name: str
    kind: str  # one of KINDS
    images: object  # ArrayImages | FileImages
    classnames: list  # the label space `images.labels` index into
    templates: list  # prompt templates for this split's text head
    class_groups: Optional[list] = None  # scored classes as groups of label-space rows, logit = the group's max;
    # labels index the groups (ImageNet-R/A: 200 groups of one class; ObjectNet: 113 of one or more)


@dataclass
class Task:
    name: str
    classnames: list
    templates: list
    train: Split
    heldout: Split
    tests: list = field(default_factory=list)  # id first, then ood, then zeroshot
    pool: Optional[Callable[[Path], str]] = None  # a retrieval pool the dataset offers (ARF): pool(cache folder) builds it there once, returns its TSV
    unseen: list = field(default_factory=list)  # generalized zero-shot: classes (indices) with no training or held-out images


def missing_root(data: str, root: str, what: str, layout: str):
    raise SystemExit(f"error: {what} not found for --data {data} (--data-root {root!r}). Expected layout:\n{layout}")


def subfolders(folder: Path) -> list:
    """The sub-folders of a dataset folder, sorted; hidden ones (.ipynb_checkpoints, .DS_Store folders,
    ...) are left out, with one warning naming them."""
    subs = sorted(p for p in folder.iterdir() if p.is_dir())
    hidden = [p.name for p in subs if p.name.startswith(".")]
    if hidden:
        print(f"warning: ignoring hidden folder(s) {', '.join(hidden)} in {folder}")
    return [p for p in subs if not p.name.startswith(".")]


def image_files(folder: Path) -> list:
    return sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTS)


def class_folders_with_images(folder: Path, what: str) -> tuple[list, list]:
    """(class folder names that hold images, the empty ones): a class with no image leaves the label
    space, with one warning naming it."""
    folders = [p.name for p in subfolders(folder)]
    empty = [c for c in folders if not image_files(folder / c)]
    if empty:
        print(f"warning: dropping {len(empty)} class(es) with no {what}: {', '.join(empty)}")
    return [c for c in folders if c not in empty], empty


def scan_class_folders(folder: Path, class_index: dict, dropped=()) -> tuple[list, list]:
    """(paths, labels) for folder/<class>/<image>; folder names are mapped through class_index (the
    folders of `dropped` classes are passed over)."""
    paths, labels = [], []
    for sub in subfolders(folder):
        if sub.name in dropped:
            unscored = len(image_files(sub))
            if unscored:
                print(f"warning: class {sub.name!r} has no training images, so its {unscored} image(s) in "
                      f"{folder.name}/ are not scored")
            continue
        if sub.name not in class_index:
            raise SystemExit(f"error: class folder {sub} is not in the training classes {sorted(class_index)[:10]}...")
        files = image_files(sub)
        if not files:
            print(f"warning: empty class folder {sub}: no images of class {sub.name!r} in {folder.name}")
        paths += [str(f) for f in files]
        labels += [class_index[sub.name]] * len(files)
    return paths, labels


def heldout_split(images, seed: int, count: int):
    """Deterministically move `count` training images (at most a tenth) into a held-out slice for model
    selection: (train, held-out)."""
    order = np.random.default_rng(seed + 12345).permutation(len(images))
    count = min(count, len(images) // 10)
    return images.subset(np.sort(order[count:])), images.subset(np.sort(order[:count]))


def few_shot(images, shots: int, seed: int, classnames: list, skip=()):
    """`shots` images of every class of `classnames` but `skip` (generalized zero-shot's unseen classes,
    which have no training images) from `images` (the training split less its held-out slice), in their
    order: per class a permutation seeded by (SHOTS_STREAM, seed, class) alone, so two methods of one
    seed draw the same images, seeds draw different ones, and a smaller K's shots are the first of a
    larger K's (nested). 0 = every image. A class with fewer than `shots` images stops the run."""
    check_shots(shots)
    if shots == 0:
        return images
    labels = np.asarray(images.labels)
    counts = np.bincount(labels, minlength=len(classnames))
    drawn = [c for c in range(len(classnames)) if c not in set(skip)]
    short = [c for c in np.argsort(counts, kind="stable") if counts[c] < shots and c in drawn]
    if short:
        named = ", ".join(f"{classnames[c]!r} has {counts[c]}" for c in short[:5])
        raise SystemExit(f"error: --shots {shots} needs {shots} training images per class (after the held-out slice), "
                         f"but class {named}{' ...' if len(short) > 5 else ''}; choose --shots {counts[drawn].min()} or fewer")
    picked = [np.random.default_rng((SHOTS_STREAM, seed, c)).permutation(np.flatnonzero(labels == c))[:shots]
              for c in drawn]
    return images.subset(np.sort(np.concatenate(picked)))


def check_shots(shots: int):
    """The one check of a --shots value."""
    if shots < 0:
        raise SystemExit(f"error: --shots must be >= 0 (got {shots}): K training images per class, 0 = all of them")


def task_of(name: str, classnames: list, templates: list, train, heldout, tests: list, pool=None) -> Task:
    """A Task whose train and held-out splits use the task's own classes and templates."""
    return Task(name, classnames, templates, Split("train", "train", train, classnames, templates),
                Split("heldout", "heldout", heldout, classnames, templates), tests, pool)
