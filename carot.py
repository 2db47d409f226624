"""CaRot: calibrated robust fine-tuning of CLIP.

Paper: Oh, Lim, Kim, Han, Yun, Choo, Hauptmann, Cheng & Song, "Towards Calibrated Robust Fine-Tuning of
Vision-Language Models", NeurIPS 2024. METHODS.md, "CaRot".

Idea. The paper bounds both the OOD classification error and the OOD calibration error by the ID
calibration error plus 1/σ_min of the ID representation covariance. CaRot lowers both terms while it
fine-tunes like FLYP: an orthogonality constraint on the image tower's last projection W_v keeps the
representation's small singular values up, and self-distillation from an EMA teacher (soft in-batch
image-text targets) improves ID calibration. Both towers and the temperature train; the student is
evaluated.

    S_ij      = s · n(f_θ(x_i)) · n(g_θ(prompt(y_j)))                    student, over the global batch [N, N]
    T_ij      = s_ψ · n(f_ψ(x_i)) · n(g_ψ(prompt(y_j)))                  EMA teacher ψ, same images and prompts
    L_MCL     = ½ [CE(S, I) + CE(Sᵀ, I)]                                 FLYP's loss (common.pretraining_loss)
    L_OC      = ‖W_vᵀ W_v − I_D‖_F                                       W_v [width, D]
    L_SD      = KL(σ(T) ‖ σ(S)) + KL(σ(Tᵀ) ‖ σ(Sᵀ))                     σ: softmax over each row, batch mean
    L_cross   = ‖W_v W_tᵀ‖_F                                             W_t [width_t, D], the text projection
    L_CaRot   = L_MCL + λ_OC · L_OC + λ_SD · L_SD + λ_cross · L_cross
    ψ        ← m_t · ψ + (1 − m_t) · θ  after steps t = 0, K, 2K, ...; m_t from m_0 to m linearly over
                the first w of the run, then m; ψ = θ0 at the start

Where the values come from. The official code (github.com/changdaeoh/CaRot, its first commit, read in a
fork's history: HesamAsad/TRACER 5d78b94) and its README's ImageNet command: λ_OC = 0.2, λ_SD = 1.5,
λ_cross = 0.05 (`--cross_fnorm`, a term of the command, not of the paper's equations as far as we could
check), teacher update every 500 of ~25k iterations, m_0 = 0.05 → m = 0.9 over w = 0.2 of the run,
FLYP's recipe (batch 512, 10 epochs, lr 1e-5, wd 0.1). The official L_OC is the Frobenius norm, not its
square; its L_SD is the soft-label CE summed over both directions, at the models' own temperatures.
The paper's text itself could not be read here.

Choices (ours):
  * L_MCL is exactly FLYP's here (baselines.py --method flyp): a random template of the task's per image
    per step by the same (seed, step, image) rule, same-class prompts masked from the negatives (the
    official code, FLYP's, keeps them); on a SigLIP the sigmoid loss (L_SD stays a softmax KL).
  * L_SD as a KL (teacher first) instead of the CE: the same gradient, and 0 at ψ = θ. No masking: the
    teacher's mass on same-class prompts is the soft label.
  * The update period as a fraction of the run, K = round(0.02 · steps) (500 of 25k), so that a short
    run's teacher moves too (miniworld: every 6 of 300 steps).
  * W_v: open_clip's `visual.proj`, else the Linear `visual.head.proj` (timm) or `visual.attnpool.c_proj`
    (ResNets) transposed; none stops with a message. W_t: the text tower's `text_projection` (needed when λ_cross > 0).
  * Exactness: L_MCL and L_SD run over the global batch (common.ContrastiveLoss, the teacher's rows
    gathered too); L_OC and L_cross depend on the projections only, counted once per step under
    --grad-accum. The teacher is common.train's EMA (`teacher=`, the step's m from `ema_decay`): in every
    checkpoint, so a killed-and-resumed run equals an uninterrupted one.
  * Kept from the repo's FT recipe: gradient clipping at 1 and a 10% warm-up (the official code: no
    clipping, 500 warm-up steps).

Run:  python carot.py                                    (miniworld + miniclip, CPU, minutes)
      python carot.py --data imagenet --data-root DIR --model ViT-B-16 --pretrained openai
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common import (ContrastiveLoss, TrainArgs, as_template_fns, class_prompts, encode_text, finish, frozen_copy,
                    once_per_step, parse_args, pretraining_loss, set_trainable, setup, template_ids, train)

PROJECTIONS = ("head.proj", "attnpool.c_proj")  # Linear image-tower projections used when there is no visual.proj


@dataclass
class Args(TrainArgs):
    lam_oc: float = 0.2  # λ_OC, weight of the orthogonality constraint ‖W_vᵀW_v − I‖_F on the image projection
    lam_sd: float = 1.5  # λ_SD, weight of the self-distillation from the EMA teacher
    lam_cross: float = 0.05  # λ_cross, weight of ‖W_v W_tᵀ‖_F (the official command's; 0 = the paper's equations)
    ema_momentum: float = 0.9  # m, the teacher's EMA momentum after the warm-up
    ema_momentum_start: float = 0.05  # m_0, the momentum at step 0, raised linearly to m
    ema_warmup: float = 0.2  # w, fraction of the run over which the momentum goes from m_0 to m
    ema_every: float = 0.02  # K / steps: the teacher is updated every K steps (official: 500 of 25k iterations)


# CaRot trains with FLYP's ImageNet recipe (batch 512, 10 epochs = 25k steps); everything else is common.FT_RECIPES.
PRESETS = {"imagenet": dict(batch_size=512, steps=25_000)}


def orthogonality(w: torch.Tensor) -> torch.Tensor:
    """‖WᵀW − I‖_F of W [width, D], in at least float32 with autocast off."""
    dtype = torch.promote_types(w.dtype, torch.float32)
    with torch.autocast(w.device.type, enabled=False):
        w = w.to(dtype)
        return torch.linalg.matrix_norm(w.t() @ w - torch.eye(w.shape[1], dtype=dtype, device=w.device))  # ‖[D, D]‖_F


def cross_norm(w_v: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """‖W_v W_tᵀ‖_F of the image and text projections W_v [width, D], W_t [width_t, D], in at least float32."""
    dtype = torch.promote_types(w_v.dtype, torch.float32)
    with torch.autocast(w_v.device.type, enabled=False):
        return torch.linalg.matrix_norm(w_v.to(dtype) @ w_t.to(dtype).t())  # ‖[width, width_t]‖_F


def self_distillation(image, text, image_t, text_t, scale, scale_t) -> torch.Tensor:
    """KL(σ(T) ‖ σ(S)) + KL(σ(Tᵀ) ‖ σ(Sᵀ)) of student logits S = s · image textᵀ and teacher logits
    T = s_ψ · image_t text_tᵀ (unit rows [N, D]), each softmax over a row, batch mean, in float32."""
    s = (scale * image @ text.t()).float()  # [N, N]
    t = (scale_t * image_t @ text_t.t()).float()  # [N, N]
    kl = lambda a, b: F.kl_div(a.log_softmax(1), b.log_softmax(1), log_target=True, reduction="batchmean")  # KL(σ(b) ‖ σ(a))
    return kl(s, t) + kl(s.t(), t.t())


def carot_loss(rows: dict, scale, scale_t, w_v, w_t, lam_oc: float, lam_sd: float, lam_cross: float, bias=None):
    """L_MCL + λ_OC · ‖W_vᵀW_v − I‖_F + λ_SD · L_SD + λ_cross · ‖W_v W_tᵀ‖_F on the global batch's rows:
    image, text (student, with gradient), image_t, text_t (teacher), label. Returns (loss, terms)."""
    mcl = pretraining_loss(rows["image"], rows["text"], scale, bias, rows["label"], "masked")  # FLYP's loss
    oc = orthogonality(w_v)
    sd = self_distillation(rows["image"], rows["text"], rows["image_t"], rows["text_t"], scale, scale_t)
    cross = cross_norm(w_v, w_t) if lam_cross else torch.zeros((), device=mcl.device)
    return mcl + lam_oc * oc + lam_sd * sd + lam_cross * cross, {
        "contrastive": mcl.detach(), "oc": oc.detach(), "sd": sd.detach(), "cross": cross.detach(), "scale": scale.detach()}


def visual_projection(visual) -> torch.Tensor:
    """W_v [width, D]: the image tower's last projection (a view of the trained parameter)."""
    if isinstance(getattr(visual, "proj", None), torch.nn.Parameter):
        return visual.proj  # open_clip ViT: [width, D]
    for name in PROJECTIONS:
        layer = getattr(getattr(visual, name.split(".")[0], None), name.split(".")[1], None)
        if isinstance(layer, torch.nn.Linear):
            return layer.weight.t()  # weight [D, width]
    raise SystemExit(f"error: CaRot constrains the image tower's last projection, and {type(visual).__name__} has "
                     f"none of visual.proj, {', '.join('visual.' + n for n in PROJECTIONS)}")


