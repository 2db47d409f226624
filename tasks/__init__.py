"""The dataset layer: every --data is a Task (a training split, a held-out slice for model selection, and
test splits of kind id / ood / zeroshot), built by one loader per dataset family. common.py is the only
file of the repo's scripts that imports it; the method files see it through common.

  base.py       image lists (ArrayImages, FileImages), Split, Task, the folder rules every loader shares
  miniworld.py  the generated world's task and its retrieval pool
  imagenet.py   ImageNet-1k and its shifts (V2, R, A, Sketch, ObjectNet)
  domainnet.py  DomainNet (fine-tuned on real, the other domains as shifts)
  domainbed.py  DomainBed's leave-one-domain-out (PACS, VLCS, OfficeHome, TerraIncognita, DomainNet, any domain folders)
  folder.py     --data folder, and --zeroshot-data folders
The folder layouts are each module's LAYOUT (docs/data.md has them all).
"""
from .base import KINDS, ArrayImages, FileImages, Split, Task, heldout_split, load_rgb
from .domainbed import check_test_domain, load_domainbed, scored_domains
from .domainnet import load_domainnet
from .folder import load_folder, load_zeroshot_folder
from .imagenet import load_imagenet
from .miniworld import load_miniworld

DATASETS = {"miniworld": load_miniworld, "imagenet": load_imagenet, "domainnet": load_domainnet, "folder": load_folder,
            "domainbed": load_domainbed}


def check_data(data: str):
    """The one check of a --data name."""
    if data not in DATASETS:
        raise SystemExit(f"error: unknown --data {data!r}; choose one of {sorted(DATASETS)}")


def load_task(data: str, root: str = "", seed: int = 0, zeroshot_data: str = "", test_domain: str = "") -> Task:
    """--data's task, plus a zero-shot split per folder of --zeroshot-data (DIR[,DIR...]); `test_domain` is
    --data domainbed's left-out domain."""
    check_data(data)
    check_test_domain(data, test_domain)
    task = load_domainbed(root, seed, test_domain) if data == "domainbed" else DATASETS[data](root, seed)
    for folder in (f for f in zeroshot_data.split(",") if f.strip()):
        split = load_zeroshot_folder(folder.strip())
        if split.name in {s.name for s in task.tests}:
            raise SystemExit(f"error: --zeroshot-data {folder!r}: a split named {split.name!r} exists already; "
                             "rename the folder")
        task.tests.append(split)
    return task


__all__ = ["DATASETS", "KINDS", "ArrayImages", "FileImages", "Split", "Task", "check_data", "check_test_domain",
           "heldout_split", "load_rgb", "load_task", "scored_domains"]
