"""--data miniworld: the generated world's downstream task (the miniworld package) and its retrieval pool."""
from __future__ import annotations

import hashlib
from pathlib import Path

from .base import KINDS, ArrayImages, Split, Task

POOL_SIZE = 50_000  # image-text pairs in the generated retrieval pool (ARF's anchors)


def load_miniworld(root: str, seed: int) -> Task:
    """The generated world. It lives in no folder, so --data-root is refused, and it is one fixed task
    whatever the seed: seeds vary the training run (initialisation, data order, augmentation), not the
    test sets or the held-out slice, as on ImageNet."""
    import miniworld

    if root:
        raise SystemExit(f"error: --data miniworld is generated and takes no --data-root (got {root!r})")
    task = miniworld.load_task()
    classnames, templates = task["classnames"], task["templates"]
    splits = []
    for name, s in task["splits"].items():
        images = ArrayImages(s["images"], s["labels"], s.get("captions"))
        splits.append(Split(name, s["kind"], images, s.get("classnames", classnames), s.get("templates", templates)))
    by_kind = {k: [s for s in splits if s.kind == k] for k in KINDS}
    return Task("miniworld", classnames, templates, by_kind["train"][0], by_kind["heldout"][0],
                by_kind["id"] + by_kind["ood"] + by_kind["zeroshot"], pool=miniworld_pool)


def miniworld_pool(cache: Path) -> str:
    """POOL_SIZE captioned images of the pretraining distribution (PNGs + pool.tsv in open_clip's CSV
    layout), written once into a folder of `cache` named by the world's configuration."""
    import miniworld

    key = hashlib.sha1(str(sorted(miniworld.world_config().items())).encode()).hexdigest()[:16]
    return str(miniworld.write_pool(Path(cache) / f"miniworld-pool-{POOL_SIZE}-{key}", POOL_SIZE))
