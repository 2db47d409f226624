"""The dataset layer: every --data is a Task (a training split, a held-out slice for model selection, and
test splits of kind id / ood / zeroshot), built by one loader per dataset family. common.py is the only
file of the repo's scripts that imports it; the method files see it through common.

  base.py       image lists (ArrayImages, FileImages), Split, Task, the folder rules every loader shares
  miniworld.py  the generated world's task and its retrieval pool
  imagenet.py   ImageNet-1k and its shifts (V2, R, A, Sketch, ObjectNet)
  domainnet.py  DomainNet (fine-tuned on one domain, real by default, the other domains as shifts)
  domainbed.py  DomainBed's leave-one-domain-out (PACS, VLCS, OfficeHome, TerraIncognita, DomainNet, any domain folders)
  folder.py     --data folder, and --zeroshot-data folders
  suites.py     --zeroshot-data NAME=DIR: a standard dataset's folder with its standard names and templates
The folder layouts are each module's LAYOUT (docs/data.md has them all).
"""
from dataclasses import replace

from .base import KINDS, ArrayImages, FileImages, Split, Task, check_shots, few_shot, heldout_split, load_rgb
from .domainnet import DOMAINS, check_source_domain, load_domainnet
from .domainbed import check_test_domain, load_domainbed, scored_domains
from .folder import load_folder, load_zeroshot_folder
from .imagenet import load_imagenet
from .miniworld import load_miniworld
from .suites import is_suite_spec, load_suite_folder

DATASETS = {"miniworld": load_miniworld, "imagenet": load_imagenet, "domainnet": load_domainnet, "folder": load_folder,
            "domainbed": load_domainbed}


def check_data(data: str):
    """The one check of a --data name."""
    if data not in DATASETS:
        raise SystemExit(f"error: unknown --data {data!r}; choose one of {sorted(DATASETS)}")


def check_task_options(data: str, shots: int = 0, source_domain: str = "real", unseen_classes: str = "",
                       test_domain: str = ""):
    """The one check of the options that shape a task beyond --data (check_args and load_task call it)."""
    check_data(data)
    check_shots(shots)
    check_source_domain(data, source_domain)
    check_test_domain(data, test_domain)
    if unseen_classes and data != "folder":
        raise SystemExit(f"error: --unseen-classes is an option of --data folder (got --data {data})")


def load_task(data: str, root: str = "", seed: int = 0, zeroshot_data: str = "", shots: int = 0,
              source_domain: str = "real", unseen_classes: str = "", test_domain: str = "") -> Task:
    """--data's task (fine-tuned on --source-domain for domainnet; with --unseen-classes FILE, --data folder
    only, a generalized zero-shot task; --data domainbed leaves --test-domain out of training and scores it), its training split cut to --shots images per class (few_shot:
    drawn by the seed, after the held-out slice; unseen classes have none), plus a zero-shot split per
    folder of --zeroshot-data ([NAME=]DIR[,...]; NAME: a suite)."""
    check_task_options(data, shots, source_domain, unseen_classes, test_domain)
    if data == "domainnet":
        task = load_domainnet(root, seed, source_domain)
    elif data == "domainbed":
        task = load_domainbed(root, seed, test_domain)
    else:
        task = load_folder(root, seed, unseen_classes) if unseen_classes else DATASETS[data](root, seed)
    if shots:
        images = few_shot(task.train.images, shots, seed, task.train.classnames, skip=task.unseen)
        task.train = replace(task.train, images=images)
        print(f"--shots {shots}: {len(task.train.images)} training images ({shots} per class), drawn by seed {seed}")
    for folder in (f for f in zeroshot_data.split(",") if f.strip()):
        split = (load_suite_folder if is_suite_spec(folder.strip()) else load_zeroshot_folder)(folder.strip())
        if split.name in {s.name for s in task.tests}:
            raise SystemExit(f"error: --zeroshot-data {folder!r}: a split named {split.name!r} exists already; "
                             "rename the folder")
        task.tests.append(split)
    return task


__all__ = ["DATASETS", "DOMAINS", "KINDS", "ArrayImages", "FileImages", "Split", "Task", "check_data",
           "check_task_options", "few_shot", "heldout_split", "load_rgb", "load_task", "scored_domains"]
