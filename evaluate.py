"""Evaluation and reporting: accuracy, ECE (15 equal-width bins), NLL, top-5 accuracy and mean per-class recall
on every split of a task, then tables (markdown, CSV, JSON) and ID-vs-OOD plots from results.jsonl, and
training curves from log.jsonl; runs out to open_clip (export) and open_clip fine-tunes in as runs (import).

  python evaluate.py eval --ckpt runs/ft-miniworld-k10-miniclip-s0        # a fine-tuned checkpoint
  python evaluate.py eval --model ViT-B-16 --pretrained openai --data imagenet --data-root DIR   # zero-shot
  python evaluate.py eval --ckpt RUN --zeroshot-data DIR1,DIR2        # + cross-dataset zero-shot transfer
  torchrun --nproc_per_node 8 evaluate.py eval --ckpt RUN              # every split shared out over 8 processes
  python evaluate.py table runs/results.jsonl                          # markdown, mean ± std over seeds
  python evaluate.py table --domainbed runs/results.jsonl              # leave-one-domain-out: a column per test domain
  python evaluate.py plot runs/results.jsonl --out id_vs_ood.png
  python evaluate.py table runs/results.jsonl --format csv             # or json: + top-5, recall, clip_benchmark's names
  python evaluate.py curves RUN [RUN...] --out curves.png              # loss terms and held-out accuracy against step
  python evaluate.py export RUN --out DIR                              # open_clip checkpoint + head.pt (--alpha A: WiSE-FT)
  python evaluate.py import CKPT --model ViT-B-32 --pretrained openai --data imagenet --data-root DIR --out RUN

Rows of the table are runs of one configuration (every argument that changes the numbers:
common.run_config), averaged over seeds, named by method and tag and, where two rows of a method would
share a name, by the fields in which they differ; for every (run, tag, split) only the newest evaluation
counts. Columns: ID accuracy, each OOD split, the OOD mean, each zero-shot transfer split and their mean,
--unseen-classes runs' S, U and H per split, then ECE and NLL on ID and averaged over OOD splits.

With --domainbed, the rows are the --data domainbed runs, one table per dataset (data root): a row per
configuration but the test domain, a column per test domain (its accuracy, mean ± std over seeds) and
the average over domains of those means; a row missing a domain has no average and names what it lacks.
"""
import argparse
import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import (AUTO_WORKERS, ClipClassifier, TrainArgs, atomic_save, check_data, data_workers, defaults, evaluate_task,
                    get_device, init_distributed, load_clip, load_run, load_task, log_results, plot_curves, plot_id_vs_ood,
                    resolve_model, run_log_args, scored_domains, seed_everything, set_threads, setup, start_run, zeroshot_head)

GZSL_COLUMNS = (("S", "acc_seen"), ("U", "acc_unseen"), ("H", "h"))  # a generalized zero-shot row's columns per split
NEEDED = ("run", "method", "data", "model", "split", "kind", "acc")  # what a results row must hold to be tabulated
EXPORTED = ("open_clip_model.pt", "head.pt")  # what `export` writes, with the architecture's <MODEL>.json
# table --format csv|json: --data imagenet's splits and the rows' metrics (name -> key) under clip_benchmark's names
CLIP_BENCHMARK = {"val": "imagenet1k", "imagenet-v2": "imagenetv2", "imagenet-sketch": "imagenet_sketch",
                  "imagenet-a": "imagenet-a", "imagenet-r": "imagenet-r", "objectnet": "objectnet"}
METRICS = (("acc1", "acc"), ("acc5", "top5"), ("mean_per_class_recall", "recall"), ("ece", "ece"), ("nll", "nll"))
SAME_INIT_COS = 0.9  # `import`: each tower's weights must have at least this cosine with θ0's (same initialisation)
WRAPPER, LINEAR_HEAD = "model.", "classification_head."  # `import`: a wrapper's CLIP and linear head on n(f(x)) (model soups')


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


