"""Probe downstream-task variants of miniworld with the committed mini CLIP (issue #18's search for the
papers' regime): zero-shot, FT, Lipsum-FT, KD and FT's WiSE-FT curve on a task whose classes differ from
miniworld.task's, without pretraining anything.

  python studies/world_probe.py --variants shape-colour,pattern --seeds 0
  python studies/world_probe.py --variants pattern --extra "--steps 50"     # a quick look
  python studies/world_probe.py --variants task --extra "--pretrained OTHER_MINICLIP.pt" --diagnostics
  python studies/world_probe.py --variants task --train-images 1000 --runs runs/world_probe_train1000
  python studies/world_probe.py --variants task --methods zeroshot,ft,lipsum_ft,lipsum_ft-noobj --errors

Each variant is rendered like miniworld.task (same styles as OOD splits, same zero-shot splits), handed to
the method files through miniworld.load_task, and trained with each method file's miniworld preset on the
variant's whole train split (`--shots 0`, its size set by --train-images; `--extra "--shots K"` cuts it) into
RUNS/<variant>/<method>-s<seed>. Prints one line per (variant, method): ID, OOD mean, zero-shot-transfer
mean (mean over seeds), and the best α < 1 of WiSE-FT on FT with its ID minus FT's (the bulge).
Nothing here is used by the method files; it is a scaffold for redesigning the world.

Two diagnostics that no method file offers:
  * lipsum_ft-noobj: Lipsum-FT whose random texts never contain an object word (a shape, colour or
    pattern name, or a word of their synonyms and fact phrases; OBJECT_STOPWORDS kept). If Lipsum-FT's
    ID cost came from random texts naming the task's attributes, this run would keep FT's ID.
  * --errors: on ID, how often zero-shot is right where FT is wrong and the reverse, and the ID accuracy of
    the output-space ensemble (1 − w)·softmax(FT) + w·softmax(zero-shot): when even that ensemble gains
    nothing, zero-shot's knowledge is not complementary to FT's and WiSE-FT has no bulge to find.
"""
import argparse
import contextlib
import sys
from pathlib import Path
from unittest import mock

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "reproduce"))

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
           ("lipsum_ft", "lipsum_ft", []), ("kd", "baselines", ["--method", "kd"]), ("lipsum_ft-noobj", "lipsum_ft", [])]
DEFAULT_METHODS = "zeroshot,ft,lipsum_ft,kd"
WISE_ALPHAS = "0.5,0.7,0.8,0.9,1"
ENSEMBLE_WEIGHTS = (0.1, 0.2, 0.3, 0.5)  # w of zero-shot in --errors' output-space ensemble
OBJECT_STOPWORDS = set("a an the with it is in of has its are there on like no one and that to run looks".split())


def object_word_ids(tokenizer) -> set:
    """Token ids of every word that names or describes an object: shapes, colours, patterns, their synonyms
    and fact phrases (function words kept, so the texts still parse as the grammar's filler)."""
    words = set(miniworld.SHAPES) | set(miniworld.COLOURS)
    for bank in (miniworld.PATTERN_ADJS, miniworld.PATTERN_PHRASES, miniworld.PATTERN_DETAILS, miniworld.SHAPE_FACTS,
                 miniworld.COLOUR_FACTS):
        for key, phrases in bank.items():
            words |= {key, *(w for phrase in phrases for w in phrase.split())}
    return {i for w in words - OBJECT_STOPWORDS for i in tokenizer.encode(w)}


def without_object_words(banned: set):
    """A stand-in for lipsum_ft.random_texts (same signature and layout) whose ids avoid `banned` too."""
    import torch

    def texts(num_texts, length, sot, eot, vocab_size, context_length, generator):
        vocab = torch.tensor([i for i in range(1, vocab_size) if i not in banned | {sot, eot}])  # [V']
        tokens = torch.zeros(num_texts, context_length, dtype=torch.long)  # [M, context]
        tokens[:, 0] = sot
        tokens[:, 1:length + 1] = vocab[torch.randint(len(vocab), (num_texts, length), generator=generator)]
        tokens[:, length + 1] = eot
        return tokens
    return texts


