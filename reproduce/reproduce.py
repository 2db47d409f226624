"""Reproduce the papers' tables and figures on miniworld with one command.

Runs every method with every seed (and the ablations of ARF's anchors, FLYP's single prompt and
Lipsum-FT's Table 3), then WiSE-FT on FT, Lipsum-FT, FLYP, ARF and LoRA, TPGM on FT, FLYP and ARF, a greedy
soup of the FT seeds, Model Stock of each FT seed s with a second FT run (seed s + STOCK_PARTNER, in
RUNS/stock-partners: not a row of its own), the energy gap of every fine-tuned run and the text-space diagnostics
(reproduce/diagnostics.py), and writes RESULTS.md (Table-1-shaped table, mean ± std over seeds; the
papers' ImageNet numbers beside ours as a shape comparison; the ordering claims checked) with two
figures: ID vs OOD with the WiSE-FT curves (Lipsum-FT paper Figure 5 shape) and energy gap vs relative
OOD accuracy (its Figure 4 shape).

  python reproduce/reproduce.py                         # 3 seeds, the presets of each method file
  python reproduce/reproduce.py --seeds 0 --steps 20    # a quick look
A rerun skips the jobs already done (RUNS/.done/<job>) and resumes an interrupted training run.
"""
import argparse
import importlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "reproduce"))

# (row, file, arguments): every method of the papers' tables.
METHODS = [
    ("zeroshot", "baselines", ["--method", "zeroshot"]),
    ("lp", "baselines", ["--method", "lp"]),
    ("ft", "baselines", ["--method", "ft"]),
    ("lpft", "baselines", ["--method", "lpft"]),  # its LP head comes from the lp run of the same seed
    ("scratch", "baselines", ["--method", "scratch"]),
    ("ema", "baselines", ["--method", "ema"]),
    ("l2sp", "baselines", ["--method", "l2sp"]),
    ("kd", "baselines", ["--method", "kd"]),
    ("featkd", "baselines", ["--method", "featkd"]),
    ("flyp", "baselines", ["--method", "flyp"]),
    ("flyp-single", "baselines", ["--method", "flyp", "--flyp-prompt", "single"]),  # FLYP with one prompt, not a random template
    ("lora", "baselines", ["--method", "lora"]),  # low-rank updates of the image tower, merged into final.pt
    ("car_ft", "car_ft", []),
    ("carot", "carot", []),
    ("lipsum_ft", "lipsum_ft", []),
    ("arf", "arf", []),
    ("arf-no-ret", "arf", ["--no-ret"]),  # ARF's ablations: captions alone,
    ("arf-no-cap", "arf", ["--no-cap"]),  # retrieved pairs alone,
    ("arf-no-anchors", "arf", ["--no-cap", "--no-ret"]),  # neither (its L_ft alone)
    ("lipsum-kld", "lipsum_ft", ["--reg-loss", "kld"]),  # Lipsum-FT paper's Table 3: KL instead of MSE,
    ("lipsum-fixed", "lipsum_ft", ["--text-guidance", "fixed"]),  # template contexts instead of random texts,
    ("lipsum-fixed-kld", "lipsum_ft", ["--text-guidance", "fixed", "--reg-loss", "kld"]),  # both (CAR-FT-like)
]
# run name -> (method, the ablation words of its row's tag): the method files tag a run with what it switched off or
# swapped, beside its coefficient (lipsum_ft's row reads "lam=0.5 kld" at miniworld's λ)
ABLATIONS = {"flyp-single": ("flyp", "prompt=single"), "arf-no-ret": ("arf", "no-ret"), "arf-no-cap": ("arf", "no-cap"), "arf-no-anchors": ("arf", "no-cap,no-ret"),
             "lipsum-kld": ("lipsum_ft", "kld"), "lipsum-fixed": ("lipsum_ft", "fixed"), "lipsum-fixed-kld": ("lipsum_ft", "kld fixed")}
ABLATION_WORDS = {"prompt=single", "no-cap", "no-ret", "kld", "fixed"}  # a tag holding one of these is an ablation's
WISE_ON = ("ft", "lipsum_ft", "flyp", "arf", "lora")  # WiSE-FT curves drawn on top of these (FLYP, ARF: heads rebuilt from the merged text tower)
TPGM_ON = ("ft", "flyp", "arf")  # TPGM projections of these
MERGED = ("wise", "tpgm", "soup", "stock", "ensemble")  # tags of rows that combine runs rather than train one
STOCK_PARTNER = 100  # Model Stock (N = 2) of FT seed s merges ft-s{s} with an FT run of seed s + 100, filed under seed s
TABLE_ALPHA = 0.5  # the WiSE-FT operating point shown in the table

