"""What the method files share: their arguments and the one FT recipe, the run (setup -> train -> finish),
CLIP with its classifier, zero-shot heads and contrastive loss, the data plumbing of training, evaluation,
runs on disk, and the machine (threads, torchrun). Each method's own loss lives in its own file; the
datasets live in the tasks package below this file. METHODS.md describes the methods and conventions.

Conventions (METHODS.md, "Conventions"): logits are s · n(f(x)) @ Wᵀ with W [K, D] the head (unit-norm rows
at the start, never scaled) and s = exp(logit_scale) the model's own temperature. A batch is a dict
{"image": [B,3,H,W], "label": [B], "index": [B] (into the training split)}, plus each extra stream's
batch under its name. The step contract: loss_fn(model, batch, step) -> (loss, terms), with `step` the
optimiser step, the same for every micro-batch, process and resumed run, so that anything per-step is a
pure function of (seed, step). A paper's hyperparameter is an Args field, an implementation detail an
UPPERCASE constant; FT_RECIPES[--data] is the only default of the recipe's fields, and a method's
PRESETS hold only what differs from it. A run folder holds args.json, log.jsonl, ckpt/step_*.pt,
final.pt and results.jsonl; every results row is also appended to <runs root>/results.jsonl.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import dataclasses
import datetime
import functools
import hashlib
import inspect
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from tasks import FileImages, Split, Task, check_data, check_task_options, load_task, scored_domains
from towers import check_batch_independent, grad_checkpointing, keyed_noise, text_modules, train_mode
from tracking import Trackers, plot_curves, reporters  # noqa: F401 -- plot_curves: evaluate.py curves

REPO = Path(__file__).resolve().parent
ECE_BINS = 15  # equal-width confidence bins of the expected calibration error
TOP_K = 5  # the k of the top-k accuracy in every results row ("top5"; clip_benchmark's acc5)
MAX_LOGIT_SCALE = math.log(100)  # a trained temperature is clamped here after every step (open_clip's rule)
FREE_CORES_SAMPLE_S = 0.1  # seconds of /proc/stat sampled at start to count the idle cores (set_threads, data_workers)
AUTO_WORKERS = -1  # --workers value that means: from the free cores (data_workers)
HEAD_PROMPTS = 2048  # prompts per text-tower forward building a zero-shot head; its chunks of classes go to processes
KEEP_CHECKPOINTS = 2  # newest step checkpoints kept while training: one may be mid-write when a job is killed
WAIT_POLL_S = 2  # seconds between looks for a file rank 0 is writing (wait_for_file)
WAIT_NOTE_S = 600  # a process waiting for such a file says so every this many seconds
# arguments a --resume may change (the others change the result: refused)
RESUME_MAY_CHANGE = ("resume", "threads", "workers", "eval_batch_size", "device", "out", "ckpt_every", "keep_checkpoints",
                     "grad_checkpointing", "report_to")
# arguments that are not part of a run's identity (run_config): the seed, how and where it ran, plumbing
NOT_CONFIG = ("seed", "method", "machine", "out", "resume", "threads", "workers", "device", "eval_batch_size", "ckpt_every",
              "keep_checkpoints", "grad_accum", "grad_checkpointing", "zeroshot_data", "cache", "prepare", "caption_batch_size",
              "report_energy_gap", "lp_run", "merge", "source", "members", "report_to")


# ----------------------------------------------------------------------------------------------
# Arguments: a dataclass per method file, the FT recipe per --data, parsed into argparse
# ----------------------------------------------------------------------------------------------
RECIPE = None  # the default of a field FT_RECIPES sets for every --data: it has no other


@dataclass
class TrainArgs:
    data: str = "miniworld"  # miniworld | imagenet | domainnet | folder | domainbed
    data_root: str = ""  # dataset folder (not needed for miniworld); layouts in docs/data.md
    test_domain: str = ""  # --data domainbed: the domain left out of training and scored (leave-one-domain-out)
    zeroshot_data: str = ""  # [NAME=]DIR[,...]: extra classification folders scored zero-shot, with heads from the current text tower (NAME: a standard dataset, e.g. eurosat, whose names and templates are used)
    shots: int = 0  # K training images per class, drawn by the seed (same for every method), the held-out slice apart (0 = all; miniworld's recipe: 10)
    source_domain: str = "real"  # --data domainnet: the domain fine-tuned on (its test split is ID, the other four OOD)
    unseen_classes: str = ""  # FILE (--data folder): class folder names, one per line, left out of training: generalized zero-shot with the zero-shot head held fixed, scored S / U / H
    model: str = "miniclip"  # open_clip architecture (ViT-B-16, ...) or the built-in miniclip
    pretrained: str = ""  # open_clip pretrained tag (openai, laion2b_s34b_b88k, ...) or a weights file
    steps: int = RECIPE  # optimiser steps
    batch_size: int = RECIPE  # global batch per optimiser step (split over processes and accumulation)
    grad_accum: int = 1  # micro-batches accumulated per step
    grad_checkpointing: bool = False  # recompute the trained towers' activations in backward: less memory, more time, same weights
    lr: float = RECIPE  # peak learning rate
    weight_decay: float = RECIPE  # AdamW decoupled weight decay
    warmup: float = 0.1  # fraction of steps with linear warm-up, then cosine to 0
    clip_grad: float = 1.0  # max global gradient norm (0 = off)
    crop_scale: float = RECIPE  # lower bound of RandomResizedCrop's area scale (papers: 0.08)
    seed: int = 0  # seeds data order, augmentation and initialisation
    workers: int = AUTO_WORKERS  # DataLoader worker processes (-1 = from the free cores, data_workers; 0 = none)
    eval_every: int = RECIPE  # steps between held-out evaluations (0 = only at the end)
    ckpt_every: int = RECIPE  # steps between resumable checkpoints (0 = only final.pt)
    select: str = "final"  # final | heldout: evaluate the last weights, or the held-out-best evaluated step's (never a test split)
    eval_batch_size: int = 512  # batch size for evaluation
    out: str = ""  # run directory (default runs/<method>-<data>-<model>-s<seed>)
    resume: bool = False  # continue from the newest readable checkpoint in --out (a trained run without its rows: evaluate it)
    keep_checkpoints: bool = False  # keep ckpt/step_*.pt once the run is finished (final.pt holds its weights)
    device: str = ""  # cuda | cpu (default: cuda when available)
    threads: int = 0  # torch CPU threads (0 = a resumed run's own, else $OMP_NUM_THREADS, else the free cores / processes per node)
    report_to: str = "none"  # none | tensorboard | wandb | tensorboard,wandb: log.jsonl's lines also to these (tracking/)


# The one fine-tuning recipe per --data that every method starts from (METHODS.md, "Conventions"):
# AdamW, 10% warm-up + cosine, RandomResizedCrop + flip. The papers': lr 1e-5, batch 256, crop scale
# 0.08-1; ImageNet 10 epochs (50k steps), DomainNet 5k steps; weight decay 0.1 for every method (FT
# included), so that a regulariser is the only difference from FT. miniworld's is the one that shows
# FT's robustness loss on the built-in world in a few CPU minutes, in the papers' regime: 10 training
# images per class (--shots 0 = its full set, where the papers' claims do not hold: docs/regime_map.md).
FT_RECIPES = {
    "miniworld": dict(steps=300, batch_size=128, lr=1e-4, weight_decay=0.1, crop_scale=0.5,
                      eval_every=100, ckpt_every=100, shots=10),
    "imagenet": dict(steps=50_000, batch_size=256, lr=1e-5, weight_decay=0.1, crop_scale=0.08,
                     eval_every=5_000, ckpt_every=5_000),
    "domainnet": dict(steps=5_000, batch_size=256, lr=1e-5, weight_decay=0.1, crop_scale=0.08,
                      eval_every=1_000, ckpt_every=1_000),
    "folder": dict(steps=1_000, batch_size=128, lr=1e-5, weight_decay=0.1, crop_scale=0.08,
                   eval_every=100, ckpt_every=100),
    # DomainBed: 5k steps, a held-out check every 300 (its checkpoint_freq), the step chosen on the
    # training domains' held-out 20% (training-domain validation); batch 96 = its 32 per domain x 3
    "domainbed": dict(steps=5_000, batch_size=96, lr=1e-5, weight_decay=0.1, crop_scale=0.08,
                      eval_every=300, ckpt_every=1_000, select="heldout"),
}


def _field_comments(cls) -> dict:
    """The `# comment` after each dataclass field, used as its --help text."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", src, re.M):
            comments[m.group(1)] = m.group(2).strip()
    return comments


def defaults(args_cls, data: str, presets: dict) -> dict:
    """Every field's default for --data: the dataclass's < FT_RECIPES[data] < the method's PRESETS[data]."""
    return {**{f.name: f.default for f in dataclasses.fields(args_cls)}, **FT_RECIPES[data], **presets.get(data, {})}


def make_args(args_cls, data: str = "miniworld", presets: Optional[dict] = None, **values):
    """args_cls as parse_args would give it for --data with `values` on the command line, checked."""
    check_data(data)
    args = args_cls(**{**defaults(args_cls, data, presets or {}), "data": data, **values})
    check_args(args)
    return args