def text_projection(clip) -> torch.Tensor:
    """W_t [width_t, D]: the text tower's last projection, `text_projection` of open_clip's CLIP or of the
    tower of a CustomTextCLIP (.text), a Parameter [width_t, D] or a Linear (weight [D, width_t])."""
    proj = getattr(getattr(clip, "text", clip), "text_projection", None)
    if isinstance(proj, (torch.nn.Parameter, torch.nn.Linear)):
        return proj if isinstance(proj, torch.nn.Parameter) else proj.weight.t()
    raise SystemExit(f"error: --lam-cross needs the text tower's projection W_t (text_projection), which "
                     f"{type(clip).__name__} has not; pass --lam-cross 0")


def teacher_momentum(step: int, args) -> float:
    """m_t after step t (0-based): m_0 → m linearly over the first w · steps, then m, at every K-th step;
    1 (ψ unchanged) at the others. The official schedule, with K = round(ema_every · steps) ≥ 1."""
    if step % max(1, round(args.ema_every * args.steps)):
        return 1.0
    warm, m0, m = args.ema_warmup * args.steps, args.ema_momentum_start, args.ema_momentum
    return m if step >= warm else m0 + (m - m0) * step / warm


def make_loss(model, teacher, task, args) -> ContrastiveLoss:
    """The student's and teacher's rows of a micro-batch, and the CaRot loss on the global batch's."""
    templates = as_template_fns(task.templates)
    tokens = {}  # (class, template) -> token ids [L], tokenized once per run

    def embed(m, batch, step):
        host = batch["host"]  # label, index on the CPU
        template = template_ids(args.seed, step, host["index"], len(templates))  # [B]: FLYP's rule
        prompts, inverse = class_prompts(m.tokenizer, task.classnames, templates, tokens, host["label"], template,
                                         batch["image"].device)  # [P, L], [B]
        with torch.no_grad():
            image_t, text_t = teacher.image_features(batch["image"]), encode_text(teacher.clip, prompts)[inverse]  # [B, D] x2
        return {"image": m.image_features(batch["image"]), "text": encode_text(m.clip, prompts)[inverse],  # [B, D] x2
                "image_t": image_t, "text_t": text_t, "label": batch["label"]}

    def loss(rows, scale, bias):  # the projections' gradients counted once per step, not once per accumulation pass
        w_v = once_per_step(visual_projection(model.clip.visual), args.grad_accum)  # [width, D]
        w_t = once_per_step(text_projection(model.clip), args.grad_accum) if args.lam_cross else None  # [width_t, D]
        return carot_loss(rows, scale, teacher.scale, w_v, w_t, args.lam_oc, args.lam_sd, args.lam_cross, bias)

    return ContrastiveLoss(embed, loss)


def main(argv=None):
    args = parse_args(Args, PRESETS, argv)
    for name in ("ema_momentum", "ema_momentum_start", "ema_warmup", "ema_every"):
        if not 0 <= getattr(args, name) <= 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} {getattr(args, name)}: must be in [0, 1]")
    env = setup(args, "carot")
    model = set_trainable(env.model, image=True, text=True, head=False, scale=True)
    visual_projection(model.clip.visual)  # a tower without W_v (or W_t, with λ_cross) stops here, before training
    if args.lam_cross:
        text_projection(model.clip)
    teacher = frozen_copy(model)  # ψ = θ0; common.train keeps it the EMA of θ
    trained = train(env, make_loss(model, teacher, env.task, args), args, ema_decay=lambda step: teacher_momentum(step, args),
                    head_from_text=True, teacher=teacher)
    return finish(env, args, trained, tag=f"oc={args.lam_oc:g},sd={args.lam_sd:g}")


if __name__ == "__main__":
    main()
