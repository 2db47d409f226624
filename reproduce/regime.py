"""Regime map: where the papers' claims hold, by training-set size (K training images per class).

  python reproduce/regime.py --shots 4,10,20,42,0 --seeds 0,1,2 --workers 2         # miniworld; 0 = the full set
  python reproduce/regime.py --shots 2,8,0 --extra "--data folder --data-root DIR"    # a user's folder
  python reproduce/regime.py --shots 4,10,0 --from runs/reproduce                    # K = 10 from reproduce.py's runs

For every K of --shots and every seed it trains each method of --methods with `--shots K` (the method
file's preset otherwise, --extra added) into RUNS/k<K>/<method>-s<seed> (RUNS/full/ for 0), WiSE-FT on FT
(merge.py wise, --wise-alphas), and zero-shot once per seed into RUNS/zeroshot/ (it trains nothing, so it is
the same model at every K). Jobs go through reproduce/reproduce.py's run_job / train_job: a rerun skips the
finished jobs (RUNS/.done/<job>), an interrupted training run resumes, --workers processes share the jobs.
It writes --out (markdown) and --figures/regime_map.png: per K, FT against zero-shot (ΔID, ΔOOD, ΔZS), FT's
WiSE-FT bulge per seed, each method against FT of the same seed (ΔID / ΔOOD / ΔZS, ± std over seeds, the
paired per-image standard error of the seed-mean Δ, the OOD margin over FT's WiSE-FT curve), and issue #32's
bars per K with the ones that fail named. Every number comes from the runs' results.jsonl and the per-image
correctness each job saves (reproduce.correct). --from RUNS[,RUNS] takes a K from reproduce.py's runs instead of
training it: the K their FT runs were trained at (args.json; on miniworld the recipe's 10, or 0 from a reproduction
run with --extra "--shots 0"). The same presets, so the same runs when --extra is empty there and here; only the
per-image caches are written into those folders.

Model selection at small K (METHODS.md, "Regimes"): the held-out slice is never carved from the K shots.
On miniworld it is a split rendered apart from training (miniworld.task.TASK_SIZES["heldout"] = 1,000
images, 41-42 per class); on --data folder / imagenet / domainnet / domainbed it is taken from the training set
BEFORE the K shots are drawn from the rest (the loader's held-out slice, then tasks.few_shot). So it does not shrink with
K: every K, and every λ / β of a sweep at that K, is selected on the same held-out images. The map runs each
method's preset coefficient; choose λ / β at a K with
`python reproduce/sweep.py lipsum_ft --flag lam --values ... --extra "--shots K" --ref RUNS/k<K>`.
"""
import argparse
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "reproduce"))
import reproduce  # noqa: E402

from reproduce import BULGE, FT_GAIN, FT_OOD_LOSS, FT_ZS_LOSS, MAX_ID_COST, MIN_OOD_GAIN  # noqa: E402  (issue #32's bars)

DEFAULT_METHODS = "zeroshot,ft,lipsum_ft,kd,car_ft,arf,flyp,carot,lora"  # issue #32's and the methods since; any row of reproduce.METHODS


def k_name(k: int) -> str:
    return f"k{k}" if k else "full"


def task_options(extra: list) -> dict:
    """The options of --extra that decide the task (common.TASK_FIELDS; the rest go to the method files untouched)."""
    import common

    p = argparse.ArgumentParser(add_help=False)
    for name, default in common.TASK_FIELDS.items():
        p.add_argument("--" + name.replace("_", "-"), default=default)
    return vars(p.parse_known_args(extra)[0])