def parse_args(args_cls, presets: dict, argv: Optional[Sequence[str]] = None):
    """The method's arguments: defaults (see `defaults`) < the command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--data", default=args_cls.data)
    data = pre.parse_known_args(argv)[0].data
    check_data(data)
    parser = argparse.ArgumentParser(description=(sys.modules[args_cls.__module__].__doc__ or "").split("\n")[0])
    helps, types = _field_comments(args_cls), typing.get_type_hints(args_cls)
    for name, default in defaults(args_cls, data, presets).items():
        flag = "--" + name.replace("_", "-")
        if types[name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=helps.get(name))
        else:
            parser.add_argument(flag, type=types[name], default=default, help=f"{helps.get(name, '')} (default: {default})")
    return make_args(args_cls, **vars(parser.parse_args(argv)))


def check_batch(what: str, size: int, grad_accum: int):
    """The one check that a global batch splits into equal micro-batches over accumulation and processes."""
    processes = int(os.environ.get("WORLD_SIZE", 1))
    if size % (grad_accum * processes):
        raise SystemExit(f"error: {what} {size} does not split into --grad-accum {grad_accum} equal micro-batches"
                         + (f" on each of {processes} processes" if processes > 1 else ""))


def check_args(args):
    problems = []
    if args.batch_size <= 0:
        problems.append(f"--batch-size must be positive (got {args.batch_size})")
    if args.lr < 0:
        problems.append(f"--lr must be >= 0 (got {args.lr})")
    if args.steps <= 0 and getattr(args, "method", None) != "zeroshot":
        problems.append(f"--steps must be positive (got {args.steps}); the untrained model is "
                        "`python baselines.py --method zeroshot` or `python evaluate.py eval`")
    if args.select not in ("final", "heldout") or (args.select == "heldout" and args.eval_every <= 0):
        problems.append(f"--select {args.select!r}: choose final, or heldout with --eval-every > 0 (the steps it compares)")
    if args.grad_accum <= 0:
        problems.append(f"--grad-accum must be positive (got {args.grad_accum})")
    if problems:
        raise SystemExit("error: " + "; ".join(problems))
    check_task_options(args.data, args.shots, args.source_domain, args.unseen_classes, args.test_domain)
    check_batch("--batch-size", args.batch_size, args.grad_accum)
    reporters(args.report_to)  # a tracker asked for and not installed stops here


# ----------------------------------------------------------------------------------------------
# The run: setup -> train -> finish, what every method's main calls
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Env:
    """What `setup` prepared; nothing changes it afterwards."""
    device: torch.device
    task: Task
    clip: nn.Module  # the CLIP inside `model` (θ0 until training)
    tokenizer: Callable
    model: ClipClassifier  # the CLIP with the task's zero-shot head
    train_tf: Callable  # the training augmentation
    eval_tf: Callable  # the model's own evaluation transform
    run: Optional[Path]  # the run directory (None: a step that trains nothing)
    method: str
    threads: int  # torch CPU threads used (set_threads); recorded in args.json under "machine"
    workers: int  # DataLoader workers used (data_workers)
    rank: int  # this process under torchrun (0 alone)
    world: int  # processes under torchrun (1 alone)


@dataclass(frozen=True)
class Trained:
    """What `train` hands to `finish`."""
    model: nn.Module  # the weights to evaluate: the last step's, their EMA, or (--select heldout) the chosen step's
    step: int  # the optimiser step those weights are from
    selected: bool  # chosen on the held-out slice (--select heldout)
    head_from_text: bool  # the head is the text tower's (FLYP, ARF): merges of this run rebuild it too


def setup(args, method: str, run_dir: bool = True, run_name: str = "") -> Env:
    """The start of every method's main: seed, device, task, CLIP, transforms, zero-shot classifier and
    the run directory's path (none with run_dir=False: a step that trains nothing; its default name is
    run_name or the method's)."""
    device = get_device(args.device)
    seed_everything(args.seed, device)
    rank, world = init_distributed(device)
    workers = data_workers(args.workers, device)
    resolve_model(args.model, args.pretrained)  # a wrong --model fails before the task loads
    run = check_run(args, run_name or method) if run_dir else None  # and a run folder that is taken
    threads = set_threads(args.threads, recorded_threads(run) if args.resume and run else 0)
    task = load_task(args.data, args.data_root, args.seed, args.zeroshot_data, shots=args.shots,
                     source_domain=args.source_domain, unseen_classes=args.unseen_classes, test_domain=args.test_domain)
    clip, tokenizer, pp = load_clip(args.model, args.pretrained, device)
    train_tf, eval_tf = image_transforms(pp, args.crop_scale)
    try:
        head = zeroshot_head(clip, tokenizer, task.classnames, task.templates, device)
        for split in task.tests:  # the test splits' own prompts must tokenize too, before training, not after
            if split.templates != task.templates or split.classnames != task.classnames:
                tokenizer([t(c) for t in as_template_fns(split.templates) for c in split.classnames])
    except ValueError as e:  # the word-level miniclip tokenizer knows miniworld's words only
        if resolve_model(args.model, args.pretrained) != "miniclip":
            raise
        raise SystemExit(f"error: --model miniclip only knows the miniworld's words, and the class names or templates of "
                         f"--data {args.data}{' or --zeroshot-data' if args.zeroshot_data else ''} use others ({e}). Pass a real CLIP: --model ViT-B-16 --pretrained openai, "
                         "or any open_clip model and tag (python -c \"import open_clip; print(open_clip.list_pretrained())\").") from None
    model = ClipClassifier(clip, head, tokenizer).to(device)
    return Env(device, task, clip, tokenizer, model, train_tf, eval_tf, run, method, threads, workers, rank, world)


def train(env: Env, loss_fn: Callable, args, *, ema_decay: Optional[float | Callable] = None, head_from_text: bool = False,
          streams: Optional[dict] = None, teacher: Optional[nn.Module] = None) -> Trained:
    """Optimises the parameters of `env.model` that require grad with `loss_fn(model, batch, step)` (or a
    ContrastiveLoss over the global batch) and returns the weights to evaluate. AdamW (fused on CUDA),
    warm-up + cosine, bf16 autocast on CUDA, gradient accumulation and clipping; after every step a
    trained logit scale is clamped to [0, MAX_LOGIT_SCALE], the EMA updated, the held-out slice scored
    when due, a checkpoint written when due. Under torchrun, DistributedDataParallel averages gradients.
      ema_decay       keep θ_ema ← m·θ_ema + (1−m)·θ (θ_ema = θ0 at the start): scored and returned; m is a
                      number, or a function of the step (0-based) it follows (m = 1: no update that step).
      teacher         a frozen copy of env.model that the loss reads (CaRot's EMA teacher): it is θ_ema
                      (with ema_decay), in every checkpoint, and the student is scored and returned.
      head_from_text  rebuild the head from the current text tower before every held-out check and at
                      the end (methods whose loss trains the text tower, not the head).
      streams         {name: (images, global batch)}: extra data, each micro-batch's share under
                      batch[name], from its own StepBatchSampler stream (seed + 1 + i)."""
    model, device, run = env.model, env.device, env.run
    start_run(env, args)
    if args.resume:
        same_start_everywhere(run, "final.pt (trained)" if (run / "final.pt").is_file() else "no final.pt")
    if args.resume and (run / "final.pt").is_file():  # trained, but stopped before its rows were written
        return trained_before(run, model, args.steps)
    noise = keyed_noise(model.clip, args.seed)  # dropout/drop_path masks keyed by sample (None: the towers have none)
    if args.grad_checkpointing:
        grad_checkpointing(model.clip, noise)
    prompts = [t(c) for c in env.task.classnames for t in as_template_fns(env.task.templates)[:1]]
    if env.task.unseen:
        hold_head_fixed(model, env.task)
    check_batch_independent(train_mode(model).clip, env.eval_tf, env.tokenizer, prompts, device)  # or stop: not exact
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, args.steps, args.warmup))
    ema = teacher if teacher is not None else copy.deepcopy(model).requires_grad_(False) if ema_decay is not None else None
    scored = model if ema is None or teacher is not None else ema  # the weights checked on the held-out slice and returned
    ema_pairs = [(e, p) for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad] if ema else []
    scale_trains = model.clip.logit_scale.requires_grad
    start = resume(run, model, opt, sched, ema, args.steps) if args.resume else 0
    data = StepData(env, args, streams or {}, start)
    stepper = LossOf(model, loss_fn)
    if env.world > 1:  # gradients averaged in buckets during backward; the parameters are broadcast from rank 0
        stepper = nn.parallel.DistributedDataParallel(stepper, broadcast_buffers=False, gradient_as_bucket_view=True)
    backward = (functools.partial(backward_global_batch, loss_fn=loss_fn, model=model) if isinstance(loss_fn, ContrastiveLoss)
                else backward_mean)
    best = HeldoutBest(run, args.select == "heldout", start)
    log = open(run / "log.jsonl", "a") if is_main_process() else None
    track = Trackers(args.report_to, run, run_config(args, env.method), start) if log else None  # --report-to
    bar = progress_bar(start, args.steps)
    train_mode(model)
    with stopped_with_a_message(run, env.rank, env.world):
        for step in bar:
            began = time.perf_counter()
            if noise is not None:
                noise.step = step
            terms = backward(stepper, data.next_step(), step, env.world, device, run)  # device tensors
            if args.clip_grad > 0:
                terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
            terms = scalars(terms)  # the step's one host sync
            check_finite(terms, step, run)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if scale_trains:
                with torch.no_grad():
                    model.clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            if ema is not None:
                m = ema_decay(step) if callable(ema_decay) else ema_decay
                ema_update([e for e, _ in ema_pairs], [p for _, p in ema_pairs], m)
            bar.set_postfix({k: f"{v:.4g}" for k, v in terms.items()})
            record = {"step": step + 1, "lr": sched.get_last_lr()[0], **terms,
                      "images_per_s": args.batch_size / (time.perf_counter() - began)}  # the step's, held-out check apart
            if heldout_due(args, step + 1, best.on):
                record["heldout_acc"] = best.score(env, args, scored, head_from_text, step + 1, bar)
                train_mode(model)
            if log:
                log.write(json.dumps(record) + "\n")
                log.flush()
                track.log(record)
            if args.ckpt_every and (step + 1) % args.ckpt_every == 0 and step + 1 < args.steps:
                save_checkpoint(run, step + 1, model, opt, sched, ema)
    data.report_unreadable()
    if log:
        log.close()
        track.close()
    if best.on:  # the weights to evaluate are the best held-out step's; the rows will say which
        best.load_into(scored)
    elif head_from_text:
        rebuild_head_from_text(model, env.task)
    model.eval()
    return Trained(scored.eval(), best.step if best.on else args.steps, best.on, head_from_text)


def hold_head_fixed(model: ClipClassifier, task: Task):
    """Generalized zero-shot (--unseen-classes): the head over all classes, seen and unseen, never trains,
    whatever the method asked of set_trainable (a head trained on the seen classes' images alone would
    forget the unseen ones); a method left with nothing else to train (LP) is stopped."""
    model.head.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise SystemExit("error: --unseen-classes holds the zero-shot head fixed, and this method trains only the head "
                         "(LP): nothing would train. Use a method that fine-tunes the image tower (ft, lipsum_ft, ...)")
    print(f"generalized zero-shot: {len(task.unseen)} of {len(task.classnames)} classes unseen in training; the "
          "zero-shot head over all of them stays fixed")


