"""Combining fine-tuned CLIPs after training: WiSE-FT, TPGM / TPGM-C, model soups, Model Stock, output ensembles.

WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): interpolate every weight,
head included, between the zero-shot model θ0 and the fine-tuned θ_ft. α = 0 is zero-shot, α = 1 is
FT; the curve in between usually bows above the straight line on OOD accuracy.

    θ_α = (1 − α) · θ0 + α · θ_ft

TPGM (Tian et al. 2023, "Trainable Projected Gradient Method for robust fine-tuning"): a per-tensor
radius γ_l keeps layer l within an L2 ball around θ0; the radii are learned on held-out data (never
test) with Adam (lr 1e-2, 200 steps) while θ0 and θ_ft stay fixed.

    θ_p,l = θ0,l + min(1, γ_l / ‖θ_ft,l − θ0,l‖) · (θ_ft,l − θ0,l)
    min_γ  CE(held-out; θ_p(γ))                                   (TPGM)
    min_γ  CE(held-out; θ_p(γ)) + μ · mean_l γ_l / ‖θ_ft,l − θ0,l‖  (TPGM-C, our choice of penalty)

Model soups (Wortsman et al. 2022, "Model soups"): average the weights of runs fine-tuned from one
shared initialisation. Uniform soup = plain average; greedy soup = sort runs by held-out accuracy
and add a run only if the soup's held-out accuracy strictly improves. Output ensembles average the
logits instead (greedy variant selected the same way), at N times the inference cost.

Model Stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models"): per tensor,
pull the average of N runs from one initialisation towards θ0 by the angle θ between their updates.

    w_H = t · w̄ + (1 − t) · w_0,   t = N cos θ / (1 + (N − 1) cos θ),   w̄ = mean_i w_i

Choices where the papers are silent (METHODS.md, "Weight-space methods and ensembles"):
  * θ0 is rebuilt exactly as `common.setup` built it for the run (same seed, same zero-shot head), so
    α = 0 reproduces a zero-shot run bit for bit; α = 0 / 1 and saturated radii select the endpoint
    tensors themselves instead of computing them, so the endpoints are exact.
  * Non-float tensors (BatchNorm counters) take the value of the nearer endpoint.
  * Runs that classify with their text tower's head (FLYP, ARF) are evaluated on every split with the
    head rebuilt from the merged text tower, not the merged head tensor (load_run_weights). TPGM
    fits their radii through that head too, rebuilt differentiably from the projected text tower at
    every step (all the task's templates up to TPGM_TEMPLATES, else that many drawn per step), so the
    text tower's radii are fitted and the fitted model is the evaluated one.
  * TPGM uses the L2 norm per tensor, radii start at ‖Δ‖/2 (the official code's init), are kept in
    [0, ‖Δ‖] by projection after each Adam step, and see held-out images through the eval transform.
  * TPGM-C's penalty is the mean projection ratio γ_l/‖Δ_l‖ over tensors, so μ does not depend on the
    number of tensors or their sizes: μ is the held-out CE one would pay to move every tensor to θ0.
  * Model Stock (the paper uses N = 2): for N > 2, cos θ is the mean cosine over all pairs of deltas
    w_i − w_0 (a zero delta counts as orthogonal); cos θ ≤ 0 gives t = 0 (θ0), where the formula would
    leave [0, 1]; a tensor no run moved stays θ0. The per-tensor t go to ratios.json.
  * Soups and Model Stock need one shared initialisation and architecture and are refused otherwise; output
    ensembles only need the same task (logits of any architectures can be averaged).

Run (any run directory written by a method file; RESULTS.md has measured numbers):
  python merge.py wise --ckpt runs/ft-miniworld-k10-miniclip-s0 --alphas 0:1:0.1   (and tpgm, tpgm-c --reg 1.0)
  python merge.py soup --kind greedy --ckpt RUN1 RUN2 ...       (ensemble --kind output: the same for logits)
  python merge.py stock --ckpt RUN1 RUN2                         (Model Stock of two runs from one init)
  torchrun --nproc_per_node 8 merge.py wise --ckpt RUN          (any subcommand: every split shared out over 8 processes)
"""
import argparse
import contextlib
import copy
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from common import (AUTO_WORKERS, TASK_FIELDS, TransformedImages, as_template_fns, atomic_save, autocast, classification_metrics,
                    collate_skipping_bad, data_workers, evaluate_split, evaluate_task, get_device, init_distributed,
                    is_main_process, load_clip, load_run, log_results, plot_id_vs_ood, print_rows, rebuild_head_from_text,
                    run_log_args, run_theta0, seed_everything, split_logits)

