"""Shared fixtures: a tiny random open_clip architecture (as a config file, the way a user passes a
custom model) and folder trees of generated JPEGs in the layouts the real datasets use."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Path of an open_clip config for a ~100k-parameter random CLIP (`--model PATH.json`)."""
    path = tmp_path_factory.mktemp("models") / "tiny-vit.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return str(path)


def write_images(folder: Path, n: int, seed: int, size=(40, 40), fmt="JPEG", colour=None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
        if colour is not None:  # a class-dependent tint so a model can learn something
            arr = (0.5 * arr + 0.5 * np.array(colour)).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img{i}.{'jpg' if fmt == 'JPEG' else fmt.lower()}", fmt)


COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


@pytest.fixture
def folder_data(tmp_path) -> str:
    """--data folder layout: train/ + test/ (ID) + sketch/ (OOD), 4 classes."""
    root = tmp_path / "folder"
    for split, n in (("train", 12), ("test", 4), ("sketch", 4)):
        for k, name in enumerate(["cat", "dog", "red_fox", "owl"]):
            write_images(root / split / name, n, seed=hash((split, k)) % 2**32, colour=COLOURS[k])
    return str(root)