def finish(env: Env, args, trained: Optional[Trained] = None, tag: str = "") -> list:
    """The end of every method's main: final.pt, evaluation on every test split, results.jsonl. Without
    `trained`, the untrained model (zero-shot) is the run's, at step 0."""
    if trained is None:
        start_run(env, args)
        trained = Trained(env.model, 0, False, False)
    if is_main_process():
        meta = {"method": env.method, "model": args.model, "pretrained": args.pretrained, "data": args.data,
                "classnames": env.task.classnames, "head_from_text": trained.head_from_text, "step": trained.step,
                "selected": trained.selected}
        atomic_save({"model": trained.model.state_dict(), "meta": meta}, env.run / "final.pt")
        print(f"{env.method} on {env.task.name}: evaluating {len(env.task.tests)} splits")
    try:
        rows = evaluate_task(trained.model, env.task, env.eval_tf, env.device, args.eval_batch_size, env.workers)  # sharded
    except KeyboardInterrupt:
        raise SystemExit(f"interrupted during the final evaluation. {env.run / 'final.pt'} holds the trained weights: "
                         "rerun the same command with --resume to evaluate them.") from None
    if not is_main_process():
        return []
    if trained.selected:  # --select heldout: the rows are the chosen step's
        rows = [{**r, "selected_step": trained.step, "select": "heldout"} for r in rows]
    log_results(env.run, env.method, args, rows, trained.step, tag)  # the run is finished: its rows are written
    done = [] if args.keep_checkpoints else [*step_checkpoints(env.run), *(env.run / "ckpt").glob("best.pt")]
    for f in done:
        f.unlink()
    print(f"{env.method}: final.pt and results.jsonl in {env.run}"
          + (f" (removed {len(done)} checkpoint(s) it no longer needs; --keep-checkpoints keeps them)" if done else ""))
    return rows


# The loop's helpers, in the order train uses them
def trained_before(run: Path, model, steps: int) -> Trained:
    """The weights of a run that finished training but stopped before its rows were written (final.pt)."""
    ckpt = torch.load(run / "final.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(ckpt["model"])
    print(f"{run / 'final.pt'} holds the trained weights: evaluating them")
    meta = ckpt["meta"]
    return Trained(model.eval(), meta.get("step", steps), meta.get("selected", False), meta.get("head_from_text", False))


def resume(run: Path, model, opt, sched, ema, steps: int) -> int:
    """Loads the newest readable checkpoint into the model, optimiser, scheduler, EMA and RNGs and returns
    its step (0 when there is none); the log's lines of the steps after it are dropped (they are redone)."""
    path, ckpt = newest_checkpoint(run)
    same_start_everywhere(run, f"step {ckpt['step']} ({path})" if ckpt else f"step 0 (no readable checkpoint in {run / 'ckpt'})")
    if ckpt is None:
        print(f"no readable checkpoint in {run/'ckpt'}; starting from step 0")
        return 0
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    if ema is not None:
        ema.load_state_dict(ckpt["ema"])
    set_rng_state(ckpt["rng"])
    print(f"resuming from {path} (step {ckpt['step']}/{steps})")
    if is_main_process() and (run / "log.jsonl").exists():
        kept = [x for x in (run / "log.jsonl").read_text().splitlines(keepends=True)
                if x.strip().startswith("{") and x.endswith("\n") and json.loads(x)["step"] <= ckpt["step"]]
        (run / "log.jsonl").write_text("".join(kept))
    return ckpt["step"]


def same_start_everywhere(run: Path, found: str):
    """--resume under torchrun: every process must start where rank 0 starts. A process that cannot see
    rank 0's run folder (no filesystem shared by the nodes) would start at step 0 with its own optimiser,
    schedule and data stream while DDP broadcasts only the weights. What each process found ("step N
    (path)") is gathered; if the starts differ, every process stops with one message (every process
    reaches this all_gather: no hang)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, found)
    if len({s.split(" (")[0] for s in seen}) > 1:
        raise SystemExit(f"error: --resume: the processes of this run found different starts in {run}: "
                         + "; ".join(f"rank {r}: {s}" for r, s in enumerate(seen)) + ". Every process must see rank 0's "
                         "run folder (--out on a filesystem every node shares); resume where they all do.")


class StepData:
    """The micro-batches of every step from `start` on: the training split's and, under each extra
    stream's name, that stream's share. Each is a StepBatchSampler stream, so a batch is a function of
    (seed, step), and every micro-batch is full: an unreadable image is replaced by the next readable
    one of its stream (TransformedImages), so the micro-batches of every process have one size (the
    all_gather of a ContrastiveLoss needs it) and a mean weighs every image alike in every
    configuration. The unreadable images are named once at the end (report_unreadable). Tensors are on
    the device; batch["host"] holds the CPU copies of "label" and "index", for what Python looks up
    per image (prompts, captions) without waiting for the device."""

    def __init__(self, env: Env, args, streams: dict, start: int):
        self.env, self.accum, self.names, self.bad = env, args.grad_accum, {"training": env.task.train.images}, {}

        def stream(images, global_batch, seed, pin):
            sampler = StepBatchSampler(len(images), global_batch, args.grad_accum, env.rank, env.world, seed, start, args.steps)
            return iter(torch.utils.data.DataLoader(TransformedImages(images, env.train_tf, stream=sampler.sample),
                                                    batch_sampler=sampler, num_workers=env.workers,
                                                    collate_fn=collate_skipping_bad, pin_memory=pin,
                                                    persistent_workers=env.workers > 0))

        self.main = stream(env.task.train.images, args.batch_size, args.seed, env.device.type == "cuda")
        self.extra = {name: stream(images, bs, args.seed + 1 + i, False) for i, (name, (images, bs)) in enumerate(streams.items())}
        self.names.update({name: images for name, (images, _) in streams.items()})

    def to_device(self, what: str, batch: dict) -> dict:
        self.bad.setdefault(what, []).extend(pop_unreadable(batch))
        host = {k: batch[k] for k in ("label", "index")}
        return {**{k: v.to(self.env.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()},
                "host": host}

    def next_step(self) -> list:
        micro = []
        for _ in range(self.accum):
            batch = self.to_device("training", next(self.main))
            for name, it in self.extra.items():
                batch[name] = self.to_device(name, next(it))
            micro.append(batch)
        return micro

    def report_unreadable(self):
        """Every process's unreadable draws, named once by rank 0 (a collective under torchrun)."""
        bad = [self.bad]
        if self.env.world > 1:
            bad = [None] * self.env.world
            dist.all_gather_object(bad, self.bad)
        for what, images in self.names.items():
            indices = [i for b in bad for i in b.get(what, [])]
            if indices and is_main_process():
                print(name_unreadable(images, indices, what))


def synced_unless(stepper, world: int, last: bool):
    """Gradient accumulation: average across processes only on the step's last backward."""
    return stepper.no_sync() if world > 1 and not last else contextlib.nullcontext()


def backward_mean(stepper, micro: list, step: int, world: int, device, run: Path) -> dict:
    """A loss that is a mean over images: each micro-batch's share, backpropagated in turn. Returns the
    step's loss and terms, averaged over the micro-batches, as device tensors (no host sync here)."""
    terms_sum, accum = {}, len(micro)
    for j, batch in enumerate(micro):
        with synced_unless(stepper, world, j == accum - 1):
            with autocast(device):
                loss, terms = stepper(batch, step)
            (loss / accum).backward()  # a non-finite loss is caught once per step (check_finite), before opt.step
        for k, v in {"loss": loss, **terms}.items():
            v = v.detach().double() / accum if torch.is_tensor(v) else float(v) / accum
            terms_sum[k] = terms_sum[k] + v if k in terms_sum else v
    return terms_sum


def backward_global_batch(stepper, micro: list, step: int, world: int, device, run: Path, loss_fn, model) -> dict:
    """A ContrastiveLoss: the rows of every micro-batch of every process (open_clip's feature cache)."""
    accum = len(micro)
    cached = []
    if accum > 1:
        with torch.no_grad(), autocast(device):
            cached = [stepper(b, step) for b in micro]
    for j, batch in enumerate(micro):
        with synced_unless(stepper, world, j == accum - 1):
            with autocast(device):
                own = stepper(batch, step)  # this micro-batch's rows, with gradient
                parts = [own if i == j else c for i, c in enumerate(cached)] or [own]
                rows = {k: torch.cat([p[k] for p in parts]) for k in own}
                rows = gather_rows(rows) if world > 1 else rows
                # the scale's (and a SigLIP bias's) gradient counted once per step, not once per pass:
                scale, bias = (once_per_step(t, accum) for t in (model.scale, getattr(model.clip, "logit_bias", None)))
                loss, terms = loss_fn.loss(rows, scale, bias)
            loss.backward()
    return {"loss": loss.detach(), **terms}  # every pass computes the same full-batch loss


class NonFiniteLoss(RuntimeError):
    pass


def scalars(terms: dict) -> dict:
    """The step's loss and terms (device tensors or numbers) as floats: one host sync per step."""
    keys = [k for k, v in terms.items() if torch.is_tensor(v)]
    values = torch.stack([terms[k].detach().double().reshape(()) for k in keys]).tolist() if keys else []
    return {k: float(v) for k, v in {**terms, **dict(zip(keys, values))}.items()}


def check_finite(terms: dict, step: int, run: Path):
    """Stops the run before opt.step when the step's loss (or, with clipping, the gradient norm: under
    torchrun another process's loss reaches it) is not finite: the weights never take that step."""
    if not (math.isfinite(terms["loss"]) and math.isfinite(terms.get("grad_norm", 0.0))):
        last = step_checkpoints(run)
        what = f"loss is {terms['loss']}" if not math.isfinite(terms["loss"]) else f"gradient norm is {terms['grad_norm']}"
        raise NonFiniteLoss(
            f"{what} at step {step} (terms: { {k: v for k, v in terms.items() if k != 'loss'} }). "
            f"Last good checkpoint: {last[-1] if last else 'none'}. Lower --lr or check the data.")


class HeldoutBest:
    """Held-out checks and --select heldout: with `on`, the weights of the best-scoring check are kept in
    ckpt/best.pt (strictly better wins, so the earliest of equals); a resumed run knows its best so far."""

    def __init__(self, run: Path, on: bool, start: int):
        self.file, self.on, self.acc, self.step = run / "ckpt" / "best.pt", on, -1.0, None
        if on and start and self.file.is_file():
            saved = torch.load(self.file, map_location="cpu", weights_only=False)
            self.acc, self.step = saved["acc"], saved["step"]

    def score(self, env: Env, args, scored: nn.Module, head_from_text: bool, step: int, bar) -> float:
        """The held-out accuracy of `scored` (every process scores its shard), kept if it is the best."""
        if head_from_text:
            rebuild_head_from_text(env.model, env.task)
        acc = evaluate_split(scored, env.task.heldout, env.task, env.eval_tf, env.device, args.eval_batch_size, env.workers)["acc"]
        if is_main_process():
            bar.write(f"step {step}: held-out acc {100*acc:.2f}")
        if self.on and acc > self.acc:
            self.acc, self.step = acc, step
            if is_main_process():
                atomic_save({"acc": acc, "step": step, "model": scored.state_dict()}, self.file)
            barrier()
        return acc

    def load_into(self, model: nn.Module):
        model.load_state_dict(torch.load(self.file, map_location="cpu", weights_only=False)["model"])
        if is_main_process():
            print(f"--select heldout: step {self.step} (held-out acc {100 * self.acc:.2f}) is evaluated")


def heldout_due(args, step: int, select: bool) -> bool:
    """Whether the held-out slice is scored after optimiser step `step` (1-based): every --eval-every steps
    but the last (finish scores the test splits there), and under --select heldout the last step too, so
    the run always has a step to select even with --steps below --eval-every."""
    if step == args.steps:
        return select
    return bool(args.eval_every) and step % args.eval_every == 0


def save_checkpoint(run: Path, step: int, model, opt, sched, ema):
    """ckpt/step_N.pt: everything a resume needs; the KEEP_CHECKPOINTS newest are kept."""
    if not is_main_process():
        return
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "ema": ema.state_dict() if ema is not None else None, "rng": rng_state(), "step": step}
    atomic_save(state, run / "ckpt" / f"step_{step}.pt")
    for old in step_checkpoints(run)[:-KEEP_CHECKPOINTS]:
        old.unlink()


