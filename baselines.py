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
  lora      LoRA (Hu et al. 2022): FT's loss, but each image-tower projection W0 only moves by a low-rank
            update (α/r)·B·A; A, B and the head train, everything else is frozen.

      L_FT(θ, W)  = CE(s · n(f_θ(x)) Wᵀ, y)                       (lp, lpft, scratch, ema: same loss)
      L_L2SP      = L_FT + λ/2 · ‖θ − θ0‖²                         (θ = image tower, head excluded)
      L_KD        = L_FT + λ τ² · KL(softmax(z0/τ) ‖ softmax(z/τ))  (z0 = zero-shot logits, same batch)
      L_FeatKD    = L_FT + λ · ‖f_θ(x) − f_θ0(x)‖²
      L_FLYP      = ½ [CE(S, I) + CE(Sᵀ, I)],  S_ij = s · n(f_θ(x_i)) · n(g_φ(prompt(y_j)))
                    (SigLIP: −(1/B) Σ_ij log σ(y_ij (S_ij + b)), y_ij = ±1, its pretraining loss)
      EMA         θ_ema ← m · θ_ema + (1 − m) · θ after every step, θ_ema = θ0 at the start
      LoRA        W = W0 + (α/r) · B A,  A [r, in], B [out, r] = 0 at the start   (loss L_FT; W0 frozen)

