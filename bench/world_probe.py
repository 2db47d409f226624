"""Probe downstream-task variants of miniworld with the committed mini CLIP (issue #18's search for the
papers' regime): zero-shot, FT, Lipsum-FT, KD and FT's WiSE-FT curve on a task whose classes differ from
miniworld.task's, without pretraining anything.

  python bench/world_probe.py --variants shape-colour,pattern --seeds 0
  python bench/world_probe.py --variants pattern --extra "--steps 50"     # a quick look
  python bench/world_probe.py --variants task --extra "--pretrained OTHER_MINICLIP.pt" --diagnostics

Each variant is rendered like miniworld.task (same styles as OOD splits, same zero-shot splits), handed to
the method files through miniworld.load_task, and trained with each method file's miniworld preset into
RUNS/<variant>/<method>-s<seed>. Prints one line per (variant, method): ID, OOD mean, zero-shot-transfer
mean (mean over seeds), and the best α < 1 of WiSE-FT on FT with its ID minus FT's (the bulge).
Nothing here is used by the method files; it is a scaffold for redesigning the world.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import miniworld  # noqa: E402
from miniworld import task as mw_task  # noqa: E402

SHAPES5 = ["triangle", "diamond", "ring", "hexagon", "bar"]
COLOURS4 = ["red", "yellow", "green", "blue"]
# name: classes as (shape, colour, pattern or None); a None pattern is left random. Backgrounds are random.
VARIANTS = {
    "task": list(mw_task.TASK_CLASSES),  # miniworld.task's own classes, for a side-by-side look
    "shape-colour": [(s, c, None) for s in SHAPES5 for c in COLOURS4],  # the RENDER_VERSION 2 task, without its cue
    "pattern": [(s, "red", p) for s in SHAPES5 for p in miniworld.PATTERNS],  # 20 classes: shape x fill pattern
    "shape-pattern-colour": [(s, c, p) for s in SHAPES5[:4] for c in ("red", "blue") for p in miniworld.PATTERNS[:3]],
    "wide": [(s, c, None) for s in SHAPES5 + ["square", "star", "heart"] for c in COLOURS4],  # 32 classes
    # candidates for miniworld.task's classes, compared on zero-shot alone (--methods zeroshot) after pretraining
    "spc-tshh": [(s, c, p) for s in ("triangle", "square", "hexagon", "heart") for c in ("red", "blue")
                 for p in ("solid", "striped", "dotted")],
    "spc-sshh": [(s, c, p) for s in ("square", "star", "heart", "hexagon") for c in ("red", "blue")
                 for p in ("solid", "striped", "checkered")],
    "sp-red6": [(s, "red", p) for s in ("triangle", "square", "star", "heart", "hexagon", "bar") for p in miniworld.PATTERNS],
    "spc-3x2x4": [(s, c, p) for s in ("triangle", "square", "heart") for c in ("red", "blue") for p in miniworld.PATTERNS],
    "spc-3x3x4": [(s, c, p) for s in ("triangle", "square", "hexagon") for c in ("red", "yellow", "blue")
                  for p in miniworld.PATTERNS],  # 36 classes
}
METHODS = [("zeroshot", "baselines", ["--method", "zeroshot"]), ("ft", "baselines", ["--method", "ft"]),
           ("lipsum_ft", "lipsum_ft", []), ("kd", "baselines", ["--method", "kd"])]
WISE_ALPHAS = "0.5,0.7,0.8,0.9,1"


def make_split(classes, n, stream, style, kind):
    idx = np.arange(n)
    labels = idx % len(classes)
    fixed = dict(style=miniworld.STYLES.index(style), **miniworld.class_attrs(classes, labels))
    images, attrs = miniworld.render_many(stream, idx, **fixed)
    split = dict(images=images, labels=labels.astype(np.int64), kind=kind)
    if kind == "train":
        split["captions"] = miniworld.captions(attrs, stream, idx)
    return split


def variant_task(name: str) -> dict:
    classes = VARIANTS[name]
    sizes = mw_task.TASK_SIZES
    splits = {}
    for k, (split, kind, style) in enumerate([("train", "train", "photo"), ("heldout", "heldout", "photo"),
                                              ("id", "id", "photo"), ("sketch", "ood", "sketch"),
                                              ("cartoon", "ood", "cartoon"), ("painting", "ood", "painting"),
                                              ("pixel", "ood", "pixel")]):
        splits[split] = make_split(classes, sizes[kind], 5000 + 100 * k, style, kind)
    base = miniworld.load_task()  # the zero-shot transfer splits stay miniworld.task's, so variants compare on them
    splits.update({n: sp for n, sp in base["splits"].items() if sp["kind"] == "zeroshot"})
    return dict(classnames=[miniworld.class_name(*c) for c in classes], templates=list(mw_task.TASK_TEMPLATES), splits=splits)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="task,shape-colour", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0")
    p.add_argument("--runs", default="runs/world_probe")
    p.add_argument("--extra", default="", help="extra arguments for every training run")
    p.add_argument("--methods", default=",".join(m for m, _, _ in METHODS), help="comma-separated subset")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--diagnostics", action="store_true", help="also bench/diagnostics.py on each variant's runs")
    a = p.parse_args(argv)
    for flag, given, known in (("--variants", a.variants, VARIANTS), ("--methods", a.methods, [m for m, _, _ in METHODS])):
        unknown = [v for v in given.split(",") if v not in known]
        if unknown:
            raise SystemExit(f"error: {flag} {', '.join(unknown)}: choose from {', '.join(known)}")
    import importlib

    import evaluate
    import merge

    for variant in a.variants.split(","):
        task = variant_task(variant)
        miniworld.load_task = lambda seed=0, task=task: task  # what common.load_miniworld asks for
        out = Path(a.runs) / variant
        for seed in [int(s) for s in a.seeds.split(",")]:
            for name, module, argv in [m for m in METHODS if m[0] in a.methods.split(",")]:
                run = out / f"{name}-s{seed}"
                if not (run / "final.pt").exists():
                    importlib.import_module(module).main([*argv, "--seed", str(seed), "--out", str(run), "--threads",
                                                          str(a.threads), *a.extra.split()])
            if "ft" in a.methods.split(",") and not any('"tag": "wise' in line for line in (out / f"ft-s{seed}" / "results.jsonl").read_text().splitlines()):
                merge.main(["wise", "--ckpt", str(out / f"ft-s{seed}"), "--alphas", WISE_ALPHAS])
        rows = evaluate.read_results(out / "results.jsonl")
        columns, table = evaluate.summarise(rows)
        print(f"\n## {variant}: {len(task['classnames'])} classes, e.g. {task['classnames'][:3]}")
        wise = {}
        for (method, tag, _, _), cols in table.items():
            mean = lambda c: float(np.mean(cols[c])) if cols.get(c) else float("nan")  # noqa: E731
            print(f"{method:<10} {tag:<12} ID {mean('id'):5.1f}  OOD {mean('OOD mean'):5.1f}  ZS {mean('ZS mean'):5.1f}")
            if method == "ft" and tag.startswith("wise a="):
                wise[float(tag.split("=")[1])] = mean("id")
        below = {al: v for al, v in wise.items() if al < 1}
        if below and 1.0 in wise:
            best = max(below, key=below.get)
            print(f"FT's WiSE curve: best α < 1 on ID is {best:g}, ID {below[best] - wise[1.0]:+.2f} vs FT (the bulge)")
        if a.diagnostics:  # while miniworld.load_task is this variant's, so the runs load with their own classes
            importlib.import_module("diagnostics").main(["--runs", str(out), "--out", str(out / "diagnostics.md")])
    return 0


if __name__ == "__main__":
    main()