def progress_bar(start: int, steps: int):
    from tqdm import tqdm

    return tqdm(range(start, steps), initial=start, total=steps, disable=not is_main_process(), dynamic_ncols=True)


@contextlib.contextmanager
def stopped_with_a_message(run: Path, rank: int, world: int):
    """Ctrl-C, or (under torchrun) a lost process, ends training with a message that names the last
    checkpoint and how to resume, not a raw traceback or a hang."""
    peers = watch_peers(rank, world)
    try:
        yield
    except KeyboardInterrupt:
        ckpts = step_checkpoints(run)
        raise SystemExit(f"interrupted. Last checkpoint: {ckpts[-1] if ckpts else 'none (nothing to resume)'}; "
                         f"continue with the same command and --resume (run folder {run}).") from None
    except (RuntimeError, SystemExit) as e:  # a collective whose peer died, or the launcher's SIGTERM
        if peers is None or isinstance(e, NonFiniteLoss) or not (str(e) == LOST or lost_ranks(rank, peers)
                                                                 or is_collective_failure(e)):
            raise
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the launcher's SIGTERM may follow: let the message out first
        PEERS_LOST.append(rank)
        raise SystemExit(lost_process_message(run, rank, peers)) from None
    finally:
        if peers is not None:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def seed_everything(seed: int, device: torch.device = torch.device("cpu")):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cpu":  # free on CPU; on CUDA it would force slower kernels, so it stays off there
        torch.use_deterministic_algorithms(True, warn_only=True)


def warmup_cosine(step: int, total: int, warmup_frac: float) -> float:
    warm = max(1, int(warmup_frac * total))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


@torch.no_grad()
def ema_update(ema_params: list, params: list, decay: float):
    """θ_ema ← m · θ_ema + (1 − m) · θ in place. lerp is exact at the ends: m = 0 copies θ, m = 1
    keeps θ_ema."""
    for e, p in zip(ema_params, params):
        e.lerp_(p, 1.0 - decay)


# ----------------------------------------------------------------------------------------------
# CLIP: loading any open_clip model (or the built-in miniclip), the classifier, heads, the text tower
# ----------------------------------------------------------------------------------------------
def get_device(name: str = "") -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))



@functools.lru_cache(maxsize=None)  # checked once per (model, pretrained), however many callers ask
def resolve_model(model_name: str, pretrained: str = "") -> str:
    """Checks --model/--pretrained before anything slow happens; returns the open_clip model name."""
    import open_clip

    if model_name.endswith(".json") and os.path.isfile(model_name):  # a custom open_clip config file
        open_clip.add_model_config(model_name)
        model_name = Path(model_name).stem
    if model_name == "miniclip":
        if pretrained and not os.path.isfile(pretrained):
            raise SystemExit(f"error: --pretrained {pretrained!r} is not a file (miniclip takes a weights file or nothing)")
        return model_name
    if model_name not in open_clip.list_models():
        raise SystemExit(f"error: unknown --model {model_name!r}. Known: miniclip, " + ", ".join(open_clip.list_models()))
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained and pretrained not in tags and not os.path.isfile(pretrained):
        raise SystemExit(
            f"error: --pretrained {pretrained!r} is neither a file nor a tag of {model_name}. Tags: {', '.join(tags) or 'none'}")
    return model_name


def load_clip(model_name: str = "miniclip", pretrained: str = "", device="cpu"):
    """Returns (clip, tokenizer, preprocess_cfg). `pretrained` is an open_clip tag or a weights file."""
    import open_clip

    model_name = resolve_model(model_name, pretrained)
    if model_name == "miniclip":
        import miniworld

        clip, tokenizer = miniworld.load_miniclip(device=device, path=pretrained or None)
    else:
        try:
            clip = open_clip.create_model(model_name, pretrained=pretrained or None, device=device)
        except Exception as e:  # noqa: BLE001 -- a file that is not a checkpoint, or weights that cannot be fetched
            raise SystemExit(f"error: could not load {model_name} weights {pretrained!r}: {e}") from None
        tokenizer = open_clip.get_tokenizer(model_name)
    clip.eval()
    return clip, tokenizer, dict(clip.visual.preprocess_cfg)