WISE_ALPHAS = "0:1:0.1"  # the paper's sweep; α = 0.5 is its default operating point
TPGM_LR = 1e-2  # Adam on the radii (Tian et al.)
TPGM_STEPS = 200
TPGM_BATCH = 128  # held-out images per radius step
TPGM_INIT = 0.5  # radii start at this fraction of ‖θ_ft − θ0‖ (official TPGM code)
TPGM_C_REG = 1.0  # μ: weight of TPGM-C's mean-ratio penalty (the Lipsum-FT paper sweeps 0.1–5)
TPGM_TEMPLATES = 16  # a text-head run's radii see the head of all its templates up to this many, else this many per step


# ----------------------------------------------------------------------------------------------
# Pure functions over state dicts, and over the (ID, OOD) points of a curve
# ----------------------------------------------------------------------------------------------
def check_compatible(states: list, names: list):
    """Same keys, shapes and dtypes, or a message naming the first difference."""
    ref = states[0]
    for state, name in zip(states[1:], names[1:]):
        if state.keys() != ref.keys():
            diff = sorted(set(state) ^ set(ref))[:3]
            raise SystemExit(f"error: {name} and {names[0]} are different architectures (parameters {diff} differ)")
        for k, v in ref.items():
            if state[k].shape != v.shape or state[k].dtype != v.dtype:
                raise SystemExit(f"error: {name} and {names[0]} are different architectures: {k} is "
                                 f"{tuple(state[k].shape)} {state[k].dtype} vs {tuple(v.shape)} {v.dtype}")


def wise(state0: dict, state1: dict, alpha: float) -> dict:
    """θ_α = (1 − α)·θ0 + α·θ1 on every float tensor; α = 0 and 1 return the endpoints' own values."""
    check_compatible([state0, state1], ["θ0", "θ_ft"])
    out = {}
    for k, a in state0.items():
        b = state1[k]
        if alpha == 0 or (not a.is_floating_point() and alpha < 0.5):
            out[k] = a.clone()
        elif alpha == 1 or not a.is_floating_point():
            out[k] = b.clone()
        else:
            out[k] = torch.lerp(a, b, alpha)  # a + α(b − a), computed from the nearer end
    return out


def tpgm_distances(state0: dict, state1: dict) -> dict:
    """‖θ_ft,l − θ0,l‖ for every float tensor that fine-tuning moved (the tensors TPGM projects)."""
    return {k: (state1[k].float() - a.float()).norm().item() for k, a in state0.items()
            if a.is_floating_point() and not torch.equal(a, state1[k])}


def tpgm_project(state0: dict, state1: dict, radii: dict) -> dict:
    """θ_p,l = θ0,l + min(1, γ_l/‖Δ_l‖)·Δ_l for the tensors in `radii`; the others are θ_ft's. A ratio
    ≥ 1 returns θ_ft's tensor and a radius ≤ 0 returns θ0's, exactly."""
    check_compatible([state0, state1], ["θ0", "θ_ft"])
    out = {k: v.clone() for k, v in state1.items()}
    for k, gamma in radii.items():
        a, b = state0[k], state1[k]
        dist = (b.float() - a.float()).norm().item()
        if gamma <= 0:
            out[k] = a.clone()
        elif gamma < dist:
            out[k] = torch.lerp(a, b, gamma / dist)
    return out


def uniform_soup(states: list) -> dict:
    """Average of the states as a running mean, so N copies of one model give that model exactly."""
    check_compatible(states, [f"ingredient {i}" for i in range(len(states))])
    out = {k: v.clone() for k, v in states[0].items()}
    for n, state in enumerate(states[1:], start=2):
        for k, v in out.items():
            if v.is_floating_point():
                v.add_(state[k] - v, alpha=1.0 / n)  # mean_n = mean_{n-1} + (x_n − mean_{n-1}) / n
    return out


