"""Evaluation and reporting: accuracy, ECE (15 equal-width bins) and NLL on every split of a task,
then markdown tables and ID-vs-OOD plots from results.jsonl.

  python evaluate.py eval --ckpt runs/ft-miniworld-miniclip-s0        # a fine-tuned checkpoint
  python evaluate.py eval --model ViT-B-16 --pretrained openai --data imagenet --data-root DIR   # zero-shot
  python evaluate.py table runs/results.jsonl                          # markdown, mean ± std over seeds
  python evaluate.py plot runs/results.jsonl --out id_vs_ood.png

Rows of the table are (method, tag, data, model) groups, averaged over seeds; for every (run, tag,
split) only the newest evaluation counts. Columns: ID accuracy, each OOD split, the OOD mean, each
zero-shot transfer split and their mean, then ECE and NLL on ID and averaged over OOD splits.
"""
import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from common import (DATASETS, checkpoint_meta, evaluate_task, get_device, image_transforms, load_classifier,
                    load_task, log_results, make_run, setup, TrainArgs)


def read_results(path) -> list:
    """Newest row per (run, tag, split)."""
    latest = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            latest[(row["run"], row.get("tag", ""), row["split"])] = row
    return list(latest.values())


def summarise(rows: list) -> tuple[list, dict]:
    """Groups rows into (method, tag, data, model) and returns (split order, {group: {column: [values per seed]}})."""
    runs = defaultdict(dict)  # (group, run) -> split -> row
    order, kinds = [], {}
    for r in rows:
        group = (r["method"], r.get("tag", ""), r["data"], r["model"])
        runs[(group, r["run"])][r["split"]] = r
        if r["split"] not in kinds:
            order.append(r["split"])
            kinds[r["split"]] = r["kind"]
    table = defaultdict(lambda: defaultdict(list))
    for (group, _), splits in runs.items():
        cols = table[group]
        ood = [s for s in splits.values() if s["kind"] == "ood"]
        zs = [s for s in splits.values() if s["kind"] == "zeroshot"]
        for name, s in splits.items():
            cols[name].append(100 * s["acc"])
        ids = [s for s in splits.values() if s["kind"] == "id"]
        if ids:
            cols["ECE ID"].append(ids[0]["ece"])
            cols["NLL ID"].append(ids[0]["nll"])
        if ood:
            cols["OOD mean"].append(100 * np.mean([s["acc"] for s in ood]))
            cols["ECE OOD"].append(np.mean([s["ece"] for s in ood]))
            cols["NLL OOD"].append(np.mean([s["nll"] for s in ood]))
        if zs:
            cols["ZS mean"].append(100 * np.mean([s["acc"] for s in zs]))
    columns = ([s for s in order if kinds[s] == "id"] + [s for s in order if kinds[s] == "ood"] + ["OOD mean"]
               + [s for s in order if kinds[s] == "zeroshot"] + ["ZS mean", "ECE ID", "ECE OOD", "NLL ID", "NLL OOD"])
    return columns, table


def fmt(values: list, decimals: int) -> str:
    if not values:
        return ""
    mean = float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {float(np.std(values, ddof=1)):.{decimals}f}"