def image_transforms(preprocess_cfg: dict, crop_scale: float):
    """Train: random resized crop (scale crop_scale..1) + flip, the papers' augmentation. Eval: the
    model's own resize + centre crop."""
    import open_clip
    from torchvision import transforms as T

    size = preprocess_cfg["size"]
    size = size if isinstance(size, int) else size[-1]
    mean, std = preprocess_cfg["mean"], preprocess_cfg["std"]
    train = T.Compose([
        T.RandomResizedCrop(size, scale=(crop_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
    evaluation = open_clip.image_transform(size, is_train=False, mean=mean, std=std,
                                           resize_mode=preprocess_cfg.get("resize_mode"),
                                           interpolation=preprocess_cfg.get("interpolation"))
    return train, evaluation


def cosine_logits(features: torch.Tensor, head: torch.Tensor, scale) -> torch.Tensor:
    """s · n(f) Wᵀ: unit-norm features [B, D] against head rows [K, D] at temperature s -> [B, K]."""
    return scale * features @ head.t()


class ClipClassifier(nn.Module):
    """A CLIP plus a linear head W [K, D]; logits = s · n(f(x)) @ Wᵀ with s = exp(logit_scale). A SigLIP's
    bias b (clip.logit_bias) is left out on purpose: it adds the same b to every class's logit, and a
    softmax over classes cancels it, so accuracy, NLL and ECE are those of s · n(f(x)) @ Wᵀ + b."""

    def __init__(self, clip: nn.Module, head: torch.Tensor, tokenizer=None):
        super().__init__()
        self.clip = clip
        self.head = nn.Parameter(head.clone())  # [K, D]
        self.tokenizer = tokenizer

    @property
    def scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(images), dim=-1)  # [B, D]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The classifier on features the caller already has (a loss that also needs the features)."""
        return cosine_logits(features, self.head, self.scale)  # [B, K]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.image_features(images))  # [B, K]


def frozen_copy(module: nn.Module) -> nn.Module:
    """θ0 for a regulariser or teacher: a frozen copy taken now, in eval mode (nn.MultiheadAttention's
    fused kernel: ~9% faster than the training-mode path on ViT-B/16, features equal to ~1e-6)."""
    return copy.deepcopy(module).requires_grad_(False).eval()


def set_trainable(model: ClipClassifier, image: bool = True, text: bool = False, head: bool = True, scale: bool = False):
    """Freeze everything, then unfreeze the named parts. The default is FT's: image tower + head."""
    for p in model.parameters():
        p.requires_grad_(False)
    if image:
        model.clip.visual.requires_grad_(True)
    if text:
        for m in text_modules(model.clip):
            m.requires_grad_(True)
        for name in ("positional_embedding", "text_projection"):
            p = getattr(model.clip, name, None)
            if isinstance(p, nn.Parameter):
                p.requires_grad_(True)
    model.head.requires_grad_(head)
    model.clip.logit_scale.requires_grad_(scale)
    if getattr(model.clip, "logit_bias", None) is not None:  # SigLIP's bias b trains wherever its scale s does
        model.clip.logit_bias.requires_grad_(scale)
    return model


def as_template_fns(templates) -> list:
    return [t if callable(t) else t.format for t in templates]


@torch.no_grad()
def zeroshot_head(clip, tokenizer, classnames, templates, device=None) -> torch.Tensor:
    """W [K, D]: row k = n(mean_t n(g(template_t(class_k)))), unit norm (what open_clip's
    build_zero_shot_classifier computes). The tower runs under autocast (bf16 on CUDA) with encode_text's
    early stop, on chunks of classes of about HEAD_PROMPTS prompts; under torchrun a collective: process r
    builds chunks r, r + world, ... and all gather the rows, which are those of one process since a
    chunk is the same forward whatever the world size."""
    device = device or next(clip.parameters()).device
    fns = as_template_fns(templates)
    per = max(1, HEAD_PROMPTS // len(fns))  # classes per chunk
    chunks = [list(classnames[i:i + per]) for i in range(0, len(classnames), per)]
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine, error = [], None
    try:
        for names in chunks[rank::world]:
            with autocast(torch.device(device)):
                text = encode_text(clip, tokenizer([fn(c) for c in names for fn in fns]).to(device))  # [k·T, D]
            mine.append(F.normalize(F.normalize(text.float(), dim=-1).view(len(names), len(fns), -1).mean(1), dim=-1))  # [k, D]
    except ValueError as e:  # a word the tokenizer lacks (miniclip's): under torchrun every process raises it, none waits
        if world == 1:
            raise
        error = e
    if world == 1:
        return torch.cat(mine).contiguous()  # [K, D]
    shards = [None] * world
    dist.all_gather_object(shards, error or [rows.cpu() for rows in mine])
    if failed := next((x for x in shards if isinstance(x, Exception)), None):
        raise failed
    return torch.cat([shards[c % world][c // world] for c in range(len(chunks))]).to(device).contiguous()  # [K, D]


def encode_text(clip, tokens: torch.Tensor) -> torch.Tensor:
    """n(g(tokens)) [N, D]: open_clip's text tower on `tokens` [N, context] with the padding after the
    batch's last EOT cut off. Same result as clip.encode_text(tokens, normalize=True) (up to round-off)
    for CLIP's causal text tower pooled at the EOT token (its argmax id), since no position attends to
    the padding after it; cheaper in proportion: a random text of 8 words fills 10 of OpenAI CLIP's 77
    positions. Other towers run on the full context: a bidirectional one (every position sees the
    padding) or one pooled elsewhere ('last', 'first', 'eos', a [CLS], an HF tower), e.g. SigLIP's,
    bidirectional and pooled at the last position of the padded context."""
    text = getattr(clip, "text", clip)  # CustomTextCLIP keeps its tower in .text, CLIP on itself
    causal_eot = getattr(text, "attn_mask", None) is not None and getattr(
        clip, "text_pool_type", getattr(text, "pool_type", None)) == "argmax"
    length = int(tokens.argmax(-1).max()) + 1  # the last EOT's position + 1
    if not causal_eot or length >= tokens.shape[1]:
        return clip.encode_text(tokens, normalize=True)
    # open_clip's towers add a [context, width] position table and a [context, context] causal mask:
    # run the model's own forward with both sliced (views of the real parameter and buffer, so
    # gradients reach the parameter)
    prefix = "" if text is clip else "text."
    sliced = {prefix + "positional_embedding": text.positional_embedding[:length],
              prefix + "attn_mask": text.attn_mask[:length, :length]}
    out = torch.func.functional_call(clip, sliced, (None, tokens[:, :length]), strict=False)
    return out["text_features"] if isinstance(out, dict) else out[1]  # [N, D]


def template_ids(seed: int, step: int, index: torch.Tensor, n_templates: int) -> torch.Tensor:
    """The template of each training image (`index` into the training split, [B]) at this step (FLYP's
    random prompt per image per step): a pure function of (seed, step, image), so every process and
    micro-batch agrees, and a resumed run too."""
    return torch.tensor([np.random.default_rng((seed, step, i)).integers(n_templates) for i in index.tolist()])  # [B]


def class_prompts(tokenizer, classnames, templates, tokens: dict, labels, templates_of, device) -> tuple:
    """The prompts of a batch whose image i is of class labels[i] with template templates_of[i] ([B] each,
    on the CPU: chosen without waiting for the device): (the token ids of each distinct (class, template)
    pair once [P, L], each image's pair [B]), both on `device`. `tokens` caches every pair's token ids,
    so a prompt is tokenized once per run."""
    pairs, inverse = torch.stack([labels, templates_of], 1).unique(dim=0, return_inverse=True)
    pairs = [tuple(p) for p in pairs.tolist()]  # each (class, template) of the batch once
    new = [p for p in pairs if p not in tokens]
    if new:
        tokens.update(zip(new, tokenizer([templates[t](classnames[c]) for c, t in new])))
    return torch.stack([tokens[p] for p in pairs]).to(device), inverse.to(device)  # [P, L], [B]


@torch.no_grad()
def template_embeddings(clip, tokenizer, classnames, templates, device=None, batch_size: int = 2048) -> torch.Tensor:
    """Per-prompt text embeddings n(g(template_t(class_k))) as [K, T, D]; CAR-FT's context head
    averages these over classes (open_clip's builder only returns the class average)."""
    device = device or next(clip.parameters()).device
    fns = as_template_fns(templates)
    texts = [fn(c) for c in classnames for fn in fns]
    out = [encode_text(clip, tokenizer(texts[i:i + batch_size]).to(device)).float()
           for i in range(0, len(texts), batch_size)]
    return torch.cat(out).view(len(classnames), len(fns), -1)  # [K, T, D]



def rebuild_head_from_text(model: ClipClassifier, task: Task):
    """The head of the model's current text tower (zero-shot head of the task's classes and templates):
    what a method that trains the text tower (FLYP, ARF) classifies with."""
    model.head.data = zeroshot_head(model.clip, model.tokenizer, task.classnames, task.templates, model.head.device)



# ----------------------------------------------------------------------------------------------
# CLIP's contrastive loss over the global batch (FLYP and ARF train with it)
# ----------------------------------------------------------------------------------------------
def clip_contrastive_loss(image_emb, text_emb, scale, groups=None, duplicates: str = "positive") -> torch.Tensor:
    """Symmetric InfoNCE of unit-norm pairs image_emb, text_emb [B, D] at temperature s (already
    exponentiated): ½ [CE(S, I) + CE(Sᵀ, I)] with S_ij = s · ⟨image_i, text_j⟩, the pair (i, i) positive.

    `groups` [B] marks duplicates: pairs i ≠ j with one id share a text (several images of one class
    behind one class prompt, identical captions). They are not true negatives, and the two rules of the
    repo's methods are:
      duplicates="positive"  each duplicate is a positive too, the target spread evenly over the group
                             (ARF: every image of a class should match its prompt);
      duplicates="masked"    duplicates are dropped from both softmaxes, the pair (i, i) stays the only
                             positive (FLYP; FLYP's own code keeps them as negatives).
    Without duplicates (groups None or all distinct) both are exactly CLIP's loss."""
    logits = (scale * image_emb @ text_emb.t()).float()  # [B, B]: S_ij
    ids = torch.arange(len(logits), device=logits.device)
    if groups is not None and duplicates == "masked":
        same = (groups[:, None] == groups[None, :]) & (ids[:, None] != ids[None, :])  # [B, B], symmetric
        logits = logits.masked_fill(same, float("-inf"))
    elif groups is not None:
        if duplicates != "positive":
            raise ValueError(f"duplicates must be 'positive' or 'masked', not {duplicates!r}")
        same = (groups[:, None] == groups[None, :]).float()  # [B, B], symmetric
        target = same / same.sum(1, keepdim=True)
        return -((target * logits.log_softmax(1)).sum(1).mean() + (target * logits.t().log_softmax(1)).sum(1).mean()) / 2
    return (F.cross_entropy(logits, ids) + F.cross_entropy(logits.t(), ids)) / 2


def sigmoid_contrastive_loss(image_emb, text_emb, scale, bias, groups=None, duplicates: str = "positive") -> torch.Tensor:
    """SigLIP's sigmoid loss of unit-norm pairs image_emb, text_emb [B, D] at temperature s (already
    exponentiated) and bias b: every pair (i, j) is its own binary problem, "is text j image i's?",

        z_ij = s · ⟨image_i, text_j⟩ + b,   y_ij = +1 if j = i else −1,   L = −(1/B) Σ_ij log σ(y_ij · z_ij)

    (Zhai et al. 2023, eq. 1; the sum over every pair, divided by the number of images). `groups` [B]
    marks duplicates as in clip_contrastive_loss, with the same two rules:
      duplicates="positive"  a pair i ≠ j of one group is a positive too, y_ij = +1 (ARF);
      duplicates="masked"    a pair i ≠ j of one group is left out of the sum (FLYP); the 1/B stays.
    Without duplicates both are exactly SigLIP's loss."""
    logits = (scale * image_emb @ text_emb.t() + bias).float()  # [B, B]: z_ij
    ids = torch.arange(len(logits), device=logits.device)
    positive = ids[:, None] == ids[None, :]  # [B, B]: the pairs (i, i)
    kept = torch.ones_like(positive)  # [B, B]: the pairs in the sum
    if groups is not None:
        if duplicates not in ("positive", "masked"):
            raise ValueError(f"duplicates must be 'positive' or 'masked', not {duplicates!r}")
        same = groups[:, None] == groups[None, :]  # [B, B], symmetric
        positive, kept = (same, kept) if duplicates == "positive" else (positive, ~same | positive)
    labels = positive.float() * 2 - 1  # [B, B]: y_ij = ±1
    return -(F.logsigmoid(labels * logits) * kept).sum() / len(logits)


def pretraining_loss(image_emb, text_emb, scale, bias=None, groups=None, duplicates: str = "positive") -> torch.Tensor:
    """The loss the CLIP was pretrained with, the one rule of FLYP and ARF: a model with a learned logit
    bias (SigLIP: clip.logit_bias) was pretrained with the sigmoid loss (sigmoid_contrastive_loss), any
    other with InfoNCE (clip_contrastive_loss). `bias` is clip.logit_bias, or None where there is none."""
    if bias is None:
        return clip_contrastive_loss(image_emb, text_emb, scale, groups, duplicates)
    return sigmoid_contrastive_loss(image_emb, text_emb, scale, bias, groups, duplicates)


@dataclass
class ContrastiveLoss:
    """A loss over the whole global batch (InfoNCE: every row is a negative of every other), split in two
    so that common.train can make it exact under torchrun and gradient accumulation:
      embed(model, batch, step) -> {name: [b, ...]}   a micro-batch's rows: embeddings (with gradient)
                                                      and integer group ids
      loss(rows, scale, bias) -> (loss, terms)        the loss on the rows of every micro-batch of the
                                                      step on every process, at temperature `scale`, with
                                                      the model's logit bias (None: it has none)
    train() gathers the rows across processes with gradient (open_clip's gather_features) and, under
    --grad-accum A, uses open_clip's feature-cache scheme: one no-grad embedding pass over the A
    micro-batches, then each micro-batch re-embedded with gradient and the full loss backpropagated
    through its own rows. Exact (the gradients of the full-batch loss); it costs one extra forward of
    every micro-batch when A > 1, and nothing extra when A = 1."""
    embed: Callable
    loss: Callable


def once_per_step(t: Optional[torch.Tensor], accum: int) -> Optional[torch.Tensor]:
    """t with its gradient divided by accum (its value unchanged): every one of the step's accum passes
    backpropagates the full-batch loss into it, and the step must count its gradient once."""
    return t if t is None or accum == 1 else t.detach() + (t - t.detach()) / accum



def gather_rows(rows: dict) -> dict:
    """Every process's rows of each tensor, concatenated in rank order: embeddings with gradient (the
    backward sums every process's gradient into the local rows), ids without. open_clip's gather."""
    from open_clip.loss import gather_features

    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for with_grad in (True, False):
        keys = sorted(k for k, v in rows.items() if v.is_floating_point() == with_grad)
        for a, b in zip(keys[0::2], keys[1::2] + keys[-1:] * (len(keys) % 2)):  # open_clip gathers pairs
            out[a], out[b] = gather_features(rows[a], rows[b], gather_with_grad=with_grad, rank=rank, world_size=world)
    return out



# ----------------------------------------------------------------------------------------------
# Data plumbing: transformed images, unreadable images, the step sampler (datasets: the tasks package)
# ----------------------------------------------------------------------------------------------
class TransformedImages(torch.utils.data.Dataset):
    """Applies a transform to the image at a key: an index into `images`, or (index, seed) to augment
    with that seed (unreadable: {"unreadable": index}). With `stream` (a StepBatchSampler's `sample`), a
    key is a position p of a training stream, and the sample is always full: the image at p, or when it
    is unreadable the first readable image at p + 1, p + 2, ... of the same stream (read here, in the
    same worker), with position p's augmentation seed. So the sample at p is a pure function of (seed,
    p) and of which files read, whatever the processes, accumulation or resume (kill-and-resume stays
    bit-exact); its "skipped" lists the unreadable indices it stepped over."""

    def __init__(self, images, transform, stream: Optional[Callable] = None):
        self.images, self.transform, self.stream = images, transform, stream

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        if self.stream is not None:
            return self.stream_sample(key)
        index, sample_seed = key if isinstance(key, tuple) else (key, None)
        img = self.images.load(index)
        if img is None:
            return {"unreadable": index}
        return {"image": self.augment(img, sample_seed), "label": int(self.images.labels[index]), "index": index}

    def stream_sample(self, p: int) -> dict:
        skipped = []
        for q in range(p, p + 2 * len(self.images)):  # 2N positions hold every image at least once
            index = self.stream(q)[0]
            img = self.images.load(index)
            if img is not None:
                break
            skipped.append(index)
        else:
            raise SystemExit(f"error: none of the {len(self.images)} images of this training stream could be read")
        return {"image": self.augment(img, self.stream(p)[1]), "label": int(self.images.labels[index]), "index": index,
                "skipped": skipped}

    def augment(self, img, sample_seed: Optional[int]):
        if sample_seed is None:
            return self.transform(img)
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also queue a lazy CUDA seeding with
            # a captured stack trace, which cost more than the transform itself
            torch.default_generator.manual_seed(sample_seed)
            return self.transform(img)


def collate_skipping_bad(samples):
    """Default collation of the readable samples; `n_bad` counts the unreadable ones, and `bad` (only
    when there are some) lists their indices so they can be named: the samples that are unreadable
    (evaluation: skipped) and those a training stream stepped over (TransformedImages' "skipped")."""
    good = [{k: v for k, v in s.items() if k != "skipped"} for s in samples if "unreadable" not in s]
    batch = torch.utils.data.default_collate(good) if good else {}
    bad = [s["unreadable"] for s in samples if "unreadable" in s] + [i for s in samples for i in s.get("skipped", [])]
    batch["n_bad"] = len(bad)
    if bad:
        batch["bad"] = bad
    return batch


def pop_unreadable(batch: dict) -> list:
    """Takes the unreadable-image bookkeeping out of a collated batch: the indices of its unreadable images."""
    batch.pop("n_bad", None)
    return batch.pop("bad", [])


def name_unreadable(images, indices, what: str) -> str:
    """One warning for the unreadable images of a training stream, each named (up to 10) and counted once."""
    draws, indices = len(indices), sorted(set(indices))
    names = [images.paths[i] for i in indices] if isinstance(images, FileImages) else [f"#{i}" for i in indices]
    return (f"warning: {len(indices)} unreadable {what} image(s), each replaced by the next readable image of its stream "
            f"every time it was drawn ({draws} draw(s)): " + ", ".join(names[:10]) + (" ..." if len(names) > 10 else ""))


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields the micro-batches of steps [start, total) for one process (global_batch divides by accum ×
    world: check_batch) as stream positions p, for TransformedImages(..., stream=self.sample). Position
    p is element p % N of the permutation of epoch p // N, with an augmentation seed that is a hash of
    (seed, p): sample(p) -> (index, seed)."""

    def __init__(self, n: int, global_batch: int, accum: int, rank: int, world: int, seed: int, start: int, total: int):
        self.n, self.B, self.accum, self.rank, self.world = n, global_batch, accum, rank, world
        self.seed, self.start, self.total, self._perms = seed, start, total, {}

    def _perm(self, epoch):
        if epoch not in self._perms:  # the two newest epochs: a replacement may look into the next one
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            kept = {e: p for e, p in self._perms.items() if e == epoch - 1}
            self._perms = {**kept, epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch]

    def sample(self, p: int) -> tuple:
        return self._perm(p // self.n)[p % self.n], (self.seed * 2_654_435_761 + p) % 2**63

    def __len__(self):
        return (self.total - self.start) * self.accum

    def __iter__(self):
        micro = self.B // (self.accum * self.world)
        for step in range(self.start, self.total):
            for a in range(self.accum):
                first = step * self.B + (a * self.world + self.rank) * micro
                yield list(range(first, first + micro))


# ----------------------------------------------------------------------------------------------
# Evaluation: accuracy, ECE and NLL of every test split, sharded under torchrun
# ----------------------------------------------------------------------------------------------
def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> dict:
    """Accuracy, expected calibration error (equal-width confidence bins), NLL, and clip_benchmark's other two:
    top-5 accuracy (label among the min(5, K) highest logits: 1 when K <= 5) and mean per-class recall (the
    mean over the classes present of the fraction of their images classified right)."""
    logits, labels = logits.float(), labels.long()
    logp = logits.log_softmax(-1)  # [N, K]
    conf, pred = logp.exp().max(-1)  # [N]
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    bin_of = torch.bucketize(conf, edges[1:-1], right=False)  # bin b holds (edges[b], edges[b+1]]
    ece = torch.zeros(())
    for b in range(bins):
        in_bin = bin_of == b
        if in_bin.any():
            ece += in_bin.float().mean() * (conf[in_bin].mean() - correct[in_bin].mean()).abs()
    nll = F.nll_loss(logp, labels)
    top5 = (logits.topk(min(TOP_K, logits.shape[-1]), -1).indices == labels[:, None]).any(-1).float()  # [N]
    recall = torch.stack([correct[labels == c].mean() for c in labels.unique()]).mean()
    return {"acc": correct.mean().item(), "ece": ece.item(), "nll": nll.item(), "n": len(labels), "top5": top5.mean().item(),
            "recall": recall.item()}


def gzsl_metrics(logits: torch.Tensor, labels: torch.Tensor, unseen: list) -> dict:
    """Generalized zero-shot scores of logits [N, K] over all K classes: S and U, the mean per-class top-1
    accuracy over the seen and over the unseen classes that have images here (Xian et al.'s protocol,
    which Lipsum-FT's Table 11 follows), and their harmonic mean H = 2SU / (S + U) (0 when both are 0; a
    side with no images here is nan, and so is H)."""
    correct = (logits.argmax(-1) == labels).float()  # [N]
    present = labels.unique().tolist()
    per_class = {c: correct[labels == c].mean().item() for c in present}
    seen_acc = [a for c, a in per_class.items() if c not in unseen]
    unseen_acc = [a for c, a in per_class.items() if c in unseen]
    s = float(np.mean(seen_acc)) if seen_acc else float("nan")
    u = float(np.mean(unseen_acc)) if unseen_acc else float("nan")
    h = 2 * s * u / (s + u) if s + u > 0 else 0.0 if s == u == 0 else float("nan")
    return {"acc_seen": s, "acc_unseen": u, "h": h}


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


@torch.inference_mode()
def predict(forward: Callable, images, transform, device, batch_size: int = 512, workers: int = 0, shard: bool = False):
    """Runs `forward(images) -> logits` over an image list; returns (logits [N,K], labels [N], n_bad),
    unreadable images skipped; a forward that returns [M, B, K] (several models on each batch) gives
    [M, N, K], every image loaded and transformed once. shard: under torchrun every process scores every
    world-th image and the shards are gathered back into the images' order on every process (sharded evaluation)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if shard and dist.is_initialized() else (0, 1)
    mine = np.arange(rank, len(images), world)  # [N / world]: this process's share
    loader = torch.utils.data.DataLoader(TransformedImages(images if world == 1 else images.subset(mine), transform),
                                         batch_size=batch_size, num_workers=workers, collate_fn=collate_skipping_bad)
    outs, labels, index, bad = [], [], [], 0
    for batch in loader:
        bad += batch["n_bad"]
        if "image" not in batch:
            continue
        with autocast(device):
            outs.append(forward(batch["image"].to(device, non_blocking=True)).float().cpu())
        labels.append(batch["label"])
        index.append(torch.as_tensor(mine)[batch["index"]])  # positions in the whole image list
    if world > 1:
        shards = [None] * world
        dist.all_gather_object(shards, (outs, labels, index, bad))
        outs, labels, index = (sum((s[i] for s in shards), []) for i in range(3))
        bad = sum(s[3] for s in shards)
    if not outs:
        raise SystemExit("error: no readable images in this split")
    order = torch.cat(index).argsort()  # the images' own order, whatever the sharding
    return torch.cat(outs, -2).index_select(-2, order), torch.cat(labels)[order], bad  # [(M,) N, K]


def split_head(model: ClipClassifier, split: Split, task: Task) -> torch.Tensor:
    """The classification head to score a split: the trained head for the task's own classes, a
    fresh text head from the model's (current) text tower for zero-shot transfer splits."""
    if split.kind == "zeroshot" or split.classnames != task.classnames:
        return zeroshot_head(model.clip, model.tokenizer, split.classnames, split.templates)
    return model.head.detach()


def split_forward(model: ClipClassifier, split: Split, task: Task, device) -> Callable:
    """images [B, 3, H, W] -> the split's logits [B, K] by `model` (its head for the split built now); with
    class groups (ImageNet-R/A, ObjectNet) the groups' [B, G]."""
    model.eval()
    head = split_head(model, split, task).to(device)  # [K, D]
    if split.class_groups is not None:
        members = torch.tensor([c for g in split.class_groups for c in g], device=device)  # [M]
        group_of = torch.tensor([k for k, g in enumerate(split.class_groups) for _ in g], device=device)  # [M]
        head = head[members]  # [M, D]

    def forward(x):  # the encoder under autocast (bf16 on CUDA); the logits, and all metrics after them, in float32
        features = model.clip.encode_image(x)  # [B, D]
        with torch.autocast(x.device.type, enabled=False):
            logits = cosine_logits(F.normalize(features.float(), dim=-1), head.float(), model.scale.float())  # [B, M]
            if split.class_groups is None:
                return logits
            grouped = logits.new_full((len(x), len(split.class_groups)), -math.inf)  # [B, G]: a group's logit is its max
            return grouped.scatter_reduce(1, group_of.expand(len(x), -1), logits, "amax")

    return forward


@torch.no_grad()
def split_logits(model, split: Split, task: Task, transform, device, batch_size=512, workers=0) -> tuple:
    """(logits [N, K], labels [N], n_bad) of one split; with class groups (ImageNet-R/A, ObjectNet) the
    logits are the groups' [N, G] and the labels index the groups. A list of models gives their logits
    stacked, [M, N, K], from one pass over the images."""
    if isinstance(model, ClipClassifier):
        return predict(split_forward(model, split, task, device), split.images, transform, device, batch_size, workers, shard=True)
    forwards = [split_forward(m, split, task, device) for m in model]
    return predict(lambda x: torch.stack([f(x) for f in forwards]), split.images, transform, device, batch_size, workers,
                   shard=True)  # [M, B, K] per batch


def evaluate_split(model, split: Split, task: Task, transform, device, batch_size=512, workers=0):
    """The split's metrics (a list of them for a list of models, from one pass over the images)."""
    logits, labels, bad = split_logits(model, split, task, transform, device, batch_size, workers)
    gzsl = task.unseen and split.kind != "zeroshot" and split.classnames == task.classnames and split.class_groups is None
    rows = [{**classification_metrics(x, labels), **(gzsl_metrics(x, labels, task.unseen) if gzsl else {}), "skipped": bad}
            for x in (logits if logits.dim() == 3 else [logits])]
    return rows if logits.dim() == 3 else rows[0]


def evaluate_task(model, task: Task, transform, device, batch_size=512, workers=0, splits=None) -> list:
    """A row of metrics per split (under torchrun: every process scores its shard, all get the rows). A list
    of models (WiSE-FT's α sweep) is scored on every batch in turn, each image loaded and transformed once:
    a list of rows per model, printed by the caller."""
    splits = splits or task.tests
    per_split = [evaluate_split(model, s, task, transform, device, batch_size, workers) for s in splits]
    if isinstance(model, ClipClassifier):
        return print_rows([{"split": s.name, "kind": s.kind, **m} for s, m in zip(splits, per_split)])
    return [[{"split": s.name, "kind": s.kind, **m[i]} for s, m in zip(splits, per_split)] for i in range(len(model))]


def print_rows(rows: list) -> list:
    """Prints evaluation rows on the main process; returns them."""
    for r in rows if is_main_process() else []:
        print(f"  {r['split']:<16} {r['kind']:<9} acc {100*r['acc']:6.2f}  ece {r['ece']:.4f}  nll {r['nll']:.4f}"
              + (f"  S {100*r['acc_seen']:6.2f}  U {100*r['acc_unseen']:6.2f}  H {100*r['h']:6.2f}" if "h" in r else "")
              + (f"  (skipped {r['skipped']} unreadable)" if r["skipped"] else ""))
    return rows


PLOT_ALPHAS = (0.5, 0.8)  # the α written beside each WiSE-FT curve
PLOT_MARKERS = "osD^vP*Xph<>"  # one per variant of a method family


def series_styles(labels: list) -> dict:
    """{label: (colour, marker)} for a figure of many series: one colour per method family (a label's first
    word, "WiSE-FT on" and "+merge" aside: "lipsum_ft (lam=1 kld)" is lipsum_ft's), in order of first
    appearance (ten strong colours, then ten light ones), and a marker per variant within a family."""
    import matplotlib.pyplot as plt

    family = lambda label: label.removeprefix("WiSE-FT on ").split(" ")[0].split("+")[0]  # noqa: E731
    families = list(dict.fromkeys(family(label) for label in labels))
    colour = {f: plt.cm.tab20.colors[(2 * i) % 20 + (2 * i) // 20] for i, f in enumerate(families)}
    variants = {}
    for label in dict.fromkeys(labels):
        variants.setdefault(family(label), []).append(label)
    return {label: (colour[family(label)], PLOT_MARKERS[variants[family(label)].index(label) % len(PLOT_MARKERS)])
            for label in labels}


def plot_id_vs_ood(points: list, curves: dict, out: str, id_label: str = "ID"):
    """One ID-vs-OOD picture for many series. points: [(label, id, ood, id_err, ood_err)] with error bars;
    curves: {"WiSE-FT on <label>": [(alpha, id, ood), ...]} as dashed lines in α order, labelled at
    PLOT_ALPHAS. One colour per method family (the label's first word: "lipsum_ft (lam=1 kld)" is
    lipsum_ft's), a marker per variant within it; the legend sits outside the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = series_styles([c for c in curves] + [p[0] for p in points])  # curves' families first: the strong colours
    fig, ax = plt.subplots(figsize=(11, 6))
    for label, x, y, xerr, yerr in points:
        colour, marker = style[label]
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=marker, color=colour, capsize=3, markersize=7, label=label)
    for label, pts in curves.items():
        pts = sorted(pts)
        ax.plot([p[1] for p in pts], [p[2] for p in pts], "--", marker=".", color=style[label][0], label=label)
        for alpha, x, y in pts:
            if alpha in PLOT_ALPHAS:
                ax.annotate(f"α={alpha:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=style[label][0])
    ax.set_xlabel(f"{id_label} accuracy (%)")
    ax.set_ylabel("OOD accuracy (mean over shifts, %)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if len(points) + len(curves) <= 24 else 2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"wrote {out}")


# ----------------------------------------------------------------------------------------------
# Runs on disk: the run folder, results rows, checkpoints, loading a finished run and its θ0
# ----------------------------------------------------------------------------------------------
def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def atomic_save(obj, path: Path):
    """torch.save to a temp file, fsync, rename: a kill mid-write never leaves a torn file, and a write
    that fails (a full disk) stops the run with a message and leaves every earlier file as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write of its zip writer as RuntimeError
        tmp.unlink(missing_ok=True)
        kept = sorted(p.name for p in path.parent.glob("*.pt"))
        raise SystemExit(f"error: could not write {path} ({e}). Nothing was replaced: {', '.join(kept) or 'no earlier file'} "
                         f"in {path.parent} as before. Free disk space, then rerun with --resume.") from None


def append_lines(path: Path, text: str):
    """Appends whole lines under an exclusive lock in one write: any number of processes appending to
    one file (reproduce/reproduce.py --workers N) never tear or interleave a line."""
    import fcntl

    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)  # closing releases the lock


def check_run(args, name: str) -> Path:
    """The run directory's path, refusing (before anything slow) to overwrite a started run unless
    --resume, or to resume a finished one (final.pt and its rows written). Nothing is created: start_run
    does that."""
    run = Path(args.out or f"runs/{name}-{data_tag(args)}-{Path(args.model).stem}-s{args.seed}")
    if is_main_process():
        if (run / "args.json").exists() and not args.resume:
            raise SystemExit(f"error: {run} already holds a run. Pass --resume to continue it, or --out NEW_DIR.")
        if args.resume and not (run / "args.json").exists():
            raise SystemExit(f"error: --resume: {run} holds no run to resume (no args.json). Drop --resume to start it "
                             "there, or pass the --out of the run to resume.")
        if args.resume and (run / "final.pt").exists() and (run / "results.jsonl").exists():
            raise SystemExit(f"error: {run} is finished (final.pt; its rows are in {run / 'results.jsonl'}): nothing to "
                             "resume. Evaluate it with `python evaluate.py eval --ckpt RUN`, or train anew with --out NEW_DIR.")
        if args.resume:
            saved = json.loads((run / "args.json").read_text())
            before = {f.name: f.default for f in dataclasses.fields(args)}  # what a run written before a field existed had
            changed = [f"--{k.replace('_', '-')} {saved.get(k, before[k])!r} -> {v!r}" for k, v in dataclasses.asdict(args).items()
                       if k not in RESUME_MAY_CHANGE and saved.get(k, before[k]) != v]
            if changed:
                raise SystemExit(f"error: --resume would change the run in {run}: {'; '.join(changed)}. Resume with the "
                                 f"arguments in {run / 'args.json'}, or train anew with --out NEW_DIR.")
    return run


def data_tag(args) -> str:
    """--data in default run names: with the left-out domain of --data domainbed (domainbed-photo) and
    --shots K (-kK), so the runs of one seed over domains or K get folders of their own."""
    return (args.data + (f"-{args.test_domain}".replace(" ", "_") if args.test_domain else "")
            + (f"-k{args.shots}" if args.shots else ""))


def start_run(env, args):
    """Creates the run directory and its args.json (the arguments as parsed, and under "machine" the
    threads, workers and processes used), once the run can start (training begins, or a zero-shot
    model is evaluated): a start that fails earlier leaves nothing behind to refuse a rerun."""
    if is_main_process():
        (env.run / "ckpt").mkdir(parents=True, exist_ok=True)
        machine = {"threads": env.threads, "workers": env.workers, "processes": env.world}
        (env.run / "args.json").write_text(json.dumps({"method": env.method, **dataclasses.asdict(args), "machine": machine}, indent=2))
        print(f"run folder: {env.run}")
    barrier()


def recorded_threads(run: Path) -> int:
    """The thread count a run recorded in its args.json (0 if none): a resume keeps it."""
    if not (run / "args.json").is_file():
        return 0
    saved = json.loads((run / "args.json").read_text())
    return saved.get("machine", {}).get("threads", saved.get("threads", 0))  # before "machine": args.threads was the count used


def run_config(args, method: str, merge: Optional[dict] = None) -> dict:
    """The run's identity: every argument that changes its numbers (the data, the model, the recipe, the
    selection rule, the method's own knobs; for a zero-shot model only what it is), plus a merge's own
    parameters (WiSE-FT's α, ...). Not the seed (rows keep it apart), nor how or where it ran."""
    values = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(vars(args))
    if method == "zeroshot":
        values = {k: values.get(k) for k in ("data", "data_root", "source_domain", "test_domain", "model", "pretrained",
                                             "unseen_classes") if k != "unseen_classes" or values.get(k)}  # S / U / H rows apart
    if values.get("select") != "heldout":  # the held-out checks then only log: they change no number
        values.pop("eval_every", None)
    return {**{k: v for k, v in sorted(values.items()) if k not in NOT_CONFIG}, **(merge or {})}


def log_results(run: Path, method: str, args, rows: list, step: int, tag: str = "", merge: Optional[dict] = None):
    """Appends one line per split to run/results.jsonl and to the runs root's results.jsonl. Each row
    carries the run's configuration (run_config) and its short id, by which tables group runs; the tag
    is for display only."""
    if not is_main_process():
        return
    config = run_config(args, method, merge)
    config_id = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    common = {"run": str(run), "method": method, "tag": tag, "data": args.data, "model": args.model,
              "pretrained": args.pretrained, "step": step, "seed": args.seed, "config": config, "config_id": config_id,
              "commit": git_commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    lines = "".join(json.dumps({**common, **row}) + "\n" for row in rows)
    for path in {run / "results.jsonl", run.parent / "results.jsonl"}:
        append_lines(path, lines)


def load_classifier(path: str, device="cpu", task: Optional[Task] = None):
    """Rebuilds a ClipClassifier from a final.pt / step checkpoint; checks the class list."""
    path = Path(path)
    if path.is_dir():
        path = path / "final.pt"
    if not path.is_file():
        raise SystemExit(f"error: checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        meta = ckpt["meta"]
    except Exception as e:  # noqa: BLE001 -- any unreadable file gets the same actionable message
        raise SystemExit(f"error: {path} is not a checkpoint written by this repo ({type(e).__name__}: {e})") from None
    if task is not None and meta["classnames"] != task.classnames:
        raise SystemExit(f"error: {path} was trained on {len(meta['classnames'])} classes of {meta['data']!r}; "
                         f"--data {task.name} has {len(task.classnames)} different classes")
    clip, tokenizer, pp = load_clip(meta["model"], meta["pretrained"], device)
    model = ClipClassifier(clip, torch.zeros_like(ckpt["model"]["head"]), tokenizer)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), meta, pp


# The arguments that decide the task a run is scored on (load_task's), with what an args.json written before
# one existed meant: a run is loaded on it, merges and tables combine only runs that agree on it.
TASK_FIELDS = {"data": "miniworld", "data_root": "", "zeroshot_data": "", "source_domain": "real", "unseen_classes": "",
               "test_domain": ""}


def load_run(path, device, data_root: str = "", tasks: Optional[dict] = None, zeroshot_data: Optional[str] = None):
    """A run directory (or its final.pt / a step checkpoint) -> namespace(dir, args, meta, model, task,
    seed, data_root, eval_tf, method). `tasks` caches loaded tasks across calls; the zero-shot folders
    are the run's own (args.json) unless `zeroshot_data` names others."""
    ckpt = Path(path)
    run = ckpt.parent if ckpt.is_file() else ckpt
    if not (run / "args.json").is_file():
        raise SystemExit(f"error: {run} has no args.json; pass a run directory written by a method file")
    args = json.loads((run / "args.json").read_text())
    task = {k: args.get(k, default) for k, default in TASK_FIELDS.items()}
    saved_root = task.pop("data_root")
    task.update(root=data_root or saved_root, seed=args.get("seed", 0), shots=args.get("shots", 0),
                zeroshot_data=task["zeroshot_data"] if zeroshot_data is None else zeroshot_data)
    key = tuple(sorted(task.items()))
    tasks = {} if tasks is None else tasks
    if key not in tasks:
        tasks[key] = load_task(**task)
    model, meta, pp = load_classifier(ckpt, device, tasks[key])
    return argparse.Namespace(dir=run, args=args, meta=meta, model=model, task=tasks[key], seed=task["seed"],
                              data_root=task["root"], eval_tf=image_transforms(pp, 1.0)[1], method=meta["method"])


def run_theta0(run, device) -> ClipClassifier:
    """θ0 of a loaded run, built the way `setup` built it: seed, load the CLIP, zero-shot head (so a
    randomly initialised --model comes back with the run's own initial weights)."""
    seed_everything(run.seed)
    clip, tokenizer, _ = load_clip(run.meta["model"], run.meta["pretrained"], device)
    head = zeroshot_head(clip, tokenizer, run.task.classnames, run.task.templates, device)
    return ClipClassifier(clip, head, tokenizer).to(device).eval()


def run_log_args(run, seed=None):
    """A loaded run's arguments (its args.json) for `log_results` (rows written after training: merges,
    evals), with the model it was trained from."""
    return argparse.Namespace(**{**run.args, "model": run.meta["model"], "pretrained": run.meta["pretrained"],
                                 "seed": run.seed if seed is None else seed})


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_checkpoints(run: Path) -> list:
    """The run's resumable checkpoints ckpt/step_N.pt, oldest first."""
    return sorted((run / "ckpt").glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))


def newest_checkpoint(run: Path):
    """The newest checkpoint that loads; torn or corrupt files are reported and passed over."""
    for path in reversed(step_checkpoints(run)):
        try:
            return path, torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001
            print(f"warning: checkpoint {path} is unreadable ({type(e).__name__}); trying an older one")
    return None, None


# ----------------------------------------------------------------------------------------------
# The machine: CPU threads, and the processes of a torchrun (gloo on CPU, nccl on GPU)
# ----------------------------------------------------------------------------------------------
def process_cpus() -> set:
    """The cores this process may run on."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def free_cores(sample_s: float = FREE_CORES_SAMPLE_S) -> float:
    """How many of this process's cores are idle now: the idle share of each over a short sample of
    /proc/stat (Linux); elsewhere, all of them."""
    cpus = process_cpus()

    def idle_and_total() -> dict:
        out = {}
        for line in Path("/proc/stat").read_text().splitlines()[1:]:
            name, *ticks = line.split()
            if name.startswith("cpu") and int(name[3:]) in cpus:
                ticks = [int(t) for t in ticks[:8]]  # user nice system idle iowait irq softirq steal
                out[name] = (ticks[3] + ticks[4], sum(ticks))
        return out

    try:
        before = idle_and_total()
        time.sleep(sample_s)
        after = idle_and_total()
    except (OSError, ValueError):
        return float(len(cpus))
    if not after:  # no per-core lines (an unusual /proc): assume all are free
        return float(len(cpus))
    return sum((after[c][0] - before[c][0]) / max(after[c][1] - before[c][1], 1) for c in after)


def set_threads(requested: int = 0, resumed: int = 0) -> int:
    """torch's intra-op threads: --threads, else those of the run being resumed (`resumed`, from its
    args.json), else $OMP_NUM_THREADS, else the cores free at start shared by the processes of this node.
    More threads than free cores spin against each other (FT on 2 cores beside one busy process: 11m29s
    with 2 threads, 1m32s with 1). Printed, since it changes speed, and float round-off: a resumed run
    keeps its count so that it ends with the weights of an uninterrupted one."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if requested > 0:
        threads, why = requested, "--threads"
    elif resumed > 0:
        threads, why = resumed, "the resumed run's own, from its args.json; --threads N to change"
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        threads, why = int(os.environ["OMP_NUM_THREADS"]), "$OMP_NUM_THREADS"
    else:
        free = free_cores()
        threads = max(1, int(round(free)) // per_node)
        why = (f"{free:.1f} of {len(process_cpus())} cores free" + (f", {per_node} processes on this node" if per_node > 1 else "")
               + "; --threads N to choose")
    torch.set_num_threads(threads)
    if is_main_process():
        print(f"CPU threads: {threads} ({why})")
    return threads



def data_workers(requested: int, device: torch.device) -> int:
    """DataLoader worker processes, the one rule of every script: --workers N (at most the cores), else
    (AUTO_WORKERS) on CUDA the cores free at start shared by the processes of this node, less the one each
    process runs on; on CPU none, since the model's threads use the free cores. A worker decodes and
    transforms ~190 training / ~150 evaluation images/s of ImageNet's size (bench/data_speed.py): ViT-B/16
    on one H100 trains on ~3k images/s, so it wants ~16 workers."""
    if requested < AUTO_WORKERS:
        raise SystemExit(f"error: --workers must be >= 0, or {AUTO_WORKERS} for the free cores (got {requested})")
    if requested != AUTO_WORKERS:
        return min(requested, len(process_cpus()))
    if torch.device(device).type != "cuda":
        return 0
    workers = max(0, int(round(free_cores())) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1)  # set_threads' rule
    if is_main_process():
        print(f"DataLoader workers: {workers} per process (the free cores; --workers N to choose)")
    return workers


def init_distributed(device: torch.device) -> tuple[int, int]:
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        atexit.register(close_distributed)
    return dist.get_rank(), dist.get_world_size()


EXIT_WAIT_S = 10  # at exit, how long a gloo process waits for the others before tearing its group down
PEERS_LOST = []  # set once a run has lost a process: its process group must not be torn down politely


def close_distributed():
    """At exit: destroy the process group, so no backend thread outlives the interpreter (a gloo process
    that skipped this sometimes aborted at exit: "terminate called without an active exception"). Not
    after a lost process, where the group is broken and an NCCL teardown could wait on the dead peer."""
    if dist.is_initialized() and not PEERS_LOST:
        if dist.get_backend() == "gloo":  # leave together: a rank whose peer is still mid-write aborted once at teardown
            with contextlib.suppress(RuntimeError):  # a peer that stopped on its own error: leave after EXIT_WAIT_S anyway
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=EXIT_WAIT_S), wait_all_ranks=True)
        dist.destroy_process_group()


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def wait_for_file(path: Path, what: str):
    """Under torchrun, every process but rank 0 waits for `path`, which rank 0 writes atomically
    (os.replace) after a job of its own of any length (ARF's faiss search over the pool): a wait that
    is not a collective, so no backend timeout (NCCL's 10 minutes, gloo's 30) cuts it short. A long
    wait says what it waits for every WAIT_NOTE_S; if rank 0 fails, torchrun stops the others and they
    say so."""
    if not dist.is_initialized() or is_main_process():
        return

    def on_sigterm(signum, frame):
        raise SystemExit(f"error: rank {dist.get_rank()} stopped while waiting for {what} ({path}): rank 0 failed or "
                         "was stopped; its output says why. Rerun the same command: finished caches are kept.")

    signal.signal(signal.SIGTERM, on_sigterm)
    waited = 0
    while not path.is_file():
        time.sleep(WAIT_POLL_S)
        waited += WAIT_POLL_S
        if waited % WAIT_NOTE_S == 0:
            print(f"rank {dist.get_rank()}: waited {waited // 60} min for {what} ({path}); every node must see that "
                  "folder (a shared filesystem)", flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class LossOf(nn.Module):
    """The step's loss as a module's forward, so that torch's DistributedDataParallel sees the model's
    forward (the method losses call sub-modules and frozen teachers directly) and averages gradients in
    buckets while backward runs. forward(batch, step) = loss_fn(model, batch, step), or a
    ContrastiveLoss's embed(model, batch, step)."""

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch, step):
        fn = self.loss_fn.embed if isinstance(self.loss_fn, ContrastiveLoss) else self.loss_fn
        return fn(self.model, batch, step)


LOST = "lost a process"  # marks the SystemExit of a run whose process group lost a member


def watch_peers(rank: int, world: int):
    """Under torchrun: every process's (host, pid), and a SIGTERM handler. When one process dies, the
    others' next collective fails (gloo sees the closed connection) or the launcher stops them with
    SIGTERM; either way each survivor stops within seconds with lost_process_message instead of a raw
    traceback or a hang. None for one process."""
    if world == 1:
        return None
    peers = [None] * world
    dist.all_gather_object(peers, (socket.gethostname(), os.getpid()))

    def on_sigterm(signum, frame):
        raise SystemExit(LOST)

    signal.signal(signal.SIGTERM, on_sigterm)
    return peers


def lost_ranks(rank: int, peers: list) -> list:
    """The other ranks on this host whose process no longer exists."""
    def gone(host, pid):
        if host != socket.gethostname():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False

    return [r for r, peer in enumerate(peers) if r != rank and gone(*peer)]


def is_collective_failure(e: Exception) -> bool:
    """A process-group error (what gloo / NCCL raise when a peer's connection closes or times out)."""
    return any(w in str(e) for w in ("Connection closed", "Connection reset", "Broken pipe", "connection", "Gloo",
                                     "NCCL", "timed out", "ProcessGroup"))


def lost_process_message(run: Path, rank: int, peers: list) -> str:
    """Which ranks are gone, where the newest checkpoint is, and how to go on."""
    time.sleep(1)  # a peer that just failed may still be exiting
    lost = lost_ranks(rank, peers)
    who = ", ".join(f"rank {r}" for r in lost) or "a process on another host (or its launcher)"
    ckpts = step_checkpoints(run)
    return (f"error: rank {rank} {LOST} of this run: {who} ended. Last checkpoint: {ckpts[-1] if ckpts else 'none'}. "
            "Rerun the same command with --resume to continue from it.")
