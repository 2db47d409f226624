"""Named zero-shot suites: `--zeroshot-data NAME=DIR` scores a folder of a standard classification dataset
(CLIP's transfer datasets: EuroSAT, Oxford Pets, Flowers102, Caltech101, CIFAR-10/100, Food101, ...) with
that dataset's standard class names and prompt templates, which the user does not write.

Where the names and templates come from: the clip_benchmark package (its datasets/en_classnames.json and
en_zeroshot_classification_templates.json, the lists the open_clip results are computed with). Only those
two JSON files are read, through importlib.resources: importing `clip_benchmark.datasets` runs two empty
__init__ files, so nothing of its heavy dependencies (torchvision's dataset builders, webdataset,
pycocoevalcap) is imported. Chosen over writing the lists here (thousands of names to keep right by hand)
and over open_clip (which ships ImageNet's only).

clip_benchmark ships templates for all the suites below but class names only for some: for the others
(CIFAR, Food101, SUN397, Cars, Aircraft, DTD, STL10, RESISC45) it takes the names from the torchvision
dataset's own metadata at download time. So there are two kinds of suite, each with one rule that cannot
give a folder the wrong name:
  named by the package: the class folders are the package's classes in its index order
    (its dataset loader's class index, torchvision's for most): folders named 0..K-1 (any zero padding) map by number
    (Flowers102's 1-based labels are one off: stopped, not shifted);
    folders named by the package's names (letter case, '_' and '-' aside: Oxford Pets' 'american_bulldog')
    map by name; other names map in sorted order, case-sensitive (the ImageFolder order of the dataset's
    standard layout, e.g. Caltech101's 101_ObjectCategories/ with BACKGROUND_Google, EuroSAT's 2750/).
    The folder count must be K, and the mapping is printed (first and last pairs) so a wrong layout shows.
  named by their folders (FOLDER_NAMED, class count given here): the class name is the folder name, '_'
    read as a space (what clip_benchmark does with torchvision's names); the folder count must be K.
Every class of the suite stays in the head (an empty class folder scores none of its images, but its name
still competes), as in the standard zero-shot protocol.
"""
from __future__ import annotations

import json
from pathlib import Path

from .base import FileImages, Split, scan_class_folders, subfolders

PACKAGE = "clip_benchmark"  # whose data files name the classes and templates
ALIASES = {"flowers102": "flowers", "oxfordpets": "pets", "oxford_pets": "pets", "stanfordcars": "cars",
           "stanford_cars": "cars", "fgvcaircraft": "fgvc_aircraft", "aircraft": "fgvc_aircraft",
           "imagenet": "imagenet1k", "cifar-10": "cifar10", "cifar-100": "cifar100"}
FOLDER_NAMED = {"cifar10": 10, "cifar100": 100, "food101": 101, "sun397": 397, "cars": 196, "fgvc_aircraft": 100,
                "dtd": 47, "stl10": 10, "resisc45": 45}  # suites the package gives templates but no names for: class count
SUITE_LAYOUT = """NAME=DIR with DIR/<class>/*.jpg, exactly as many class folders as the suite has classes:
  suites named by clip_benchmark (eurosat, pets, flowers, caltech101, ...): folders 0..K-1 in the
    package's class index order, or named by its class names, or the dataset's own class folders if
    their sorted order is that order (docs/data.md lists which)
  the other suites (cifar10, cifar100, food101, ...): folders named by the class names ('_' for a space)"""


def package_lists() -> tuple[dict, dict]:
    """(class names, templates) of every dataset clip_benchmark knows, templates with {} for the class."""
    from importlib import resources

    try:
        data = resources.files("clip_benchmark.datasets")
    except ModuleNotFoundError:
        raise SystemExit("error: named --zeroshot-data suites take their class names and templates from the "
                         "clip_benchmark package: pip install --no-deps clip_benchmark") from None
    names = json.loads(data.joinpath("en_classnames.json").read_text())
    templates = json.loads(data.joinpath("en_zeroshot_classification_templates.json").read_text())
    return names, {k: [t.replace("{c}", "{}") for t in ts] for k, ts in templates.items()}


def known_suites(names: dict, templates: dict) -> list:
    return sorted(k for k in templates if k in names or k in FOLDER_NAMED)


def is_suite_spec(spec: str) -> bool:
    """NAME=DIR (a folder path that merely contains '=' is read as a folder)."""
    name = spec.split("=", 1)[0]
    return "=" in spec and "/" not in name and not Path(spec).is_dir()


def load_suite_folder(spec: str) -> Split:
    """The zero-shot split of `NAME=DIR`, named NAME (its canonical name), with the suite's class names and
    templates; labels index the suite's classes."""
    given, folder = (s.strip() for s in spec.split("=", 1))
    names, templates = package_lists()
    suite = ALIASES.get(given.lower(), given.lower())
    if suite not in known_suites(names, templates):
        raise SystemExit(f"error: --zeroshot-data {spec!r}: unknown suite {given!r}; known suites: "
                         f"{', '.join(known_suites(names, templates))} (or pass a plain DIR)")
    base = Path(folder)
    if not base.is_dir():
        raise SystemExit(f"error: --zeroshot-data {spec!r}: {folder!r} is not a folder. Expected layout:\n{SUITE_LAYOUT}")
    folders = [p.name for p in subfolders(base)]
    count = len(names[suite]) if suite in names else FOLDER_NAMED[suite]
    if len(folders) != count:
        raise SystemExit(f"error: --zeroshot-data {spec!r}: {base} has {len(folders)} class folders but {suite} has "
                         f"{count} classes (one folder per class, empty ones too). Expected layout:\n{SUITE_LAYOUT}")
    if suite in names:
        classnames = list(names[suite])
        order = folder_order(folders, classnames, spec)
        pairs = [f"{f} -> {classnames[i]}" for i, f in enumerate(order)]
        print(f"zero-shot suite {suite}: class folders -> {PACKAGE}'s names: {', '.join(pairs[:2])}, ..., {pairs[-1]}")
    else:
        if all(f.isdigit() for f in folders):
            raise SystemExit(f"error: --zeroshot-data {spec!r}: {PACKAGE} has no class names for {suite}, so its "
                             f"class folders must be named by the class names ('_' for a space), not by number")
        order = sorted(folders)
        classnames = [f.replace("_", " ") for f in order]
    images = FileImages(*scan_class_folders(base, {f: i for i, f in enumerate(order)}))
    if len(images) == 0:
        raise SystemExit(f"error: no images under {base}. Expected layout:\n{SUITE_LAYOUT}")
    return Split(suite, "zeroshot", images, classnames, list(templates[suite]))


def folder_order(folders: list, classnames: list, spec: str) -> list:
    """The class folders in the suite's class index order: by number if every name is one (0..K-1); by
    name if every folder is one of the class names (letter case, '_', '-' aside); else in sorted order
    (ImageFolder's, case-sensitive)."""
    if all(f.isdigit() for f in folders):
        order = sorted(folders, key=int)
        if [int(f) for f in order] != list(range(len(folders))):
            raise SystemExit(f"error: --zeroshot-data {spec!r}: class folders named by number must be "
                             f"0..{len(folders) - 1} (the class index), not {', '.join(order[:3])}, ...")
        return order
    by_name = {plain(f): f for f in folders}
    if sorted(by_name) == sorted(plain(c) for c in classnames):
        return [by_name[plain(c)] for c in classnames]
    return sorted(folders)


def plain(name: str) -> str:
    return " ".join(name.casefold().replace("_", " ").replace("-", " ").split())