def check_shots(shots: list, seeds: list, extra: list) -> dict:
    """{seed: training images per class of the full set (the fewest of any class)}, after checking that
    every K has that many images in every class: tasks.few_shot's message, once, before any job starts."""
    import tasks

    per_class = {}
    for seed in seeds:
        options = task_options(extra)
        options.pop("zeroshot_data")  # the K shots are drawn from training: no need to read the zero-shot folders here
        task = tasks.load_task(root=options.pop("data_root"), **options, seed=seed)
        labels = np.asarray(task.train.images.labels)
        counts = np.bincount(labels, minlength=len(task.classnames))
        per_class[seed] = int(np.delete(counts, task.unseen).min())
        for k in shots:
            tasks.few_shot(task.train.images, k, seed, task.train.classnames, skip=task.unseen)
    return per_class


def scored_job(module: str, argv: list, out: Path):
    """reproduce.train_job, then the run's per-image correctness on every split (reproduce.correct's cache, which
    the paired SEs read): one more evaluation per run, in the job's worker rather than serially in the report."""
    train = reproduce.train_job(module, argv, out)

    def fn():
        if not ((out / "final.pt").is_file() and (out / "results.jsonl").is_file()):  # finished, then stopped while scoring
            train()
        reproduce.correct(out, "heldout")
    return fn


def jobs_of(a, runs: Path, seeds: list, shots: list, methods: list, extra: list, threads: int, sources: dict) -> list:
    """(job, fn, needs) of the map: zero-shot per seed, then per K (not in sources: --from) and seed each method and
    WiSE-FT on FT."""
    import merge

    module = {name: (file, argv) for name, file, argv in reproduce.METHODS}
    jobs = [(f"zeroshot-s{s}", scored_job("baselines", ["--method", "zeroshot", "--seed", str(s), "--threads", str(threads), *extra],
                                          runs / "zeroshot" / f"zeroshot-s{s}"), ()) for s in seeds]
    for k in shots:
        if k in sources:
            continue  # read from reproduce.py's runs
        for s in seeds:
            for name in methods:
                if name == "zeroshot":
                    continue
                file, argv = module[name]
                more = ({"lpft": ["--lp-run", str(runs / k_name(k) / f"lp-s{s}")]}.get(name, [])
                        + (a.arf_args.split() if file == "arf" else []))
                argv = [*argv, *more, "--shots", str(k), "--seed", str(s), "--threads", str(threads), *extra]
                needs = (f"lp-{k_name(k)}-s{s}",) if name == "lpft" and "lp" in methods else ()  # LP-FT's head: LP's
                jobs.append((f"{name}-{k_name(k)}-s{s}", scored_job(file, argv, runs / k_name(k) / f"{name}-s{s}"), needs))
            ft = runs / k_name(k) / f"ft-s{s}"
            jobs.append((f"wise-ft-{k_name(k)}-s{s}", lambda ft=ft: merge.main(
                ["wise", "--ckpt", str(ft), "--alphas", a.wise_alphas, "--plot", str(ft / "wise_curve.png")]), (f"ft-{k_name(k)}-s{s}",)))
    return jobs


def check_from(folders: list, seeds: list, methods: list, shots: list) -> dict:
    """--from: {K: folder} of reproduce.py's runs folders, after checking that each holds every finished run the map
    needs (and its results.jsonl, FT's WiSE-FT rows in it), all trained at one K of --shots that no other folder gives."""
    import json

    taken = {}
    for folder in map(Path, folders):
        need = [f"{m}-s{s}" for s in seeds for m in methods if m != "zeroshot"]
        missing = [r for r in need if not (folder / r / "final.pt").is_file()]
        if missing or not (folder / "results.jsonl").is_file():
            raise SystemExit(f"error: --from {folder} lacks finished runs of the map ({', '.join(missing) or 'results.jsonl'}): run "
                             f"`python reproduce/reproduce.py --runs {folder} --methods {','.join(methods)}` first, or leave it out of --from")
        ks = sorted({json.loads((folder / r / "args.json").read_text()).get("shots", 0) for r in need})
        if len(ks) != 1 or ks[0] not in shots or ks[0] in taken:
            raise SystemExit(f"error: --from {folder}: its runs were trained at --shots {','.join(map(str, ks))}; each folder "
                             f"gives the map one K, which must be in --shots ({','.join(map(str, shots))}) and in no other --from folder")
        taken[ks[0]] = folder
    return taken


