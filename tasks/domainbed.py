"""--data domainbed: leave-one-domain-out over a folder of domain folders (DomainBed's protocol: PACS, VLCS,
OfficeHome, TerraIncognita, DomainNet, or any dataset laid out the same way). Train on every domain but
--test-domain, select on a fixed 20% of each training domain ("training-domain validation"), score the
left-out domain (kind ood).

Choices where DomainBed's protocol leaves room:
  - The held-out 20% of a domain is the same for every method, seed and test domain: its images are
    ordered by the SHA-1 of their path relative to DIR (e.g. 'photo/dog/001.jpg') and the first
    round(20%) of them are held out. Nothing of the run (seed, method, test domain) enters the rule.
  - Training batches draw from the pooled training domains (not an equal share per domain).
  - The label space is every class folder holding an image in some training domain (underscores read
    as spaces, as --data folder does); the test domain's images of any other class are not scored.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .base import FileImages, Split, class_folders_with_images, missing_root, scan_class_folders, subfolders, task_of

HELDOUT_FRACTION = 0.2  # of each training domain, held out for model selection (DomainBed's holdout_fraction)
# DomainBed's five datasets, recognised from their domain folder names (DomainBed's own folder names)
KNOWN = {"PACS": ("art_painting", "cartoon", "photo", "sketch"),
         "VLCS": ("Caltech101", "LabelMe", "SUN09", "VOC2007"),
         "OfficeHome": ("Art", "Clipart", "Product", "Real World"),
         "TerraIncognita": ("location_100", "location_38", "location_43", "location_46"),
         "DomainNet": ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")}
LAYOUT = """DIR/<domain>/<class>/*.jpg         (two or more domain folders with the same class folders, e.g.
                                    DomainBed's PACS: DIR/{art_painting,cartoon,photo,sketch}/<class>/;
                                    --test-domain names the left-out one)"""


def check_test_domain(data: str, test_domain: str):
    """The one check that --test-domain comes with --data domainbed and only with it."""
    if data == "domainbed" and not test_domain:
        raise SystemExit("error: --data domainbed needs --test-domain NAME: the domain left out of training and scored "
                         "(run once per domain; `python evaluate.py table --domainbed` averages them)")
    if data != "domainbed" and test_domain:
        raise SystemExit(f"error: --test-domain {test_domain!r} is for --data domainbed (leave-one-domain-out), "
                         f"not --data {data}")


def find_domains(root: str) -> list:
    """The domain folders of DIR (its non-hidden sub-folders), sorted."""
    base = Path(root)
    if not root or not base.is_dir():
        missing_root("domainbed", root, "the folder of domain folders", LAYOUT)
    domains = [p.name for p in subfolders(base)]
    if len(domains) < 2:
        missing_root("domainbed", root, f"two or more domain folders (found {domains})", LAYOUT)
    return domains


def dataset_name(domains) -> str:
    """DomainBed's name of a dataset with these domain folders; '' when it is none of the five."""
    return next((name for name, known in KNOWN.items() if set(domains) == set(known)), "")


def heldout_order(base: Path, paths: list) -> np.ndarray:
    """The images' order for the held-out draw: by SHA-1 of their path relative to DIR (no seed)."""
    keys = [hashlib.sha1(Path(p).relative_to(base).as_posix().encode()).hexdigest() for p in paths]
    return np.argsort(keys, kind="stable")


def load_domainbed(root: str, seed: int, test_domain: str = ""):
    """The task of one left-out domain; `seed` is unused (the held-out slice does not depend on it)."""
    from open_clip import SIMPLE_IMAGENET_TEMPLATES

    check_test_domain("domainbed", test_domain)
    base, domains = Path(root), find_domains(root)
    if test_domain not in domains:
        raise SystemExit(f"error: --test-domain {test_domain!r} is not a domain of {root}; its domains: {', '.join(domains)}")
    training = [d for d in domains if d != test_domain]
    classes = sorted({c for d in training for c in class_folders_with_images(base / d, f"images in domain {d}")[0]})
    if not classes:
        missing_root("domainbed", root, "images in the training domains", LAYOUT)
    every = {p.name for d in domains for p in subfolders(base / d)}
    dropped = sorted(every - set(classes))
    index = {c: i for i, c in enumerate(classes)}
    classnames = [c.replace("_", " ") for c in classes]
    templates = list(SIMPLE_IMAGENET_TEMPLATES)
    train, held = ([], []), ([], [])
    for d in training:
        paths, labels = scan_class_folders(base / d, index, dropped)
        order = heldout_order(base, paths)
        count = int(round(HELDOUT_FRACTION * len(paths)))
        for part, idx in ((held, np.sort(order[:count])), (train, np.sort(order[count:]))):
            part[0].extend(paths[i] for i in idx)
            part[1].extend(labels[i] for i in idx)
    test = Split(test_domain, "ood", FileImages(*scan_class_folders(base / test_domain, index, dropped)), classnames, templates)
    name = dataset_name(domains) or f"domainbed:{base.name}"
    return task_of(name, classnames, templates, FileImages(*train), FileImages(*held), [test])


def scored_domains(root: str, seen) -> tuple[str, list]:
    """(the dataset's name, the domains a leave-one-domain-out row must cover) for the runs of data root
    `root` whose rows hold test domains `seen`: the root's domain folders; with the folder gone, those of
    the one DomainBed dataset the seen domains belong to, else the seen ones."""
    if root and Path(root).is_dir():
        domains = find_domains(root)
    else:
        known = [d for d in KNOWN.values() if set(seen) <= set(d)]
        domains = sorted(known[0]) if len(known) == 1 else sorted(seen)
    return dataset_name(domains) or Path(root).name or "domainbed", domains