# ViT-B/16 on ImageNet (IN / V2 / R / A / S), each Δ taken against the zero-shot row of its own source:
# "lipsum": the Lipsum-FT paper (ARF from its own paper; METHODS.md); "carot": CaRot's Table 6 as printed in
# TRACER's Table 2 (ICML 2026; its FT, CAR-FT, Lipsum-FT and ARF rows equal those papers' numbers, so it
# quotes them; CaRot's own tables could not be read here: a second-hand quote, METHODS.md).
PAPER_ZS = {"lipsum": (68.2, 62.0, 76.3, 52.1, 46.7), "carot": (68.33, 61.93, 77.71, 49.95, 48.26)}
PAPER = {  # (method, tag) -> (source, numbers)
    ("ft", ""): ("lipsum", (82.8, 72.6, 68.5, 39.2, 48.0)),
    ("lipsum_ft", ""): ("lipsum", (83.3, 73.6, 75.9, 49.9, 51.4)),
    ("arf", ""): ("lipsum", (82.7, 72.8, 75.6, 50.3, 51.8)),
    ("car_ft", ""): ("carot", (83.27, 74.03, 75.37, 49.53, 52.97)),
    ("carot", ""): ("carot", (83.16, 74.08, 77.74, 51.57, 52.74)),
    ("ft", "stock"): ("carot", (84.07, 74.83, 71.77, 51.23, 51.77)),
}


def ablation_words(tag: str) -> set:
    return ABLATION_WORDS & set(tag.replace(",", " ").split())


def is_ablation(tag: str) -> bool:
    return bool(ablation_words(tag))


