"""Sweep one coefficient of one method on miniworld, choose it on the held-out slice, report every attempt.

  python reproduce/sweep.py lipsum_ft --flag lam --values 0.25,0.5,1,2
  python reproduce/sweep.py car_ft --flag beta --values 1,4,16
  python reproduce/sweep.py baselines --extra "--method kd" --flag kd-lambda --values 0.25,1,4

Each (value, seed) trains with the method file's miniworld preset and `--FLAG value` into
RUNS/<method>-<flag><value>-s<seed> (a rerun skips finished runs, like reproduce/reproduce.py). The FT
reference is reproduce/reproduce.py's (`--ref`, default runs/reproduce): its FT runs and their WiSE-FT curves.
At K training images per class (`--extra "--shots K"`; METHODS.md, Regimes) the runs go to
RUNS/<method>-k<K>-<flag><value>-s<seed> and the FT reference must be at the same K: reproduce/regime.py's
RUNS/k<K> (`--ref runs/regime/k10`); a --ref at another K is refused. The held-out slice does not shrink with K.

Choice rule (held-out data only, never a test split): the largest value, i.e. the strongest
regularisation, whose mean held-out accuracy is at most MAX_HELDOUT_DROP points below FT's mean
held-out accuracy on the same seeds. Every attempt's test numbers are reported beside it, so a
reader sees what the rule gave up. Writes the table to --out (default docs/sweep_<method>_<flag>.md).
"""
import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "reproduce"))
import reproduce  # noqa: E402

MAX_HELDOUT_DROP = 1.0  # points of held-out accuracy the chosen value may give up against FT (the papers claim none;
# 2.5 until the RENDER_VERSION 3 world, see docs/world_v2_sweep_*.md)


def heldout_acc(run_dir: Path) -> float:
    """Held-out accuracy (%) of a run's final weights."""
    return 100 * float(reproduce.correct(run_dir, "heldout").mean())