def summarise(runs: Path, seeds: list, shots: list, methods: list, sources: dict) -> dict:
    """Per K: {"ft": [(ΔID, ΔOOD, ΔZS) of FT − zero-shot per seed], "se_ft": {kind: paired SE}, "bulge": [(α, ID − FT's)
    per seed], "methods": {method: (paired_with_ft's columns, {kind: paired SE})}, "tags": {method: its rows' tag (the
    coefficients it ran with)}, "zs": zero-shot (ID, OOD, ZS) mean}."""
    import evaluate

    zs_rows = [r for r in evaluate.read_results(runs / "zeroshot" / "results.jsonl") if r.get("tag", "") == "" and r["seed"] in seeds]
    zs_dirs = [runs / "zeroshot" / f"zeroshot-s{s}" for s in seeds]
    out = {}
    for k in shots:
        folder = sources.get(k, runs / k_name(k))
        rows = [r for r in evaluate.read_results(folder / "results.jsonl") if r["method"] != "zeroshot" and r["seed"] in seeds]
        rows += zs_rows
        point, _ = reproduce.run_points(rows)
        if not all(("ft", "", s) in point and ("zeroshot", "", s) in point for s in seeds):
            continue
        ft_dirs = [folder / f"ft-s{s}" for s in seeds]
        tests = reproduce.test_splits(ft_dirs[0])
        kinds = {kind: [n for n, t in tests.items() if t.kind == kind] for kind in ("id", "ood", "zeroshot")}
        bulge = reproduce.wise_bulges(point, rows, seeds)
        table = reproduce.paired_with_ft(rows, [])
        per_method, tags_of = {}, {}
        for m in methods:
            tag = reproduce.own_tag(table, m)
            dirs = [folder / f"{m}-s{s}" for s in seeds]
            if m in ("zeroshot", "ft") or tag is None or not all((d / "final.pt").is_file() for d in dirs):
                continue
            per_method[m] = (table[(m, tag)], {kind: reproduce.paired_se(dirs, ft_dirs, n) for kind, n in kinds.items()})
            tags_of[m] = tag
        out[k] = dict(tags=tags_of, ft=[np.subtract(point[("ft", "", s)], point[("zeroshot", "", s)]) for s in seeds],
                      se_ft={kind: reproduce.paired_se(ft_dirs, zs_dirs, n) for kind, n in kinds.items()},
                      bulge=bulge, methods=per_method, zs=np.mean([point[("zeroshot", "", s)] for s in seeds], 0))
    return out


def bars(summary: dict) -> list:
    """[(bar, holds)] of issue #32 at one K: FT's three against zero-shot, the bulge on every seed, and each
    robust method's ΔID ≥ −1 with ΔOOD ≥ +3 (Lipsum-FT's is the acceptance's; the others are reported the same way).
    holds is None where the task cannot measure the bar (no OOD or zero-shot-transfer split: a NaN mean)."""
    (fi, fo, fz), bulges = np.mean(summary["ft"], 0), [b for _, b in summary["bulge"]]
    check = lambda value, ok: None if math.isnan(value) else bool(ok)  # noqa: E731
    out = [(f"FT ID ≥ ZS + {FT_GAIN:g}", check(fi, fi >= FT_GAIN)), (f"FT OOD ≤ ZS − {-FT_OOD_LOSS:g}", check(fo, fo <= FT_OOD_LOSS)),
           (f"FT ZS transfer ≤ ZS − {-FT_ZS_LOSS:g}", check(fz, fz <= FT_ZS_LOSS)),
           (f"bulge > +{BULGE:g} every seed", check(sum(bulges), all(b > BULGE for b in bulges)))]
    for m, (cols, _) in summary["methods"].items():
        d_id, d_ood = np.mean(cols["id"]), np.mean(cols["ood"])
        out.append((f"{m} ΔID ≥ −{-MAX_ID_COST:g}, ΔOOD ≥ +{MIN_OOD_GAIN:g}", check(d_ood, d_id >= MAX_ID_COST and d_ood >= MIN_OOD_GAIN)))
    return out


