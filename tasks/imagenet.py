"""--data imagenet: ImageNet-1k (train / val by wnid folder) and its distribution shifts, each scored when
its folder is present: ImageNet-V2, -R, -A, -Sketch and ObjectNet 1.0."""
from __future__ import annotations

import json
from pathlib import Path

from .base import FileImages, Split, heldout_split, image_files, missing_root, scan_class_folders, subfolders, task_of

HELDOUT_IMAGES = 10_000  # training images moved into the held-out slice
OBJECTNET_BORDER = 2  # px cut from each edge of an ObjectNet image: its 1-px red frame (the reference evaluation cuts 2)
LAYOUT = """DIR/train/nXXXXXXXX/*.JPEG         (1000 wnid folders)
DIR/val/nXXXXXXXX/*.JPEG           (validation regrouped into wnid folders)
optional OOD sets, scored when present:
DIR/imagenetv2/0 ... 999/*.jpeg    (ImageNet-V2 matched-frequency, folders named by class index)
DIR/imagenet-r/nXXXXXXXX/*.jpg     (200 wnids)
DIR/imagenet-a/nXXXXXXXX/*.jpg     (200 wnids)
DIR/imagenet-sketch/nXXXXXXXX/*.JPEG
DIR/objectnet-1.0/images/<folder>/*.png, DIR/objectnet-1.0/mappings/*   (ObjectNet 1.0 unzipped as shipped;
                                    its 113 ImageNet-overlapping classes are scored)"""


def imagenet_wnids() -> list:
    """The 1000 ILSVRC-2012 wnids in class-index order (the order of open_clip's IMAGENET_CLASSNAMES).
    open_clip ships no wnid list; timm, its own dependency, does."""
    from timm.data import ImageNetInfo

    return ImageNetInfo().label_names()


def subset_groups(images: FileImages, n_classes: int) -> tuple:
    """(images relabelled into the classes present, their groups) for a split that holds a subset of the
    label space (ImageNet-R/A: 200 of 1000); (images, None) when every class is present."""
    present = sorted(set(images.labels.tolist()))
    if len(present) == n_classes:
        return images, None
    remap = {c: k for k, c in enumerate(present)}
    return FileImages(images.paths, [remap[c] for c in images.labels.tolist()], images.border), [[c] for c in present]


def load_objectnet(folder: Path, classnames: list, templates: list) -> Split:
    """ObjectNet 1.0: its 113 classes that overlap ImageNet through the mapping files shipped with it, each
    scored as the max logit over its ImageNet classes (the reference evaluation's projection), argmax over
    those 113; images of the other classes are left out; the red frame is cut."""
    maps = folder / "mappings"
    try:
        folder_of = {label: f for f, label in json.loads((maps / "folder_to_objectnet_label.json").read_text()).items()}
        to_imagenet = json.loads((maps / "objectnet_to_imagenet_1k.json").read_text())
        label_2012 = {line.strip(): i for i, line in enumerate((maps / "imagenet_to_label_2012_v2").read_text().splitlines())}
        index_of_2012 = {int(v): int(k) for k, v in json.loads((maps / "pytorch_to_imagenet_2012_id.json").read_text()).items()}
        groups = {folder_of[o]: sorted(index_of_2012[label_2012[n]] for n in names.split("; ")) for o, names in to_imagenet.items()}
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: ObjectNet's mapping files in {maps} are missing or do not agree ({type(e).__name__}: {e}). "
                         f"Expected layout:\n{LAYOUT}") from None
    names = sorted(groups)  # the overlapping classes by folder name, as the reference orders them
    paths, labels = [], []
    for k, name in enumerate(names):
        files = image_files(folder / "images" / name) if (folder / "images" / name).is_dir() else []
        paths += [str(f) for f in files]
        labels += [k] * len(files)
    others = len(subfolders(folder / "images")) - sum((folder / "images" / n).is_dir() for n in names)
    print(f"ObjectNet: scoring {len(paths)} images of the {len(names)} classes that overlap ImageNet "
          f"(skipping {others} class folders outside the mapping)")
    images = FileImages(paths, labels, border=OBJECTNET_BORDER)
    return Split("objectnet", "ood", images, classnames, templates, class_groups=[groups[n] for n in names])


def load_imagenet_v2(folder: Path, names: list, templates: list) -> Split:
    """ImageNet-V2: its folders are class indices, mapped by integer, never by string order."""
    paths, labels = [], []
    subs = subfolders(folder)
    other = [p.name for p in subs if not p.name.isdigit() or int(p.name) >= len(names)]
    if other:
        print(f"warning: ignoring {len(other)} folder(s) of {folder} that are not class indices 0-{len(names) - 1}: "
              f"{', '.join(other[:5])}")
    for sub in sorted((p for p in subs if p.name not in other), key=lambda p: int(p.name)):
        files = image_files(sub)
        paths += [str(f) for f in files]
        labels += [int(sub.name)] * len(files)
    return Split("imagenet-v2", "ood", FileImages(paths, labels), names, templates)


def load_imagenet(root: str, seed: int):
    from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    base = Path(root)
    if not root or not (base / "train").is_dir() or not (base / "val").is_dir():
        missing_root("imagenet", root, "train/ and val/", LAYOUT)
    wnids, known = [p.name for p in subfolders(base / "train")], imagenet_wnids()
    unknown, missing = sorted(set(wnids) - set(known)), sorted(set(known) - set(wnids))
    if unknown or missing:  # class names are given by wnid: folders with other names would get wrong ones
        raise SystemExit(f"error: {base/'train'} has {len(wnids)} class folders; ImageNet-1k needs its {len(known)} wnids. "
                         + (f"{len(unknown)} folder(s) are not ImageNet-1k wnids: {', '.join(unknown[:5])}"
                            f"{' ...' if len(unknown) > 5 else ''}. " if unknown else "")
                         + (f"{len(missing)} wnid(s) have no folder: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}."
                            if missing else ""))
    index = {w: i for i, w in enumerate(known)}
    names, templates = list(IMAGENET_CLASSNAMES), list(OPENAI_IMAGENET_TEMPLATES)
    train, heldout = heldout_split(FileImages(*scan_class_folders(base / "train", index)), seed, HELDOUT_IMAGES)
    tests = [Split("val", "id", FileImages(*scan_class_folders(base / "val", index)), names, templates)]
    if (base / "imagenetv2").is_dir():
        tests.append(load_imagenet_v2(base / "imagenetv2", names, templates))
    for name in ("imagenet-r", "imagenet-a", "imagenet-sketch"):
        if (base / name).is_dir():
            images, groups = subset_groups(FileImages(*scan_class_folders(base / name, index)), len(names))
            tests.append(Split(name, "ood", images, names, templates, groups))
    if (base / "objectnet-1.0").is_dir():
        tests.append(load_objectnet(base / "objectnet-1.0", names, templates))
    return task_of("imagenet", names, templates, train, heldout, tests)
