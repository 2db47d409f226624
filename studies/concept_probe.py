"""Does a world with more named concepts widen the text space and leave Lipsum-FT room? (issue #18)

  python studies/concept_probe.py --out runs/concept_probe                 # pretrain (~12 min), then probe (~8 min)
  python studies/concept_probe.py --out runs/concept_probe --extra-shapes 0 # the same pipeline on today's 12 shapes

The hypothesis (docs/world_probe.md): Lipsum-FT costs ID here because the mini CLIP's embedding has about
a dozen directions, the ones the task's head and FT's feature change lie in; a world with more named
concepts than its task uses should have more. This script tests it without touching the committed
world: in this process only, it adds --extra-shapes procedural shapes (EXTRA_SHAPES: a pentagon, stars,
flowers, letters, ... each under a made-up name with one fact phrase) to miniworld, pretrains a mini CLIP
with the committed recipe and config (only the vocabulary grows) into OUT/miniclip.pt, and runs
studies/world_probe.py's `task` variant (miniworld.task's 24 classes, which use none of the new shapes)
with --errors and --diagnostics on it into OUT/task. Compare with `world_probe.py --variants task`
on the committed CLIP (docs/world_probe.md).
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "reproduce"))

import miniworld  # noqa: E402
from miniworld import model as mw_model  # noqa: E402
from miniworld import world as mw_world  # noqa: E402


def _polar(u, v) -> tuple:
    return np.hypot(u, v), np.arctan2(v, u)


def _flower(k, u, v):
    r, ang = _polar(u, v)
    return r < 0.5 + 0.45 * np.abs(np.cos(k * (ang + math.pi / 2) / 2))


def _box(u, v, x0, x1, y0, y1):
    return (u > x0) & (u < x1) & (v > y0) & (v < y1)


# name -> inside-test in object-local coordinates (unit radius, y down), and its one fact phrase
EXTRA_SHAPES = {
    "blicket": (lambda u, v: mw_world._polygon(5, 0.92, *_polar(u, v)), "with five straight sides"),
    "dax": (lambda u, v: (np.hypot(np.abs(u) - 0.5, v) < 0.42) | _box(u, v, -0.5, 0.5, -0.15, 0.15), "shaped like a dumbbell"),
    "wug": (lambda u, v: mw_world._star(4, 0.38, *_polar(u, v), outer=0.98), "with four thin points"),
    "toma": (lambda u, v: mw_world._star(6, 0.4, *_polar(u, v), outer=0.98), "with six sharp points"),
    "fep": (lambda u, v: mw_world._star(8, 0.6, *_polar(u, v), outer=0.98), "with eight little points"),
    "zorb": (lambda u, v: _flower(3, u, v), "with three round petals"),
    "kiki": (lambda u, v: _flower(4, u, v), "with four round petals"),
    "bouba": (lambda u, v: _flower(6, u, v), "with six round petals"),
    "modi": (lambda u, v: (u / 0.95) ** 2 + (v / 0.55) ** 2 < 1, "that is a wide oval"),
    "gazzer": (lambda u, v: (np.hypot(u, v) < 0.92) & (v < 0.1), "that is half a disc"),
    "lorp": (lambda u, v: (np.hypot(u, v) < 0.92) & ~((u > 0) & (np.abs(v) < u * 0.7)), "with a wedge cut out"),
    "tufa": (lambda u, v: np.abs(u) < np.abs(v) * 0.95 + 0.08, "shaped like an hourglass"),
    "nerk": (lambda u, v: (np.abs(v) < 0.7) & (np.abs(u) < 0.5 + 0.45 * (v + 0.7) / 1.4), "with a narrow top and a wide base"),
    "vimp": (lambda u, v: _box(u, v, -0.9, 0.9, -0.9, -0.45) | _box(u, v, -0.25, 0.25, -0.9, 0.9), "shaped like the letter t"),
    "jabo": (lambda u, v: _box(u, v, -0.7, -0.2, -0.9, 0.9) | _box(u, v, -0.7, 0.8, 0.4, 0.9), "shaped like the letter l"),
    "pilk": (lambda u, v: (_box(u, v, -0.85, 0.85, -0.85, 0.85) & ~_box(u, v, -0.4, 0.4, -0.95, 0.45)), "shaped like a cup"),
    "snorf": (lambda u, v: (np.abs(u) < 0.9) & (v > np.abs(u) * 0.9 - 0.6) & (v < np.abs(u) * 0.9 - 0.05), "bent like a chevron"),
    "gleeb": (lambda u, v: (np.abs(u - v) < 0.42) & (np.abs(u + v) < 1.6) | (np.abs(u + v) < 0.42) & (np.abs(u - v) < 1.6),
              "with two crossing diagonals"),
    "tibble": (lambda u, v: (np.hypot(u, v - 0.3) < 0.6) | ((v > -0.95) & (v <= 0.3) & (np.abs(u) < (v + 0.95) * 0.48)),
               "shaped like a drop"),
    "zupa": (lambda u, v: _box(u, v, -0.9, 0.9, -0.9, -0.55) | _box(u, v, -0.9, 0.9, -0.18, 0.18) | _box(u, v, -0.9, 0.9, 0.55, 0.9),
             "made of three parallel bars"),
    "morv": (lambda u, v: (np.maximum(abs(u), abs(v)) < 0.85) & (np.maximum(abs(u), abs(v)) > 0.5), "like a square frame"),
    "kesh": (lambda u, v: mw_world._polygon(3, 0.98, *_polar(u, v)) & ~mw_world._polygon(3, 0.5, *_polar(u, v)),
             "like a triangle frame"),
    "drav": (lambda u, v: mw_world._polygon(4, 0.75, *_polar(u, v - 0.28), math.pi / 4)
             | (mw_world._polygon(3, 0.6, *_polar(u, v + 0.42)) & (v < -0.15)),
             "shaped like a little house"),
    "yoff": (lambda u, v: _box(u, v, -0.9, -0.45, -0.9, 0.9) | _box(u, v, 0.45, 0.9, -0.9, 0.9) | _box(u, v, -0.9, 0.9, -0.22, 0.22),
             "shaped like the letter h"),
}


def extend_world(n_extra: int) -> list:
    """Adds the first n_extra EXTRA_SHAPES to miniworld in this process (its shape list, facts and
    renderer), which also changes world_config() and so every cache key. -> the names added."""
    names = list(EXTRA_SHAPES)[:n_extra]
    base_mask = mw_world._shape_mask

    def shape_mask(shape, u, v):
        return EXTRA_SHAPES[shape][0](u, v) if shape in EXTRA_SHAPES else base_mask(shape, u, v)

    mw_world._shape_mask = shape_mask  # render() looks it up by name
    miniworld.SHAPES.extend(names)  # one list object, shared by world, text and task
    for name in names:
        miniworld.SHAPE_FACTS[name] = [EXTRA_SHAPES[name][1]]
    return names


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/concept_probe")
    p.add_argument("--extra-shapes", type=int, default=len(EXTRA_SHAPES), help=f"0..{len(EXTRA_SHAPES)}")
    p.add_argument("--seeds", default="0")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--pretrain-steps", type=int, default=mw_model.PRETRAIN_STEPS)
    p.add_argument("--pretrain-images", type=int, default=mw_model.PRETRAIN_IMAGES)
    p.add_argument("--extra", default="", help="extra arguments for every training run (world_probe --extra)")
    a = p.parse_args(argv)
    if not 0 <= a.extra_shapes <= len(EXTRA_SHAPES):
        raise SystemExit(f"error: --extra-shapes {a.extra_shapes}: choose 0..{len(EXTRA_SHAPES)}")
    for flag, value in (("--pretrain-steps", a.pretrain_steps), ("--pretrain-images", a.pretrain_images)):
        if value < 1:
            raise SystemExit(f"error: {flag} {value}: must be at least 1")
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    added = extend_world(a.extra_shapes)
    out = Path(a.out)
    ckpt = out / "miniclip.pt"
    cfg = json.loads(mw_model.CONFIG_JSON.read_text())
    cfg["text_cfg"]["vocab_size"] = miniworld.WordTokenizer().vocab_size
    print(f"{len(miniworld.SHAPES)} shapes ({len(added)} added), vocabulary {cfg['text_cfg']['vocab_size']} ids")
    if not ckpt.is_file():
        t0 = time.time()
        _, losses = mw_model.pretrain(steps=a.pretrain_steps, n_images=a.pretrain_images, cfg=cfg, out=ckpt)
        print(f"pretrained in {(time.time() - t0) / 60:.1f} min, final loss {np.mean(losses[-50:]):.3f}")
    meta = torch.load(ckpt, map_location="cpu", weights_only=False)["meta"]
    print(f"{ckpt}: {meta}")
    import world_probe

    return world_probe.main(["--variants", "task", "--seeds", a.seeds, "--runs", str(out), "--threads", str(a.threads),
                             "--methods", "zeroshot,ft,lipsum_ft,kd", "--errors", "--diagnostics",
                             "--extra", f"--pretrained {ckpt} {a.extra}"])


if __name__ == "__main__":
    main()