def identity(row: dict) -> tuple:
    """A row's group: (method, tag, data, model, config_id). Rows of runs that differ in any argument that
    changes the numbers (common.run_config) never share a group; rows written before configs existed
    group by the first four."""
    return row["method"], row.get("tag", ""), row["data"], row["model"], row.get("config_id", "")


def summarise(rows: list) -> tuple:
    """(split order, {group: {column: [values per run]}}, {group: config}, {group: {seed: run}}). Two runs
    of one configuration and seed are both counted, with a warning naming them."""
    runs = defaultdict(dict)  # (group, run) -> split -> row
    order, kinds, configs, seeds, twins = [], {}, {}, defaultdict(dict), set()
    for r in rows:
        group = identity(r)
        runs[(group, r["run"])][r["split"]] = r
        configs[group] = r.get("config", {})
        first = seeds[group].setdefault(r.get("seed"), r["run"])
        if first != r["run"] and (first, r["run"]) not in twins:
            twins.add((first, r["run"]))
            print(f"warning: {first} and {r['run']} have one configuration and seed ({r.get('seed')}): both count in "
                  f"the row of {group[0]}{' (' + group[1] + ')' if group[1] else ''}")
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
            for short, key in GZSL_COLUMNS if "h" in s else ():  # generalized zero-shot rows (--unseen-classes)
                cols[f"{short} {name}"].append(100 * s[key])
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
               + [s for s in order if kinds[s] == "zeroshot"] + ["ZS mean"]
               + [f"{short} {s}" for s in order for short, _ in GZSL_COLUMNS] + ["ECE ID", "ECE OOD", "NLL ID", "NLL OOD"])
    return columns, table, configs, seeds


def fmt(values: list, decimals: int) -> str:
    if not values:
        return ""
    mean = float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {float(np.std(values, ddof=1)):.{decimals}f}"


def row_names(groups: list, configs: dict) -> dict:
    """{group: its name}: the method and its tag; the data and model when a table holds several; and where
    groups would still share a name, the configuration fields in which they differ ("ft (lr=3e-05)")."""
    mixed = len({(g[2], g[3]) for g in groups}) > 1

    def name(g, shown=""):
        inner = "; ".join(x for x in (g[1], shown) if x)
        return (f"{g[0]} ({inner})" if inner else g[0]) + (f" [{g[2]}, {Path(g[3]).stem}]" if mixed else "")

    show = lambda v: f"{v:g}" if isinstance(v, float) else str(v)  # noqa: E731
    names = {}
    for g in groups:
        twins = [h for h in groups if name(h) == name(g)]
        keys = sorted({k for h in twins for k in {**configs[h], **configs[g]} if configs[h].get(k) != configs[g].get(k)})
        names[g] = name(g, ", ".join(f"{k}={show(configs[g].get(k))}" for k in keys))
    return names


