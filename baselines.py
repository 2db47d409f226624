"""Baselines the robust fine-tuning papers compare against, one short loss each.

  zeroshot  the pretrained CLIP with the text-built head W, no training.
  ft        standard fine-tuning (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"):
            cross-entropy on logits s · n(f_θ(x)) @ Wᵀ, head W initialised from the zero-shot head,
            image tower + head trainable, text tower and logit scale s frozen.
  lp        linear probe: only the head trains (from W); the image tower stays θ0.
  lpft      LP-FT (Kumar et al. 2022): FT whose head starts from an LP run's head.
  scratch   Scratch-FT: FT whose head starts at zero.
  ema       FT, evaluated at the exponential moving average of its weights.
  l2sp      FT pulled towards θ0 in weight space (Xuhong et al. 2018).
  kd        FT pulled towards the zero-shot model's outputs (Hinton et al. 2015).
  featkd    FT pulled towards the zero-shot model's image embeddings.
  flyp      FLYP (Goyal et al. 2023, "Finetune like you pretrain"): no CE head; CLIP's own contrastive loss
            between each image and its class prompt, both towers + s train; the head is rebuilt from
            the fine-tuned text tower for evaluation.

      L_FT(θ, W)  = CE(s · n(f_θ(x)) Wᵀ, y)                       (lp, lpft, scratch, ema: same loss)
      L_L2SP      = L_FT + λ/2 · ‖θ − θ0‖²                         (θ = image tower, head excluded)
      L_KD        = L_FT + λ τ² · KL(softmax(z0/τ) ‖ softmax(z/τ))  (z0 = zero-shot logits, same batch)
      L_FeatKD    = L_FT + λ · ‖f_θ(x) − f_θ0(x)‖²
      L_FLYP      = ½ [CE(S, I) + CE(Sᵀ, I)],  S_ij = s · n(f_θ(x_i)) · n(g_φ(prompt(y_j)))
      EMA         θ_ema ← m · θ_ema + (1 − m) · θ after every step, θ_ema = θ0 at the start

Choices where the papers are silent:
  * LP optimiser: AdamW in the same loop (augmentation, schedule, checkpoints) as FT, head only, lr
    10× FT's and no weight decay (decoupled decay would shrink the head towards 0, not towards W);
    not L-BFGS on cached features, so LP is resumable and LP-FT's head saw FT's augmentation.
  * LP-FT hand-off: `--method lp` first, then `--method lpft` loads the head from that run's final.pt
    (`--lp-run`, default the LP run of the same data/model/seed); the image tower restarts from θ0,
    with a fresh optimiser and FT's recipe.
  * EMA decay: m = 1 − 1/(EMA_WINDOW · steps), an averaging window of a fifth of the run, which is
    0.9999 at ImageNet's 50k steps and 0.999 at DomainNet's 5k (METHODS.md: 0.999–0.9999); constant m
    (no warm-up of m); only trainable weights are averaged (the frozen ones are equal anyway).
  * FLYP false negatives: a batch holds several images of one class, so prompt j ≠ i can equal image i's
    own prompt. We mask those pairs out of both softmaxes (FLYP_MASK_DUPLICATES); with no duplicates the
    loss is exactly CLIP's. FLYP's code keeps them as negatives (set the constant to False).
    Prompt: FLYP's "a photo of a {}." for training; evaluation uses the task's full template set. The
    logit scale is clamped to ≤ 100 after each step, as in open_clip's training.
  * KD: τ² keeps λ's meaning across τ (Hinton); the teacher is θ0's image tower + W + θ0's scale.
    FeatKD: f unnormalised (incl. projection), squared distance summed over D, mean over the batch.
    L2SP: AdamW's weight decay of the FT recipe stays on. Teachers/anchors are frozen copies of θ0 and
    see the same augmented batch as the student.
  * λ values: the seed copy of the Lipsum-FT paper lost its swept numbers. Ours are untuned starting
    points (KD, FeatKD λ = 1; L2SP λ = 0.1); sweep them on the held-out slice (`heldout`), never a test
    split, before reading much into a baseline's row.

Run:  python baselines.py --method ft        (miniworld + miniclip, CPU, minutes)
      python baselines.py --method lp && python baselines.py --method lpft
      python baselines.py --method ft --data imagenet --data-root DIR --model ViT-B-16 --pretrained openai
"""
import argparse
import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from common import TrainArgs, encode_text, finish, parse_args, set_trainable, setup, train, zeroshot_head