def run_job(name: str, runs: Path, fn, log, needs=()):
    """Runs fn() once. Skipped when RUNS/.done/name exists or another worker has claimed it
    (RUNS/.claim/name, created exclusively); waits for the jobs it `needs`; marked done when fn
    returns, failed (RUNS/.failed/name) when it raises. Returns True, False, or None (not ours)."""
    marker = runs / ".done" / name
    if marker.exists():
        return True
    for folder in (".done", ".claim", ".failed"):
        (runs / folder).mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(runs / ".claim" / name, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return None
    while not all((runs / ".done" / n).exists() for n in needs):
        if any((runs / ".failed" / n).exists() for n in needs):
            log.write(f"SKIPPED {name}: a job it needs failed\n")
            (runs / ".failed" / name).touch()
            return False
        time.sleep(2)
    start = time.time()
    try:
        fn()
    except (Exception, SystemExit) as e:  # noqa: BLE001 -- report, keep going with the other jobs
        log.write(f"FAILED {name}: {type(e).__name__}: {e}\n{traceback.format_exc()}\n")
        print(f"FAILED {name}: {e}")
        (runs / ".failed" / name).touch()
        return False
    marker.write_text(f"{time.time() - start:.1f}\n")
    return True


def train_job(module: str, argv: list, out: Path):
    def fn():
        resume = ["--resume"] if (out / "args.json").exists() else []
        importlib.import_module(module).main([*argv, "--out", str(out), *resume])
    return fn


def relative_ood(rows: list, zeroshot_ood: float) -> float:
    """OOD mean as % of the zero-shot model's (NaN when that is 0: nothing to be relative to)."""
    return 100 * ood_mean(rows) / zeroshot_ood if zeroshot_ood > 0 else math.nan


def ood_mean(rows: list) -> float:
    return float(np.mean([r["acc"] for r in rows if r["kind"] == "ood"]))


def wise_alpha(row: dict):
    """α of a WiSE-FT row (from its configuration, never its display tag), None for any other row."""
    config = row.get("config", {})
    return config.get("alpha") if config.get("merge") == "wise" else None


def wise_alphas(rows: list) -> dict:
    """{(method, tag): α} of the WiSE-FT rows."""
    return {(r["method"], r.get("tag", "")): wise_alpha(r) for r in rows if wise_alpha(r) is not None}


def run_points(rows: list) -> tuple[dict, dict]:
    """({(method, tag, seed): (ID, OOD mean, ZS mean) in %}, {(method, tag, seed): run folder}) from
    evaluation rows, one entry per run or merge."""
    import merge

    points = defaultdict(list)  # (method, tag, seed) -> that run's rows
    for r in rows:
        points[(r["method"], r.get("tag", ""), r["seed"])].append(r)
    return ({key: merge.summary(rs) for key, rs in points.items()},
            {key: str(Path(rs[0]["run"])) for key, rs in points.items()})


def ft_wise_curves(point: dict, alphas: dict) -> dict:
    """seed -> [(α, ID, OOD)] of WiSE-FT on FT, by α, from run_points' summaries and wise_alphas."""
    curves = defaultdict(list)
    for (method, tag, seed), (i, o, _) in point.items():
        if method == "ft" and (method, tag) in alphas:
            curves[seed].append((alphas[(method, tag)], i, o))
    return {seed: sorted(c) for seed, c in curves.items()}


def wise_bulges(point: dict, rows: list, seeds: list) -> list:
    """[(α, ID − FT's ID)] per seed: the best WiSE-FT point on FT's curve short of α = 1 (NaN, NaN without a curve)."""
    curves = ft_wise_curves(point, wise_alphas(rows))
    out = []
    for seed in seeds:
        below = [(i, al) for al, i, _ in curves.get(seed, []) if al < 1]  # (ID, α) of the curve's points short of FT
        best_id, best = max(below) if below else (math.nan, math.nan)
        out.append((best, best_id - point[("ft", "", seed)][0]))
    return out


def own_tag(table: dict, method: str):
    """The tag of a method's own row in paired_with_ft's table (not a merge, not an ablation); None if it has none."""
    return next((t for (m, t) in table if m == method and not t.startswith(MERGED) and not is_ablation(t)), None)


def paired_with_ft(rows: list, gaps: list) -> dict:
    """{(method, tag): {column: [value per seed]}}: ID, OOD mean and zero-shot-transfer mean relative to
    FT of the same seed (points), the OOD margin over that seed's FT WiSE-FT curve at equal ID
    (merge.effective_robustness_margin, NaN where the ID is outside the curve's range), and the run's
    energy gap on the OOD splits."""
    import merge

    point, run_of = run_points(rows)
    curves = ft_wise_curves(point, wise_alphas(rows))
    gap = {str(Path(g["checkpoint"])): g["ood_mean"] for g in gaps}  # by run: ablations share a method name
    table = defaultdict(lambda: defaultdict(list))
    for (method, tag, seed), (i, o, z) in point.items():
        if (method == "ft" and tag.startswith("wise")) or ("ft", "", seed) not in point or seed not in curves:
            continue
        ft_id, ft_ood, ft_zs = point[("ft", "", seed)]
        cols = table[(method, tag)]
        cols["id"].append(i - ft_id)
        cols["ood"].append(o - ft_ood)
        cols["zs"].append(z - ft_zs)
        cols["margin"].append(merge.effective_robustness_margin([c[1:] for c in curves[seed]], (i, o)))
        if not tag.startswith(MERGED) and run_of[(method, tag, seed)] in gap:
            cols["gap"].append(gap[run_of[(method, tag, seed)]])
    return table


def test_splits(run_dir: Path) -> dict:
    """name -> Split of a run's test splits (its task as the run loads it)."""
    import common

    return {t.name: t for t in common.load_run(str(run_dir), "cpu").task.tests}


def correct(run_dir: Path, split: str) -> np.ndarray:
    """Per-image correctness [N] of a run's final weights on the held-out slice ("heldout") or a test split
    (by name), cached in the run folder; a miss scores every split of the run, loading it once."""
    cache = run_dir / f"correct-{split}.npy"
    if not cache.is_file():
        import common

        device = common.get_device("")
        run = common.load_run(str(run_dir), device)
        for data in [run.task.heldout, *run.task.tests]:
            logits, labels, _ = common.split_logits(run.model, data, run.task, run.eval_tf, device)  # [N, K], [N]
            np.save(run_dir / f"correct-{data.name}.npy", (logits.argmax(1) == labels).numpy())
    return np.load(cache)


def paired_se(run_dirs: list, ft_dirs: list, splits: list) -> float:
    """Standard error (points) of the seed-mean accuracy difference to FT, averaged over `splits`, from the
    per-image differences (paired: the same images): the splits are finite samples, so a difference within
    ~1-2 SE of a bar is within what another sample of the same distribution could give."""
    if not splits:
        return float("nan")
    var = []
    for split in splits:
        d = np.mean([correct(r, split).astype(float) - correct(f, split) for r, f in zip(run_dirs, ft_dirs)], 0)  # [N]
        var.append(d.var(ddof=1) / len(d))
    return 100 * float(np.sqrt(np.sum(var)) / len(splits))


def cell(values, fmt="{:+.1f}") -> str:
    """mean ± std of the non-NaN values ('–' if none); the std only in the default signed format."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "–"
    return fmt.format(np.mean(values)) + (f" ± {np.std(values):.1f}" if len(values) > 1 and fmt == "{:+.1f}" else "")


def paired_rows(table: dict) -> list:
    """Markdown rows of paired_with_ft's table, in METHODS order, each method's merges after it."""
    order = [m for m, _, _ in METHODS if m not in ABLATIONS]
    rank = lambda mt: (order.index(mt[0]) if mt[0] in order else len(order), mt[1].startswith(MERGED), mt[1])  # noqa: E731
    return [f"| {m}{f' ({t})' if t else ''} | {len(c['id'])} | {cell(c['id'])} | {cell(c['ood'])} | {cell(c['zs'])} | "
            f"{cell(c['margin'])} ({sum(not math.isnan(v) for v in c['margin'])}) | {cell(c['gap'], '{:.3g}')} |"
            for (m, t), c in sorted(table.items(), key=lambda item: rank(item[0]))]


BARS_ON = ("lipsum_ft", "arf", "kd", "car_ft", "flyp", "carot", "lora")  # the methods reported against the bars
REQUIRED = ("lipsum_ft",)  # the method whose bar the acceptance requires (issue #32); the others are reported the same way
# The bars of miniworld's default regime (issue #32), in points: FT ID − zero-shot ≥, FT OOD − zero-shot ≤, FT zero-shot
# transfer − zero-shot ≤, FT's WiSE-FT bulge > (every seed); a robust method against FT: ΔID ≥ and ΔOOD ≥.
# (Issue #18's, for the full training set: FT +15 / −5 / −5, bulge > 0, ΔID ≥ −1.5; the full set misses them, docs/regime_map.md.)
FT_GAIN, FT_OOD_LOSS, FT_ZS_LOSS, BULGE = 7.0, -4.0, -4.0, 0.5
MAX_ID_COST, MIN_OOD_GAIN = -1.0, 3.0


def world_bars(runs: Path, rows: list, seeds: list) -> list:
    """Markdown lines: miniworld's acceptance bars (issue #18's zero-shot ones, issue #32's for FT and the
    methods) on these runs. Zero-shot and FT against the bars, FT's WiSE-FT bulge per seed, and BARS_ON
    against FT with the seed spread and the paired per-image standard error of each Δ."""

    def stat(values, fmt="{:.1f}"):
        return fmt.format(np.mean(values)) + (f" ± {np.std(values):.1f}" if len(values) > 1 else "")

    point, _ = run_points(rows)
    if not all((m, "", s) in point for m in ("zeroshot", "ft") for s in seeds):  # no zero-shot or FT run for some seed
        return []
    zs, ft = [point[("zeroshot", "", s)] for s in seeds], [point[("ft", "", s)] for s in seeds]
    tests = test_splits(runs / f"ft-s{seeds[0]}")
    chance = {n: 100 / len(t.class_groups or t.classnames) for n, t in tests.items()}
    zs_rows = {r["split"]: 100 * r["acc"] for r in rows if r["method"] == "zeroshot" and r["seed"] == seeds[0]
               and r.get("tag", "") == ""}
    zs_splits = [n for n, t in tests.items() if t.kind == "zeroshot"]
    (zi, zo, zz), (fi, fo, fz) = np.mean(zs, 0), np.mean(ft, 0)
    ok = lambda b: "yes" if b else "**no**"  # noqa: E731
    lines = ["## The world's bars (issues #18 and #32)", "",
             "Mean over seeds; Δ against FT of the same seed (± std over seeds; SE = standard error of the seed-mean Δ",
             "from the per-image differences on the same images, the sampling noise of the finite test splits).", "",
             "| bar | measured | holds |", "|---|---|---|",
             f"| zero-shot ID in [45, 75] | {zi:.1f} | {ok(45 <= zi <= 75)} |",
             f"| zero-shot OOD mean ≥ 45 | {zo:.1f} | {ok(zo >= 45)} |",
             *[f"| zero-shot {n} ≥ 2 × chance ({2 * chance[n]:.1f}) | {zs_rows[n]:.1f} | {ok(zs_rows[n] >= 2 * chance[n])} |"
               for n in zs_splits],
             f"| FT ID ≥ zero-shot + {FT_GAIN:g} | {fi - zi:+.1f} ({stat([f[0] for f in ft])}) | {ok(fi - zi >= FT_GAIN)} |",
             f"| FT OOD mean ≤ zero-shot − {-FT_OOD_LOSS:g} | {fo - zo:+.1f} ({stat([f[1] for f in ft])}) | {ok(fo - zo <= FT_OOD_LOSS)} |",
             f"| FT zero-shot transfer ≤ zero-shot − {-FT_ZS_LOSS:g} | {fz - zz:+.1f} ({stat([f[2] for f in ft])}) | {ok(fz - zz <= FT_ZS_LOSS)} |"]
    found = [(al, b) for al, b in wise_bulges(point, rows, seeds) if not math.isnan(b)]
    alphas, bulges = [al for al, _ in found], [b for _, b in found]
    if bulges:
        lines.append(f"| FT's WiSE-FT bulge: best α < 1 on ID (per seed), its ID − FT's | α {', '.join(f'{a:g}' for a in alphas)}: "
                     f"{stat(bulges, '{:+.2f}')} | {ok(min(bulges) > BULGE)} (> +{BULGE:g} on every seed) |")
    table = paired_with_ft(rows, [])
    ft_dirs = [runs / f"ft-s{s}" for s in seeds]
    for method in BARS_ON:
        tag = own_tag(table, method)
        if tag is None:
            continue
        cols = table[(method, tag)]
        dirs = [runs / f"{method}-s{s}" for s in seeds]
        if not all((d / "final.pt").is_file() for d in dirs + ft_dirs):
            continue
        se = {k: paired_se(dirs, ft_dirs, [n for n, t in tests.items() if t.kind == k]) for k in ("id", "ood", "zeroshot")}
        d_id, d_ood, margin = np.mean(cols["id"]), np.mean(cols["ood"]), np.nanmean(cols["margin"])
        bar = f"ΔOOD ≥ +{MIN_OOD_GAIN:g} with ΔID ≥ −{-MAX_ID_COST:g}"
        lines.append(f"| {method}{f' ({tag})' if tag else ''}: ΔID {cell(cols['id'])} (SE {se['id']:.1f}), ΔOOD {cell(cols['ood'])} "
                     f"(SE {se['ood']:.1f}), ΔZS {cell(cols['zs'])} (SE {se['zeroshot']:.1f}), margin {cell(cols['margin'])} | "
                     + (f"required: {bar}; goal: margin > +1 | " if method in REQUIRED else f"reported: {bar} | ")
                     + f"{ok(d_ood >= MIN_OOD_GAIN and d_id >= MAX_ID_COST)}"
                     + (f"; goal {ok(margin > 1)} |" if method in REQUIRED else " |"))
    alphas = wise_alphas(rows)
    wise_lipsum = [np.nanmean(c["margin"]) for (m, t), c in table.items() if m == "lipsum_ft" and 0 < alphas.get((m, t), 0) < 1]
    if wise_lipsum:
        lines.append(f"| WiSE-FT on Lipsum-FT above WiSE-FT on FT at equal ID (mean margin of its 0 < α < 1 points) | "
                     f"{np.nanmean(wise_lipsum):+.2f} | {ok(np.nanmean(wise_lipsum) > 0)} |")
    return lines + [""]


def training_set(runs: Path, seeds: list) -> str:
    """The training set the FT runs saw, in words: their --shots K (miniworld's recipe: 10) or the full set."""
    k = {json.loads(f.read_text()).get("shots", 0) for f in (runs / f"ft-s{s}" / "args.json" for s in seeds) if f.is_file()}
    if k == {0}:
        return "the full training split of every run (`--shots 0`)"
    return (f"K = {', '.join(map(str, sorted(k)))} images per class (`--shots`; miniworld's default regime, docs/miniworld.md), "
            "drawn by each run's seed, the held-out slice apart")


def write_results(runs: Path, out_md: Path, figures: Path, seeds: list, wall: float, job_time: float, workers: int,
                  command: str):
    import evaluate

    rows = evaluate.read_results(runs / "results.jsonl")
    table_rows = [r for r in rows if wise_alpha(r) in (None, TABLE_ALPHA)]
    table_tag = next((r["tag"] for r in rows if wise_alpha(r) == TABLE_ALPHA), "")  # the display tag of those rows
    figures.mkdir(parents=True, exist_ok=True)
    evaluate.plot(rows, str(figures / "reproduce_id_vs_ood.png"))
    columns, summary, _, _ = evaluate.summarise(rows)
    by_method = {(group[0], group[1]): cols for group, cols in summary.items()}
    id_col = columns[0]

    def mean(method, col, tag=None):
        """Mean over seeds of a column; tag None = the method's own run (not a merge, not an ablation); an ablation's
        words (ABLATIONS) = its row, whatever coefficient its tag also names."""
        own = lambda t: not t.startswith(MERGED) and not is_ablation(t)  # noqa: E731
        same = lambda t: (t == tag if not ablation_words(tag) else ablation_words(t) == ablation_words(tag)  # noqa: E731
                          and not t.startswith(MERGED))
        groups = [c for (m, t), c in by_method.items() if m == method and (same(t) if tag is not None else own(t))]
        values = groups[0].get(col) if groups else None
        return float(np.mean(values)) if values else float("nan")

    lines = [
        "# Reproducing the papers' tables on miniworld",
        "",
        f"Written by `{command}` ({len(seeds)} seeds: {', '.join(map(str, seeds))}; {wall / 60:.1f} min wall time with "
        f"{workers} worker process(es) on {os.cpu_count()} CPU cores, summed over every invocation into {runs} (a rerun "
        f"adds only the jobs it ran); {job_time / 60:.1f} min summed over jobs). Every number "
        f"below comes from `{runs / 'results.jsonl'}`; nothing is typed in by hand.",
        "",
        f"Training set: {training_set(runs, seeds)}.",
        "",
        "## Table 1 shape: ID, domain shifts, zero-shot transfer, calibration",
        "",
        "ID = the fine-tuning distribution; OOD columns are domain shifts of the same classes (their mean is",
        "*OOD mean*); ZS columns are zero-shot transfer tasks (classes / attributes never fine-tuned on, scored",
        f"with heads from the model's current text tower). mean ± std over seeds. WiSE-FT rows are α = {TABLE_ALPHA:g}.",
        "",
        evaluate.markdown_table(table_rows),
        "",
        "## Figures",
        "",
        "![ID vs OOD with WiSE-FT curves](docs/reproduce_id_vs_ood.png)",
        "",
    ]
    gaps = [json.loads(line) for line in (runs / "energy_gap.jsonl").read_text().splitlines()] if (runs / "energy_gap.jsonl").exists() else []
    zs_ood = mean("zeroshot", "OOD mean")
    points = []
    latest = {g["checkpoint"]: g for g in gaps}
    for g in latest.values():
        run_rows = [r for r in rows if r["run"] == str(Path(g["checkpoint"])) and not r.get("tag", "").startswith(MERGED)]
        if run_rows and g.get("ood_mean") is not None:
            tag = run_rows[0].get("tag", "")
            label = f"{g['method']} ({tag})" if is_ablation(tag) else g["method"]
            points.append((label, g["ood_mean"], relative_ood(run_rows, zs_ood / 100)))
    points = [p for p in points if math.isfinite(p[2])]
    if len(points) >= 3:
        import matplotlib

        import common

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        x, y = np.array([p[1] for p in points]), np.array([p[2] for p in points])
        r = float(np.corrcoef(x, y)[0, 1])
        fig, ax = plt.subplots(figsize=(10, 5))
        methods = sorted({p[0] for p in points})
        style = common.series_styles(methods)  # a colour per method family, a marker per variant
        for method in methods:
            sel = [p for p in points if p[0] == method]
            ax.scatter([p[1] for p in sel], [p[2] for p in sel], label=method, color=style[method][0], marker=style[method][1])
        ax.set_xlabel("energy gap to the zero-shot model (OOD splits, 10,000 random texts)")
        ax.set_ylabel("OOD accuracy relative to zero-shot (%)")
        ax.set_title(f"Pearson r = {r:.2f} over {len(points)} runs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        fig.savefig(figures / "reproduce_energy_gap.png", dpi=120)
        lines += [f"Energy gap vs relative OOD accuracy (Figure 4 shape): Pearson r = {r:.2f} over {len(points)} runs "
                  "(the paper finds a clear negative correlation).", "",
                  "![energy gap vs relative OOD accuracy](docs/reproduce_energy_gap.png)", ""]

    lines += ["## Effective robustness: each method against FT of the same seed", "",
              "ΔID, ΔOOD and ΔZS (zero-shot transfer mean) are differences to FT (same seed), mean ± std over seeds. *Margin* is the OOD-mean margin over the",
              "WiSE-FT curve of that seed's FT run at equal ID, interpolated between neighbouring α (METHODS.md, Evaluation): > 0",
              "means robust beyond what interpolating towards zero-shot buys; '–' (or fewer seeds in brackets) where the ID is",
              "outside the curve's range. Energy gap: ½ (v(θ) − v(θ0))² averaged over 10,000 random texts, mean over the OOD splits.", "",
              "| method | seeds | ΔID vs FT | ΔOOD vs FT | ΔZS vs FT | margin over FT's WiSE curve (seeds) | energy gap (OOD) |",
              "|---|---|---|---|---|---|---|", *paired_rows(paired_with_ft(rows, list(latest.values()))), ""]

    lines += world_bars(runs, rows, seeds)
    if (runs / "diagnostics.md").exists():
        lines += ["## Text-space diagnostics (`reproduce/diagnostics.py`)", "",
                  "How much of θ0's text space random texts probe, and where each method moved the image features: "
                  "Δ = n(f_θ(x)) − n(f_θ0(x)) on the ID and OOD test images, its share along the top random-text "
                  "directions (the rest lies where random texts barely read), and its size relative to FT's.", "",
                  (runs / "diagnostics.md").read_text(), ""]
    lines += ["## Shape comparison with the papers (ImageNet, ViT-B/16)", "",
              "Points relative to zero-shot (Δ) and to FT (vs FT). Paper OOD = mean of ImageNet-V2/R/A/Sketch; ours =",
              "mean of the miniworld domain shifts.", "",
              "| method | paper ΔID | paper ΔOOD | paper OOD vs FT | ours ΔID | ours ΔOOD | ours OOD vs FT |",
              "|---|---|---|---|---|---|---|"]
    p_ft_ood = float(np.mean(PAPER[("ft", "")][1][1:]))
    o_zs_id, o_ft_ood = mean("zeroshot", id_col), mean("ft", "OOD mean")
    for method, tag in (("ft", ""), ("lipsum_ft", ""), ("arf", ""), ("car_ft", ""), ("carot", ""), ("ft", "stock"), ("lora", "")):
        p_cells = ["", "", ""]
        if (method, tag) in PAPER:
            source, paper = PAPER[(method, tag)]
            p_ood, zs = float(np.mean(paper[1:])), PAPER_ZS[source]
            p_cells = [f"{paper[0] - zs[0]:+.1f}", f"{p_ood - float(np.mean(zs[1:])):+.1f}", f"{p_ood - p_ft_ood:+.1f}"]
        o_ood = mean(method, "OOD mean", tag or None)
        lines.append(f"| {method}{f' ({tag})' if tag else ''} | " + " | ".join(p_cells)
                     + f" | {mean(method, id_col, tag or None) - o_zs_id:+.1f} | {o_ood - zs_ood:+.1f} | {o_ood - o_ft_ood:+.1f} |")
    lines += ["", "Paper columns: the Lipsum-FT paper (FT, Lipsum-FT; ARF from its paper) and CaRot's Table 6 as printed in "
              "TRACER's Table 2 (CAR-FT, CaRot, Model Stock; Δ against that table's own zero-shot row). No ImageNet "
              "distribution-shift numbers for LoRA on CLIP were found to quote (METHODS.md, LoRA).", ""]

    def above(a, b):
        """a > b, or None where a row is missing (a method not run, a tag not found): never a silent "no"."""
        return None if math.isnan(a) or math.isnan(b) else a > b

    claims = [
        ("FT raises ID over zero-shot", above(mean("ft", id_col), o_zs_id)),
        ("FT lowers OOD below zero-shot", above(zs_ood, mean("ft", "OOD mean"))),
        ("FT lowers zero-shot transfer", above(mean("zeroshot", "ZS mean"), mean("ft", "ZS mean"))),
        ("Lipsum-FT beats FT on OOD", above(mean("lipsum_ft", "OOD mean"), mean("ft", "OOD mean"))),
        ("CAR-FT beats FT on OOD", above(mean("car_ft", "OOD mean"), mean("ft", "OOD mean"))),
        ("ARF beats FT on OOD", above(mean("arf", "OOD mean"), mean("ft", "OOD mean"))),
        ("ARF beats FT on zero-shot transfer", above(mean("arf", "ZS mean"), mean("ft", "ZS mean"))),
        *[(f"ARF's {what} alone help {col.split()[0]} (arf ({ABLATIONS[run][1]}) beats arf ({ABLATIONS['arf-no-anchors'][1]}))",
           above(mean("arf", col, ABLATIONS[run][1]), mean("arf", col, ABLATIONS["arf-no-anchors"][1])))
          for what, run in (("captions", "arf-no-ret"), ("retrieved pairs", "arf-no-cap")) for col in ("OOD mean", "ZS mean")],
        ("Lipsum-FT beats FT on ID (paper: +0.5)", above(mean("lipsum_ft", id_col), mean("ft", id_col))),
        *[(f"Lipsum-FT (random texts, MSE) beats its variant lipsum_ft ({ABLATIONS[run][1]}) on OOD (paper Table 3)",
           above(mean("lipsum_ft", "OOD mean"), mean("lipsum_ft", "OOD mean", ABLATIONS[run][1])))
          for run in ("lipsum-kld", "lipsum-fixed", "lipsum-fixed-kld")],
        ("WiSE-FT α=0.5 on FT beats FT on OOD", above(mean("ft", "OOD mean", table_tag), mean("ft", "OOD mean"))),
        ("WiSE on Lipsum-FT beats WiSE on FT on OOD (α=0.5)",
         above(mean("lipsum_ft", "OOD mean", table_tag), mean("ft", "OOD mean", table_tag))),
        ("Model Stock of two FT runs beats FT on ID", above(mean("ft", id_col, "stock"), mean("ft", id_col))),
        ("Model Stock of two FT runs beats FT on OOD", above(mean("ft", "OOD mean", "stock"), mean("ft", "OOD mean"))),
        ("CaRot beats FLYP on OOD", above(mean("carot", "OOD mean"), mean("flyp", "OOD mean"))),
        ("CaRot has a lower OOD ECE than FLYP", above(mean("flyp", "ECE OOD"), mean("carot", "ECE OOD"))),
        ("WiSE-FT α=0.5 on LoRA beats LoRA on OOD", above(mean("lora", "OOD mean", table_tag), mean("lora", "OOD mean"))),
    ]
    lines += ["", "## The papers' ordering claims, checked on these numbers", "",
              "| claim | holds here |", "|---|---|"]
    lines += [f"| {c} | {'not measured (no such rows)' if ok is None else 'yes' if ok else '**no**'} |" for c, ok in claims]
    lines.append("")
    out_md.write_text("\n".join(lines))
    print(f"wrote {out_md}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--runs", default="runs/reproduce", help="folder for every run and results.jsonl")
    p.add_argument("--out", default="RESULTS.md", help="the markdown report")
    p.add_argument("--figures", default="docs", help="folder for the PNGs (linked from the report)")
    p.add_argument("--methods", default=",".join(m for m, _, _ in METHODS), help="comma-separated subset")
    p.add_argument("--extra", default="", help="extra arguments for every training run (quoted), e.g. '--steps 20'")
    p.add_argument("--wise-alphas", default="0,0.2,0.4,0.5,0.6,0.7,0.8,0.9,1",
                   help="WiSE-FT mixing coefficients (merge.py syntax); dense near 1, where a bulge would show")
    p.add_argument("--tpgm-steps", type=int, default=200, help="TPGM's Adam steps on the radii")
    p.add_argument("--arf-args", default="", help="extra arguments for arf.py only (its --captions / --pool off miniworld)")
    p.add_argument("--workers", type=int, default=1, help="processes taking jobs in parallel (each gets cores / workers threads)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a helper process started by --workers
    cli = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(cli)
    wall_start = time.time()
    from tqdm import tqdm

    import merge

    seeds = [int(s) for s in a.seeds.split(",")]
    chosen = set(a.methods.split(","))
    extra = a.extra.split()
    runs = Path(a.runs)
    runs.mkdir(parents=True, exist_ok=True)
    log = open(runs / "reproduce.log", "a")
    torch_threads = max(1, (os.cpu_count() or 1) // a.workers)  # fixed per worker, not measured: bit-exact reruns
    jobs = []
    for seed in seeds:
        for name, module, method_argv in METHODS:
            if name not in chosen:
                continue
            out = runs / f"{name}-s{seed}"
            more = {"lpft": ["--lp-run", str(runs / f"lp-s{seed}")]}.get(name, a.arf_args.split() if module == "arf" else [])
            needs = (f"lp-s{seed}",) if name == "lpft" and "lp" in chosen else ()
            argv = [*method_argv, *more, "--seed", str(seed), "--threads", str(torch_threads), *extra]
            jobs.append((f"{name}-s{seed}", train_job(module, argv, out), needs))
        for name in WISE_ON:
            if name in chosen:
                jobs.append((f"wise-{name}-s{seed}", lambda n=name, s=seed: merge.main(
                    ["wise", "--ckpt", str(runs / f"{n}-s{s}"), "--alphas", a.wise_alphas, "--plot", str(runs / f"{n}-s{s}" / "wise_curve.png")]),
                    (f"{name}-s{seed}",)))
        for name in TPGM_ON:
            if name in chosen:
                jobs.append((f"tpgm-{name}-s{seed}", lambda n=name, s=seed: merge.main(
                    ["tpgm", "--ckpt", str(runs / f"{n}-s{s}"), "--steps", str(a.tpgm_steps)]), (f"{name}-s{seed}",)))
        for name, _, _ in METHODS:
            if name in chosen and name != "zeroshot":
                jobs.append((f"gap-{name}-s{seed}", lambda n=name, s=seed: importlib.import_module("lipsum_ft").main(
                    ["--report-energy-gap", str(runs / f"{n}-s{s}")]), (f"{name}-s{seed}",)))
        if "ft" in chosen:  # Model Stock's second run: its own results.jsonl (RUNS/stock-partners), not an FT row
            partner = runs / "stock-partners" / f"ft-s{seed + STOCK_PARTNER}"
            argv = ["--method", "ft", "--seed", str(seed + STOCK_PARTNER), "--threads", str(torch_threads), *extra]
            jobs.append((f"ft-partner-s{seed}", train_job("baselines", argv, partner), ()))
            jobs.append((f"stock-ft-s{seed}", lambda s=seed, p=partner: merge.main(
                ["stock", "--ckpt", str(runs / f"ft-s{s}"), str(p), "--out", str(runs / f"stock-ft-s{s}")]),
                (f"ft-s{seed}", f"ft-partner-s{seed}")))
    if "ft" in chosen and len(seeds) > 1:
        jobs.append(("soup-ft", lambda: merge.main(["soup", "--kind", "greedy", "--out", str(runs / "soup-greedy-ft"),
                                                    "--ckpt", *[str(runs / f"ft-s{s}") for s in seeds]]),
                     tuple(f"ft-s{s}" for s in seeds)))
    trained = tuple(f"{name}-s{seed}" for seed in seeds for name, _, _ in METHODS if name in chosen and name != "zeroshot")
    jobs.append(("diagnostics", lambda: importlib.import_module("diagnostics").main(
        ["--runs", str(runs), "--out", str(runs / "diagnostics.md")]), trained))
    workers = []
    if not a.worker:  # the coordinator: forget claims and failures of earlier (killed) runs, start helpers
        for folder in (".claim", ".failed"):
            for f in (runs / folder).glob("*"):
                f.unlink()
        me = [sys.executable, str(Path(__file__).resolve()), *cli, "--worker"]
        workers = [subprocess.Popen(me) for _ in range(a.workers - 1)]
    import torch

    torch.set_num_threads(torch_threads)
    outcomes = [run_job(name, runs, fn, log, needs) for name, fn, needs in tqdm(jobs, desc="reproduce", unit="job")]
    if a.worker:
        return
    for w in workers:
        w.wait()
    failed = [name for (name, _, _), ok in zip(jobs, outcomes) if ok is not True and not (runs / ".done" / name).exists()]
    wall_file = runs / ".wall_seconds"  # wall time of every invocation, summed across reruns
    wall = time.time() - wall_start + (float(wall_file.read_text()) if wall_file.exists() else 0.0)
    wall_file.write_text(f"{wall:.1f}\n")
    job_time = sum(float(f.read_text()) for f in (runs / ".done").glob("*"))  # every job's own time, across reruns
    command = " ".join(["python reproduce/reproduce.py", shlex.join(cli)]).strip()
    write_results(runs, Path(a.out), Path(a.figures), seeds, wall, job_time, a.workers, command)
    if failed:
        raise SystemExit(f"{len(failed)} jobs failed (see {runs / 'reproduce.log'}): {', '.join(failed)}")


if __name__ == "__main__":
    main()