def model_stock(state0: dict, states: list) -> tuple:
    """Model Stock (Jang et al. 2024), tensor by tensor: cos θ = mean pairwise cosine of the runs' deltas
    w_i − w_0 (a pair with a zero delta counts 0), clamped at 0; t = N cos θ / (1 + (N − 1) cos θ) in [0, 1];
    w_H = t·w̄ + (1 − t)·w_0, with t = 0 / 1 copying w_0 / w̄. Non-float tensors are the soup's (run 0's).
    Returns (state, {tensor: t} for the float tensors some run moved)."""
    if len(states) < 2:
        raise SystemExit(f"error: Model Stock needs at least two fine-tuned runs; got {len(states)}")
    check_compatible([state0, *states], ["θ0", *(f"run {i}" for i in range(len(states)))])
    n, out, ratios = len(states), uniform_soup(states), {}  # w̄ = mean_i w_i
    for k, w0 in state0.items():  # a tensor no run moved is their average already, θ0 exactly
        if w0.is_floating_point() and any(not torch.equal(s[k], w0) for s in states):
            delta = torch.stack([(s[k].double() - w0.double()).flatten() for s in states])  # [N, P]
            unit = delta / delta.norm(dim=1, keepdim=True).clamp_min(1e-30)  # [N, P]; a zero delta stays 0
            cos = ((unit @ unit.T).sum() - (unit * unit).sum()) / (n * (n - 1))  # mean over pairs i ≠ j
            cos = cos.clamp(0, 1).item()  # cos θ ≤ 0 -> t = 0 (θ0)
            t = ratios[k] = n * cos / (1 + (n - 1) * cos)  # the paper's t
            out[k] = w0.clone() if t == 0 else out[k] if t == 1 else torch.lerp(w0, out[k], t)  # t·w̄ + (1 − t)·w_0
    return out, ratios


def ensemble_logits(logits: list) -> torch.Tensor:
    """Output ensemble: the mean of the members' logits [N, K]."""
    return torch.stack(logits).mean(0)  # [M, N, K] -> [N, K]