Choices where the papers are silent:
  * LP optimiser: AdamW in the same loop (augmentation, schedule, checkpoints) as FT, head only, lr
    10× FT's and no weight decay (decoupled decay would shrink the head towards 0, not towards W);
    not L-BFGS on cached features, so LP is resumable and LP-FT's head saw FT's augmentation.
  * LP-FT hand-off: `--method lp`, then `--method lpft` loads that run's head (`--lp-run`, default the LP
    run of the same data/model/seed); the image tower restarts from θ0 with FT's recipe.
  * EMA decay: m = 1 − 1/(EMA_WINDOW · steps), an averaging window of a fifth of the run, which is
    0.9999 at ImageNet's 50k steps and 0.999 at DomainNet's 5k (the usual 0.999–0.9999); constant m
    (no warm-up of m); only trainable weights are averaged (the frozen ones are equal anyway). The
    average is kept by common.train (`ema_decay`), which scores it on the held-out slice and returns it.
  * FLYP false negatives: a batch holds several images of one class, so prompt j ≠ i can equal image i's
    own prompt. We mask those pairs out of both softmaxes (common.clip_contrastive_loss's "masked" rule;
    out of the sigmoid loss's sum on SigLIP); with no duplicates the loss is exactly CLIP's (SigLIP's).
    FLYP's code keeps them as negatives (set FLYP_DUPLICATES to "negative"). Prompts: FLYP's data has
    one row per (image, template), so an epoch pairs each image with a random template; here image i at
    step t gets template common.template_ids(seed, t, i) of the task's set (the same in every process,
    micro-batch and resumed run). `--flyp-prompt single` is the ablation with FLYP_TEMPLATE for every
    image. Evaluation uses the head rebuilt from the fine-tuned text tower with the task's templates. The
    logit scale (and a SigLIP's logit bias) trains; the scale is clamped to ≤ 100 after each step. The
    loss is over the global batch under torchrun and --grad-accum (common.ContrastiveLoss).
  * KD: τ² keeps λ's meaning across τ (Hinton); the teacher is θ0's image tower + W + θ0's scale.
    FeatKD: f unnormalised (incl. projection), squared distance summed over D, mean over the batch.
    L2SP: AdamW's weight decay of the FT recipe stays on. Teachers/anchors are frozen copies of θ0 and
    see the same augmented batch as the student.
  * λ values (our copy of the Lipsum-FT paper lacks its sweep): untuned starting points (KD, FeatKD 1;
    L2SP 0.1); sweep them on the held-out slice, never a test split, before reading much into a row.
  * LoRA: one rank-r update on each nn.Linear and packed q/k/v in_proj_weight of the image tower (not the
    paper's q/v pair); A Kaiming-uniform (seeded), B = 0; r = 16, α = 2r; lr LORA_LR_FACTOR × FT's. final.pt
    holds the merged W0 + (α/r)BA under the usual keys: WiSE-FT scales the update (METHODS.md, "LoRA").

Run:  python baselines.py --method ft        (miniworld + miniclip, CPU, minutes)
      python baselines.py --method lp && python baselines.py --method lpft
      python baselines.py --method lora --lora-rank 8 --lora-alpha 16
      python baselines.py --method ft --data imagenet --data-root DIR --model ViT-B-16 --pretrained openai
"""
import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from common import (FT_RECIPES, ContrastiveLoss, TrainArgs, as_template_fns, class_prompts, cosine_logits, data_tag,
                    encode_text, finish, frozen_copy, parse_args, pretraining_loss, set_trainable, setup, template_ids, train)

EMA_WINDOW = 0.2  # EMA averaging window 1/(1 − m) as a fraction of the run
FLYP_TEMPLATE = "a photo of a {}."  # the one training prompt of --flyp-prompt single
FLYP_DUPLICATES = "masked"  # same-class prompts in a batch: "masked" from the negatives | "negative" (FLYP's code)
LP_LR_FACTOR = 10.0  # LP's lr relative to FT's (a linear head tolerates, and needs, larger steps)
LORA_LR_FACTOR = 10.0  # LoRA's lr relative to FT's (the low-rank update starts at B = 0 and needs larger steps)


@dataclass
class Args(TrainArgs):
    method: str = "ft"  # zeroshot | lp | ft | lpft | scratch | ema | l2sp | kd | featkd | flyp | lora
    l2sp_lambda: float = 0.1  # l2sp: λ, weight of ½‖θ − θ0‖² (summed over every image-tower parameter)
    kd_lambda: float = 1.0  # kd: λ, weight of τ²·KL(softmax(z0/τ) ‖ softmax(z/τ))
    kd_tau: float = 1.0  # kd: temperature τ on top of the model's own scale s
    featkd_lambda: float = 1.0  # featkd: λ, weight of ‖f_θ(x) − f_θ0(x)‖²
    ema_decay: float = -1.0  # ema: m in θ_ema ← m·θ_ema + (1−m)·θ; -1 = 1 − 1/(EMA_WINDOW·steps)
    lp_run: str = ""  # lpft: the LP run whose head starts FT (default runs/lp-<data>-<model>-s<seed>)
    lora_rank: int = 16  # lora: r, the rank of each update B·A
    lora_alpha: float = 32.0  # lora: α; the update B·A is scaled by α/r
    flyp_prompt: str = "random"  # flyp: random (a random template of the task's per image per step, FLYP's data) | single (FLYP_TEMPLATE)


# Every method trains with FT's recipe (common.FT_RECIPES) except where its paper departs from it, per
# --method and --data. FLYP (its paper, ImageNet): batch 512, 10 epochs = 25k steps at batch 512.
PRESETS = {
    "lp": {data: dict(lr=LP_LR_FACTOR * recipe["lr"], weight_decay=0.0) for data, recipe in FT_RECIPES.items()},
    "flyp": {"imagenet": dict(batch_size=512, steps=25_000)},
    "lora": {data: dict(lr=LORA_LR_FACTOR * recipe["lr"]) for data, recipe in FT_RECIPES.items()},
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


def flyp_loss(image_emb, text_emb, labels, scale, duplicates: str = FLYP_DUPLICATES, bias=None):
    """The pretraining loss between n(f(x_i)) and n(g(prompt(y_i))), both [B, D]: CLIP's symmetric InfoNCE,
    or SigLIP's sigmoid loss when the model has a logit bias (common.pretraining_loss); the pair (i, i) is
    the positive, same-class pairs are masked (or, duplicates="negative", kept as negatives)."""
    loss = pretraining_loss(image_emb, text_emb, scale, bias, labels if duplicates == "masked" else None, "masked")
    return loss, {"contrastive": loss.detach(), "scale": scale.detach(), **({} if bias is None else {"bias": bias.detach()})}


# ------------------------------------------------------------------------------------------------
# The methods: what trains, where the head starts, the loss, and what is evaluated. Each takes the
# model at θ0 (so anchors and teachers taken here are θ0) and returns a Recipe for common.train.
# ------------------------------------------------------------------------------------------------
@dataclass
class Recipe:
    loss_fn: Callable  # loss_fn(model, batch, step) -> (loss, terms), or a common.ContrastiveLoss
    tag: str = ""  # the results rows' tag: the method's own knob values
    ema_decay: Optional[float] = None  # evaluate the EMA of the weights with this decay (common.train keeps it)
    head_from_text: bool = False  # evaluate with the head rebuilt from the fine-tuned text tower
    merge: Optional[Callable] = None  # folds the method's extra weights into the usual keys before final.pt (LoRA)


def classifier_ce(model, batch, step):
    return ft_loss(model(batch["image"]), batch["label"])


def ft(model, args, task) -> Recipe:
    """FT: image tower + head (from the zero-shot head) with cross-entropy; text tower and s frozen."""
    set_trainable(model, image=True, head=True)
    return Recipe(classifier_ce)


def lp(model, args, task) -> Recipe:
    """LP: only the head trains; its lr and weight decay come from PRESETS["lp"]."""
    set_trainable(model, image=False, head=True)
    return Recipe(classifier_ce)


def lpft(model, args, task) -> Recipe:
    """LP-FT: FT whose head starts from the LP run's head."""
    set_trainable(model, image=True, head=True)
    model.head.data.copy_(lp_head(args, task))
    return Recipe(classifier_ce)


def scratch(model, args, task) -> Recipe:
    """Scratch-FT: FT whose head starts at zero."""
    set_trainable(model, image=True, head=True)
    model.head.data.zero_()
    return Recipe(classifier_ce)


def ema(model, args, task) -> Recipe:
    """EMA: FT's training, evaluated at the exponential moving average of its weights."""
    set_trainable(model, image=True, head=True)
    decay = args.ema_decay if args.ema_decay >= 0 else max(0.0, 1 - 1 / (EMA_WINDOW * max(args.steps, 1)))
    return Recipe(classifier_ce, tag=f"m={decay:.4g}", ema_decay=decay)


def l2sp(model, args, task) -> Recipe:
    """L2SP: FT + λ/2 ‖θ − θ0‖² over the image tower."""
    set_trainable(model, image=True, head=True)
    anchor = [p.detach().clone() for p in model.clip.visual.parameters()]  # θ0

    def loss_fn(m, batch, step):
        return l2sp_loss(m(batch["image"]), batch["label"], list(m.clip.visual.parameters()), anchor, args.l2sp_lambda)

    return Recipe(loss_fn, tag=f"lambda={args.l2sp_lambda:g}")


def kd(model, args, task) -> Recipe:
    """KD: FT + λ τ² KL(zero-shot ‖ fine-tuned) on the same augmented batch; the teacher is θ0's image
    tower with the zero-shot head W and θ0's scale."""
    set_trainable(model, image=True, head=True)
    teacher, head0, scale0 = frozen_copy(model.clip.visual), model.head.detach().clone(), model.scale.detach().clone()

    def loss_fn(m, batch, step):
        logits = m(batch["image"])  # [B, K]
        with torch.no_grad():
            logits0 = cosine_logits(F.normalize(teacher(batch["image"]), dim=-1), head0, scale0)  # [B, K], zero-shot
        return kd_loss(logits, logits0, batch["label"], args.kd_lambda, args.kd_tau)

    return Recipe(loss_fn, tag=f"lambda={args.kd_lambda:g}")


def featkd(model, args, task) -> Recipe:
    """FeatKD: FT + λ ‖f_θ(x) − f_θ0(x)‖² on unnormalised image embeddings of the same augmented batch."""
    set_trainable(model, image=True, head=True)
    teacher = frozen_copy(model.clip.visual)

    def loss_fn(m, batch, step):
        feats = m.clip.encode_image(batch["image"])  # [B, D], unnormalised
        with torch.no_grad():
            feats0 = teacher(batch["image"])  # [B, D], θ0
        return featkd_loss(m.logits(F.normalize(feats, dim=-1)), batch["label"], feats, feats0, args.featkd_lambda)

    return Recipe(loss_fn, tag=f"lambda={args.featkd_lambda:g}")


def flyp(model, args, task) -> Recipe:
    """FLYP: no CE head; CLIP's contrastive loss between each image and a prompt of its class (a random
    template per image per step, or FLYP_TEMPLATE), both towers and s train, and the head is rebuilt
    from the fine-tuned text tower for evaluation."""
    if args.flyp_prompt not in ("random", "single"):
        raise SystemExit(f"error: --flyp-prompt {args.flyp_prompt!r}: choose random or single")
    set_trainable(model, image=True, text=True, head=False, scale=True)
    templates = as_template_fns(task.templates if args.flyp_prompt == "random" else [FLYP_TEMPLATE])  # str.format or open_clip's lambdas
    tokens = {}  # (class, template) -> token ids [L]: each prompt is tokenized once per run, not once per step

    def embed(m, batch, step):  # a micro-batch's rows; the loss is over the global batch (common.ContrastiveLoss)
        host = batch["host"]  # label, index on the CPU: the prompts are chosen without waiting for the device
        template = template_ids(args.seed, step, host["index"], len(templates))  # [B]
        prompts, inverse = class_prompts(m.tokenizer, task.classnames, templates, tokens, host["label"], template,
                                         batch["image"].device)  # [P, L], [B]
        text = encode_text(m.clip, prompts)[inverse]  # [B, D]
        return {"image": m.image_features(batch["image"]), "text": text, "label": batch["label"]}

    def loss(rows, scale, bias):
        return flyp_loss(rows["image"], rows["text"], rows["label"], scale, bias=bias)

    return Recipe(ContrastiveLoss(embed, loss), tag="" if args.flyp_prompt == "random" else "prompt=single", head_from_text=True)


class LowRank(nn.Module):
    """The parametrization W0 ↦ W0 + (α/r)·B·A of one weight W0 [out, in]: A [r, in], B [out, r] = 0."""

    def __init__(self, w0: torch.Tensor, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        a = nn.init.kaiming_uniform_(torch.empty(rank, w0.shape[1], dtype=w0.dtype), a=5 ** 0.5, generator=generator)
        self.A = nn.Parameter(a.to(w0.device))  # [r, in]: nn.Linear's init, as LoRA's code
        self.B = nn.Parameter(w0.new_zeros(w0.shape[0], rank))  # [out, r]
        self.scaling = alpha / rank

    def forward(self, w0: torch.Tensor) -> torch.Tensor:
        return w0 + self.scaling * (self.B @ self.A)  # [out, in]: W = W0 + (α/r)·B·A


def lora(model, args, task) -> Recipe:
    """LoRA: FT's loss; each nn.Linear and packed nn.MultiheadAttention q/k/v weight of the image tower moves
    by (α/r)·B·A only; A, B and the head train. Its merge folds B·A into each weight's own key (final.pt)."""
    set_trainable(model, image=False, head=True)
    tower = model.clip.visual
    targets = [(m, "weight") if isinstance(m, nn.Linear) else (m, "in_proj_weight") for m in tower.modules()
               if isinstance(m, nn.Linear) or (isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None)]
    if not targets:
        raise SystemExit(f"error: --method lora: the image tower ({type(tower).__name__}) has no nn.Linear or "
                         "nn.MultiheadAttention weight to put a low-rank update on")
    smallest = min(min(getattr(m, name).shape) for m, name in targets)
    if not 1 <= args.lora_rank <= smallest:
        raise SystemExit(f"error: --lora-rank {args.lora_rank}: choose 1 to {smallest} (the smallest targeted weight's side)")
    g = torch.Generator().manual_seed(args.seed)
    for m, name in targets:
        parametrize.register_parametrization(m, name, LowRank(getattr(m, name), args.lora_rank, args.lora_alpha, g))

    def merge():
        for m, name in targets:
            if parametrize.is_parametrized(m, name):
                parametrize.remove_parametrizations(m, name, leave_parametrized=True)

    return Recipe(classifier_ce, tag=f"r={args.lora_rank} alpha={args.lora_alpha:g}", merge=merge)


METHODS = {"zeroshot": None, "lp": lp, "ft": ft, "lpft": lpft, "scratch": scratch, "ema": ema, "l2sp": l2sp,
           "kd": kd, "featkd": featkd, "flyp": flyp, "lora": lora}


def lp_head(args, task) -> torch.Tensor:
    """LP-FT's starting head: the head of the LP run of the same data, model and classes."""
    run = Path(args.lp_run or f"runs/lp-{data_tag(args)}-{Path(args.model).stem}-s{args.seed}")
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


def parse(argv=None) -> Args:
    """parse_args with the chosen --method's PRESETS."""
    method = argparse.ArgumentParser(add_help=False)
    method.add_argument("--method", default=Args.method)
    name = method.parse_known_args(argv)[0].method
    if name not in METHODS:
        raise SystemExit(f"error: unknown --method {name!r}; choose one of {', '.join(METHODS)}")
    return parse_args(Args, PRESETS.get(name, {}), argv)


def main(argv=None):
    args = parse(argv)
    if args.unseen_classes and args.method in ("lp", "lpft", "scratch"):  # GZSL: the zero-shot head stays fixed
        raise SystemExit(f"error: --unseen-classes holds the zero-shot head over all classes fixed, and --method "
                         f"{args.method} {'trains only the head' if args.method == 'lp' else 'starts from another head'}; "
                         "use a method that fine-tunes the image tower from the zero-shot head (ft, ema, l2sp, kd, featkd, flyp)")
    env = setup(args, args.method)
    if args.method == "zeroshot":
        return finish(env, args)
    recipe = METHODS[args.method](env.model, args, env.task)
    if recipe.merge and args.resume and (env.run / "final.pt").is_file():
        recipe.merge()  # a trained run's final.pt holds merged weights: it loads into the merged model
    trained = train(env, recipe.loss_fn, args, ema_decay=recipe.ema_decay, head_from_text=recipe.head_from_text)
    if recipe.merge:
        recipe.merge()
    return finish(env, args, trained, tag=recipe.tag)


if __name__ == "__main__":
    main()
