"""Evaluation and reporting: accuracy, ECE (15 equal-width bins) and NLL on every split of a task,
then markdown tables and ID-vs-OOD plots from results.jsonl.

  python evaluate.py eval --ckpt runs/ft-miniworld-miniclip-s0        # a fine-tuned checkpoint
  python evaluate.py eval --model ViT-B-16 --pretrained openai --data imagenet --data-root DIR   # zero-shot
  python evaluate.py eval --ckpt RUN --zeroshot-data DIR1,DIR2        # + cross-dataset zero-shot transfer
  python evaluate.py table runs/results.jsonl                          # markdown, mean ± std over seeds
  python evaluate.py plot runs/results.jsonl --out id_vs_ood.png

Rows of the table are (method, tag, data, model) groups, averaged over seeds; for every (run, tag,
split) only the newest evaluation counts. Columns: ID accuracy, each OOD split, the OOD mean, each
zero-shot transfer split and their mean, then ECE and NLL on ID and averaged over OOD splits.
"""
import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from common import (TrainArgs, check_data, defaults, evaluate_task, get_device, load_run, log_results, plot_id_vs_ood,
                    run_log_args, set_threads, setup, start_run)


NEEDED = ("run", "method", "data", "model", "split", "kind", "acc")  # what a results row must hold to be tabulated


def read_results(path) -> list:
    """Newest row per (run, tag, split). A line that is not a JSON row with NEEDED fields is skipped,
    named (file and line) and counted."""
    latest, bad = {}, []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or any(k not in row for k in NEEDED):
                raise ValueError
        except ValueError:
            bad.append(n)
            continue
        latest[(row["run"], row.get("tag", ""), row["split"])] = row
    if bad:
        print(f"warning: skipped {len(bad)} malformed line(s) of {path} (not a results row with {', '.join(NEEDED)}): "
              f"line {', '.join(map(str, bad[:10]))}{' ...' if len(bad) > 10 else ''}")
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


def row_name(method: str, tag: str, data: str, model: str, mixed: bool) -> str:
    """A table row's (or plot point's) name; the data and model are named when a table holds several."""
    name = f"{method} ({tag})" if tag else method
    return f"{name} [{data}, {Path(model).stem}]" if mixed else name


def markdown_table(rows: list) -> str:
    columns, table = summarise(rows)
    columns = [c for c in columns if any(table[g].get(c) for g in table)]
    mixed = len({(data, model) for _, _, data, model in table}) > 1
    lines = ["| method | seeds | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for (method, tag, data, model), cols in table.items():
        name = row_name(method, tag, data, model, mixed)
        seeds = max(len(v) for v in cols.values())
        cells = [fmt(cols.get(c, []), 4 if c.startswith(("ECE", "NLL")) else 1) for c in columns]
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list, out: str) -> list:
    """ID vs OOD mean of every (method, tag) row, with seed error bars; WiSE-FT rows ("wise a=α", written
    by merge.py) joined into one curve per method. One figure per (data, model): `out` itself when the
    rows hold one, OUT-<data>-<model>.png for each when they hold several. Returns the files written."""
    groups = sorted({(r["data"], Path(r["model"]).stem) for r in rows})
    if len(groups) > 1:
        stem = Path(out)
        return [plot([r for r in rows if (r["data"], Path(r["model"]).stem) == g],
                     str(stem.with_name(f"{stem.stem}-{g[0]}-{g[1]}{stem.suffix}")))[0] for g in groups]
    columns, table = summarise(rows)
    id_col = columns[0]
    points, curves = [], defaultdict(list)
    for (method, tag, _, _), cols in table.items():
        if not cols.get(id_col) or not cols.get("OOD mean"):
            continue
        x, y = np.mean(cols[id_col]), np.mean(cols["OOD mean"])
        if tag.startswith("wise"):
            curves[f"WiSE-FT on {method}"].append((float(tag.split("=")[1]), x, y))
            continue
        err = lambda v: np.std(v, ddof=1) if len(v) > 1 else 0  # noqa: E731
        points.append((f"{method} ({tag})" if tag else method, x, y, err(cols[id_col]), err(cols["OOD mean"])))
    plot_id_vs_ood(points, curves, out, id_label=f"ID ({id_col})")
    return [out]


def evaluate_command(a):
    if not a.ckpt:  # the zero-shot model: same path as `baselines.py --method zeroshot`
        check_data(a.data)
        values = dict(data=a.data, data_root=a.data_root, model=a.model, pretrained=a.pretrained, device=a.device, out=a.out,
                      eval_batch_size=a.eval_batch_size, workers=a.workers, seed=a.seed, steps=0,
                      zeroshot_data=a.zeroshot_data, threads=a.threads)
        args = TrainArgs(**{**defaults(TrainArgs, a.data, {}), **values})  # the rest as FT's recipe has it; nothing trains
        env = setup(args, "zeroshot")
        rows = evaluate_task(env.model, env.task, env.eval_tf, env.device, a.eval_batch_size, env.workers)
        start_run(env, args)
        log_results(env.run, "zeroshot", args, rows, step=0)
        return rows
    device = get_device(a.device)
    set_threads(a.threads)
    run = load_run(a.ckpt, device, a.data_root, zeroshot_data=a.zeroshot_data or None)
    rows = evaluate_task(run.model, run.task, run.eval_tf, device, a.eval_batch_size, a.workers)
    log_results(run.dir, run.method, run_log_args(run), rows, step=run.args.get("steps", 0))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("eval", help="evaluate a checkpoint (or a zero-shot model) on every split")
    p.add_argument("--ckpt", default="", help="a run directory or a .pt written by a method file; empty = zero-shot --model")
    for name, help_ in (("data", "dataset (zero-shot evaluation; a run knows its own)"), ("data_root", "dataset folder "
                        "(for a run: only if it moved)"), ("model", "open_clip architecture or miniclip (zero-shot)"),
                        ("pretrained", "open_clip tag or weights file (zero-shot)"), ("device", "cuda | cpu"),
                        ("out", "run directory of the zero-shot evaluation"), ("zeroshot_data", "DIR[,DIR...]: "
                        "classification folders scored zero-shot with heads from the model's text tower (default: a "
                        "run's own --zeroshot-data)")):
        p.add_argument("--" + name.replace("_", "-"), default=getattr(TrainArgs, name), help=help_)
    p.add_argument("--eval-batch-size", type=int, default=TrainArgs.eval_batch_size, help="batch size for evaluation")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=0, help="seed of the zero-shot model (a random-weight --model)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = the cores free at start)")
    for name, help_ in (("table", "markdown table, mean ± std over seeds"), ("plot", "ID-vs-OOD figure")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("results", help="a results.jsonl (runs append to <runs root>/results.jsonl)")
        if name == "plot":
            p.add_argument("--out", default="id_vs_ood.png", help="the PNG to write")
    a = parser.parse_args(argv)
    if a.command == "eval":
        return evaluate_command(a)
    if not Path(a.results).is_file():
        raise SystemExit(f"error: {a.results} does not exist (runs append to runs/results.jsonl)")
    rows = read_results(a.results)
    if a.command == "table":
        print(markdown_table(rows))
    else:
        plot(rows, a.out)


if __name__ == "__main__":
    main()
