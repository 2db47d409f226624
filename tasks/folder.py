"""--data folder (a training folder and test folders of class sub-folders) and --zeroshot-data folders
(classification datasets scored zero-shot, with heads from the model's current text tower)."""
from __future__ import annotations

from pathlib import Path

from .base import (FileImages, Split, class_folders_with_images, heldout_split, missing_root, scan_class_folders,
                   subfolders, task_of)

HELDOUT_IMAGES = 10_000  # training images moved into the held-out slice (at most a tenth of them)
LAYOUT = """DIR/train/<class>/*.jpg            (training images, one folder per class)
DIR/<test split>/<class>/*.jpg     (one or more test folders with the same class folder names;
                                    'test' or 'val' is in-distribution, every other folder is OOD)"""
ZEROSHOT_LAYOUT = """DIR/<class>/*.jpg                  (one folder per class; the split is named after DIR)
DIR/classnames.txt                 (optional: a class name per line, for the class folders in sorted order;
                                    default: the folder names, '_' read as a space)
DIR/templates.txt                  (optional: a prompt per line, {} for the class name; default: open_clip's
                                    SIMPLE_IMAGENET_TEMPLATES)"""


def load_folder(root: str, seed: int):
    from open_clip import SIMPLE_IMAGENET_TEMPLATES

    base = Path(root)
    if not root or not (base / "train").is_dir():
        missing_root("folder", root, "train/", LAYOUT)
    folders, empty = class_folders_with_images(base / "train", "training images from the label space")
    index = {c: i for i, c in enumerate(folders)}
    classnames = [c.replace("_", " ") for c in folders]
    templates = list(SIMPLE_IMAGENET_TEMPLATES)
    train, heldout = heldout_split(FileImages(*scan_class_folders(base / "train", index, empty)), seed, HELDOUT_IMAGES)
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
    return task_of("folder", classnames, templates, train, heldout, tests)


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