def markdown_table(rows: list) -> str:
    columns, table = summarise(rows)
    columns = [c for c in columns if any(table[g].get(c) for g in table)]
    lines = ["| method | seeds | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for (method, tag, data, model), cols in table.items():
        name = f"{method} ({tag})" if tag else method
        seeds = max(len(v) for v in cols.values())
        cells = [fmt(cols.get(c, []), 4 if c.startswith(("ECE", "NLL")) else 1) for c in columns]
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list, out: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns, table = summarise(rows)
    id_col = columns[0]
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # 20 distinct colours: a full table has more than 10 rows
    markers = "osD^v<>ph*X"
    curves = defaultdict(list)  # WiSE-FT points, tagged "wise a=0.3" by merge.py, joined into curves
    for (method, tag, _, _), cols in table.items():
        if not cols.get(id_col) or not cols.get("OOD mean"):
            continue
        x, y = np.mean(cols[id_col]), np.mean(cols["OOD mean"])
        if tag.startswith("wise"):
            curves[method].append((float(tag.split("=")[1]), x, y))
            continue
        xerr = np.std(cols[id_col], ddof=1) if len(cols[id_col]) > 1 else 0
        yerr = np.std(cols["OOD mean"], ddof=1) if len(cols["OOD mean"]) > 1 else 0
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=markers[len(ax.containers) % len(markers)], capsize=3,
                    label=f"{method} ({tag})" if tag else method)
    for method, pts in curves.items():
        pts.sort()
        ax.plot([p[1] for p in pts], [p[2] for p in pts], "--.", label=f"WiSE-FT on {method}")
    ax.set_xlabel(f"ID accuracy ({id_col}, %)")
    ax.set_ylabel("OOD accuracy (mean over shifts, %)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def evaluate_command(argv):
    p = argparse.ArgumentParser(prog="evaluate.py eval", description="evaluate a checkpoint (or a zero-shot model) on every split")
    p.add_argument("--ckpt", default="", help="a run directory or a .pt written by a method file; empty = zero-shot --model")
    for name in ("data", "data_root", "model", "pretrained", "device", "out"):
        p.add_argument("--" + name.replace("_", "-"), default=getattr(TrainArgs, name))
    p.add_argument("--eval-batch-size", type=int, default=TrainArgs.eval_batch_size)
    p.add_argument("--workers", type=int, default=TrainArgs.workers)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.data not in DATASETS:
        raise SystemExit(f"error: unknown --data {a.data!r}; choose one of {sorted(DATASETS)}")
    if not a.ckpt:  # the zero-shot model: same path as `baselines.py --method zeroshot`
        args = TrainArgs(data=a.data, data_root=a.data_root, model=a.model, pretrained=a.pretrained, device=a.device,
                         out=a.out, eval_batch_size=a.eval_batch_size, workers=a.workers, seed=a.seed, steps=0)
        env = setup(args, "zeroshot")
        rows = evaluate_task(env.model, env.task, env.eval_tf, env.device, a.eval_batch_size, a.workers)
        log_results(env.run, "zeroshot", args, rows, step=0)
        return rows
    device = get_device(a.device)
    run = Path(a.ckpt) if Path(a.ckpt).is_dir() else Path(a.ckpt).parent
    saved = json.loads((run / "args.json").read_text()) if (run / "args.json").exists() else {}
    data, root = saved.get("data", a.data), a.data_root or saved.get("data_root", "")
    task = load_task(data, root, a.seed)
    model, meta, pp = load_classifier(a.ckpt, device, task)
    eval_tf = image_transforms(pp, 1.0)[1]
    rows = evaluate_task(model, task, eval_tf, device, a.eval_batch_size, a.workers)
    args = TrainArgs(data=data, data_root=root, model=meta["model"], pretrained=meta["pretrained"], seed=saved.get("seed", a.seed))
    log_results(run, meta["method"], args, rows, step=saved.get("steps", 0))
    return rows


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("eval", "table", "plot"):
        raise SystemExit("usage: evaluate.py {eval,table,plot} ...  (see the module docstring)")
    command, rest = argv[0], argv[1:]
    if command == "eval":
        return evaluate_command(rest)
    p = argparse.ArgumentParser(prog=f"evaluate.py {command}")
    p.add_argument("results", help="a results.jsonl")
    p.add_argument("--out", default="id_vs_ood.png", help="(plot) the PNG to write")
    a = p.parse_args(rest)
    if not Path(a.results).is_file():
        raise SystemExit(f"error: {a.results} does not exist (runs append to runs/results.jsonl)")
    rows = read_results(a.results)
    if command == "table":
        print(markdown_table(rows))
    else:
        plot(rows, a.out)


if __name__ == "__main__":
    main()
