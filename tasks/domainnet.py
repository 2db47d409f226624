"""--data domainnet: DomainNet from its official split files; fine-tuned on `real`, the other four domains
are the distribution shifts."""
from __future__ import annotations

from pathlib import Path

from .base import FileImages, Split, heldout_split, missing_root, task_of

DOMAINS = ("real", "painting", "clipart", "infograph", "sketch")
HELDOUT_IMAGES = 5_000  # training images moved into the held-out slice
LAYOUT = """DIR/{real,painting,clipart,infograph,sketch}/<class>/*.jpg
DIR/{domain}_train.txt, DIR/{domain}_test.txt   (official split files: '<domain>/<class>/<file> <label>' per line)"""


def read_split_file(base: Path, domain: str, part: str) -> tuple[list, list, dict]:
    """(paths, labels, {label: class name}) of one official split file."""
    listing = base / f"{domain}_{part}.txt"
    if not listing.is_file():
        missing_root("domainnet", str(base), str(listing), LAYOUT)
    paths, labels, names = [], [], {}
    for line in listing.read_text().splitlines():
        if not line.strip():
            continue
        rel, label = line.rsplit(maxsplit=1)
        paths.append(str(base / rel))
        labels.append(int(label))
        names.setdefault(int(label), rel.split("/")[1].lower().replace("_", " "))
    return paths, labels, names


def load_domainnet(root: str, seed: int):
    """Labels come from the official split files, so every domain shares one class order whatever
    the case of its folder names."""
    from open_clip import OPENAI_IMAGENET_TEMPLATES

    base = Path(root)
    if not root or not base.is_dir():
        missing_root("domainnet", root, "the DomainNet folder", LAYOUT)
    train_paths, train_labels, names = read_split_file(base, "real", "train")
    classnames = [names[i] for i in range(len(names))]
    templates = list(OPENAI_IMAGENET_TEMPLATES)
    train, heldout = heldout_split(FileImages(train_paths, train_labels), seed, HELDOUT_IMAGES)
    tests = []
    for domain in DOMAINS:
        if domain != "real" and not (base / f"{domain}_test.txt").is_file():
            continue
        paths, labels, dnames = read_split_file(base, domain, "test")
        clash = {i: (n, classnames[i]) for i, n in dnames.items() if i < len(classnames) and n != classnames[i]}
        if clash:
            raise SystemExit(f"error: {domain}_test.txt labels disagree with real_train.txt: {list(clash.items())[:3]}")
        tests.append(Split(domain, "id" if domain == "real" else "ood", FileImages(paths, labels), classnames, templates))
    return task_of("domainnet", classnames, templates, train, heldout, tests)
