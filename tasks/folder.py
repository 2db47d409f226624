"""--data folder (a training folder and test folders of class sub-folders) and --zeroshot-data folders
(classification datasets scored zero-shot, with heads from the model's current text tower)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import (FileImages, Split, class_folders_with_images, heldout_split, missing_root, scan_class_folders,
                   subfolders, task_of)

HELDOUT_IMAGES = 10_000  # training images moved into the held-out slice (at most a tenth of them)
LAYOUT = """DIR/train/<class>/*.jpg            (training images, one folder per class)
DIR/<test split>/<class>/*.jpg     (one or more test folders with the same class folder names;
                                    'test' or 'val' is in-distribution, every other folder is OOD)
--unseen-classes FILE              (optional: class folder names, one per line, whose train/ images are
                                    dropped: generalized zero-shot, scored S / U / H on every test folder)"""
ZEROSHOT_LAYOUT = """DIR/<class>/*.jpg                  (one folder per class; the split is named after DIR)
DIR/classnames.txt                 (optional: a class name per line, for the class folders in sorted order;
                                    default: the folder names, '_' read as a space)
DIR/templates.txt                  (optional: a prompt per line, {} for the class name; default: open_clip's
                                    SIMPLE_IMAGENET_TEMPLATES)"""


def load_folder(root: str, seed: int, unseen_classes: str = ""):
    """--data folder's task. With `unseen_classes` (a file of class folder names, one per line) it is
    generalized zero-shot: those classes keep their place in the label space and in every test folder,
    but their training images are dropped before the held-out slice is taken (task.unseen names them)."""
    from open_clip import SIMPLE_IMAGENET_TEMPLATES

    base = Path(root)
    if not root or not (base / "train").is_dir():
        missing_root("folder", root, "train/", LAYOUT)
    folders, empty = class_folders_with_images(base / "train", "training images from the label space")
    index = {c: i for i, c in enumerate(folders)}
    classnames = [c.replace("_", " ") for c in folders]
    templates = list(SIMPLE_IMAGENET_TEMPLATES)
    images = FileImages(*scan_class_folders(base / "train", index, empty))
    unseen = read_unseen_classes(unseen_classes, folders, base / "train") if unseen_classes else []
    if unseen:  # the unseen classes' training images are never drawn, nor held out
        images = images.subset(np.flatnonzero(~np.isin(images.labels, unseen)))
    train, heldout = heldout_split(images, seed, HELDOUT_IMAGES)
    if len(train) == 0:
        raise SystemExit(f"error: no images under {base/'train'}. Expected layout:\n{LAYOUT}")
    tests = []
    for sub in (p for p in subfolders(base) if p.name != "train"):
        kind = "id" if sub.name in ("test", "val") else "ood"
        tests.append(Split(sub.name, kind, FileImages(*scan_class_folders(sub, index, empty)), classnames, templates))
    if not tests:
        missing_root("folder", root, "a test folder beside train/", LAYOUT)
    if not any(t.kind == "id" for t in tests):
        print(f"warning: {base} has no test/ or val/ folder, so the run has no in-distribution (ID) split: "
              f"{', '.join(t.name for t in tests)} are scored as OOD")
    tests.sort(key=lambda s: s.kind != "id")
    task = task_of("folder", classnames, templates, train, heldout, tests)
    task.unseen = unseen
    return task


def read_unseen_classes(path: str, folders: list, train: Path) -> list:
    """The label-space indices of the class folder names in `path` (one per line), sorted; one message
    for a missing or empty file, names that are not class folders of train/, or every class unseen."""
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"error: --unseen-classes {path!r} is not a file (class folder names of {train}, one per line)")
    names = read_lines(file)
    if not names:
        raise SystemExit(f"error: --unseen-classes {path!r} is empty; it names the unseen classes' folders in {train}, "
                         "one per line")
    absent = sorted(set(names) - set(folders))
    if absent:
        raise SystemExit(f"error: --unseen-classes {path!r} names {len(absent)} class(es) that are not class folders with "
                         f"images in {train}: {', '.join(absent[:10])}{' ...' if len(absent) > 10 else ''}")
    if set(names) >= set(folders):
        raise SystemExit(f"error: --unseen-classes {path!r} names all {len(folders)} classes of {train}: no seen class "
                         "is left to fine-tune on")
    return sorted(folders.index(n) for n in set(names))


def read_lines(path: Path) -> list:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def load_zeroshot_folder(folder: str) -> Split:
    """A classification dataset scored zero-shot (ARF's cross-dataset transfer: fine-tune on one dataset,
    evaluate on others), in ZEROSHOT_LAYOUT. Its head is built from the model's current text tower."""
    from open_clip import SIMPLE_IMAGENET_TEMPLATES

    base = Path(folder)
    if not base.is_dir():
        raise SystemExit(f"error: --zeroshot-data {folder!r} is not a folder. Expected layout:\n{ZEROSHOT_LAYOUT}")
    folders, empty = class_folders_with_images(base, f"images from zero-shot split {base.name}")
    if not folders:
        raise SystemExit(f"error: no images under {base}. Expected layout:\n{ZEROSHOT_LAYOUT}")
    classnames = [c.replace("_", " ") for c in folders]
    if (base / "classnames.txt").is_file():
        every = sorted(folders + empty)  # the file names every class folder, empty ones too
        names = read_lines(base / "classnames.txt")
        if len(names) != len(every):
            raise SystemExit(f"error: {base / 'classnames.txt'} has {len(names)} names for {len(every)} class folders "
                             "(one name per class folder, in sorted folder order)")
        classnames = [n for n, c in zip(names, every) if c not in empty]
    templates = list(SIMPLE_IMAGENET_TEMPLATES)
    if (base / "templates.txt").is_file():
        templates = read_lines(base / "templates.txt")
        bad = [t for t in templates if t.count("{}") != 1]
        if bad or not templates:
            raise SystemExit(f"error: {base / 'templates.txt'}: every line needs one {{}} for the class name "
                             f"(e.g. 'a photo of a {{}}.'); not {bad[:3] or 'an empty file'}")
    images = FileImages(*scan_class_folders(base, {c: i for i, c in enumerate(folders)}, empty))
    return Split(base.name, "zeroshot", images, classnames, templates)