def greedy_select(scores: list, score_of) -> tuple:
    """Greedy soup / ensemble selection (Wortsman et al. 2022a). `scores[i]` is member i's own held-out
    accuracy, `score_of(indices)` the held-out accuracy of combining those members. Members are tried
    best first; one joins only if the combination strictly improves. Returns (chosen, its score, trace)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: ties keep the given order
    chosen, best, trace = [order[0]], scores[order[0]], []
    for i in order[1:]:
        score = score_of(chosen + [i])
        trace.append((i, score, score > best))
        if score > best:
            chosen, best = chosen + [i], score
    return chosen, best, trace


def parse_alphas(spec: str) -> list:
    """"0:1:0.1" (start:stop:step, stop included) or "0,0.5,1"."""
    if ":" in spec:
        start, stop, step = (float(s) for s in spec.split(":"))
        values = np.arange(start, stop + step / 2, step)
    else:
        values = [float(s) for s in spec.split(",")]
    return [round(float(a), 6) for a in values]


def summary(rows: list) -> tuple:
    """(ID acc, OOD mean, zero-shot-transfer mean) in % from evaluation rows."""
    mean = lambda kind: 100 * float(np.mean([r["acc"] for r in rows if r["kind"] == kind] or [np.nan]))  # noqa: E731
    return mean("id"), mean("ood"), mean("zeroshot")


def effective_robustness_margin(points_curve: list, point: tuple) -> float:
    """OOD margin of `point` = (ID, OOD) over the piecewise-linear WiSE-FT curve through `points_curve`
    [(ID, OOD), ...] in α order, at equal ID (METHODS.md, Evaluation). Where the curve crosses that ID
    more than once (ID is not monotone in α), the highest curve OOD is the bar. NaN when the ID lies
    outside the curve's ID range: the curve is not extrapolated."""
    x, y = point
    bars = [y0 for x0, y0 in points_curve if x0 == x]
    for (x0, y0), (x1, y1) in zip(points_curve, points_curve[1:]):
        if x0 != x1 and min(x0, x1) <= x <= max(x0, x1):
            bars.append(y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    return y - max(bars) if bars else math.nan


# ----------------------------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------------------------
def cmd_wise(a, device):
    alphas, tasks, curves, first = parse_alphas(a.alphas), {}, {}, None
    for path in a.ckpt:
        run = load_run(path, device, a.data_root, tasks)
        first = run if first is None else first
        check_together([first, run], "their WiSE-FT curves would share one table. Run merge.py wise on each.")
        state0, state1 = run_endpoints(run, device)
        print(f"WiSE-FT on {run.dir} ({run.method}): α in {alphas}, every image loaded once and scored by each")
        models = []  # θ_α for every α side by side (len(alphas) copies of the model in memory), sharing the tokenizer
        for alpha in alphas:
            load_run_weights(run, wise(state0, state1, alpha))
            models.append(copy.deepcopy(run.model, {id(run.model.tokenizer): run.model.tokenizer}))
        for alpha, rows in zip(alphas, evaluate_task(models, run.task, run.eval_tf, device, a.eval_batch_size, a.workers)):
            print_rows(rows)
            log_results(run.dir, run.method, run_log_args(run), rows, run.args.get("steps", 0), tag=f"wise a={alpha:g}",
                        merge={"merge": "wise", "alpha": alpha})
            curves.setdefault(run.method, {}).setdefault(alpha, []).append(summary(rows))
            print(f"α={alpha:<4g} ID {summary(rows)[0]:6.2f}  OOD mean {summary(rows)[1]:6.2f}  ZS mean {summary(rows)[2]:6.2f}")
    if is_main_process():
        report_wise(curves, a.plot or str((first.dir if len(a.ckpt) == 1 else first.dir.parent) / "wise_curve.png"))


def report_wise(curves: dict, out: str):
    """Markdown table (mean ± std over runs), the headline deltas, effective robustness, and the plot."""
    means = {m: {al: np.mean(v, axis=0) for al, v in sorted(c.items())} for m, c in curves.items()}
    print("\n| method | α | runs | ID | OOD mean | ZS mean |\n|---|---|---|---|---|---|")
    for m, c in means.items():
        for al, v in c.items():
            sd = np.std(curves[m][al], axis=0, ddof=1) if len(curves[m][al]) > 1 else np.zeros(3)
            print(f"| {m} | {al:g} | {len(curves[m][al])} | " + " | ".join(f"{x:.1f} ± {e:.1f}" for x, e in zip(v, sd)) + " |")
    ref = "ft" if "ft" in means else next(iter(means))
    ref_curve = [(v[0], v[1]) for v in means[ref].values()]
    for m, c in means.items():
        if 0 in c and 0.5 in c and 1 in c:
            print(f"{m}: WiSE α=0.5 vs α=1: OOD {c[0.5][1] - c[1][1]:+.2f}; vs α=0 (zero-shot): ID {c[0.5][0] - c[0][0]:+.2f}")
        for al in [al for al in (0.5, 1) if al in c and m != ref]:
            margin = effective_robustness_margin(ref_curve, (c[al][0], c[al][1]))
            print(f"{m} α={al:g}: OOD margin over the WiSE curve of {ref} at equal ID: {margin:+.2f}")
    points = [(f"{m} (α=1)", *c[1][:2], 0, 0) for m, c in means.items() if 1 in c]
    first = next(iter(means.values()))
    if 0 in first:
        points.append(("zero-shot (α=0)", *first[0][:2], 0, 0))
    plot_id_vs_ood(points, {f"WiSE-FT on {m}": [(al, v[0], v[1]) for al, v in c.items()] for m, c in means.items()}, out)


def learn_radii(model, state0: dict, state1: dict, batches, steps: int, lr: float, reg: float, device,
                text_head=None) -> dict:
    """TPGM's inner problem: Adam on the per-tensor radii γ [L] with θ0 and θ_ft fixed, minimising the
    held-out CE (+ TPGM-C's penalty) of the projected model. `batches` yields held-out batches; with
    `text_head(params, step)` the head is rebuilt from the projected text tower (the head tensor itself
    is not projected)."""
    device = torch.device(device)
    dist = tpgm_distances(state0, state1)
    names = [k for k in dist if text_head is None or k != "head"]
    norms = torch.tensor([dist[k] for k in names], device=device)  # [L]
    theta0 = {k: state0[k].to(device) for k in names}
    delta = {k: (state1[k] - state0[k]).to(device) for k in names}
    gamma = torch.nn.Parameter(TPGM_INIT * norms)  # [L] radii, in the units of ‖Δ‖
    opt = torch.optim.Adam([gamma], lr=lr)
    model = model.requires_grad_(False).eval()
    for step in range(steps):
        batch = next(batches)
        ratio = gamma / norms  # [L], within [0, 1] thanks to the projection below
        params = {k: theta0[k] + ratio[i] * delta[k] for i, k in enumerate(names)}  # θ0 + (γ/‖Δ‖)Δ
        with autocast(device):
            if text_head is not None:
                params["head"] = text_head(params, step)  # [K, D], from the projected text tower
            logits = torch.func.functional_call(model, params, (batch["image"].to(device),))  # [B, K]
        ce = F.cross_entropy(logits.float(), batch["label"].to(device))
        loss = ce + reg * ratio.mean()  # TPGM-C's penalty μ · mean_l γ_l/‖Δ_l‖ (μ = 0: TPGM)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():  # the projected step on the radii: 0 ≤ γ ≤ ‖Δ‖ (beyond it γ has no effect)
            gamma.copy_(torch.minimum(gamma.clamp(min=0), norms))
        if (step + 1) % 50 == 0 or step == 0:
            print(f"  step {step + 1:4d}  held-out ce {ce.item():.4f}  mean γ/‖Δ‖ {ratio.mean().item():.3f}")
    return dict(zip(names, gamma.detach().tolist()))


def cmd_tpgm(a, device):
    reg = a.reg if a.command == "tpgm-c" else 0.0
    tag = f"tpgm-c reg={reg:g}" if reg else "tpgm"
    run = load_run(a.ckpt[0], device, a.data_root)
    state0, state1 = run_endpoints(run, device)
    heldout = run.task.heldout  # never a test split: TPGM's radii are fitted, so they must not see test
    batches = shuffled_batches(heldout.images, run.eval_tf, a.batch_size, run.seed, a.workers)
    print(f"{tag} on {run.dir}: {a.steps} Adam steps (lr {a.lr}) on '{heldout.name}' ({len(heldout.images)} images)")
    model = run.model
    text_head = differentiable_text_head(model, run.task, run.seed) if run.meta.get("head_from_text") else None
    radii = [learn_radii(model, state0, state1, batches, a.steps, a.lr, reg, device, text_head)]
    if torch.distributed.is_initialized():  # fitted alike by every process; rank 0's are evaluated and saved
        torch.distributed.broadcast_object_list(radii, 0)
    radii = radii[0]
    norms, names = tpgm_distances(state0, state1), list(radii)
    ratios = np.array([radii[k] / norms[k] for k in names])  # per tensor in OUT/radii.json
    print(f"learned radii ({tag}): γ/‖Δ‖ mean {ratios.mean():.3f}, min {ratios.min():.3f}, max {ratios.max():.3f}")
    heldout_ft = evaluate_split(model, run.task.heldout, run.task, run.eval_tf, device, a.eval_batch_size)["acc"]
    state = load_run_weights(run, tpgm_project(state0, state1, radii))
    heldout_p = evaluate_split(model, run.task.heldout, run.task, run.eval_tf, device, a.eval_batch_size)["acc"]
    print(f"held-out acc: θ_ft {100 * heldout_ft:.2f} -> projected {100 * heldout_p:.2f}")
    out = Path(a.out or run.dir / tag.replace(" ", "-").replace("=", ""))
    save_run(out, state, run, f"{run.method}+{tag.split()[0]}", {"merge": tag, "source": str(run.dir)},
             {"radii.json": {k: {"dist": norms[k], "radius": radii[k], "ratio": radii[k] / norms[k]} for k in names}})
    rows = evaluate_task(model, run.task, run.eval_tf, device, a.eval_batch_size, a.workers)
    log_results(run.dir, run.method, run_log_args(run), rows, run.args.get("steps", 0), tag=tag,
                merge={"merge": a.command, "tpgm_reg": reg, "tpgm_steps": a.steps, "tpgm_lr": a.lr, "tpgm_batch": a.batch_size})
    print(f"{tag}: ID {summary(rows)[0]:.2f}  OOD mean {summary(rows)[1]:.2f}  ZS mean {summary(rows)[2]:.2f}; "
          f"radii and final.pt in {out}")
    return rows, radii


def report_greedy(what: str, runs, scores: list, score_of) -> list:
    """greedy_select with each try and the outcome printed; returns the chosen members' indices."""
    chosen, best, trace = greedy_select(scores, score_of)
    for i, score, added in trace:
        print(f"  try {runs[i].dir}: {what} held-out {100 * score:.2f} -> {'added' if added else 'skipped'}")
    print(f"greedy {what}: {len(chosen)} of {len(runs)} runs, held-out {100 * best:.2f} (best single {100 * max(scores):.2f})")
    return chosen


def combined_run(a, runs, chosen: list, what: str) -> tuple:
    """(folder, method name, member run folders) of a soup, Model Stock or ensemble of `runs[chosen]`."""
    out = Path(a.out) if a.out else runs[0].dir.parent / f"{what}-{runs[0].args['data']}-{Path(runs[0].meta['model']).stem}"
    return out, "+".join(sorted({r.method for r in runs})), [str(runs[i].dir) for i in chosen]


def log_combined(out: Path, method: str, runs, members: list, rows: list, tag: str):
    """A combination's rows, filed under its first run's seed (--ckpt order, as its args.json), with the member
    list on every row: Model Stock of (ft seed s, ft seed s') is paired with FT of seed s."""
    log_results(out, method, run_log_args(runs[0]), [{**r, "members": members} for r in rows],
                runs[0].args.get("steps", 0), tag=tag, merge={"merge": tag, "candidates": len(runs)})


def cmd_soup(a, device):  # soup and stock
    tasks = {}
    runs = [load_run(p, device, a.data_root, tasks) for p in a.ckpt]
    check_same_init(runs)
    task, tf, model = runs[0].task, runs[0].eval_tf, runs[0].model
    states = [{k: v.clone() for k, v in r.model.state_dict().items()} for r in runs]
    for r in runs[1:]:
        r.model = None  # the states are all we need; free the modules

    def heldout_acc(state):
        load_run_weights(runs[0], state)
        return evaluate_split(model, task.heldout, task, tf, device, a.eval_batch_size, a.workers)["acc"]

    if a.command == "stock" or a.kind == "uniform":
        chosen = list(range(len(runs)))
    else:
        scores = [heldout_acc(s) for s in states]
        for r, s in zip(runs, scores):
            print(f"  held-out {100 * s:6.2f}  {r.dir}")
        chosen = report_greedy("soup", runs, scores, lambda idx: heldout_acc(uniform_soup([states[i] for i in idx])))
    if a.command == "stock":  # θ0 of run 0: check_same_init made it every run's
        merged, ratios = model_stock(run_theta0(runs[0], device).state_dict(), states)
        tag, files, t = "stock", {"ratios.json": ratios}, list(ratios.values()) or [np.nan]
        print(f"Model Stock: t over the {len(t)} moved tensors: mean {np.mean(t):.3f}, min {min(t):.3f}, max {max(t):.3f}")
    else:
        merged, tag, files = uniform_soup([states[i] for i in chosen]), f"soup {a.kind}", None
    state = load_run_weights(runs[0], merged)
    out, method, members = combined_run(a, runs, chosen, tag.replace(" ", "-"))
    save_run(out, state, runs[0], f"{method}+{tag.replace(' ', '-')}", {"merge": tag, "members": members}, files)
    rows = evaluate_task(model, task, tf, device, a.eval_batch_size, a.workers)
    log_combined(out, method, runs, members, rows, tag)
    return rows, members


def cmd_ensemble(a, device):
    tasks = {}
    runs = [load_run(p, device, a.data_root, tasks) for p in a.ckpt]
    check_together(runs, "an ensemble's members must be scored on one task", same_model=False)
    task = runs[0].task
    chosen = list(range(len(runs)))
    if a.kind == "greedy":
        held = [split_logits(r.model, task.heldout, task, r.eval_tf, device, a.eval_batch_size, a.workers) for r in runs]
        labels = held[0][1]
        acc = lambda idx: classification_metrics(ensemble_logits([held[i][0] for i in idx]), labels)["acc"]  # noqa: E731
        scores = [acc([i]) for i in range(len(runs))]
        chosen = report_greedy("ensemble", runs, scores, acc)
    rows = []
    for split in task.tests:
        outs = [split_logits(runs[i].model, split, task, runs[i].eval_tf, device, a.eval_batch_size, a.workers) for i in chosen]
        metrics = classification_metrics(ensemble_logits([o[0] for o in outs]), outs[0][1])
        rows.append({"split": split.name, "kind": split.kind, **metrics, "skipped": outs[0][2]})
        print(f"  {split.name:<16} {split.kind:<9} acc {100 * metrics['acc']:6.2f}  ece {metrics['ece']:.4f}  nll {metrics['nll']:.4f}")
    out, method, members = combined_run(a, runs, chosen, f"ensemble-{a.kind}")
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        (out / "members.json").write_text(json.dumps(members, indent=1))
    log_combined(out, method, runs, members, rows, f"ensemble {a.kind}")
    return rows, members


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    only = {  # flags of one subcommand (or a few): name -> (commands, argparse keywords)
        "--alphas": (("wise",), dict(default=WISE_ALPHAS, help="start:stop:step (stop included) or a,b,c")),
        "--plot": (("wise",), dict(default="", help="PNG of the ID-vs-OOD curve (default: RUN/wise_curve.png)")),
        "--out": (("tpgm", "tpgm-c", "soup", "stock", "ensemble"), dict(default="", help="directory for the merged model / member list")),
        "--steps": (("tpgm", "tpgm-c"), dict(type=int, default=TPGM_STEPS, help="Adam steps on the radii")),
        "--lr": (("tpgm", "tpgm-c"), dict(type=float, default=TPGM_LR, help="Adam learning rate on the radii")),
        "--batch-size": (("tpgm", "tpgm-c"), dict(type=int, default=TPGM_BATCH, help="held-out images per step")),
        "--reg": (("tpgm-c",), dict(type=float, default=TPGM_C_REG, help="μ, weight of the mean γ/‖Δ‖ penalty")),
    }
    kinds = {"soup": ("greedy", "uniform"), "ensemble": ("greedy", "output")}
    for name, help_ in (("wise", "WiSE-FT α sweep"), ("tpgm", "TPGM projection"), ("tpgm-c", "TPGM with a radius penalty"),
                        ("soup", "uniform / greedy model soup"), ("stock", "Model Stock"), ("ensemble", "output / greedy ensemble")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--ckpt", nargs="+", required=True, help="run directories (or their final.pt)")
        p.add_argument("--data-root", default="", help="dataset folder if it moved since training (default: the run's)")
        p.add_argument("--device", default="", help="cuda | cpu (default: cuda when available)")
        p.add_argument("--eval-batch-size", type=int, default=512, help="batch size for evaluation")
        p.add_argument("--workers", type=int, default=AUTO_WORKERS, help="DataLoader worker processes (-1: from the free cores)")
        for flag, (commands, kw) in only.items():
            if name in commands:
                p.add_argument(flag, **kw)
        if name in kinds:
            p.add_argument("--kind", choices=kinds[name], default="greedy", help="greedy: add members by held-out accuracy")
    a = parser.parse_args(argv)
    if a.command.startswith("tpgm") and len(a.ckpt) != 1:
        raise SystemExit(f"error: {a.command} projects one fine-tuned run; got {len(a.ckpt)}")
    commands = {"wise": cmd_wise, "tpgm": cmd_tpgm, "tpgm-c": cmd_tpgm, "soup": cmd_soup, "stock": cmd_soup, "ensemble": cmd_ensemble}
    device = get_device(a.device)
    init_distributed(device)  # under torchrun every process scores its share of each split; rank 0 prints and writes
    a.workers = data_workers(a.workers, device)
    with contextlib.nullcontext() if is_main_process() else contextlib.redirect_stdout(None):  # print() to None: nothing
        return commands[a.command](a, device)


# ----------------------------------------------------------------------------------------------
# Runs in and out: θ0 and θ_ft of a run, merged weights loaded and saved as a run of their own
# ----------------------------------------------------------------------------------------------
def differentiable_text_head(model, task, seed: int):
    """params, step -> the head of the text tower in `params` (clip.* tensors; the others are the model's):
    n(mean_t n(g(template_t(class_k)))) like common.zeroshot_head, with gradient; over all templates up to
    TPGM_TEMPLATES, else TPGM_TEMPLATES of them drawn per step from (seed, step)."""
    fns = as_template_fns(task.templates)
    device = model.head.device
    tokens = model.tokenizer([fn(c) for c in task.classnames for fn in fns]).to(device).view(len(task.classnames), len(fns), -1)

    def head(params: dict, step: int) -> torch.Tensor:
        used = tokens if len(fns) <= TPGM_TEMPLATES else tokens[:, torch.randperm(
            len(fns), generator=torch.Generator().manual_seed(seed * 1_000_003 + step))[:TPGM_TEMPLATES].to(device)]
        out = torch.func.functional_call(model.clip, {k[len("clip."):]: v for k, v in params.items() if k.startswith("clip.")},
                                         (None, used.flatten(0, 1)), strict=False)
        text = F.normalize((out["text_features"] if isinstance(out, dict) else out[1]).float(), dim=-1)  # [K·T, D]
        return F.normalize(text.view(used.shape[0], used.shape[1], -1).mean(1), dim=-1)  # [K, D]

    return head


def run_endpoints(run, device) -> tuple:
    """(θ0, θ_ft) state dicts of a loaded run, what weight-space methods combine; θ0 is rebuilt as
    `setup` built it. If the model name or weights file changed since the run was trained (say, a
    rebuilt assets/miniclip.pt), not even the frozen tensors (the text tower for FT) match: said."""
    state1 = {k: v.clone() for k, v in run.model.state_dict().items()}
    state0 = run_theta0(run, device).state_dict()
    if all(torch.equal(v, state1[k]) for k, v in state0.items()):
        raise SystemExit(f"error: {run.dir} ({run.method}) holds θ0 itself: nothing to combine with θ0 (WiSE-FT and TPGM "
                         "need a fine-tuned run)")
    if not any(torch.equal(v, state1[k]) for k, v in state0.items()):
        print(f"warning: every tensor of {run.dir} differs from the rebuilt θ0 ({run.meta['model']}, "
              f"pretrained={run.meta['pretrained']!r}). Fine if {run.method} trains all of CLIP; otherwise those "
              "weights changed since the run, and the merge would interpolate towards the wrong θ0.")
    return state0, state1


def load_run_weights(run, state: dict) -> dict:
    """Loads weights made from a run (a merge) into run.model; a run that classifies with its text tower's
    head (FLYP, ARF: meta["head_from_text"]) gets the head rebuilt from the merged text tower, not the
    merged head tensor. Returns the state as evaluated (and saved)."""
    run.model.load_state_dict(state)
    if run.meta.get("head_from_text"):
        rebuild_head_from_text(run.model, run.task)
    return {k: v.clone() for k, v in run.model.state_dict().items()}


def save_run(out: Path, state: dict, run, method: str, extra: dict, files: Optional[dict] = None):
    """final.pt + args.json (+ `files`: {name: JSON}) for weights made from a loaded `run` (a merge), so they
    are a run themselves that evaluate.py and merge.py accept. Written by the main process only."""
    if not is_main_process():
        return
    out.mkdir(parents=True, exist_ok=True)
    for name, value in (files or {}).items():
        (out / name).write_text(json.dumps(value, indent=1))
    atomic_save({"model": state, "meta": {**run.meta, "method": method}}, out / "final.pt")
    (out / "args.json").write_text(json.dumps({**run.args, "method": method, "out": str(out), **extra}, indent=2))


def check_together(runs: list, why: str, same_model: bool = True):
    """Runs combined into one model, curve or table are scored on one task: the same TASK_FIELDS and classes,
    and (same_model) the same model and weights file; else one message naming the fields that differ. The
    seed, --shots and the recipe may differ (soups are made of runs that differ in them)."""
    first = runs[0]
    for r in runs[1:]:
        differ = [k for k, default in TASK_FIELDS.items() if r.args.get(k, default) != first.args.get(k, default)]
        differ += [k for k in ("classnames", *(("model", "pretrained") if same_model else ())) if r.meta[k] != first.meta[k]]
        if differ:
            raise SystemExit(f"error: {r.dir} and {first.dir} differ in {', '.join(differ)}: {why}")


def check_same_init(runs: list):
    """Soups average weights, which only makes sense from one initialisation and architecture: the same
    model, weights file, classes and state-dict layout, and (for a randomly initialised model) the same
    initial weights whatever the seeds."""
    first = runs[0]
    check_together(runs, "weights of different architectures, initialisations or tasks cannot be averaged (soups "
                         "and Model Stock need one shared initialisation)")
    check_compatible([r.model.state_dict() for r in runs], [str(r.dir) for r in runs])
    seeds = sorted({r.seed for r in runs})
    if len(seeds) > 1:  # a random-init architecture differs per seed: compare the actual θ0 weights
        ref = None
        for s in seeds:
            seed_everything(s)
            clip = load_clip(first.meta["model"], first.meta["pretrained"], "cpu")[0].state_dict()
            ref = clip if ref is None else ref
            if any(not torch.equal(ref[k], clip[k]) for k in ref):
                raise SystemExit(f"error: runs with seeds {seeds[0]} and {s} start from different weights "
                                 f"({first.meta['model']} with pretrained={first.meta['pretrained']!r} is initialised "
                                 "randomly per seed): soups need one shared initialisation")
        print(f"note: members were trained with seeds {seeds}; a greedy soup selects on seed {first.seed}'s held-out "
              "slice, which for --data folder/imagenet/domainnet overlaps the other seeds' training images")


def shuffled_batches(images, transform, batch_size: int, seed: int, workers: int = 0):
    """Endless full batches of `images` (unreadable ones skipped), reshuffled every pass from `seed`."""
    loader = torch.utils.data.DataLoader(TransformedImages(images, transform), shuffle=True,
                                         batch_size=min(batch_size, len(images)), num_workers=workers,
                                         collate_fn=collate_skipping_bad, drop_last=True,
                                         generator=torch.Generator().manual_seed(seed))
    while True:
        yield from loader


if __name__ == "__main__":
    main()