METHODS = ("zeroshot", "lp", "ft", "lpft", "scratch", "ema", "l2sp", "kd", "featkd", "flyp")

L2SP_LAMBDA = 0.1  # weight of ½‖θ − θ0‖² (summed over every image-tower parameter)
KD_LAMBDA = 1.0  # weight of τ² · KL(zero-shot ‖ fine-tuned)
KD_TAU = 1.0  # distillation temperature on top of the model's own scale s
FEATKD_LAMBDA = 1.0  # weight of ‖f_θ(x) − f_θ0(x)‖²
EMA_WINDOW = 0.2  # EMA averaging window 1/(1 − m) as a fraction of the run
FLYP_TEMPLATE = "a photo of a {}."  # FLYP's training prompt
FLYP_MASK_DUPLICATES = True  # drop same-class prompts from the negatives (False: FLYP's code)
LP_LR_FACTOR = 10.0  # LP's lr relative to FT's (a linear head tolerates, and needs, larger steps)


@dataclass
class Args(TrainArgs):
    method: str = "ft"  # zeroshot | lp | ft | lpft | scratch | ema | l2sp | kd | featkd | flyp
    l2sp_lambda: float = L2SP_LAMBDA  # l2sp: weight of ½‖θ − θ0‖²
    kd_lambda: float = KD_LAMBDA  # kd: weight of τ²·KL(softmax(z0/τ) ‖ softmax(z/τ))
    kd_tau: float = KD_TAU  # kd: temperature τ
    featkd_lambda: float = FEATKD_LAMBDA  # featkd: weight of ‖f_θ(x) − f_θ0(x)‖²
    ema_decay: float = -1.0  # ema: m in θ_ema ← m·θ_ema + (1−m)·θ; -1 = 1 − 1/(EMA_WINDOW·steps)
    lp_run: str = ""  # lpft: the LP run whose head starts FT (default runs/lp-<data>-<model>-s<seed>)


# The papers' recipe (METHODS.md): AdamW, lr 1e-5, batch 256, 10% warm-up + cosine, RandomResizedCrop
# scale 0.08-1 + flip; ImageNet 10 epochs (50k steps), DomainNet 5k steps. miniworld's recipe is the
# one that shows FT's robustness loss on the built-in world in a few CPU minutes (see miniworld.py).
PRESETS = {
    "miniworld": dict(steps=300, batch_size=128, lr=1e-4, weight_decay=0.1, crop_scale=0.5, eval_every=100, ckpt_every=100),
    "imagenet": dict(steps=50_000, batch_size=256, lr=1e-5, weight_decay=0.1, crop_scale=0.08, workers=8,
                     eval_every=5_000, ckpt_every=5_000),
    "domainnet": dict(steps=5_000, batch_size=256, lr=1e-5, weight_decay=0.1, crop_scale=0.08, workers=8,
                      eval_every=1_000, ckpt_every=1_000),
    "folder": dict(steps=1_000, batch_size=128, lr=1e-5, weight_decay=0.1, crop_scale=0.08, workers=4),
}

# Where a method departs from the FT recipe above, per --data (every other method uses it as is).
# FLYP (its paper, ImageNet): batch 512, lr 1e-5, wd 0.1, 10 epochs = 25k steps at batch 512.
METHOD_PRESETS = {
    "lp": {data: dict(lr=LP_LR_FACTOR * p["lr"], weight_decay=0.0) for data, p in PRESETS.items()},
    "flyp": {"imagenet": dict(batch_size=512, steps=25_000)},
}


# ------------------------------------------------------------------------------------------------
# The losses, side by side. Each is pure: tensors in, (loss, terms) out.
# ------------------------------------------------------------------------------------------------
def ft_loss(logits: torch.Tensor, labels: torch.Tensor):
    """Cross-entropy on the classifier logits [B, K] (also LP, LP-FT, Scratch-FT and EMA's loss:
    those differ in what trains, where the head starts, or which weights are evaluated)."""
    ce = F.cross_entropy(logits, labels)
    return ce, {"ce": ce.detach()}


def l2sp_loss(logits, labels, params: list, params0: list, lam: float):
    """CE + λ/2 · ‖θ − θ0‖² over the image-tower tensors `params` and their θ0 copies `params0`."""
    ce = F.cross_entropy(logits, labels)
    # ‖θ − θ0‖² as one fused op per tensor: autograd keeps references to θ and θ0, not a copy of θ − θ0
    dist = sum(F.mse_loss(p, p0, reduction="sum") for p, p0 in zip(params, params0))
    return ce + lam / 2 * dist, {"ce": ce.detach(), "l2sp": dist.detach()}


