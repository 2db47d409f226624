"""Infrastructure shared by every method file: arguments and the FT recipe, CLIP loading, zero-shot
heads, CLIP's contrastive loss, datasets, retrieval pools, metrics and evaluation, run directories,
plots, and the one training loop. No method's own loss lives here.

Conventions (METHODS.md):
  * Logits are `s · n(f(x)) @ Wᵀ` (`cosine_logits`) where W [K, D] is the head and s =
    clip.logit_scale.exp() is the model's own learned temperature (100 for OpenAI CLIP, ~20 for the
    mini CLIP). The scale is never baked into W: W starts as unit-norm class embeddings, so WiSE-FT
    interpolating the head and the tower is interpolating like with like.
  * A batch is a dict {"image": [B,3,H,W], "label": [B], "index": [B]}; `index` points into the
    training split so methods with per-image side data (ARF's captions) can look it up. A method that
    asks `train` for extra `streams` finds their batches under their names (ARF's "retrieved").
  * The step contract: `loss_fn(model, batch, step) -> (loss, terms)`. `step` is the optimiser step
    (0-based) the batch belongs to, the same for every micro-batch of gradient accumulation, every
    process and a resumed run, so anything per-step (Lipsum-FT's random texts) is a pure function of
    (seed, step) written in the method file. `terms` is a dict of floats/0-d tensors for the progress
    bar and the log. Everything else the loop does for a method is an explicit argument of `train`:
    the EMA of the weights to evaluate, a head rebuilt from the text tower, extra data streams.
  * The knob rule: a paper's hyperparameter is an `Args` field (in `--help`, with its per-data
    default); an implementation detail is an UPPERCASE constant at the top of its file; never both.
    The fine-tuning recipe (steps, batch, lr, ...) is FT_RECIPES[--data], one per dataset; a method
    file's PRESETS hold only what differs from it for that method (tests check that none repeats it).
  * Every run directory holds args.json, log.jsonl, ckpt/step_*.pt, final.pt and results.jsonl; every
    evaluation row is also appended to <runs root>/results.jsonl so evaluate.py can tabulate them all.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import csv
import dataclasses
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent
ECE_BINS = 15  # equal-width confidence bins of the expected calibration error
MAX_LOGIT_SCALE = math.log(100)  # a trained temperature is clamped here after every step (open_clip's rule)
MINIWORLD_POOL_SIZE = 50_000  # image-text pairs in the generated miniworld retrieval pool (ARF's anchors)
OBJECTNET_BORDER = 2  # px cut from each edge of an ObjectNet image: its 1-px red frame (the reference evaluation cuts 2)
FREE_CORES_SAMPLE_S = 0.1  # seconds of /proc/stat sampled at start to count the idle cores (set_threads)


# ----------------------------------------------------------------------------------------------
# Arguments: a dataclass per method file, the FT recipe per --data, parsed into argparse.
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainArgs:
    data: str = "miniworld"  # miniworld | imagenet | domainnet | folder
    data_root: str = ""  # dataset folder (not needed for miniworld); see README for layouts
    zeroshot_data: str = ""  # DIR[,DIR...]: extra classification folders scored zero-shot, with heads from the current text tower
    model: str = "miniclip"  # open_clip architecture (ViT-B-16, ...) or the built-in miniclip
    pretrained: str = ""  # open_clip pretrained tag (openai, laion2b_s34b_b88k, ...) or a weights file
    steps: int = 300  # optimiser steps
    batch_size: int = 128  # global batch per optimiser step (split over processes and accumulation)
    grad_accum: int = 1  # micro-batches accumulated per step
    lr: float = 1e-4  # peak learning rate
    weight_decay: float = 0.1  # AdamW decoupled weight decay
    warmup: float = 0.1  # fraction of steps with linear warm-up, then cosine to 0
    clip_grad: float = 1.0  # max global gradient norm (0 = off)
    crop_scale: float = 0.5  # lower bound of RandomResizedCrop's area scale (papers: 0.08)
    seed: int = 0  # seeds data order, augmentation and initialisation
    workers: int = 0  # DataLoader worker processes (0 = load in the main process)
    eval_every: int = 100  # steps between held-out evaluations (0 = only at the end)
    ckpt_every: int = 100  # steps between resumable checkpoints (0 = only final.pt)
    select: str = "final"  # final | heldout: evaluate the last weights, or the held-out-best evaluated step's (never a test split)
    eval_batch_size: int = 512  # batch size for evaluation
    out: str = ""  # run directory (default runs/<method>-<data>-<model>-s<seed>)
    resume: bool = False  # continue from the newest readable checkpoint in --out
    device: str = ""  # cuda | cpu (default: cuda when available)
    threads: int = 0  # torch CPU threads (0 = a resumed run's own, else $OMP_NUM_THREADS, else the free cores / processes per node)


# The one fine-tuning recipe per --data that every method starts from (METHODS.md): AdamW, 10% warm-up
# + cosine, RandomResizedCrop + flip. The papers': lr 1e-5, batch 256, crop scale 0.08-1; ImageNet 10
# epochs (50k steps), DomainNet 5k steps; weight decay 0.1 for every method (FT included), so that a
# regulariser is the only difference from FT. miniworld's is the one that shows FT's robustness loss on
# the built-in world in a few CPU minutes (see the miniworld package).
FT_RECIPES = {
    "miniworld": dict(steps=300, batch_size=128, lr=1e-4, weight_decay=0.1, crop_scale=0.5, eval_every=100, ckpt_every=100),
    "imagenet": dict(steps=50_000, batch_size=256, lr=1e-5, weight_decay=0.1, crop_scale=0.08, workers=8,
                     eval_every=5_000, ckpt_every=5_000),
    "domainnet": dict(steps=5_000, batch_size=256, lr=1e-5, weight_decay=0.1, crop_scale=0.08, workers=8,
                      eval_every=1_000, ckpt_every=1_000),
    "folder": dict(steps=1_000, batch_size=128, lr=1e-5, weight_decay=0.1, crop_scale=0.08, workers=4),
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


def parse_alphas(spec: str) -> list:
    """"0:1:0.1" (start:stop:step, stop included) or "0,0.5,1"."""
    if ":" in spec:
        start, stop, step = (float(s) for s in spec.split(":"))
        values = np.arange(start, stop + step / 2, step)
    else:
        values = [float(s) for s in spec.split(",")]
    return [round(float(a), 6) for a in values]


def check_data(data: str):
    """The one check of a --data name."""
    if data not in DATASETS:
        raise SystemExit(f"error: unknown --data {data!r}; choose one of {sorted(DATASETS)}")


def parse_args(args_cls, presets: dict, argv: Optional[Sequence[str]] = None):
    """Dataclass defaults < FT_RECIPES[--data] < the method's PRESETS[--data] < command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--data", default=args_cls.data)
    data = pre.parse_known_args(argv)[0].data
    check_data(data)
    defaults = {**{f.name: f.default for f in dataclasses.fields(args_cls)}, **FT_RECIPES[data], **presets.get(data, {})}
    parser = argparse.ArgumentParser(description=(sys.modules[args_cls.__module__].__doc__ or "").split("\n")[0])
    helps = _field_comments(args_cls)
    for f in dataclasses.fields(args_cls):
        flag, default = "--" + f.name.replace("_", "-"), defaults[f.name]
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=helps.get(f.name))
        else:
            typ = type(default) if default is not None else str
            parser.add_argument(flag, type=typ, default=default, help=f"{helps.get(f.name, '')} (default: {default})")
    args = args_cls(**vars(parser.parse_args(argv)))
    check_args(args)
    return args


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
    elif args.batch_size > 0 and args.batch_size % args.grad_accum:
        problems.append(f"--batch-size {args.batch_size} does not split into --grad-accum {args.grad_accum} equal "
                        "micro-batches (under torchrun: into grad_accum x processes)")
    if problems:
        raise SystemExit("error: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------
# Models: any open_clip CLIP, a weights file, or the built-in miniclip; the classifier wrapper and θ0.
# ----------------------------------------------------------------------------------------------
def get_device(name: str = "") -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


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
    """A CLIP plus a linear head W [K, D]; logits = s · n(f(x)) @ Wᵀ with s = exp(logit_scale)."""

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
    text_modules = [model.clip.transformer, model.clip.token_embedding, model.clip.ln_final] if hasattr(model.clip, "transformer") else [model.clip.text]
    if image:
        model.clip.visual.requires_grad_(True)
    if text:
        for m in text_modules:
            m.requires_grad_(True)
        for name in ("positional_embedding", "text_projection"):
            p = getattr(model.clip, name, None)
            if isinstance(p, nn.Parameter):
                p.requires_grad_(True)
    model.head.requires_grad_(head)
    model.clip.logit_scale.requires_grad_(scale)
    return model
# ----------------------------------------------------------------------------------------------
# Zero-shot heads
# ----------------------------------------------------------------------------------------------
def as_template_fns(templates) -> list:
    return [t if callable(t) else t.format for t in templates]


@torch.no_grad()
def zeroshot_head(clip, tokenizer, classnames, templates, device=None) -> torch.Tensor:
    """W [K, D]: row k = n(mean_t n(g(template_t(class_k)))), unit norm (open_clip's builder)."""
    import open_clip

    device = device or next(clip.parameters()).device
    weights = open_clip.build_zero_shot_classifier(
        clip, tokenizer, list(classnames), as_template_fns(templates), num_classes_per_batch=max(1, 2048 // len(templates)),
        device=device,
    )  # [D, K]
    return weights.t().float().contiguous()


def encode_text(clip, tokens: torch.Tensor) -> torch.Tensor:
    """n(g(tokens)) [N, D]: open_clip's text tower on `tokens` [N, context] with the padding after the
    batch's last EOT cut off. Same result as clip.encode_text(tokens, normalize=True) (up to round-off)
    for CLIP's causal text tower pooled at the EOT token (its argmax id), since no position attends to
    the padding after it; cheaper in proportion: a random text of 8 words fills 10 of OpenAI CLIP's 77
    positions. Other towers (bidirectional, 'last'/'mean' pooling) run on the full context."""
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


def special_token_ids(tokenizer) -> tuple[int, int, int]:
    """(sot, eot, vocab_size) of an open_clip SimpleTokenizer or the miniworld word tokenizer."""
    vocab_size = getattr(tokenizer, "vocab_size", None) or len(tokenizer.encoder)
    return tokenizer.sot_token_id, tokenizer.eot_token_id, vocab_size


# ----------------------------------------------------------------------------------------------
# CLIP's contrastive loss (FLYP and ARF train with it)
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


@dataclass
class ContrastiveLoss:
    """A loss over the whole global batch (InfoNCE: every row is a negative of every other), split in two
    so that common.train can make it exact under torchrun and gradient accumulation:
      embed(model, batch, step) -> {name: [b, ...]}   a micro-batch's rows: embeddings (with gradient)
                                                      and integer group ids
      loss(rows, scale) -> (loss, terms)              the loss on the rows of every micro-batch of the
                                                      step on every process, at temperature `scale`
    train() gathers the rows across processes with gradient (open_clip's gather_features) and, under
    --grad-accum A, uses open_clip's feature-cache scheme: one no-grad embedding pass over the A
    micro-batches, then each micro-batch re-embedded with gradient and the full loss backpropagated
    through its own rows. Exact (the gradients of the full-batch loss); it costs one extra forward of
    every micro-batch when A > 1, and nothing extra when A = 1."""
    embed: Callable
    loss: Callable


def text_ids(texts: list, device) -> torch.Tensor:
    """A group id per text [N], equal exactly for equal texts, on every process (a 56-bit hash, not an
    index into this micro-batch): duplicates are found across the whole global batch."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(t.encode(), digest_size=7).digest(), "big") for t in texts],
                        dtype=torch.long, device=device)


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
# Data: image lists, splits, tasks by name
# ----------------------------------------------------------------------------------------------
class ArrayImages:
    """Images held in memory as uint8 [N, H, W, 3] (miniworld)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, captions: Optional[list] = None):
        self.images, self.labels, self.captions = images, np.asarray(labels, dtype=np.int64), captions

    def __len__(self):
        return len(self.labels)

    def load(self, i: int):
        from PIL import Image

        return Image.fromarray(self.images[i])

    def subset(self, idx):
        idx = np.asarray(idx)
        caps = [self.captions[i] for i in idx] if self.captions is not None else None
        return ArrayImages(self.images[idx], self.labels[idx], caps)


def load_rgb(path: str):
    """Open any image as 8-bit RGB (CMYK, palette, alpha, grayscale, 16-bit); None if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: rescale to 8 bits
                arr = np.asarray(img, dtype=np.float64)
                arr = (255.0 * arr / max(arr.max(), 1.0)).astype(np.uint8)
                return Image.fromarray(arr).convert("RGB")
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError):
        return None


class FileImages:
    """Images on disk given as (path, label) pairs; unreadable files are skipped and counted. `border`
    pixels are cut from every edge on load (ObjectNet's frame)."""

    def __init__(self, paths: list, labels, border: int = 0):
        self.paths, self.labels, self.border = list(paths), np.asarray(labels, dtype=np.int64), border

    def __len__(self):
        return len(self.labels)

    def load(self, i: int):
        img = load_rgb(self.paths[i])
        if img is None or not self.border:
            return img
        b = self.border
        return img.crop((b, b, img.width - b, img.height - b))

    def subset(self, idx):
        return FileImages([self.paths[i] for i in idx], self.labels[np.asarray(idx)], self.border)


def image_keys(images) -> list:
    """Stable per-image cache keys: the absolute path of a file, the content hash of an in-memory array."""
    if isinstance(images, FileImages):
        return [os.path.abspath(p) for p in images.paths]
    return [hashlib.sha1(np.ascontiguousarray(images.images[i]).tobytes()).hexdigest() for i in range(len(images))]


@dataclass
class Split:
    name: str
    kind: str  # train | heldout | id | ood | zeroshot
    images: object  # ArrayImages | FileImages
    classnames: list  # the label space `images.labels` index into
    templates: list  # prompt templates for this split's text head
    class_groups: Optional[list] = None  # scored classes as groups of label-space rows, logit = the group's max;
    # labels index the groups (ImageNet-R/A: 200 groups of one class; ObjectNet: 113 of one or more)


@dataclass
class Task:
    name: str
    classnames: list
    templates: list
    train: Split
    heldout: Split
    tests: list = field(default_factory=list)  # id first, then ood, then zeroshot
    pool: Optional[Callable[[], str]] = None  # a retrieval pool the dataset offers (ARF): builds it, returns its TSV


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

LAYOUTS = {
    "imagenet": """DIR/train/nXXXXXXXX/*.JPEG         (1000 wnid folders)
DIR/val/nXXXXXXXX/*.JPEG           (validation regrouped into wnid folders)
optional OOD sets, scored when present:
DIR/imagenetv2/0 ... 999/*.jpeg    (ImageNet-V2 matched-frequency, folders named by class index)
DIR/imagenet-r/nXXXXXXXX/*.jpg     (200 wnids)
DIR/imagenet-a/nXXXXXXXX/*.jpg     (200 wnids)
DIR/imagenet-sketch/nXXXXXXXX/*.JPEG
DIR/objectnet-1.0/images/<folder>/*.png, DIR/objectnet-1.0/mappings/*   (ObjectNet 1.0 unzipped as shipped;
                                    its 113 ImageNet-overlapping classes are scored)""",
    "domainnet": """DIR/{real,painting,clipart,infograph,sketch}/<class>/*.jpg
DIR/{domain}_train.txt, DIR/{domain}_test.txt   (official split files: '<domain>/<class>/<file> <label>' per line)""",
    "zeroshot": """DIR/<class>/*.jpg                  (one folder per class; the split is named after DIR)
DIR/classnames.txt                 (optional: a class name per line, for the class folders in sorted order;
                                    default: the folder names, '_' read as a space)
DIR/templates.txt                  (optional: a prompt per line, {} for the class name; default: open_clip's
                                    SIMPLE_IMAGENET_TEMPLATES)""",
    "folder": """DIR/train/<class>/*.jpg            (training images, one folder per class)
DIR/<test split>/<class>/*.jpg     (one or more test folders with the same class folder names;
                                    'test' or 'val' is in-distribution, every other folder is OOD)""",
}


def missing_root(data: str, root: str, what: str):
    raise SystemExit(f"error: {what} not found for --data {data} (--data-root {root!r}). Expected layout:\n{LAYOUTS[data]}")


def subfolders(folder: Path) -> list:
    """The sub-folders of a dataset folder, sorted; hidden ones (.ipynb_checkpoints, .DS_Store folders,
    ...) are left out, with one warning naming them."""
    subs = sorted(p for p in folder.iterdir() if p.is_dir())
    hidden = [p.name for p in subs if p.name.startswith(".")]
    if hidden:
        print(f"warning: ignoring hidden folder(s) {', '.join(hidden)} in {folder}")
    return [p for p in subs if not p.name.startswith(".")]


def image_files(folder: Path) -> list:
    return sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTS)


def class_folders_with_images(folder: Path, what: str) -> tuple[list, list]:
    """(class folder names that hold images, the empty ones): a class with no image leaves the label
    space, with one warning naming it."""
    folders = [p.name for p in subfolders(folder)]
    empty = [c for c in folders if not image_files(folder / c)]
    if empty:
        print(f"warning: dropping {len(empty)} class(es) with no {what}: {', '.join(empty)}")
    return [c for c in folders if c not in empty], empty


def scan_class_folders(folder: Path, class_index: dict, dropped=()) -> tuple[list, list]:
    """(paths, labels) for folder/<class>/<image>; folder names are mapped through class_index (the
    folders of `dropped` classes are passed over)."""
    paths, labels = [], []
    for sub in subfolders(folder):
        if sub.name in dropped:
            continue
        if sub.name not in class_index:
            raise SystemExit(f"error: class folder {sub} is not in the training classes {sorted(class_index)[:10]}...")
        files = image_files(sub)
        if not files:
            print(f"warning: empty class folder {sub}: no images of class {sub.name!r} in {folder.name}")
        paths += [str(f) for f in files]
        labels += [class_index[sub.name]] * len(files)
    return paths, labels


def heldout_split(images, seed: int, count: int):
    """Deterministically move `count` training images into a held-out slice for model selection."""
    order = np.random.default_rng(seed + 12345).permutation(len(images))
    count = min(count, len(images) // 10)
    return images.subset(np.sort(order[count:])), images.subset(np.sort(order[:count]))


def load_miniworld(root: str, seed: int) -> Task:
    """The generated world (the miniworld package). It lives in no folder, so --data-root is refused, and
    it is one fixed task whatever the seed: seeds vary the training run (initialisation, data order,
    augmentation), not the test sets or the held-out slice, as on ImageNet."""
    import miniworld

    if root:
        raise SystemExit(f"error: --data miniworld is generated and takes no --data-root (got {root!r})")
    task = miniworld.load_task()
    classnames, templates = task["classnames"], task["templates"]
    splits = []
    for name, s in task["splits"].items():
        images = ArrayImages(s["images"], s["labels"], s.get("captions"))
        splits.append(Split(name, s["kind"], images, s.get("classnames", classnames), s.get("templates", templates)))
    by_kind = {k: [s for s in splits if s.kind == k] for k in ("train", "heldout", "id", "ood", "zeroshot")}
    return Task("miniworld", classnames, templates, by_kind["train"][0], by_kind["heldout"][0],
                by_kind["id"] + by_kind["ood"] + by_kind["zeroshot"], pool=miniworld_pool)


def miniworld_pool() -> str:
    """miniworld's retrieval pool: MINIWORLD_POOL_SIZE captioned images of the pretraining distribution,
    written once into the cache (PNGs + pool.tsv in open_clip's CSV layout)."""
    import miniworld

    out = cache_dir("arf") / f"miniworld-pool-{MINIWORLD_POOL_SIZE}-{digest(sorted(miniworld.world_config().items()))}"
    return str(miniworld.write_pool(out, MINIWORLD_POOL_SIZE))


def imagenet_wnids() -> list:
    """The 1000 ILSVRC-2012 wnids in class-index order (the order of open_clip's IMAGENET_CLASSNAMES).
    open_clip ships no wnid list; timm, its own dependency, does."""
    from timm.data import ImageNetInfo

    return ImageNetInfo().label_names()


def subset_groups(images: FileImages, n_classes: int) -> tuple:
    """(images relabelled into the classes present, their groups) for a split that holds a subset of the
    label space (ImageNet-R/A: 200 of 1000); (images, None) when every class is present."""
    present = sorted(set(images.labels.tolist()))
    if len(present) == n_classes:
        return images, None
    remap = {c: k for k, c in enumerate(present)}
    return FileImages(images.paths, [remap[c] for c in images.labels.tolist()], images.border), [[c] for c in present]


def load_objectnet(folder: Path, classnames: list, templates: list) -> Split:
    """ObjectNet 1.0 (LAYOUTS["imagenet"]): its 113 classes that overlap ImageNet through the mapping files
    shipped with it, each scored as the max logit over its ImageNet classes (the reference evaluation's
    projection), argmax over those 113; images of the other classes are left out; the red frame is cut."""
    maps = folder / "mappings"
    try:
        folder_of = {label: f for f, label in json.loads((maps / "folder_to_objectnet_label.json").read_text()).items()}
        to_imagenet = json.loads((maps / "objectnet_to_imagenet_1k.json").read_text())
        label_2012 = {line.strip(): i for i, line in enumerate((maps / "imagenet_to_label_2012_v2").read_text().splitlines())}
        index_of_2012 = {int(v): int(k) for k, v in json.loads((maps / "pytorch_to_imagenet_2012_id.json").read_text()).items()}
        groups = {folder_of[o]: sorted(index_of_2012[label_2012[n]] for n in names.split("; ")) for o, names in to_imagenet.items()}
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: ObjectNet's mapping files in {maps} are missing or do not agree ({type(e).__name__}: {e}). "
                         f"Expected layout:\n{LAYOUTS['imagenet']}") from None
    names = sorted(groups)  # the overlapping classes by folder name, as the reference orders them
    paths, labels = [], []
    for k, name in enumerate(names):
        files = image_files(folder / "images" / name) if (folder / "images" / name).is_dir() else []
        paths += [str(f) for f in files]
        labels += [k] * len(files)
    others = len(subfolders(folder / "images")) - sum((folder / "images" / n).is_dir() for n in names)
    print(f"ObjectNet: scoring {len(paths)} images of the {len(names)} classes that overlap ImageNet "
          f"(skipping {others} class folders outside the mapping)")
    images = FileImages(paths, labels, border=OBJECTNET_BORDER)
    return Split("objectnet", "ood", images, classnames, templates, class_groups=[groups[n] for n in names])


def load_imagenet(root: str, seed: int) -> Task:
    from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    base = Path(root)
    if not root or not (base / "train").is_dir() or not (base / "val").is_dir():
        missing_root("imagenet", root, "train/ and val/")
    wnids, known = [p.name for p in subfolders(base / "train")], imagenet_wnids()
    unknown, missing = sorted(set(wnids) - set(known)), sorted(set(known) - set(wnids))
    if unknown or missing:  # class names are given by wnid: folders with other names would get wrong ones
        raise SystemExit(f"error: {base/'train'} has {len(wnids)} class folders; ImageNet-1k needs its {len(known)} wnids. "
                         + (f"{len(unknown)} folder(s) are not ImageNet-1k wnids: {', '.join(unknown[:5])}"
                            f"{' ...' if len(unknown) > 5 else ''}. " if unknown else "")
                         + (f"{len(missing)} wnid(s) have no folder: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}."
                            if missing else ""))
    index = {w: i for i, w in enumerate(known)}
    names, templates = list(IMAGENET_CLASSNAMES), list(OPENAI_IMAGENET_TEMPLATES)
    train, heldout = heldout_split(FileImages(*scan_class_folders(base / "train", index)), seed, 10_000)
    tests = [Split("val", "id", FileImages(*scan_class_folders(base / "val", index)), names, templates)]
    v2 = base / "imagenetv2"
    if v2.is_dir():  # folders are class indices: map by integer, never by string order
        paths, labels = [], []
        subs = subfolders(v2)
        other = [p.name for p in subs if not p.name.isdigit() or int(p.name) >= len(names)]
        if other:
            print(f"warning: ignoring {len(other)} folder(s) of {v2} that are not class indices 0-{len(names) - 1}: "
                  f"{', '.join(other[:5])}")
        for sub in sorted((p for p in subs if p.name not in other), key=lambda p: int(p.name)):
            files = image_files(sub)
            paths += [str(f) for f in files]
            labels += [int(sub.name)] * len(files)
        tests.append(Split("imagenet-v2", "ood", FileImages(paths, labels), names, templates))
    for name in ("imagenet-r", "imagenet-a", "imagenet-sketch"):
        if (base / name).is_dir():
            images, groups = subset_groups(FileImages(*scan_class_folders(base / name, index)), len(names))
            tests.append(Split(name, "ood", images, names, templates, groups))
    if (base / "objectnet-1.0").is_dir():
        tests.append(load_objectnet(base / "objectnet-1.0", names, templates))
    return Task("imagenet", names, templates, Split("train", "train", train, names, templates),
                Split("heldout", "heldout", heldout, names, templates), tests)


DOMAINNET_DOMAINS = ("real", "painting", "clipart", "infograph", "sketch")


def read_domainnet_split(base: Path, domain: str, part: str) -> tuple[list, list, dict]:
    listing = base / f"{domain}_{part}.txt"
    if not listing.is_file():
        missing_root("domainnet", str(base), str(listing))
    paths, labels, names = [], [], {}
    for line in listing.read_text().splitlines():
        if not line.strip():
            continue
        rel, label = line.rsplit(maxsplit=1)
        paths.append(str(base / rel))
        labels.append(int(label))
        names.setdefault(int(label), rel.split("/")[1].lower().replace("_", " "))
    return paths, labels, names


def load_domainnet(root: str, seed: int) -> Task:
    """Labels come from the official split files, so every domain shares one class order whatever
    the case of its folder names."""
    from open_clip import OPENAI_IMAGENET_TEMPLATES

    base = Path(root)
    if not root or not base.is_dir():
        missing_root("domainnet", root, "the DomainNet folder")
    train_paths, train_labels, names = read_domainnet_split(base, "real", "train")
    classnames = [names[i] for i in range(len(names))]
    templates = list(OPENAI_IMAGENET_TEMPLATES)
    train, heldout = heldout_split(FileImages(train_paths, train_labels), seed, 5_000)
    tests = []
    for domain in DOMAINNET_DOMAINS:
        if domain != "real" and not (base / f"{domain}_test.txt").is_file():
            continue
        paths, labels, dnames = read_domainnet_split(base, domain, "test")
        clash = {i: (n, classnames[i]) for i, n in dnames.items() if i < len(classnames) and n != classnames[i]}
        if clash:
            raise SystemExit(f"error: {domain}_test.txt labels disagree with real_train.txt: {list(clash.items())[:3]}")
        tests.append(Split(domain, "id" if domain == "real" else "ood", FileImages(paths, labels), classnames, templates))
    return Task("domainnet", classnames, templates, Split("train", "train", train, classnames, templates),
                Split("heldout", "heldout", heldout, classnames, templates), tests)


def load_folder(root: str, seed: int) -> Task:
    from open_clip import SIMPLE_IMAGENET_TEMPLATES

    base = Path(root)
    if not root or not (base / "train").is_dir():
        missing_root("folder", root, "train/")
    folders, empty = class_folders_with_images(base / "train", "training images from the label space")
    index = {c: i for i, c in enumerate(folders)}
    classnames = [c.replace("_", " ") for c in folders]
    templates = list(SIMPLE_IMAGENET_TEMPLATES)
    train, heldout = heldout_split(FileImages(*scan_class_folders(base / "train", index, empty)), seed, 10_000)
    if len(train) == 0:
        raise SystemExit(f"error: no images under {base/'train'}. Expected layout:\n{LAYOUTS['folder']}")
    tests = []
    for sub in (p for p in subfolders(base) if p.name != "train"):
        kind = "id" if sub.name in ("test", "val") else "ood"
        tests.append(Split(sub.name, kind, FileImages(*scan_class_folders(sub, index, empty)), classnames, templates))
    if not tests:
        missing_root("folder", root, "a test folder beside train/")
    tests.sort(key=lambda s: s.kind != "id")
    return Task("folder", classnames, templates, Split("train", "train", train, classnames, templates),
                Split("heldout", "heldout", heldout, classnames, templates), tests)


DATASETS = {"miniworld": load_miniworld, "imagenet": load_imagenet, "domainnet": load_domainnet, "folder": load_folder}


def read_lines(path: Path) -> list:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def load_zeroshot_folder(folder: str) -> Split:
    """A classification dataset scored zero-shot (ARF's cross-dataset transfer: fine-tune on one dataset,
    evaluate on others): LAYOUTS["zeroshot"]. Its head is built from the model's current text tower."""
    from open_clip import SIMPLE_IMAGENET_TEMPLATES

    base = Path(folder)
    if not base.is_dir():
        raise SystemExit(f"error: --zeroshot-data {folder!r} is not a folder. Expected layout:\n{LAYOUTS['zeroshot']}")
    folders, empty = class_folders_with_images(base, f"images from zero-shot split {base.name}")
    if not folders:
        raise SystemExit(f"error: no images under {base}. Expected layout:\n{LAYOUTS['zeroshot']}")
    classnames = [c.replace("_", " ") for c in folders]
    if (base / "classnames.txt").is_file():
        every = sorted(folders + empty)  # the file names every class folder, empty ones too
        names = read_lines(base / "classnames.txt")
        if len(names) != len(every):
            raise SystemExit(f"error: {base / 'classnames.txt'} has {len(names)} names for {len(every)} class folders "
                             "(one name per class folder, in sorted folder order)")
        classnames = [n for n, c in zip(names, every) if c not in empty]
    templates = list(SIMPLE_IMAGENET_TEMPLATES)
    if (base / "templates.txt").is_file():
        templates = read_lines(base / "templates.txt")
        bad = [t for t in templates if t.count("{}") != 1]
        if bad or not templates:
            raise SystemExit(f"error: {base / 'templates.txt'}: every line needs one {{}} for the class name "
                             f"(e.g. 'a photo of a {{}}.'); not {bad[:3] or 'an empty file'}")
    images = FileImages(*scan_class_folders(base, {c: i for i, c in enumerate(folders)}, empty))
    return Split(base.name, "zeroshot", images, classnames, templates)


def load_task(data: str, root: str = "", seed: int = 0, zeroshot_data: str = "") -> Task:
    """--data's task, plus a zero-shot split per folder of --zeroshot-data."""
    check_data(data)
    task = DATASETS[data](root, seed)
    for folder in (f for f in zeroshot_data.split(",") if f.strip()):
        split = load_zeroshot_folder(folder.strip())
        if split.name in {s.name for s in task.tests}:
            raise SystemExit(f"error: --zeroshot-data {folder!r}: a split named {split.name!r} exists already; "
                             "rename the folder")
        task.tests.append(split)
    return task


class TransformedImages(torch.utils.data.Dataset):
    """Applies a transform; an index may carry its own seed so augmentation is a pure function of
    (seed, position in the data stream), which is what makes kill-and-resume bit-exact."""

    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        index, sample_seed = key if isinstance(key, tuple) else (key, None)
        img = self.images.load(index)
        if img is None:
            return {"unreadable": index}
        if sample_seed is None:
            x = self.transform(img)
        else:
            with torch.random.fork_rng(devices=[]):
                # the CPU generator only: torch.manual_seed would also queue a lazy CUDA seeding with
                # a captured stack trace, which cost more than the transform itself
                torch.default_generator.manual_seed(sample_seed)
                x = self.transform(img)
        return {"image": x, "label": int(self.images.labels[index]), "index": index}


def collate_skipping_bad(samples):
    """Default collation of the readable samples; `n_bad` counts the unreadable ones, and `bad` (only
    when there are some) lists their indices so they can be named."""
    good = [s for s in samples if "unreadable" not in s]
    batch = torch.utils.data.default_collate(good) if good else {}
    bad = [s["unreadable"] for s in samples if "unreadable" in s]
    batch["n_bad"] = len(bad)
    if bad:
        batch["bad"] = bad
    return batch


def pop_unreadable(batch: dict) -> list:
    """Takes the unreadable-image bookkeeping out of a collated batch: the indices of its unreadable images."""
    batch.pop("n_bad", None)
    return batch.pop("bad", [])


def name_unreadable(images, indices, what: str) -> str:
    """One warning for the unreadable images of a split, each named (up to 10) and counted once."""
    indices = sorted(set(indices))
    names = [images.paths[i] for i in indices] if isinstance(images, FileImages) else [f"#{i}" for i in indices]
    return (f"warning: skipped {len(indices)} unreadable {what} image(s), each every time it was drawn: "
            + ", ".join(names[:10]) + (" ..." if len(names) > 10 else ""))


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields the micro-batches of steps [start, total) for one process. Sample p of the stream is
    element p % N of the permutation of epoch p // N; its augmentation seed is a hash of (seed, p)."""

    def __init__(self, n: int, global_batch: int, accum: int, rank: int, world: int, seed: int, start: int, total: int):
        assert global_batch % (accum * world) == 0, "batch size must divide by grad_accum × processes"
        self.n, self.B, self.accum, self.rank, self.world = n, global_batch, accum, rank, world
        self.seed, self.start, self.total, self._perms = seed, start, total, {}

    def _perm(self, epoch):
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch]

    def __len__(self):
        return (self.total - self.start) * self.accum

    def __iter__(self):
        micro = self.B // (self.accum * self.world)
        for step in range(self.start, self.total):
            for a in range(self.accum):
                first = step * self.B + (a * self.world + self.rank) * micro
                yield [(self._perm(p // self.n)[p % self.n], (self.seed * 2_654_435_761 + p) % 2**63) for p in range(first, first + micro)]


def shuffled_batches(images, transform, batch_size: int, seed: int, workers: int = 0):
    """Endless full batches of `images` (unreadable ones skipped), reshuffled every pass from `seed`."""
    loader = torch.utils.data.DataLoader(TransformedImages(images, transform), shuffle=True,
                                         batch_size=min(batch_size, len(images)), num_workers=workers,
                                         collate_fn=collate_skipping_bad, drop_last=True,
                                         generator=torch.Generator().manual_seed(seed))
    while True:
        yield from loader


# ----------------------------------------------------------------------------------------------
# Caches and retrieval pools: image-text pairs in open_clip's CSV layout, cached embeddings, faiss
# ----------------------------------------------------------------------------------------------
EXACT_MAX = 1_000_000  # pools with fewer rows are searched exactly; larger ones with an IVF index
PQ_MIN = 20_000_000  # from here on IVF stores PQ codes (float vectors would not fit in RAM)
IVF_NPROBE = 8  # inverted lists visited per query (recall@10 0.99 on bench/retrieval.py's pool)
EMBED_CHUNK = 8192  # images per embedding chunk: the unit of sharding over processes and of resuming


def cache_dir(sub: str) -> Path:
    """$ROBUSTFT_CACHE/sub (default ~/.cache/robust-ft/sub), created."""
    root = Path(os.environ.get("ROBUSTFT_CACHE", Path.home() / ".cache" / "robust-ft")) / sub
    root.mkdir(parents=True, exist_ok=True)
    return root


def digest(*parts) -> str:
    return hashlib.sha1("\x1f".join(map(str, parts)).encode()).hexdigest()[:16]


def clean(text: str) -> str:
    return " ".join(str(text).split())  # one line, no tabs: caption caches are TSVs


def read_pool(path: str, img_key: str, caption_key: str, sep: str):
    """(FileImages of the pool, captions, rows skipped). Skips rows with a missing column, an empty
    caption or an image file that does not exist; relative paths are relative to the pool file."""
    base, paths, captions, bad = Path(path).resolve().parent, [], [], 0
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter=sep)
        if not reader.fieldnames or img_key not in reader.fieldnames or caption_key not in reader.fieldnames:
            raise SystemExit(f"error: pool {path} has columns {reader.fieldnames}; expected --pool-img-key {img_key!r} "
                             f"and --pool-caption-key {caption_key!r} (separator {sep!r})")
        for row in reader:
            p, text = row.get(img_key), row.get(caption_key)
            if not p or not text or not text.strip() or None in row:
                bad += 1
                continue
            p = p if os.path.isabs(p) else str(base / p)
            if not os.path.isfile(p):
                bad += 1
                continue
            paths.append(p)
            captions.append(clean(text))
    return FileImages(paths, np.zeros(len(paths), dtype=np.int64)), captions, bad


def shard_chunks(n: int, chunk: int) -> list:
    """This process's chunks of range(n): chunk c (rows c·chunk ...) belongs to process c mod world, so
    every process gets an equal share and the chunks are the same whatever the number of processes."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return shard_chunks_all(n, chunk)[rank::world]


@torch.inference_mode()
def embed_images(clip, images, transform, cache_file: Path, batch_size: int, device, workers: int = 0,
                 chunk: Optional[int] = None):
    """n(f(x)) of every image as a float16 [N, D] memmap cached in cache_file, plus a [N] mask of the
    readable ones; a rerun memory-maps the file. Every process calls it: the images are embedded in
    chunks of EMBED_CHUNK (sharded over processes by shard_chunks, bf16 autocast on CUDA), each chunk
    saved when done (cache_file.chunkNNNNNN.npz), so a killed run resumes at its first unfinished
    chunk; process 0 then joins the chunks into cache_file."""
    from tqdm import tqdm

    chunk = chunk or EMBED_CHUNK
    mask_file = cache_file.with_suffix(".ok.npy")
    part = lambda r: cache_file.with_suffix(f".chunk{r.start // chunk:06d}.npz")  # noqa: E731
    if not cache_file.is_file():
        todo = [r for r in shard_chunks(len(images), chunk) if not part(r).is_file()]
        bar = tqdm(total=sum(len(r) for r in todo), desc=f"embedding {len(images)} images", unit="img")
        for r in todo:
            emb, ok = None, np.zeros(len(r), dtype=bool)
            loader = torch.utils.data.DataLoader(TransformedImages(images.subset(list(r)), transform), batch_size=batch_size,
                                                 num_workers=workers, collate_fn=collate_skipping_bad)
            for batch in loader:
                if "image" in batch:
                    with autocast(device):
                        z = F.normalize(clip.encode_image(batch["image"].to(device)).float(), dim=-1).cpu().numpy()  # [b, D]
                    emb = np.zeros((len(r), z.shape[1]), dtype=np.float16) if emb is None else emb
                    emb[batch["index"].numpy()] = z
                    ok[batch["index"].numpy()] = True
                bar.update(len(batch.get("index", [])) + batch["n_bad"])
            tmp = part(r).with_suffix(".tmp.npz")
            np.savez(tmp, emb=emb if emb is not None else np.zeros((len(r), 0), dtype=np.float16), ok=ok)
            os.replace(tmp, part(r))  # a finished chunk: a rerun skips it
        bar.close()
        barrier()
        if is_main_process():
            parts = [np.load(part(r)) for r in shard_chunks_all(len(images), chunk)]
            dims = {p["emb"].shape[1] for p in parts if p["ok"].any()}
            if not dims:
                raise SystemExit(f"error: none of the {len(images)} images could be read")
            partial = cache_file.with_suffix(".partial.npy")
            out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=(len(images), dims.pop()))
            for r, p in zip(shard_chunks_all(len(images), chunk), parts):
                if p["ok"].any():
                    out[r.start:r.stop] = p["emb"]
            out.flush()
            del out
            np.save(mask_file, np.concatenate([p["ok"] for p in parts]))
            os.replace(partial, cache_file)
            for r in shard_chunks_all(len(images), chunk):
                part(r).unlink()
        barrier()
    return np.load(cache_file, mmap_mode="r"), np.load(mask_file)


def shard_chunks_all(n: int, chunk: int) -> list:
    """Every chunk of range(n), in order (what shard_chunks hands out over all processes)."""
    return [range(s, min(n, s + chunk)) for s in range(0, n, chunk)]


def build_index(emb: np.ndarray, verbose: bool = True):
    """Inner-product faiss index over unit rows [N, D]: exact below EXACT_MAX rows, IVF beyond
    (nlist ≈ 4√N, faiss's guideline; k-means on a 40·nlist sample), PQ codes beyond PQ_MIN."""
    import faiss

    n, d = emb.shape
    if n < EXACT_MAX:
        spec = "Flat"
    else:
        nlist = 1 << round(math.log2(4 * math.sqrt(n)))
        spec = f"IVF{nlist},Flat" if n < PQ_MIN else f"IVF{nlist},PQ{d // 8}"
    index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        sample = np.random.default_rng(0).choice(n, min(n, 40 * nlist), replace=False)
        index.train(np.ascontiguousarray(emb[np.sort(sample)], dtype=np.float32))
        faiss.extract_index_ivf(index).nprobe = IVF_NPROBE
    for i in range(0, n, 262_144):
        index.add(np.ascontiguousarray(emb[i:i + 262_144], dtype=np.float32))
    if verbose:
        print(f"faiss index: {spec}" + (f", nprobe {IVF_NPROBE}" if spec != "Flat" else " (exact)") + f" over {n} pool images")
    return index


def search(index, queries: np.ndarray, k: int, chunk: int = 65_536) -> np.ndarray:
    """Indices [Q, k] of the k nearest rows per query (-1 where fewer exist)."""
    return np.concatenate([index.search(np.ascontiguousarray(queries[i:i + chunk], dtype=np.float32), k)[1]
                           for i in range(0, len(queries), chunk)])


# ----------------------------------------------------------------------------------------------
# Metrics and evaluation
# ----------------------------------------------------------------------------------------------
def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> dict:
    """Accuracy, expected calibration error (equal-width confidence bins) and NLL."""
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
    return {"acc": correct.mean().item(), "ece": ece.item(), "nll": nll.item(), "n": len(labels)}


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


@torch.inference_mode()
def predict(forward: Callable, images, transform, device, batch_size: int = 512, workers: int = 0, shard: bool = False):
    """Runs `forward(images) -> logits` over an image list; returns (logits [N,K], labels [N], n_bad),
    unreadable images skipped. shard: under torchrun every process scores every world-th image and the
    shards are gathered back into the images' order on every process (sharded evaluation)."""
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
    return torch.cat(outs)[order], torch.cat(labels)[order], bad


def split_head(model: ClipClassifier, split: Split, task: Task) -> torch.Tensor:
    """The classification head to score a split: the trained head for the task's own classes, a
    fresh text head from the model's (current) text tower for zero-shot transfer splits."""
    if split.kind == "zeroshot" or split.classnames != task.classnames:
        return zeroshot_head(model.clip, model.tokenizer, split.classnames, split.templates)
    return model.head.detach()


@torch.no_grad()
def split_logits(model: ClipClassifier, split: Split, task: Task, transform, device, batch_size=512, workers=0) -> tuple:
    """(logits [N, K], labels [N], n_bad) of one split; with class groups (ImageNet-R/A, ObjectNet) the
    logits are the groups' [N, G] and the labels index the groups."""
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

    return predict(forward, split.images, transform, device, batch_size, workers, shard=True)


def evaluate_split(model: ClipClassifier, split: Split, task: Task, transform, device, batch_size=512, workers=0) -> dict:
    logits, labels, bad = split_logits(model, split, task, transform, device, batch_size, workers)
    return {**classification_metrics(logits, labels), "skipped": bad}


def evaluate_task(model, task: Task, transform, device, batch_size=512, workers=0, splits=None) -> list:
    """A row of metrics per split (under torchrun: every process scores its shard, all get the rows)."""
    rows = []
    for split in splits or task.tests:
        metrics = evaluate_split(model, split, task, transform, device, batch_size, workers)
        rows.append({"split": split.name, "kind": split.kind, **metrics})
        if is_main_process():
            print(f"  {split.name:<16} {split.kind:<9} acc {100*metrics['acc']:6.2f}  ece {metrics['ece']:.4f}  nll {metrics['nll']:.4f}"
                  + (f"  (skipped {metrics['skipped']} unreadable)" if metrics["skipped"] else ""))
    return rows


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


def summary(rows: list) -> tuple:
    """(ID acc, OOD mean, zero-shot-transfer mean) in % from evaluation rows."""
    mean = lambda kind: 100 * float(np.mean([r["acc"] for r in rows if r["kind"] == kind] or [np.nan]))  # noqa: E731
    return mean("id"), mean("ood"), mean("zeroshot")


# ----------------------------------------------------------------------------------------------
# Runs: directories, results, checkpoints, loading a finished run and its θ0
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
    one file (bench/reproduce.py --workers N) never tear or interleave a line."""
    import fcntl

    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)  # closing releases the lock


def check_run(args, method: str) -> Path:
    """The run directory's path, refusing (before anything slow) to overwrite a started run unless
    --resume, or to resume a finished one. Nothing is created: start_run does that."""
    run = Path(args.out or f"runs/{method}-{args.data}-{Path(args.model).stem}-s{args.seed}")
    if is_main_process():
        if (run / "args.json").exists() and not args.resume:
            raise SystemExit(f"error: {run} already holds a run. Pass --resume to continue it, or --out NEW_DIR.")
        if args.resume and (run / "final.pt").exists():
            raise SystemExit(f"error: {run} is finished (final.pt; its rows are in {run / 'results.jsonl'}): nothing to "
                             "resume. Evaluate it with `python evaluate.py eval --ckpt RUN`, or train anew with --out NEW_DIR.")
    return run


def start_run(env, args):
    """Creates the run directory and its args.json, once the run can start (training begins, or a
    zero-shot model is evaluated): a start that fails earlier leaves nothing behind to refuse a rerun."""
    if getattr(env, "started", False):
        return
    if is_main_process():
        (env.run / "ckpt").mkdir(parents=True, exist_ok=True)
        (env.run / "args.json").write_text(json.dumps({"method": env.method, **dataclasses.asdict(args)}, indent=2))
        print(f"run folder: {env.run}")
    barrier()
    env.started = True


def log_results(run: Path, method: str, args, rows: list, step: int, tag: str = ""):
    """Appends one line per split to run/results.jsonl and to the runs root's results.jsonl."""
    if not is_main_process():
        return
    common = {"run": str(run), "method": method, "tag": tag, "data": args.data, "model": args.model,
              "pretrained": args.pretrained, "step": step, "seed": args.seed, "commit": git_commit(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    lines = "".join(json.dumps({**common, **row}) + "\n" for row in rows)
    for path in {run / "results.jsonl", run.parent / "results.jsonl"}:
        append_lines(path, lines)


def checkpoint_meta(args, method: str, task: Task, head_from_text: bool = False) -> dict:
    return {"method": method, "model": args.model, "pretrained": args.pretrained, "data": args.data,
            "classnames": task.classnames, "head_from_text": head_from_text}


def head_is_from_text(meta: dict) -> bool:
    """Whether a checkpoint classifies with the head of its own text tower (FLYP, ARF): then any new
    weights made from it (WiSE-FT, TPGM, soups) must rebuild the head from their text tower too.
    Checkpoints written before the flag existed are known by their method."""
    return meta.get("head_from_text", meta["method"].split("+")[0] in ("flyp", "arf"))


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


def load_run(path, device, data_root: str = "", tasks: Optional[dict] = None, zeroshot_data: Optional[str] = None):
    """A run directory (or its final.pt / a step checkpoint) -> namespace(dir, args, meta, model, task,
    seed, data_root, eval_tf, method). `tasks` caches loaded tasks across calls; the zero-shot folders
    are the run's own (args.json) unless `zeroshot_data` names others."""
    ckpt = Path(path)
    run = ckpt.parent if ckpt.is_file() else ckpt
    if not (run / "args.json").is_file():
        raise SystemExit(f"error: {run} has no args.json; pass a run directory written by a method file")
    args = json.loads((run / "args.json").read_text())
    key = (args["data"], data_root or args.get("data_root", ""), args.get("seed", 0),
           args.get("zeroshot_data", "") if zeroshot_data is None else zeroshot_data)
    tasks = {} if tasks is None else tasks
    if key not in tasks:
        tasks[key] = load_task(*key)
    model, meta, pp = load_classifier(ckpt, device, tasks[key])
    return argparse.Namespace(dir=run, args=args, meta=meta, model=model, task=tasks[key], seed=key[2],
                              data_root=key[1], eval_tf=image_transforms(pp, 1.0)[1], method=meta["method"])


def run_theta0(run, device) -> ClipClassifier:
    """θ0 of a loaded run, built the way `setup` built it: seed, load the CLIP, zero-shot head (so a
    randomly initialised --model comes back with the run's own initial weights)."""
    seed_everything(run.seed)
    clip, tokenizer, _ = load_clip(run.meta["model"], run.meta["pretrained"], device)
    head = zeroshot_head(clip, tokenizer, run.task.classnames, run.task.templates, device)
    return ClipClassifier(clip, head, tokenizer).to(device).eval()


def run_endpoints(run, device) -> tuple:
    """(θ0, θ_ft) state dicts of a loaded run, what weight-space methods combine; θ0 is rebuilt as
    `setup` built it. If the model name or weights file changed since the run was trained (say, a
    rebuilt assets/miniclip.pt), not even the frozen tensors (the text tower for FT) match: said."""
    state1 = {k: v.clone() for k, v in run.model.state_dict().items()}
    state0 = run_theta0(run, device).state_dict()
    if not any(torch.equal(v, state1[k]) for k, v in state0.items()):
        print(f"warning: every tensor of {run.dir} differs from the rebuilt θ0 ({run.meta['model']}, "
              f"pretrained={run.meta['pretrained']!r}). Fine if {run.method} trains all of CLIP; otherwise those "
              "weights changed since the run, and the merge would interpolate towards the wrong θ0.")
    return state0, state1


def load_run_weights(run, state: dict) -> dict:
    """Loads weights made from a run (a merge) into run.model; a run that classifies with its text tower's head (FLYP,
    ARF) gets the head rebuilt from the merged text tower, not the merged head tensor. Returns the
    state as evaluated (and saved)."""
    run.model.load_state_dict(state)
    if head_is_from_text(run.meta):
        rebuild_head_from_text(run.model, run.task)
    return {k: v.clone() for k, v in run.model.state_dict().items()}


def save_run(out: Path, state: dict, run, method: str, extra: dict):
    """final.pt + args.json for weights made from a loaded `run` (a merge), so they are a run themselves that
    evaluate.py and merge.py accept."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_save({"model": state, "meta": {**run.meta, "method": method}}, out / "final.pt")
    (out / "args.json").write_text(json.dumps({**run.args, "method": method, "out": str(out), **extra}, indent=2))


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


def check_same_init(runs: list):
    """Soups average weights, which only makes sense from one initialisation and architecture: the same
    model, weights file, classes and state-dict layout, and (for a randomly initialised model) the same
    initial weights whatever the seeds."""
    first = runs[0]
    for r in runs[1:]:
        if r.meta["model"] != first.meta["model"]:
            raise SystemExit(f"error: {r.dir} is a {r.meta['model']} and {first.dir} a {first.meta['model']}: "
                             "weights of different architectures cannot be averaged")
        if r.meta["pretrained"] != first.meta["pretrained"]:
            raise SystemExit(f"error: {r.dir} starts from pretrained={r.meta['pretrained']!r} and {first.dir} from "
                             f"{first.meta['pretrained']!r}: soups need one shared initialisation")
        if r.meta["classnames"] != first.meta["classnames"]:
            raise SystemExit(f"error: {r.dir} and {first.dir} were fine-tuned on different class lists")
    check_compatible([r.model.state_dict() for r in runs], [str(r.dir) for r in runs])
    seeds = sorted({r.seed for r in runs})
    if len(seeds) > 1:  # a random-init architecture differs per seed: compare the actual θ0 weights
        ref = None
        for s in seeds:
            seed_everything(s)
            clip = load_clip(first.meta["model"], first.meta["pretrained"], "cpu")[0].state_dict()
            if ref is not None and any(not torch.equal(ref[k], clip[k]) for k in ref):
                raise SystemExit(f"error: runs with seeds {seeds[0]} and {s} start from different weights "
                                 f"({first.meta['model']} with pretrained={first.meta['pretrained']!r} is initialised "
                                 "randomly per seed): soups need one shared initialisation")
            if ref is None:
                ref = clip
        print(f"note: members were trained with seeds {seeds}; held-out selection uses seed {first.seed}'s "
              "slice, which for --data folder/imagenet/domainnet overlaps the other seeds' training images")


def run_log_args(run, seed=None):
    """The fields `log_results` reads, from a loaded run (for rows written after training: merges, evals)."""
    return argparse.Namespace(data=run.args["data"], model=run.meta["model"], pretrained=run.meta["pretrained"],
                              seed=run.seed if seed is None else seed)


# ----------------------------------------------------------------------------------------------
# Plots: ID vs OOD accuracy (evaluate.py's tables and merge.py's WiSE-FT curves)
# ----------------------------------------------------------------------------------------------
def plot_id_vs_ood(points: list, curves: dict, out: str, id_label: str = "ID"):
    """One ID-vs-OOD picture. points: [(label, id, ood, id_err, ood_err)] drawn with error bars;
    curves: {label: [(alpha, id, ood), ...]} drawn as dashed lines in alpha order (WiSE-FT), with α = 0.5
    marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # 20 distinct colours: a full table has more than 10 rows
    markers = "osD^v<>ph*X"
    for n, (label, x, y, xerr, yerr) in enumerate(points):
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=markers[n % len(markers)], capsize=3, label=label)
    for label, pts in curves.items():
        pts = sorted(pts)
        ax.plot([p[1] for p in pts], [p[2] for p in pts], "--.", label=label)
        for alpha, x, y in pts:
            if alpha == 0.5:
                ax.annotate("α=0.5", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel(f"{id_label} accuracy (%)")
    ax.set_ylabel("OOD accuracy (mean over shifts, %)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"wrote {out}")


# ----------------------------------------------------------------------------------------------
# Distributed helpers (torchrun): gloo on CPU, nccl on GPU
# ----------------------------------------------------------------------------------------------
def init_distributed(device: torch.device) -> tuple[int, int]:
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        atexit.register(close_distributed)
    return dist.get_rank(), dist.get_world_size()


PEERS_LOST = []  # set once a run has lost a process: its process group must not be torn down politely


def close_distributed():
    """At exit: destroy the process group, so no backend thread outlives the interpreter (a gloo process
    that skipped this sometimes aborted at exit: "terminate called without an active exception"). Not
    after a lost process, where the group is broken and an NCCL teardown could wait on the dead peer."""
    if dist.is_initialized() and not PEERS_LOST:
        dist.destroy_process_group()


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


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


# ----------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------
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


class NonFiniteLoss(RuntimeError):
    pass


@torch.no_grad()
def ema_update(ema_params: list, params: list, decay: float):
    """θ_ema ← m · θ_ema + (1 − m) · θ in place. lerp is exact at the ends: m = 0 copies θ, m = 1
    keeps θ_ema."""
    for e, p in zip(ema_params, params):
        e.lerp_(p, 1.0 - decay)


def rebuild_head_from_text(model: ClipClassifier, task: Task):
    """The head of the model's current text tower (zero-shot head of the task's classes and templates):
    what a method that trains the text tower (FLYP, ARF) classifies with."""
    model.head.data = zeroshot_head(model.clip, model.tokenizer, task.classnames, task.templates, model.head.device)


LOST = "lost a process"  # marks the SystemExit of a run whose process group lost a member


def watch_peers(run: Path, rank: int, world: int):
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


def train(env, loss_fn: Callable, args, *, ema_decay: Optional[float] = None, head_from_text: bool = False,
          streams: Optional[dict] = None) -> nn.Module:
    """Optimises the parameters of `env.model` that require grad with `loss_fn(model, batch, step)`
    and returns the model to evaluate.

    AdamW (fused on CUDA), linear warm-up + cosine, bf16 autocast on CUDA, gradient accumulation,
    gradient clipping, held-out evaluation every `eval_every` steps, atomic checkpoints every
    `ckpt_every` steps (model, optimiser, scheduler, RNG, step, EMA), `--resume`, and under torchrun
    DistributedDataParallel's bucketed gradient averaging (overlapping backward; micro-batches before
    the step's last are accumulated without it). A ContrastiveLoss is computed over the global batch
    (gathered across processes, exact under accumulation). After every optimiser step, in this order:
    a trained logit scale is clamped to [0, MAX_LOGIT_SCALE]; the EMA is updated; the held-out slice is
    scored (sharded over processes), when due.
      ema_decay       keep θ_ema ← m·θ_ema + (1−m)·θ of the trainable weights (m = ema_decay, θ_ema = θ0
                      at the start); the held-out checks score it and it is what train returns.
      head_from_text  the head is rebuilt from the current text tower before every held-out check and
                      at the end (methods whose loss trains the text tower, not the head).
      streams         {name: (images, global batch)}: extra data, each micro-batch's share of it under
                      batch[name]. Stream i is its own StepBatchSampler stream (seed + 1 + i) with the
                      training transform, so its batches too are a function of (seed, step)."""
    model, task, run, device = env.model, env.task, env.run, env.device
    rank, world = init_distributed(device)
    from tqdm import tqdm

    for what, bs in [("--batch-size", args.batch_size)] + [(f"the {n} stream's batch", b) for n, (_, b) in (streams or {}).items()]:
        if bs % (args.grad_accum * world):
            raise SystemExit(f"error: {what} {bs} does not split into --grad-accum {args.grad_accum} x {world} processes "
                             "equal micro-batches")
    start_run(env, args)
    env.head_from_text = head_from_text  # recorded in final.pt: merges rebuild such a head too
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, args.steps, args.warmup))
    ema = copy.deepcopy(model).requires_grad_(False) if ema_decay is not None else None
    ema_pairs = [(e, p) for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad] if ema else []
    scale_trains = model.clip.logit_scale.requires_grad

    start = 0
    if args.resume:
        path, ckpt = newest_checkpoint(run)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            if ema is not None:
                ema.load_state_dict(ckpt["ema"])
            set_rng_state(ckpt["rng"])
            start = ckpt["step"]
            print(f"resuming from {path} (step {start}/{args.steps})")
            if is_main_process() and (run / "log.jsonl").exists():  # the steps after the checkpoint are redone: drop their lines
                kept = [x for x in (run / "log.jsonl").read_text().splitlines(keepends=True)
                        if x.strip().startswith("{") and x.endswith("\n") and json.loads(x)["step"] <= start]
                (run / "log.jsonl").write_text("".join(kept))
        else:
            print(f"no readable checkpoint in {run/'ckpt'}; starting from step 0")

    def save_checkpoint(step):
        if not is_main_process():
            return
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "ema": ema.state_dict() if ema is not None else None, "rng": rng_state(), "step": step}
        atomic_save(state, run / "ckpt" / f"step_{step}.pt")
        for old in step_checkpoints(run)[:-2]:
            old.unlink()  # keep the two newest: one may be mid-write when a job is killed

    def stream(images, global_batch, seed, pin):
        sampler = StepBatchSampler(len(images), global_batch, args.grad_accum, rank, world, seed, start, args.steps)
        return iter(torch.utils.data.DataLoader(TransformedImages(images, env.train_tf), batch_sampler=sampler,
                                                num_workers=args.workers, collate_fn=collate_skipping_bad,
                                                pin_memory=pin, persistent_workers=args.workers > 0))

    def to_device(batch):
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    batch_iter = stream(task.train.images, args.batch_size, args.seed, device.type == "cuda")
    extra = {name: stream(images, bs, args.seed + 1 + i, False) for i, (name, (images, bs)) in enumerate((streams or {}).items())}
    log = open(run / "log.jsonl", "a") if is_main_process() else None
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=not is_main_process(), dynamic_ncols=True)
    bad_images = {}  # "training" / stream name -> indices of unreadable images drawn
    stepper = LossOf(model, loss_fn)
    if world > 1:  # gradients averaged in buckets during backward; the parameters are broadcast from rank 0
        stepper = nn.parallel.DistributedDataParallel(stepper, broadcast_buffers=False, gradient_as_bucket_view=True)
    accum = args.grad_accum

    def synced_unless(last: bool):  # gradient accumulation: average across processes only on the step's last backward
        return stepper.no_sync() if world > 1 and not last else contextlib.nullcontext()

    def check_finite(loss, terms, step):
        if not torch.isfinite(loss):
            last = step_checkpoints(run)
            raise NonFiniteLoss(
                f"loss is {loss.item()} at step {step} (terms: { {k: float(v) for k, v in terms.items()} }). "
                f"Last good checkpoint: {last[-1] if last else 'none'}. Lower --lr or check the data.")

    def scalars(loss, terms, parts=1) -> dict:
        return {k: float(v.detach() if torch.is_tensor(v) else v) / parts for k, v in {"loss": loss, **terms}.items()}

    def backward_mean(micro: list, step: int) -> dict:
        """A loss that is a mean over images: each micro-batch's share, backpropagated in turn."""
        terms_sum = {}
        for j, batch in enumerate(micro):
            with synced_unless(j == accum - 1):
                with autocast(device):
                    loss, terms = stepper(batch, step)
                check_finite(loss, terms, step)
                (loss / accum).backward()
            for k, v in scalars(loss, terms, accum).items():
                terms_sum[k] = terms_sum.get(k, 0.0) + v
        return terms_sum

    def backward_global_batch(micro: list, step: int) -> dict:
        """A ContrastiveLoss: the rows of every micro-batch of every process, open_clip's feature cache."""
        cached = []
        if accum > 1:
            with torch.no_grad(), autocast(device):
                cached = [stepper(b, step) for b in micro]
        for j, batch in enumerate(micro):
            with synced_unless(j == accum - 1):
                with autocast(device):
                    own = stepper(batch, step)  # this micro-batch's rows, with gradient
                    parts = [own if i == j else c for i, c in enumerate(cached)] or [own]
                    rows = {k: torch.cat([p[k] for p in parts]) for k in own}
                    rows = gather_rows(rows) if world > 1 else rows
                    scale = model.scale  # its gradient counted once per step, not once per pass:
                    scale = scale.detach() + (scale - scale.detach()) / accum if accum > 1 else scale
                    loss, terms = loss_fn.loss(rows, scale)
                check_finite(loss, terms, step)
                loss.backward()
        return scalars(loss, terms)  # every pass computes the same full-batch loss

    select = args.select == "heldout"  # keep the weights of the best held-out step
    best_file = run / "ckpt" / "best.pt"
    best = {"acc": -1.0, "step": None}
    if select and start and best_file.is_file():  # a resumed run knows its best step so far
        best.update({k: v for k, v in torch.load(best_file, map_location="cpu", weights_only=False).items() if k != "model"})
    model.train()
    peers = watch_peers(run, rank, world)  # under torchrun: a lost process stops this one with a message
    try:
        for step in bar:
            micro = []
            for _ in range(accum):
                batch = next(batch_iter)
                for name, it in extra.items():
                    batch[name] = next(it)
                    bad_images.setdefault(name, []).extend(pop_unreadable(batch[name]))
                    batch[name] = to_device(batch[name])
                bad_images.setdefault("training", []).extend(pop_unreadable(batch))
                micro.append(to_device(batch))
            terms_sum = (backward_global_batch if isinstance(loss_fn, ContrastiveLoss) else backward_mean)(micro, step)
            if args.clip_grad > 0:
                terms_sum["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, args.clip_grad))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if scale_trains:
                with torch.no_grad():
                    model.clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            if ema is not None:
                ema_update([e for e, _ in ema_pairs], [p for _, p in ema_pairs], ema_decay)
            bar.set_postfix({k: f"{v:.4g}" for k, v in terms_sum.items()})
            record = {"step": step + 1, "lr": sched.get_last_lr()[0], **terms_sum}
            due = args.eval_every and (step + 1) % args.eval_every == 0
            if due and (step + 1 < args.steps or select):  # every process: sharded; --select scores the last step too
                if head_from_text:
                    rebuild_head_from_text(model, task)
                scored = ema if ema is not None else model
                record["heldout_acc"] = evaluate_split(scored, task.heldout, task, env.eval_tf, device, args.eval_batch_size)["acc"]
                if is_main_process():
                    bar.write(f"step {step+1}: held-out acc {100*record['heldout_acc']:.2f}")
                if select and record["heldout_acc"] > best["acc"]:  # strictly better: the earliest of equals wins
                    best.update(acc=record["heldout_acc"], step=step + 1)
                    if is_main_process():
                        atomic_save({**best, "model": scored.state_dict()}, best_file)
                    barrier()
                model.train()
            if log:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if args.ckpt_every and (step + 1) % args.ckpt_every == 0 and step + 1 < args.steps:
                save_checkpoint(step + 1)
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

    for what, indices in bad_images.items():
        if indices and is_main_process():
            print(name_unreadable(task.train.images if what == "training" else streams[what][0], indices, what))
    if log:
        log.close()
    result = ema if ema is not None else model
    if select:  # the weights to evaluate are the best held-out step's; the rows will say which
        result.load_state_dict(torch.load(best_file, map_location="cpu", weights_only=False)["model"])
        env.selected_step = best["step"]
        if is_main_process():
            print(f"--select heldout: step {best['step']} (held-out acc {100 * best['acc']:.2f}) is evaluated")
    elif head_from_text:
        rebuild_head_from_text(model, task)
    model.eval()
    return result.eval()


def finish(env, args, model: Optional[nn.Module] = None, tag: str = "", step: Optional[int] = None) -> list:
    """The end of every method's main: final.pt, evaluation on every test split, results.jsonl."""
    model = model or env.model
    start_run(env, args)
    if is_main_process():
        meta = checkpoint_meta(args, env.method, env.task, getattr(env, "head_from_text", False))
        atomic_save({"model": model.state_dict(), "meta": meta}, env.run / "final.pt")
        print(f"{env.method} on {env.task.name}: evaluating {len(env.task.tests)} splits")
    rows = evaluate_task(model, env.task, env.eval_tf, env.device, args.eval_batch_size, args.workers)  # sharded
    if not is_main_process():
        return []
    selected = getattr(env, "selected_step", None)
    if selected is not None:  # --select heldout: the rows are the chosen step's
        rows = [{**r, "selected_step": selected, "select": "heldout"} for r in rows]
    log_results(env.run, env.method, args, rows, selected or (args.steps if step is None else step), tag)
    print(f"{env.method}: final.pt and results.jsonl in {env.run}")
    return rows


def setup(args, method: str, run_dir: bool = True):
    """The start of every method's main: seed, device, task, CLIP, transforms, zero-shot classifier,
    run directory (none with run_dir=False: a step that trains nothing). Returns a namespace."""
    device = get_device(args.device)
    seed_everything(args.seed, device)
    args.workers = min(args.workers, os.cpu_count() or 1)
    init_distributed(device)
    resolve_model(args.model, args.pretrained)  # a wrong --model fails before the task loads
    run = check_run(args, method) if run_dir else None  # and a run folder that is taken
    resumed = json.loads((run / "args.json").read_text()).get("threads", 0) if args.resume and run and (run / "args.json").is_file() else 0
    args.threads = set_threads(args.threads, resumed)  # args.json records the count used
    task = load_task(args.data, args.data_root, args.seed, args.zeroshot_data)
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
    return argparse.Namespace(device=device, clip=clip, tokenizer=tokenizer, task=task, train_tf=train_tf,
                              eval_tf=eval_tf, model=model, run=run, method=method)