def markdown_table(rows: list) -> str:
    columns, table, configs, seeds = summarise(rows)
    columns = [c for c in columns if any(table[g].get(c) for g in table)]
    names = row_names(list(table), configs)
    lines = ["| method | seeds | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for group, cols in table.items():
        cells = [fmt(cols.get(c, []), 4 if c.startswith(("ECE", "NLL")) else 1) for c in columns]
        lines.append(f"| {names[group]} | {len(seeds[group])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def records(rows: list) -> list:
    """table --format csv|json: a record per (row group, split): its name, identity, split, clip_benchmark's dataset name
    (ImageNet's splits), runs and their folders, each METRIC's mean and std over runs (fractions, as clip_benchmark
    writes them; None where the rows lack it), and the full configuration."""
    groups = defaultdict(list)
    for r in rows:
        groups[(identity(r), r["split"])].append(r)
    names = row_names(list(dict.fromkeys(g for g, _ in groups)), {identity(r): r.get("config", {}) for r in rows})
    out = []
    for (g, split), rs in groups.items():
        rec = {"name": names[g], "method": g[0], "tag": g[1], "data": g[2], "model": g[3],
               "pretrained": rs[0].get("pretrained", ""), "config_id": g[4], "split": split, "kind": rs[0]["kind"],
               "clip_benchmark": CLIP_BENCHMARK.get(split, "") if g[2] == "imagenet" else "", "n": rs[0].get("n"),
               "runs": len(rs), "run_dirs": sorted(r["run"] for r in rs)}
        for name, key in METRICS:
            v = [r[key] for r in rs if key in r]
            rec.update({name: float(np.mean(v)) if v else None, f"{name}_std": float(np.std(v, ddof=1)) if len(v) > 1 else None})
        out.append({**rec, "config": rs[0].get("config", {})})
    return out


def csv_table(recs: list) -> str:
    """records as CSV: the configuration flattened to config.<field> columns, the run folders joined by ';'."""
    import csv
    import io

    flat = [{**{k: v for k, v in r.items() if k != "config"}, "run_dirs": ";".join(r["run_dirs"]),
             **{f"config.{k}": v for k, v in r["config"].items()}} for r in recs]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, list(dict.fromkeys(k for r in flat for k in r)), lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return buf.getvalue().rstrip("\n")


def domainbed_tables(rows: list) -> str:
    """The leave-one-domain-out tables of the --data domainbed rows (see the module docstring): a run's
    scored split is its test domain; the domains a row must cover are tasks' scored_domains."""
    rows = [r for r in rows if r["data"] == "domainbed" and r["split"] == r.get("config", {}).get("test_domain")]
    if not rows:
        raise SystemExit("error: no --data domainbed rows (with --test-domain in their configuration) to tabulate")
    by_root = defaultdict(list)
    for r in rows:
        by_root[r["config"].get("data_root", "")].append(r)
    out = []
    for root, rs in by_root.items():
        title, domains = scored_domains(root, {r["split"] for r in rs})
        groups, configs = defaultdict(lambda: defaultdict(list)), {}
        for r in rs:  # one group per configuration but the test domain
            config = {k: v for k, v in r["config"].items() if k != "test_domain"}
            group = (r["method"], r.get("tag", ""), r["data"], r["model"],
                     hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10])
            configs[group] = config
            groups[group][r["split"]].append(100 * r["acc"])
        names = row_names(list(groups), configs)
        lines = [f"**{title}** ({root})", "", "| method | seeds | " + " | ".join(domains) + " | Avg |",
                 "|---|---|" + "---|" * (len(domains) + 1)]
        for group, accs in groups.items():
            missing = [d for d in domains if not accs.get(d)]
            avg = (f"{np.mean([np.mean(accs[d]) for d in domains]):.1f}" if not missing
                   else f"incomplete (no {', '.join(missing)})")
            counts = sorted({len(v) for v in accs.values()})
            seeds = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
            lines.append(f"| {names[group]} | {seeds} | " + " | ".join(fmt(accs.get(d, []), 1) for d in domains)
                         + f" | {avg} |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def plot(rows: list, out: str) -> list:
    """ID vs OOD mean of every row of the table, with seed error bars; WiSE-FT rows (written by merge.py,
    α in their configuration) joined into one curve per run configuration. One figure per (data, model):
    `out` itself when the rows hold one, OUT-<data>-<model>.png for each when they hold several. Returns
    the files written."""
    groups = sorted({(r["data"], Path(r["model"]).stem) for r in rows})
    if len(groups) > 1:
        stem = Path(out)
        return [plot([r for r in rows if (r["data"], Path(r["model"]).stem) == g],
                     str(stem.with_name(f"{stem.stem}-{g[0]}-{g[1]}{stem.suffix}")))[0] for g in groups]
    id_col = next((r["split"] for r in rows if r["kind"] == "id"), None)
    if id_col is None:  # DomainBed: the left-out domain is the only test split
        print(f"note: no ID split in these rows, so no ID-vs-OOD plot ({out} not written)")
        return []
    _, table, configs, _ = summarise(rows)
    names = row_names(list(table), configs)
    points, curves = [], defaultdict(list)
    for group, cols in table.items():
        if not cols.get(id_col) or not cols.get("OOD mean"):
            continue
        x, y = np.mean(cols[id_col]), np.mean(cols["OOD mean"])
        if configs[group].get("merge") == "wise":
            source = {k: v for k, v in configs[group].items() if k not in ("merge", "alpha")}
            of = next((names[h] for h in table if h[0] == group[0] and configs[h] == source), group[0])
            curves[f"WiSE-FT on {of}"].append((configs[group]["alpha"], x, y))
            continue
        err = lambda v: np.std(v, ddof=1) if len(v) > 1 else 0  # noqa: E731
        points.append((names[group], x, y, err(cols[id_col]), err(cols["OOD mean"])))
    plot_id_vs_ood(points, curves, out, id_label=f"ID ({id_col})")
    return [out]


def evaluate_command(a):
    if not a.ckpt:  # the zero-shot model: same path as `baselines.py --method zeroshot`
        check_data(a.data)
        values = dict(data=a.data, data_root=a.data_root, model=a.model, pretrained=a.pretrained, device=a.device, out=a.out,
                      eval_batch_size=a.eval_batch_size, workers=a.workers, seed=a.seed, steps=0,
                      zeroshot_data=a.zeroshot_data, threads=a.threads, source_domain=a.source_domain,
                      unseen_classes=a.unseen_classes, test_domain=a.test_domain)
        args = TrainArgs(**{**defaults(TrainArgs, a.data, {}), **values})  # the rest as FT's recipe has it; nothing trains
        env = setup(args, "zeroshot")
        rows = evaluate_task(env.model, env.task, env.eval_tf, env.device, a.eval_batch_size, env.workers)
        start_run(env, args)
        log_results(env.run, "zeroshot", args, rows, step=0)
        return rows
    device = get_device(a.device)
    init_distributed(device)  # under torchrun each process scores its share of every split; rank 0 writes
    set_threads(a.threads)
    workers = data_workers(a.workers, device)
    run = load_run(a.ckpt, device, a.data_root, zeroshot_data=a.zeroshot_data or None)
    rows = evaluate_task(run.model, run.task, run.eval_tf, device, a.eval_batch_size, workers)
    log_results(run.dir, run.method, run_log_args(run), rows, step=run.args.get("steps", 0))
    return rows


def export_command(a):
    """RUN -> OUT/open_clip_model.pt (the CLIP's plain state dict: open_clip.create_model_and_transforms(MODEL,
    pretrained=it) loads it), OUT/head.pt (head [K, D], class names, logit scale, head_from_text: logits =
    exp(logit_scale) · n(encode_image(x)) @ headᵀ) and OUT/<MODEL>.json (the architecture, for a config
    open_clip does not ship: open_clip.add_model_config registers it as MODEL). --alpha: WiSE-FT's θ_α."""
    import open_clip
    from merge import load_run_weights, run_endpoints, wise

    run = load_run(a.run, "cpu")
    if a.alpha is not None:
        load_run_weights(run, wise(*run_endpoints(run, "cpu"), a.alpha))
    name = resolve_model(run.meta["model"], run.meta["pretrained"])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    clip = run.model.clip
    atomic_save({k: v.detach().cpu().contiguous() for k, v in clip.state_dict().items()}, out / EXPORTED[0])
    atomic_save({"head": run.model.head.detach().cpu(), "classnames": list(run.meta["classnames"]),  # [K, D]
                 "logit_scale": clip.logit_scale.item(), "head_from_text": bool(run.meta.get("head_from_text")),
                 "model": name, "pretrained": run.meta["pretrained"], "data": run.args["data"], "method": run.method,
                 "alpha": a.alpha, "source": str(run.dir)}, out / EXPORTED[1])
    (out / f"{name}.json.tmp").write_text(json.dumps(open_clip.get_model_config(name), indent=1))
    (out / f"{name}.json.tmp").replace(out / f"{name}.json")  # atomic, as the two above
    print(f"exported {run.dir}{f' (WiSE-FT α={a.alpha:g})' if a.alpha is not None else ''} to {out}: "
          f"open_clip.create_model_and_transforms({name!r}, pretrained={str(out / EXPORTED[0])!r})")
    return out


def import_command(a):
    """An open_clip checkpoint fine-tuned from --model/--pretrained (a random-weight --model: --seed's weights)
    -> a run folder (args.json, final.pt) that eval and merge.py take, then evaluated; also a wrapper's (model
    soups': the CLIP under WRAPPER, a LINEAR_HEAD, no text transformer: θ0's). Head: the wrapper's (W / s; a bias
    has no place in s · n(f) Wᵀ: dropped, said), else (--head text) its text tower's zero-shot head (merges
    rebuild it), or --head FILE (an export's head.pt). Refused with one message when its tensors are not
    --model's (names, shapes) or either tower has a cosine below SAME_INIT_COS with θ0's (not fine-tuned from
    that initialisation). Its configuration names the file and its sha1, so its rows keep apart."""
    import open_clip

    check_data(a.data)
    out, path = Path(a.out), Path(a.checkpoint)
    if not a.out or (out / "args.json").exists():
        raise SystemExit(f"error: {'--out ' + a.out + ' already holds a run' if a.out else 'import needs --out RUN_DIR'}")
    seed_everything(a.seed)
    clip, tokenizer, _ = load_clip(a.model, a.pretrained)
    state0 = clip.state_dict()
    try:
        state = open_clip.factory.load_state_dict(str(path))  # a plain state dict or {"state_dict": ...} (open_clip's training)
    except Exception as e:  # noqa: BLE001 -- any unreadable file gets the same message
        raise SystemExit(f"error: could not read {path} as an open_clip checkpoint ({type(e).__name__}: {e})") from None
    linear = {k[len(LINEAR_HEAD):]: state.pop(k) for k in list(state) if k.startswith(LINEAR_HEAD)}  # weight [K, D], bias [K]
    state = {k.removeprefix(WRAPPER): v for k, v in state.items()} if all(k.startswith(WRAPPER) for k in state) else state
    if not any(k.startswith("transformer.") for k in state):  # a text transformer left out (model soups'): θ0's
        state = {**{k: v for k, v in state0.items() if k.startswith("transformer.")}, **state}
    odd = (sorted(set(state0) ^ set(state)) + [k for k in state0 if k in state and state[k].shape != state0[k].shape])
    image = [k for k in state0 if k.startswith("visual.")]
    towers = {"image tower": image, "text tower": [k for k in state0 if k not in image]}  # the text tower: all the rest
    flat = lambda s, keys: torch.cat([s[k].double().flatten() for k in keys if state0[k].is_floating_point()])  # noqa: E731  [P]
    cos = {} if odd else {t: F.cosine_similarity(flat(state, ks), flat(state0, ks), dim=0).item() for t, ks in towers.items()}
    if odd or min(cos.values()) < SAME_INIT_COS:
        why = (f"{len(odd)} tensor(s) missing, extra or of another shape ({', '.join(odd[:3])}{' ...' if len(odd) > 3 else ''})"
               if odd else ", ".join(f"{t} cosine {c:.3f} with θ0's" for t, c in cos.items()) + f" (< {SAME_INIT_COS})")
        raise SystemExit(f"error: {path} is not a fine-tune of --model {a.model} from --pretrained {a.pretrained!r}"
                         f"{' (seed ' + str(a.seed) + ')' if not a.pretrained else ''}: {why}. Import checkpoints of that "
                         "architecture fine-tuned from those weights")
    clip.load_state_dict(state)
    task = load_task(a.data, a.data_root, a.seed, a.zeroshot_data, source_domain=a.source_domain, test_domain=a.test_domain,
                     unseen_classes=a.unseen_classes)
    if a.head not in ("", "text") and not Path(a.head).is_file():
        raise SystemExit(f"error: --head {a.head} is not a file (an export's head.pt), nor 'text' (the zero-shot head)")
    saved = torch.load(a.head, map_location="cpu", weights_only=True) if a.head not in ("", "text") else None
    own = {} if a.head else linear  # the checkpoint's own linear head, unless --head names another
    if saved and saved["classnames"] != task.classnames or own and len(own["weight"]) != len(task.classnames):
        raise SystemExit(f"error: {'--head ' + a.head if saved else path} holds a head over other classes than --data {a.data}'s")
    if own.get("bias", torch.zeros(1)).abs().max() > 0:
        print(f"note: its head's bias (max |b| {own['bias'].abs().max():.3g}) is dropped: logits here are s · n(f) Wᵀ")
    head = (saved["head"] if saved else own["weight"] / clip.logit_scale.exp().detach() if own  # [K, D]
            else zeroshot_head(clip, tokenizer, task.classnames, task.templates))
    meta = {"method": a.method, "model": a.model, "pretrained": a.pretrained, "data": a.data, "classnames": task.classnames,
            "head_from_text": saved["head_from_text"] if saved else not own, "step": 0, "selected": False}
    digest = hashlib.sha1(path.read_bytes()).hexdigest()[:12]
    args = {"method": a.method, **{k: getattr(a, k) for k in ("data", "data_root", "test_domain", "zeroshot_data",
            "source_domain", "unseen_classes", "model", "pretrained", "seed")}, "steps": 0, "out": str(out),
            "imported": f"{path.resolve()} (sha1 {digest}){' + head ' + a.head if a.head else ''}"}
    out.mkdir(parents=True, exist_ok=True)
    atomic_save({"model": ClipClassifier(clip, head, tokenizer).state_dict(), "meta": meta}, out / "final.pt")
    (out / "args.json.tmp").write_text(json.dumps(args, indent=2))
    (out / "args.json.tmp").replace(out / "args.json")  # atomic: a run folder with args.json is a run
    print(f"imported {path} as {out} (cosine with θ0: {', '.join(f'{t} {c:.4f}' for t, c in cos.items())}); evaluating it")
    a.ckpt = str(out)
    return evaluate_command(a)


def curves(runs: list, out: str) -> str:
    """The log.jsonl of every run drawn against step (tracking.plot_curves); a missing or empty log is one message."""
    logs = {}
    for run in runs:
        path = Path(run) if str(run).endswith(".jsonl") else Path(run) / "log.jsonl"
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
        if not lines:
            raise SystemExit(f"error: {path} is {'empty' if path.is_file() else 'missing'}: no training steps to draw "
                             "(a run writes a line per step; zero-shot, merged and imported runs train nothing)")
        logs[str(run)] = lines
    return plot_curves(logs, out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in ("eval", "import"):
        p = sub.add_parser(command, help="evaluate a checkpoint (or a zero-shot model) on every split" if command == "eval"
                           else "an open_clip checkpoint fine-tuned elsewhere as a run of this repo, then evaluated")
        if command == "eval":
            p.add_argument("--ckpt", default="", help="a run folder or a .pt written by a method file; empty = zero-shot --model")
        else:
            p.add_argument("checkpoint", help="open_clip checkpoint (a state dict, or open_clip training's {'state_dict': ...})")
            p.add_argument("--head", default="", help="text (its text tower's zero-shot head) or an export's head.pt "
                           "(default: the checkpoint's own linear head if it has one, else text)")
            p.add_argument("--method", default="imported", help="the method name its rows carry")
        for name, help_ in (("data", "dataset (zero-shot evaluation, import; a run knows its own)"), ("data_root", "dataset "
                            "folder (for a run: only if it moved)"), ("model", "open_clip architecture or miniclip (zero-shot; "
                            "import: the one fine-tuned)"), ("pretrained", "open_clip tag or weights file (zero-shot; import: "
                            "the one fine-tuned from)"), ("device", "cuda | cpu"),
                            ("test_domain", "--data domainbed: the left-out domain (zero-shot; a run knows its own)"),
                            ("out", "run directory of the zero-shot evaluation or the import"), ("zeroshot_data", "DIR[,DIR...]: "
                            "classification folders scored zero-shot with heads from the model's text tower (default: a "
                            "run's own --zeroshot-data)"), ("source_domain", "--data domainnet: the domain whose test split "
                            "is ID (zero-shot; a run knows its own)"), ("unseen_classes", "FILE of unseen class folders "
                            "(zero-shot on --data folder: S / U / H; a run knows its own)")):
            p.add_argument("--" + name.replace("_", "-"), default=getattr(TrainArgs, name), help=help_)
        p.add_argument("--eval-batch-size", type=int, default=TrainArgs.eval_batch_size, help="batch size for evaluation")
        p.add_argument("--workers", type=int, default=AUTO_WORKERS, help="DataLoader worker processes (-1: from the free cores)")
        p.add_argument("--seed", type=int, default=0, help="seed of the zero-shot model (a random-weight --model) and the task")
        p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = the cores free at start)")
    p = sub.add_parser("export", help="a run as an open_clip checkpoint + its head (head.pt)")
    p.add_argument("run", help="a run directory (trained, merged or imported)")
    p.add_argument("--out", required=True, help="folder for open_clip_model.pt, head.pt and <MODEL>.json")
    p.add_argument("--alpha", type=float, default=None, help="export WiSE-FT's θ_α of the run instead (0 = θ0, 1 = the run)")
    p = sub.add_parser("curves", help="loss terms and held-out accuracy against step, from each run's log.jsonl")
    p.add_argument("runs", nargs="+", help="run directories (or their log.jsonl)")
    p.add_argument("--out", default="curves.png", help="the PNG to write")
    for name, help_ in (("table", "markdown table, mean ± std over seeds"), ("plot", "ID-vs-OOD figure")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("results", help="a results.jsonl, or a folder holding one: a runs root or a run folder")
        if name == "table":
            p.add_argument("--domainbed", action="store_true", help="leave-one-domain-out tables of the --data "
                           "domainbed runs: a column per test domain and their average")
            p.add_argument("--format", choices=("md", "csv", "json"), default="md", help="md: the markdown table; csv, "
                           "json: a record per configuration and split, with top-5, per-class recall and clip_benchmark's names")
        if name == "plot":
            p.add_argument("--out", default="id_vs_ood.png", help="the PNG to write")
            p.add_argument("--methods", default="", help="comma-separated methods to draw (default: all)")
    a = parser.parse_args(argv)
    if a.command in ("eval", "export", "import", "curves"):
        return {"eval": evaluate_command, "export": export_command, "import": import_command,
                "curves": lambda a: curves(a.runs, a.out)}[a.command](a)
    path = Path(a.results) / "results.jsonl" if Path(a.results).is_dir() else Path(a.results)
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist (every run appends its rows to its own folder's and to "
                         "<runs root>/results.jsonl, e.g. runs/results.jsonl)")
    rows = read_results(path)
    if not rows:
        raise SystemExit(f"error: {path} holds no results rows: nothing to {'tabulate' if a.command == 'table' else 'plot'}")
    if a.command == "table":
        if a.domainbed and a.format != "md":
            raise SystemExit("error: table --domainbed writes markdown only; --format csv|json takes the rows without it")
        print(domainbed_tables(rows) if a.domainbed else markdown_table(rows) if a.format == "md"
              else csv_table(records(rows)) if a.format == "csv" else json.dumps(records(rows), indent=1))
    else:
        chosen = [m for m in a.methods.split(",") if m]
        rows = [r for r in rows if not chosen or r["method"].split("+")[0] in chosen]
        if not rows:
            raise SystemExit(f"error: no rows of --methods {a.methods} in {path}")
        written = plot(rows, a.out)
        print(f"{len(written)} figure(s): {', '.join(written)}")


if __name__ == "__main__":
    main()