def kd_loss(logits, logits0, labels, lam: float, tau: float):
    """CE + λ τ² · KL(softmax(z0/τ) ‖ softmax(z/τ)); logits z [B, K], zero-shot logits z0 [B, K]."""
    ce = F.cross_entropy(logits, labels)
    kl = F.kl_div((logits / tau).log_softmax(-1), (logits0 / tau).log_softmax(-1), log_target=True,
                  reduction="batchmean")  # Σ_k p0 (log p0 − log p), batch mean
    return ce + lam * tau ** 2 * kl, {"ce": ce.detach(), "kd": kl.detach()}


def featkd_loss(logits, labels, feats, feats0, lam: float):
    """CE + λ · ‖f_θ(x) − f_θ0(x)‖²; unnormalised image embeddings feats, feats0 [B, D]."""
    ce = F.cross_entropy(logits, labels)
    dist = ((feats - feats0) ** 2).sum(-1).mean()
    return ce + lam * dist, {"ce": ce.detach(), "featkd": dist.detach()}


def flyp_loss(image_emb, text_emb, labels, scale, mask_duplicates: bool = FLYP_MASK_DUPLICATES):
    """Symmetric InfoNCE: image_emb [B, D] = n(f(x_i)), text_emb [B, D] = n(g(prompt(y_i))); the pair
    (i, i) is the positive. With mask_duplicates, pairs (i, j ≠ i) of one class are no negatives."""
    logits = scale * image_emb @ text_emb.t()  # [B, B]: S_ij
    if mask_duplicates:
        same = (labels[:, None] == labels[None, :]) & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        logits = logits.masked_fill(same, float("-inf"))  # symmetric mask: serves Sᵀ too
    target = torch.arange(len(labels), device=labels.device)
    i2t = F.cross_entropy(logits, target)  # each image picks its prompt
    t2i = F.cross_entropy(logits.t(), target)  # each prompt picks its image
    return (i2t + t2i) / 2, {"i2t": i2t.detach(), "t2i": t2i.detach(), "scale": scale.detach()}


@torch.no_grad()
def ema_update(ema_params: list, params: list, decay: float):
    """θ_ema ← m · θ_ema + (1 − m) · θ in place. lerp is exact at the ends: m = 0 copies θ, m = 1
    keeps θ_ema."""
    for e, p in zip(ema_params, params):
        e.lerp_(p, 1.0 - decay)


# ------------------------------------------------------------------------------------------------
# Wiring: what trains, where the head starts, and the loss closure of each method
# ------------------------------------------------------------------------------------------------
def frozen_image_tower(model):
    """θ0's image tower, frozen, in eval mode (nn.MultiheadAttention's fused kernel: its forward is ~9%
    faster than the training-mode path on ViT-B/16; features agree to ~1e-6): the KD / FeatKD teacher."""
    return copy.deepcopy(model.clip.visual).requires_grad_(False).eval()


def rebuild_head(model, task):
    """FLYP's head: the zero-shot head of the model's current (fine-tuned) text tower."""
    model.head.data.copy_(zeroshot_head(model.clip, model.tokenizer, task.classnames, task.templates))


def lp_head(args, task) -> torch.Tensor:
    """LP-FT's starting head: the head of the LP run of the same data, model and classes."""
    run = Path(args.lp_run or f"runs/lp-{args.data}-{Path(args.model).stem}-s{args.seed}")
    if not (run / "final.pt").is_file():
        raise SystemExit(f"error: LP-FT needs a finished LP run; {run/'final.pt'} does not exist. Run "
                         f"`python baselines.py --method lp` with the same --data/--model/--seed first, or pass --lp-run DIR.")
    ckpt = torch.load(run / "final.pt", map_location="cpu", weights_only=False)
    meta = ckpt["meta"]
    if (meta["model"], meta["pretrained"], meta["classnames"]) != (args.model, args.pretrained, task.classnames):
        raise SystemExit(f"error: {run} is a {meta['method']} run of {meta['model']} {meta['pretrained']!r} on "
                         f"{len(meta['classnames'])} classes of {meta['data']}; LP-FT here needs {args.model} "
                         f"{args.pretrained!r} on --data {args.data}")
    print(f"lpft: head from {run/'final.pt'} ({meta['method']} run)")
    return ckpt["model"]["head"]


