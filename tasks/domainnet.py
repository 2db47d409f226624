"""--data domainnet: DomainNet from its official split files; fine-tuned on one domain (--source-domain,
default `real`), whose test split is ID, the other four domains' test splits are the distribution shifts."""
from __future__ import annotations

from pathlib import Path

from .base import FileImages, Split, heldout_split, missing_root, task_of

DOMAINS = ("real", "painting", "clipart", "infograph", "sketch")  # the order of the OOD splits
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


def check_source_domain(data: str, source: str):
    """The one check of a --source-domain value: a DomainNet domain, and only with --data domainnet."""
    if data != "domainnet" and source != "real":
        raise SystemExit(f"error: --source-domain {source!r} is for --data domainnet only (got --data {data})")
    if source not in DOMAINS:
        raise SystemExit(f"error: unknown --source-domain {source!r}; choose one of {', '.join(DOMAINS)}")


def load_domainnet(root: str, seed: int, source: str = "real"):
    """Fine-tuned on `source`'s train list (less the held-out slice); its test list is the ID split, the
    other domains' test lists (those present) are OOD. Labels come from the official split files, so every
    domain shares one class order whatever the case of its folder names."""
    from open_clip import OPENAI_IMAGENET_TEMPLATES

    check_source_domain("domainnet", source)
    base = Path(root)
    if not root or not base.is_dir():
        missing_root("domainnet", root, "the DomainNet folder", LAYOUT)
    train_paths, train_labels, names = read_split_file(base, source, "train")
    classnames = [names[i] for i in range(len(names))]
    templates = list(OPENAI_IMAGENET_TEMPLATES)
    train, heldout = heldout_split(FileImages(train_paths, train_labels), seed, HELDOUT_IMAGES)
    tests = []
    for domain in (source, *(d for d in DOMAINS if d != source)):
        if domain != source and not (base / f"{domain}_test.txt").is_file():
            continue
        paths, labels, dnames = read_split_file(base, domain, "test")
        clash = {i: (n, classnames[i]) for i, n in dnames.items() if i < len(classnames) and n != classnames[i]}
        if clash:
            raise SystemExit(f"error: {domain}_test.txt labels disagree with {source}_train.txt: {list(clash.items())[:3]}")
        tests.append(Split(domain, "id" if domain == source else "ood", FileImages(paths, labels), classnames, templates))
    return task_of("domainnet", classnames, templates, train, heldout, tests)