def make_split(classes, n, stream, style, kind):
    idx = np.arange(n)
    labels = idx % len(classes)
    fixed = dict(style=miniworld.STYLES.index(style), **miniworld.class_attrs(classes, labels))
    images, attrs = miniworld.render_many(stream, idx, **fixed)
    split = dict(images=images, labels=labels.astype(np.int64), kind=kind)
    if kind == "train":
        split["captions"] = miniworld.captions(attrs, stream, idx)
    return split


def variant_task(name: str, train_images: int = 0) -> dict:
    classes = VARIANTS[name]
    sizes = dict(mw_task.TASK_SIZES, train=train_images or mw_task.TASK_SIZES["train"])
    splits = {}
    for k, (split, kind, style) in enumerate([("train", "train", "photo"), ("heldout", "heldout", "photo"),
                                              ("id", "id", "photo"), ("sketch", "ood", "sketch"),
                                              ("cartoon", "ood", "cartoon"), ("painting", "ood", "painting"),
                                              ("pixel", "ood", "pixel")]):
        splits[split] = make_split(classes, sizes[kind], 5000 + 100 * k, style, kind)
    base = miniworld.load_task()  # the zero-shot transfer splits stay miniworld.task's, so variants compare on them
    splits.update({n: sp for n, sp in base["splits"].items() if sp["kind"] == "zeroshot"})
    return dict(classnames=[miniworld.class_name(*c) for c in classes], templates=list(mw_task.TASK_TEMPLATES), splits=splits)


