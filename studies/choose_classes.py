"""Choose miniworld.task's classes from the pretrained mini CLIP's zero-shot accuracy alone (issue #18).

  python studies/choose_classes.py                 # writes docs/choose_classes.md

Renders IMAGES_PER_COMBO fresh images (RENDER_SEED, a stream no split uses) of every (shape, colour,
pattern) the task may use (the zero-shot-transfer shapes and colours excluded) in every style, embeds them
once, and scores every candidate class set of the listed SIZES = (shapes, colours, patterns) by zero-shot
accuracy within the set (TASK_TEMPLATES heads): photo = the ID stand-in, the other styles = OOD. Ranked
by min(ID, 70) + OOD mean: zero-shot should read the task partly (the world's bar: ID 45–75, OOD mean ≥ 45)
and leave fine-tuning headroom. No fine-tuning run and no test split is looked at.
"""
import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import miniworld as mw  # noqa: E402

IMAGES_PER_COMBO = 12
RENDER_SEED = 777
COLOUR_POOL = ["red", "yellow", "green", "blue"]
SIZES = [(4, 2, 3), (5, 2, 2), (4, 3, 2), (6, 2, 2), (3, 2, 4), (4, 2, 2)]  # (shapes, colours, patterns)
SHOW = 3  # best candidates listed per size


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "docs" / "choose_classes.md"))
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, tok = mw.load_miniclip()
    shapes = [s for s in mw.SHAPES if s not in mw.ZS_SHAPES]
    combos = [(s, c, pat) for s in shapes for c in COLOUR_POOL for pat in mw.PATTERNS]
    labels = np.repeat(np.arange(len(combos)), IMAGES_PER_COMBO)  # [N]
    feats = {}
    with torch.no_grad():
        for k, style in enumerate(mw.STYLES):
            images, _ = mw.render_many(RENDER_SEED, np.arange(len(labels)), style=k, **mw.class_attrs(combos, labels))
            f = torch.cat([model.encode_image(mw.to_tensor(images[i:i + 1024])) for i in range(0, len(images), 1024)])
            feats[style] = F.normalize(f, dim=-1)  # [N, D]
        heads = torch.stack([F.normalize(F.normalize(model.encode_text(tok([t.format(mw.class_name(*c)) for t in mw.TASK_TEMPLATES])),
                                                     dim=-1).mean(0), dim=-1) for c in combos])  # [combos, D]
    labels_t = torch.from_numpy(labels)

    def accuracy(classes):
        ids = torch.tensor([combos.index(c) for c in classes])
        keep = torch.isin(labels_t, ids)
        target = (labels_t[keep][:, None] == ids[None]).float().argmax(1)  # [n]: position within the set
        return {s: 100 * float(((f[keep] @ heads[ids].t()).argmax(1) == target).float().mean()) for s, f in feats.items()}

    lines = ["# Choosing miniworld.task's classes by zero-shot accuracy", "",
             f"Written by `python studies/choose_classes.py` ({IMAGES_PER_COMBO} images per (shape, colour, pattern) and style, render "
             f"seed {RENDER_SEED}, committed mini CLIP). Ranked by min(ID, 70) + OOD mean; the best {SHOW} per size.", "",
             "| shapes x colours x patterns | classes | zero-shot photo (ID) | OOD mean | worst style | shapes | colours | patterns |",
             "|---|---|---|---|---|---|---|---|"]
    for ns, nc, npat in SIZES:
        scored = []
        for S in itertools.combinations(shapes, ns):
            for C in itertools.combinations(COLOUR_POOL, nc):
                for P in itertools.combinations(mw.PATTERNS, npat):
                    acc = accuracy([(s, c, pat) for s in S for c in C for pat in P])
                    ood = [acc[s] for s in mw.STYLES if s != "photo"]
                    scored.append((min(acc["photo"], 70) + np.mean(ood), acc["photo"], np.mean(ood), min(ood), S, C, P))
        for _, i, o, worst, S, C, P in sorted(scored, key=lambda r: -r[0])[:SHOW]:
            lines.append(f"| {ns} x {nc} x {npat} | {ns * nc * npat} | {i:.1f} | {o:.1f} | {worst:.1f} | {', '.join(S)} | "
                         f"{', '.join(C)} | {', '.join(P)} |")
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