def shots_of(extra: list) -> int:
    """The --shots K a run with these arguments trains at: its own, else its --data's recipe (0 = the full set)."""
    import common

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--data", default=common.TrainArgs.data)
    p.add_argument("--shots", type=int)
    known = p.parse_known_args(extra)[0]
    common.check_data(known.data)  # an unknown --data stops here with the loader's message
    return known.shots if known.shots is not None else common.defaults(common.TrainArgs, known.data, {})["shots"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("module", help="method file without .py: lipsum_ft, car_ft, arf, baselines")
    p.add_argument("--flag", required=True, help="the flag swept, without dashes (lam, beta, kd-lambda, ...)")
    p.add_argument("--values", required=True, help="comma-separated values, weakest regularisation first")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--extra", default="", help="more arguments for every run (quoted), e.g. '--method kd'")
    p.add_argument("--runs", default="runs/sweep")
    p.add_argument("--ref", default="runs/reproduce", help="reproduce/reproduce.py's runs: FT and its WiSE-FT curves")
    p.add_argument("--out", default="", help="markdown report (default docs/sweep_<module>_<flag>.md)")
    cli = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(cli)
    import evaluate

    seeds, values = [int(s) for s in a.seeds.split(",")], a.values.split(",")
    runs, ref = Path(a.runs), Path(a.ref)
    runs.mkdir(parents=True, exist_ok=True)
    ft_runs = [ref / f"ft-s{s}" for s in seeds]
    missing = [str(r) for r in ft_runs if not (r / "final.pt").is_file()]
    if missing:
        raise SystemExit(f"error: no FT reference run {', '.join(missing)}: run `python reproduce/reproduce.py --methods ft` first")
    extra = a.extra.split()
    name = extra[extra.index("--method") + 1] if "--method" in extra else a.module  # baselines --method kd -> kd
    shots = shots_of(extra)
    ref_shots = {str(r): json.loads((r / "args.json").read_text()).get("shots", 0) for r in ft_runs if (r / "args.json").is_file()}
    if any(k != shots for k in ref_shots.values()):
        raise SystemExit(f"error: the sweep trains with --shots {shots} but its FT reference --ref {ref} does not ("
                         + ", ".join(f"{r}: --shots {k}" for r, k in ref_shots.items() if k != shots) + "); pass FT runs of the same K "
                         f"as --ref (reproduce/regime.py's RUNS/{f'k{shots}' if shots else 'full'})")
    label = f"{name}-k{shots}" if shots else name  # a sweep at K has its own runs and report
    failed = []
    with open(runs / "sweep.log", "a") as log:
        for v in values:
            for s in seeds:
                job = f"{label}-{a.flag}{v}-s{s}"
                argv = [*extra, f"--{a.flag}", v, "--seed", str(s)]
                if not reproduce.run_job(job, runs, reproduce.train_job(a.module, argv, runs / job), log):
                    failed.append(job)
    if failed:
        raise SystemExit(f"{len(failed)} runs failed (see {runs / 'sweep.log'}): {', '.join(failed)}")

    ft_heldout = float(np.mean([heldout_acc(r) for r in ft_runs]))
    ref_rows = [r for r in evaluate.read_results(ref / "results.jsonl") if r["method"] == "ft" and r["seed"] in seeds]
    lines = [f"# Sweep of `--{a.flag}` for {name}" + (f" at K = {shots} training images per class" if shots else ""), "",
             f"Written by `python reproduce/sweep.py {shlex.join(cli)}` (seeds {a.seeds}). FT reference: {ref} (held-out "
             f"{ft_heldout:.1f}%). Δ columns are against FT of the same seed, mean ± std; margin = OOD-mean margin over "
             "that seed's FT WiSE-FT curve at equal ID (reproduce/reproduce.py). SE: standard error of the Δ over the "
             "split's images (paired per image, seed-mean), the sampling noise of a finite split.", "",
             f"Choice rule, held-out slice only: the largest value whose mean held-out accuracy is at most {MAX_HELDOUT_DROP} "
             "points below FT's.", "",
             "| value | held-out acc | Δheld-out vs FT | ΔID vs FT | ΔOOD vs FT | ΔZS vs FT | margin over FT's WiSE curve (seeds) | chosen |",
             "|---|---|---|---|---|---|---|---|"]
    dirs = {v: [runs / f"{label}-{a.flag}{v}-s{s}" for s in seeds] for v in values}
    tests = reproduce.test_splits(ft_runs[0])
    splits = {"heldout": ["heldout"], **{k: [n for n, t in tests.items() if t.kind == k] for k in ("id", "ood", "zeroshot")}}
    held = {v: [heldout_acc(d) for d in dirs[v]] for v in values}
    allowed = [v for v in values if np.mean(held[v]) >= ft_heldout - MAX_HELDOUT_DROP]
    chosen = allowed[-1] if allowed else None  # values run weakest first: the last allowed is the strongest
    for v in values:
        rows = ref_rows + [{**r, "method": name, "tag": ""} for d in dirs[v] for r in evaluate.read_results(d / "results.jsonl")]
        cols = reproduce.paired_with_ft(rows, [])[(name, "")]
        se = {k: reproduce.paired_se(dirs[v], ft_runs, names) for k, names in splits.items()}  # SE per kind of split
        lines.append(f"| {v} | {np.mean(held[v]):.1f} ± {np.std(held[v]):.1f} | {np.mean(held[v]) - ft_heldout:+.1f} "
                     f"(SE {se['heldout']:.1f}) | {reproduce.cell(cols['id'])} (SE {se['id']:.1f}) | "
                     f"{reproduce.cell(cols['ood'])} (SE {se['ood']:.1f}) | {reproduce.cell(cols['zs'])} (SE {se['zeroshot']:.1f}) | "
                     f"{reproduce.cell(cols['margin'])} ({sum(not np.isnan(m) for m in cols['margin'])}) | "
                     f"{'**yes**' if v == chosen else ''} |")
    lines.append("")
    out = Path(a.out or REPO / "docs" / f"sweep_{name}_{a.flag}{f'_k{shots}' if shots else ''}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {out}")
    return chosen


if __name__ == "__main__":
    main()