def print_errors(ft_run: Path, classes: list):
    """Zero-shot (θ0 of the run) against FT on the ID split: who is right where the other is wrong, which
    attribute of the (shape, colour, pattern) `classes` each gets wrong, and the ID accuracy of their
    output-space ensemble for each w in ENSEMBLE_WEIGHTS."""
    import common

    device = common.get_device("")
    run = common.load_run(str(ft_run), device)
    split = next(s for s in run.task.tests if s.kind == "id")
    probs = {}
    for name, model in (("zero-shot", common.run_theta0(run, device)), ("ft", run.model)):
        logits, labels, _ = common.split_logits(model, split, run.task, run.eval_tf, device)  # [N, K], [N]
        probs[name] = logits.float().softmax(-1)  # [N, K]
    right = {n: p.argmax(-1) == labels for n, p in probs.items()}  # [N] each
    print(f"{ft_run.name} on {split.name}: zero-shot {100 * right['zero-shot'].float().mean():.1f}, FT "
          f"{100 * right['ft'].float().mean():.1f}; only zero-shot right "
          f"{100 * (right['zero-shot'] & ~right['ft']).float().mean():.1f}, only FT right "
          f"{100 * (right['ft'] & ~right['zero-shot']).float().mean():.1f}")
    for name, p in probs.items():
        wrong = {attr: 0 for attr in ("shape", "colour", "pattern")}
        for guess, truth in zip(p.argmax(-1).tolist(), labels.tolist()):
            for k, attr in enumerate(wrong):
                wrong[attr] += classes[guess][k] != classes[truth][k]
        print(f"  {name} gets wrong: " + ", ".join(f"{a} {100 * n / len(labels):.1f}%" for a, n in wrong.items()))
    for w in ENSEMBLE_WEIGHTS:
        mixed = (1 - w) * probs["ft"] + w * probs["zero-shot"]  # [N, K]
        print(f"  output ensemble, zero-shot weight {w:g}: ID {100 * (mixed.argmax(-1) == labels).float().mean():.1f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="task,shape-colour", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0")
    p.add_argument("--runs", default="runs/world_probe")
    p.add_argument("--extra", default="", help="extra arguments for every training run")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, of {', '.join(m for m, _, _ in METHODS)}")
    p.add_argument("--train-images", type=int, default=0, help="size of the train split (0: miniworld.task's)")
    p.add_argument("--errors", action="store_true", help="also zero-shot vs FT errors on ID, and their output ensemble")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--diagnostics", action="store_true", help="also reproduce/diagnostics.py on each variant's runs")
    a = p.parse_args(argv)
    if a.train_images < 0:
        raise SystemExit(f"error: --train-images {a.train_images}: give a number of images, or 0 for miniworld.task's")
    for flag, given, known in (("--variants", a.variants, VARIANTS), ("--methods", a.methods, [m for m, _, _ in METHODS])):
        unknown = [v for v in given.split(",") if v not in known]
        if unknown:
            raise SystemExit(f"error: {flag} {', '.join(unknown)}: choose from {', '.join(known)}")
    import importlib

    import evaluate
    import merge

    for variant in a.variants.split(","):
        task = variant_task(variant, a.train_images)
        miniworld.load_task = lambda seed=0, task=task: task  # what tasks.miniworld.load_miniworld asks for
        out = Path(a.runs) / variant
        for seed in [int(s) for s in a.seeds.split(",")]:
            for name, module, argv in [m for m in METHODS if m[0] in a.methods.split(",")]:
                # lipsum_ft-noobj logs as lipsum_ft with the same arguments, so it keeps its own results root
                run = out / "noobj" / f"lipsum_ft-s{seed}" if name == "lipsum_ft-noobj" else out / f"{name}-s{seed}"
                if not (run / "final.pt").exists():
                    method = importlib.import_module(module)
                    texts = (mock.patch.object(method, "random_texts", without_object_words(object_word_ids(
                        miniworld.WordTokenizer()))) if name == "lipsum_ft-noobj" else contextlib.nullcontext())
                    with texts:
                        method.main([*argv, "--seed", str(seed), "--out", str(run), "--threads", str(a.threads),
                                     "--shots", "0", *a.extra.split()])  # the variant's whole train split (--train-images)
            if "ft" in a.methods.split(",") and not any('"tag": "wise' in line for line in (out / f"ft-s{seed}" / "results.jsonl").read_text().splitlines()):
                merge.main(["wise", "--ckpt", str(out / f"ft-s{seed}"), "--alphas", WISE_ALPHAS])
        rows = evaluate.read_results(out / "results.jsonl")
        if (out / "noobj" / "results.jsonl").is_file():
            rows += [dict(r, method="lipsum_ft-noobj") for r in evaluate.read_results(out / "noobj" / "results.jsonl")]
        columns, table, configs, _ = evaluate.summarise(rows)
        print(f"\n## {variant}: {len(task['classnames'])} classes, e.g. {task['classnames'][:3]}")
        wise = {}
        for group, cols in table.items():
            (method, tag), config = group[:2], configs[group]
            mean = lambda c: float(np.mean(cols[c])) if cols.get(c) else float("nan")  # noqa: E731
            print(f"{method:<15} {tag:<12} ID {mean('id'):5.1f}  OOD {mean('OOD mean'):5.1f}  ZS {mean('ZS mean'):5.1f}")
            if method == "ft" and config.get("merge") == "wise":
                wise[config["alpha"]] = mean("id")
        below = {al: v for al, v in wise.items() if al < 1}
        if below and 1.0 in wise:
            best = max(below, key=below.get)
            print(f"FT's WiSE curve: best α < 1 on ID is {best:g}, ID {below[best] - wise[1.0]:+.2f} vs FT (the bulge)")
        if a.errors:
            for seed in [int(s) for s in a.seeds.split(",")]:
                print_errors(out / f"ft-s{seed}", VARIANTS[variant])
        if a.diagnostics:  # while miniworld.load_task is this variant's, so the runs load with their own classes
            importlib.import_module("diagnostics").main(["--runs", str(out), "--out", str(out / "diagnostics.md")])
    return 0


if __name__ == "__main__":
    main()