def make_loss(method: str, model, args, task):
    """Returns (loss_fn(model, batch), after_step or None, extra_state, evaluation tag) and sets
    what trains and where the head starts. Anchors and teachers are taken from `model` now: θ0."""
    image_loss = lambda m, b: ft_loss(m(b["image"]), b["label"])  # noqa: E731
    if method == "lp":
        set_trainable(model, image=False, head=True)
        return image_loss, None, {}, ""
    if method == "flyp":
        set_trainable(model, image=True, text=True, head=False, scale=True)
        prompts = model.tokenizer([FLYP_TEMPLATE.format(c) for c in task.classnames]).to(model.head.device)  # [K, L]

        def flyp(m, b):
            classes, inverse = b["label"].unique(return_inverse=True)  # encode each class once
            text = encode_text(m.clip, prompts[classes])[inverse]  # [B, D]
            return flyp_loss(m.image_features(b["image"]), text, b["label"], m.scale)

        def after_step(step):
            with torch.no_grad():
                model.clip.logit_scale.clamp_(0, math.log(100))
            if args.eval_every and step % args.eval_every == 0:  # the held-out check scores with this head
                rebuild_head(model, task)

        return flyp, after_step, {}, ""

    set_trainable(model, image=True, text=False, head=True)
    if method == "scratch":
        model.head.data.zero_()
    if method == "lpft":
        model.head.data.copy_(lp_head(args, task))
    if method in ("ft", "scratch", "lpft"):
        return image_loss, None, {}, ""
    if method == "ema":
        decay = args.ema_decay if args.ema_decay >= 0 else max(0.0, 1 - 1 / (EMA_WINDOW * max(args.steps, 1)))
        ema_model = copy.deepcopy(model).requires_grad_(False)
        pairs = [(e, p) for e, p in zip(ema_model.parameters(), model.parameters()) if p.requires_grad]
        after = lambda step: ema_update([e for e, _ in pairs], [p for _, p in pairs], decay)  # noqa: E731
        return image_loss, after, {"ema": ema_model}, f"m={decay:.4g}"
    if method == "l2sp":
        anchor = [p.detach().clone() for p in model.clip.visual.parameters()]
        loss = lambda m, b: l2sp_loss(m(b["image"]), b["label"], list(m.clip.visual.parameters()), anchor,  # noqa: E731
                                      args.l2sp_lambda)
        return loss, None, {}, f"lambda={args.l2sp_lambda:g}"

    teacher = frozen_image_tower(model)
    head0, scale0 = model.head.detach().clone(), model.scale.detach().clone()

    def distill(m, b):
        feats = m.clip.encode_image(b["image"])  # [B, D], unnormalised
        logits = m.scale * F.normalize(feats, dim=-1) @ m.head.t()  # [B, K], as ClipClassifier.forward
        with torch.no_grad():
            feats0 = teacher(b["image"])  # [B, D], θ0 on the same augmented batch
        if method == "featkd":
            return featkd_loss(logits, b["label"], feats, feats0, args.featkd_lambda)
        logits0 = scale0 * F.normalize(feats0, dim=-1) @ head0.t()  # [B, K], the zero-shot model
        return kd_loss(logits, logits0, b["label"], args.kd_lambda, args.kd_tau)

    return distill, None, {}, f"lambda={args.featkd_lambda if method == 'featkd' else args.kd_lambda:g}"


def parse(argv=None) -> Args:
    """parse_args with the FT presets overlaid by the chosen --method's own."""
    method = argparse.ArgumentParser(add_help=False)
    method.add_argument("--method", default=Args.method)
    name = method.parse_known_args(argv)[0].method
    presets = {data: {**p, **METHOD_PRESETS.get(name, {}).get(data, {})} for data, p in PRESETS.items()}
    return parse_args(Args, presets, argv)


def main(argv=None):
    args = parse(argv)
    if args.method not in METHODS:
        raise SystemExit(f"error: unknown --method {args.method!r}; choose one of {', '.join(METHODS)}")
    env = setup(args, args.method)
    if args.method == "zeroshot":
        return finish(env, args, step=0)

    loss_fn, after_step, extra, tag = make_loss(args.method, env.model, args, env.task)
    train(env, loss_fn, args, after_step=after_step, extra_state=extra)
    if args.method == "flyp":
        rebuild_head(env.model, env.task)
    return finish(env, args, model=extra.get("ema"), tag=tag)


if __name__ == "__main__":
    main()