def figure(result: dict, per_class: int, out: Path):
    """x = K (log scale, the full set at the right), y: FT − zero-shot (left), each method's ΔID and ΔOOD vs FT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import common

    ks = sorted(result, key=lambda k: k or math.inf)
    top = max([k for k in ks if k] or [1])
    x = {k: k if k else max(2 * top, per_class) for k in ks}  # the full set at its own size per class (or right of the rest)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for j, label in enumerate(("ID", "OOD mean", "ZS transfer")):
        axes[0].errorbar([x[k] for k in ks], [np.mean([d[j] for d in result[k]["ft"]]) for k in ks],
                         yerr=[np.std([d[j] for d in result[k]["ft"]]) for k in ks], marker="o", capsize=3, label=f"FT − zero-shot, {label}")
    axes[0].plot([x[k] for k in ks], [np.mean([b for _, b in result[k]["bulge"]]) for k in ks], "k--", marker="s",
                 label="WiSE-FT bulge (best α < 1 ID − FT ID)")
    methods = sorted({m for k in ks for m in result[k]["methods"]})
    style = common.series_styles(methods)
    for col, ax in (("id", axes[1]), ("ood", axes[2])):
        for n, m in enumerate(methods):
            have = [k for k in ks if m in result[k]["methods"]]
            vals = [result[k]["methods"][m][0][col] for k in have]
            shift = 1 + 0.03 * (n - len(methods) / 2)  # methods side by side, not on top of each other
            ax.errorbar([x[k] * shift for k in have], [np.mean(v) for v in vals], yerr=[np.std(v) for v in vals],
                        marker=style[m][1], color=style[m][0], capsize=3, label=m)
    for ax, bar in ((axes[0], FT_GAIN), (axes[0], FT_OOD_LOSS), (axes[1], MAX_ID_COST), (axes[2], MIN_OOD_GAIN)):
        ax.axhline(bar, color="grey", lw=0.8, ls=":")
    titles = (f"FT − zero-shot (bars: ID ≥ +{FT_GAIN:g}, OOD / ZS ≤ {FT_OOD_LOSS:g})", f"ΔID vs FT of the same seed (bar: ≥ {MAX_ID_COST:g})",
              f"ΔOOD mean vs FT of the same seed (bar: ≥ +{MIN_OOD_GAIN:g})")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log")
        ax.set_xticks([x[k] for k in ks], [f"full\n({per_class}/class)" if k == 0 else str(k) for k in ks])
        ax.minorticks_off()
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xlabel("training images per class (K)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def report(result: dict, seeds: list, per_class: int, command: str, timing: str, figure_link: str, runs: Path) -> list:
    cell = reproduce.cell
    se_txt = lambda se: f"SE {se:.1f}" if math.isfinite(se) else "SE –"  # noqa: E731
    ks = sorted(result, key=lambda k: k or math.inf)
    kname = lambda k: f"full ({per_class}/class)" if k == 0 else str(k)  # noqa: E731
    lines = ["# Regime map: the papers' claims by training-set size", "",
             f"Written by `{command}` (seeds {', '.join(map(str, seeds))}). Every number comes from the runs' "
             f"results.jsonl under `{runs}` (a K taken --from another folder: under that folder). K = training images per class (`--shots K`, drawn per seed, nested in K); "
             "the held-out slice is the same at every K (METHODS.md, Regimes). ± = std over seeds; SE = standard error "
             "of the seed-mean Δ from the per-image differences on the same test images.", "", timing, "",
             f"![regime map]({figure_link})", "", "Figure: means over seeds, error bars = std over seeds; dotted lines = the bars.", "",
             "## FT against zero-shot, and FT's WiSE-FT bulge", "",
             "| K | zero-shot ID / OOD / ZS | FT ΔID vs ZS | FT ΔOOD vs ZS | FT ΔZS vs ZS | WiSE bulge per seed (α: best α < 1 ID − FT ID) |",
             "|---|---|---|---|---|---|"]
    for k in ks:
        r = result[k]
        ft = np.array(r["ft"])
        lines.append(f"| {kname(k)} | {r['zs'][0]:.1f} / {r['zs'][1]:.1f} / {r['zs'][2]:.1f} | "
                     + " | ".join(f"{cell(ft[:, j])} ({se_txt(r['se_ft'][kind])})" for j, kind in enumerate(("id", "ood", "zeroshot")))
                     + " | " + ", ".join(f"α {al:g}: {b:+.2f}" for al, b in r["bulge"]) + " |")
    lines += ["", "## Each method against FT of the same seed", "",
              "Margin = OOD-mean margin over that seed's FT WiSE-FT curve at equal ID (> 0: robust beyond what interpolating "
              "towards zero-shot buys; '–' outside the curve's ID range, seeds in range in brackets). Each row names the "
              "coefficients its runs used (their tag): a K taken --from another folder has that folder's presets.", "",
              "| K | method | ΔID vs FT | ΔOOD vs FT | ΔZS vs FT | margin over FT's WiSE curve |", "|---|---|---|---|---|---|"]
    for k in ks:
        for m, (cols, se) in result[k]["methods"].items():
            n_margin = sum(not math.isnan(v) for v in cols["margin"])
            tag = result[k]["tags"][m]
            lines.append(f"| {kname(k)} | {m}{f' ({tag})' if tag else ''} | {cell(cols['id'])} ({se_txt(se['id'])}) | {cell(cols['ood'])} ({se_txt(se['ood'])}) | "
                         f"{cell(cols['zs'])} ({se_txt(se['zeroshot'])}) | {cell(cols['margin'])} ({n_margin}) |")
    lines += ["", "## Issue #32's bars per K", "",
              f"FT ID ≥ zero-shot + {FT_GAIN:g}, FT OOD mean ≤ zero-shot − {-FT_OOD_LOSS:g}, zero-shot transfer ≤ zero-shot − "
              f"{-FT_ZS_LOSS:g}, a WiSE-FT bulge > +{BULGE:g} on every seed, and per robust method ΔID ≥ −{-MAX_ID_COST:g} with "
              f"ΔOOD ≥ +{MIN_OOD_GAIN:g} against FT (seed means, each method at its preset coefficient: the acceptance's "
              "Lipsum-FT λ is chosen on held-out data with reproduce/sweep.py at the chosen K).", "",
              "| K | all hold | failing bars |", "|---|---|---|"]
    for k in ks:
        failing = [name for name, ok in bars(result[k]) if ok is False]
        unmeasured = [name for name, ok in bars(result[k]) if ok is None]
        lines.append(f"| {kname(k)} | {'no' if failing else '**yes**'} | {'; '.join(failing) or '–'}"
                     + (f" (not measurable here: {'; '.join(unmeasured)})" if unmeasured else "") + " |")
    return lines + [""]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shots", default="4,10,20,42,0", help="comma-separated K (training images per class); 0 = the full set")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated rows of reproduce.METHODS (zeroshot and ft always run)")
    p.add_argument("--extra", default="", help="extra arguments for every run (quoted): --data / --data-root, --steps, ...")
    p.add_argument("--arf-args", default="", help="extra arguments for arf.py only (its --captions / --pool off miniworld)")
    p.add_argument("--wise-alphas", default="0,0.2,0.4,0.5,0.6,0.7,0.8,0.9,1", help="WiSE-FT α on FT (merge.py syntax)")
    p.add_argument("--runs", default="runs/regime", help="folder for every run: RUNS/k<K>/, RUNS/full/, RUNS/zeroshot/")
    p.add_argument("--from", dest="sources", default="", help="comma-separated reproduce/reproduce.py runs folders: each gives the K its runs were trained at, instead of training it")
    p.add_argument("--out", default="docs/regime_map.md", help="the markdown report")
    p.add_argument("--figures", default="docs", help="folder for regime_map.png (linked from the report)")
    p.add_argument("--workers", type=int, default=1, help="processes taking jobs in parallel (each gets cores / workers threads)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a helper process started by --workers
    cli = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(cli)
    seeds = [int(s) for s in a.seeds.split(",")]
    shots = list(dict.fromkeys(int(k) for k in a.shots.split(",")))
    methods = list(dict.fromkeys(["zeroshot", "ft", *a.methods.split(",")]))
    extra = a.extra.split()
    unknown = [m for m in methods if m not in {name for name, _, _ in reproduce.METHODS}]
    if unknown:
        raise SystemExit(f"error: unknown --methods {', '.join(unknown)}; choose from {', '.join(n for n, _, _ in reproduce.METHODS)}")
    owned = [f for f in ("--shots", "--seed", "--out", "--resume", "--threads") if any(e.split("=")[0] == f for e in extra)]
    if owned:
        raise SystemExit(f"error: --extra may not hold {', '.join(owned)}: the map sets it per run (--shots and --seeds of regime.py)")
    if any(k < 0 for k in shots):
        raise SystemExit(f"error: --shots {a.shots}: K must be >= 0 (0 = the full set)")
    runs = Path(a.runs)
    sources = check_from([f for f in a.sources.split(",") if f], seeds, methods, shots)
    per_class = {} if a.worker else check_shots(shots, seeds, extra)  # a K too large for a class stops here, with few_shot's message
    runs.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // a.workers)
    jobs = jobs_of(a, runs, seeds, shots, methods, extra, threads, sources)
    wall_start = time.time()
    workers = []
    if not a.worker:  # the coordinator: forget claims and failures of earlier (killed) runs, start helpers
        for folder in (".claim", ".failed"):
            for f in (runs / folder).glob("*"):
                f.unlink()
        workers = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *cli, "--worker"]) for _ in range(a.workers - 1)]
    import torch

    torch.set_num_threads(threads)
    with open(runs / "regime.log", "a") as log:
        outcomes = [reproduce.run_job(name, runs, fn, log, needs) for name, fn, needs in jobs]
    if a.worker:
        return None
    for w in workers:
        w.wait()
    failed = [name for (name, _, _), ok in zip(jobs, outcomes) if ok is not True and not (runs / ".done" / name).exists()]
    if failed:
        raise SystemExit(f"error: {len(failed)} jobs failed (see {runs / 'regime.log'}): {', '.join(failed)}")
    result = summarise(runs, seeds, shots, methods, sources)
    out, figures = Path(a.out), Path(a.figures)
    out.parent.mkdir(parents=True, exist_ok=True)
    figures.mkdir(parents=True, exist_ok=True)
    figure(result, per_class[seeds[0]], figures / "regime_map.png")
    link = os.path.relpath(figures / "regime_map.png", out.parent)
    command = " ".join(["python reproduce/regime.py", shlex.join(cli)]).strip()
    job_time = sum(float(f.read_text()) for f in (runs / ".done").glob("*"))
    timing = (f"This invocation: {(time.time() - wall_start) / 60:.1f} min wall time with {a.workers} worker process(es) on "
              f"{os.cpu_count()} CPU cores; {job_time / 60:.1f} min summed over every job in {runs} (every invocation's).")
    lines = report(result, seeds, per_class[seeds[0]], command, timing, link, runs)
    out.write_text("\n".join(lines))
    print(f"wrote {out} and {figures / 'regime_map.png'}")
    return result


if __name__ == "__main__":
    main()
