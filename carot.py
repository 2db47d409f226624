"""CaRot: calibrated robust fine-tuning of CLIP.

Paper: Oh, Lim, Kim, Han, Yun, Choo, Hauptmann, Cheng & Song, "Towards Calibrated Robust Fine-Tuning of
Vision-Language Models", NeurIPS 2024. METHODS.md, "CaRot".

Idea. The paper bounds both the OOD classification error and the OOD calibration error by the ID
calibration error plus 1/σ_min of the ID representation covariance. CaRot lowers both terms while it
fine-tunes like FLYP: an orthogonality constraint on the image tower's last projection W_v keeps the
representation's small singular values up, and self-distillation from an EMA teacher (soft in-batch
image-text targets) improves ID calibration. Both towers and the temperature train.

    S_ij      = s · n(f_θ(x_i)) · n(g_θ(prompt(y_j)))                    student, over the global batch [N, N]
    T_ij      = s_ψ · n(f_ψ(x_i)) · n(g_ψ(prompt(y_j)))                  EMA teacher ψ, same images and prompts
    L_MCL     = ½ [CE(S, I) + CE(Sᵀ, I)]                                 FLYP's loss (common.pretraining_loss)
    L_OC      = ‖W_vᵀ W_v − I‖²_F                                        W_v [width, D]
    L_SD      = ½ [KL(σ(T) ‖ σ(S)) + KL(σ(Tᵀ) ‖ σ(Sᵀ))]                 σ: softmax over each row, batch mean
    L_CaRot   = L_MCL + λ_OC · L_OC + λ_SD · L_SD
    ψ        ← m · ψ + (1 − m) · θ after every optimiser step, ψ = θ0 at the start

Choices where the paper is silent, or where we could not check it (the official code and the paper's
text were not reachable from here; λ_OC = 0.2 and λ_SD = 1.5 are from Table 5's caption):
  * L_MCL is exactly FLYP's loss (baselines.py --method flyp): a random template of the task's per image
    per step, the same (seed, step, image) rule, same-class prompts masked from the negatives; on a
    SigLIP the sigmoid loss (L_SD stays a softmax KL: its bias cancels in a softmax).
  * L_OC: squared Frobenius norm, unnormalised. W_v is open_clip's `visual.proj` [width, D], else the
    Linear `visual.head.proj` (timm towers) or `visual.attnpool.c_proj` (ResNets) as Wᵀ; no such layer
    stops with a message. When width < D (the built-in miniclip: 128 < 256) the smaller Gram W_v W_vᵀ −
    I_width is used: it differs from ‖W_vᵀ W_v − I_D‖² by the constant D − width (the zero eigenvalues),
    so the gradient is the paper's and the term is 0 at a semi-orthogonal W_v.
  * L_SD: KL with the teacher first, symmetric over image→text and text→image like L_MCL, no masking of
    same-class prompts (the teacher's mass on them is the soft label), each side at its own temperature
    (s for the student, the EMA of s for the teacher). KL rather than CE: equal gradients, 0 at ψ = θ.
  * The teacher ψ is the EMA of every weight (both towers, s) updated per step with m = 0.999 (our
    choice; unverified), evaluated in eval mode and without gradient; the student θ is evaluated and
    saved (the head rebuilt from its text tower, as FLYP). common.train keeps ψ (`teacher=`), so it is
    in every checkpoint and a resumed run continues it exactly.
  * ImageNet preset: FLYP's (batch 512, 25k steps, lr 1e-5, wd 0.1), which CaRot follows; unverified.
  * Exactness: L_MCL and L_SD are over the global batch (common.ContrastiveLoss: the teacher's rows are
    gathered too); L_OC depends on W_v only and is counted once per step under --grad-accum.

Run:  python carot.py                                    (miniworld + miniclip, CPU, minutes)
      python carot.py --data imagenet --data-root DIR --model ViT-B-16 --pretrained openai
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common import (ContrastiveLoss, TrainArgs, as_template_fns, encode_text, finish, frozen_copy, once_per_step, parse_args,
                    pretraining_loss, set_trainable, setup, train)

PROJECTIONS = ("head.proj", "attnpool.c_proj")  # Linear image-tower projections used when there is no visual.proj


@dataclass
class Args(TrainArgs):
    lam_oc: float = 0.2  # λ_OC, weight of the orthogonality constraint on the image projection (paper: 0.2)
    lam_sd: float = 1.5  # λ_SD, weight of the self-distillation from the EMA teacher (paper: 1.5)
    ema_momentum: float = 0.999  # m, the teacher's EMA momentum per optimiser step (our choice)


# CaRot trains with FLYP's ImageNet recipe (batch 512, 10 epochs = 25k steps); everything else is common.FT_RECIPES.
PRESETS = {"imagenet": dict(batch_size=512, steps=25_000)}


def orthogonality(w: torch.Tensor) -> torch.Tensor:
    """‖WᵀW − I‖²_F of W [width, D] in at least float32 with autocast off, on the smaller Gram."""
    dtype = torch.promote_types(w.dtype, torch.float32)
    with torch.autocast(w.device.type, enabled=False):
        w = w.to(dtype)
        gram = w.t() @ w if w.shape[0] >= w.shape[1] else w @ w.t()  # [D, D] (or [width, width])
        return (gram - torch.eye(len(gram), dtype=dtype, device=w.device)).square().sum()


def self_distillation(image, text, image_t, text_t, scale, scale_t) -> torch.Tensor:
    """½ [KL(σ(T) ‖ σ(S)) + KL(σ(Tᵀ) ‖ σ(Sᵀ))] of student logits S = s · image textᵀ and teacher logits
    T = s_ψ · image_t text_tᵀ (unit rows [N, D]), each softmax over a row, batch mean, in float32."""
    s = (scale * image @ text.t()).float()  # [N, N]
    t = (scale_t * image_t @ text_t.t()).float()  # [N, N]
    kl = lambda a, b: F.kl_div(a.log_softmax(1), b.log_softmax(1), log_target=True, reduction="batchmean")  # Σ p_t (log p_t − log p_s)
    return (kl(s, t) + kl(s.t(), t.t())) / 2


def carot_loss(rows: dict, scale, scale_t, proj, lam_oc: float, lam_sd: float, bias=None):
    """L_MCL + λ_OC · ‖W_vᵀW_v − I‖²_F + λ_SD · L_SD on the global batch's rows: image, text (student,
    with gradient), image_t, text_t (teacher), label. Returns (loss, terms)."""
    mcl = pretraining_loss(rows["image"], rows["text"], scale, bias, rows["label"], "masked")  # FLYP's loss
    oc = orthogonality(proj)
    sd = self_distillation(rows["image"], rows["text"], rows["image_t"], rows["text_t"], scale, scale_t)
    return mcl + lam_oc * oc + lam_sd * sd, {"contrastive": mcl.detach(), "oc": oc.detach(), "sd": sd.detach(),
                                              "scale": scale.detach()}


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


def template_ids(seed: int, step: int, index: torch.Tensor, n_templates: int) -> torch.Tensor:
    """The template of each training image (`index` [B]) at this step, a pure function of (seed, step,
    image): the same in every process, micro-batch and resumed run (FLYP's rule in baselines.py)."""
    return torch.tensor([np.random.default_rng((seed, step, i)).integers(n_templates) for i in index.tolist()])  # [B]


def make_loss(model, teacher, task, args) -> ContrastiveLoss:
    """The student's and teacher's rows of a micro-batch, and the CaRot loss on the global batch's."""
    templates = as_template_fns(task.templates)
    tokens = {}  # (class, template) -> token ids [L], tokenized once per run

    def embed(m, batch, step):
        host = batch["host"]  # label, index on the CPU
        template = template_ids(args.seed, step, host["index"], len(templates))  # [B]
        pairs, inverse = torch.stack([host["label"], template], 1).unique(dim=0, return_inverse=True)
        pairs = [tuple(p) for p in pairs.tolist()]  # each (class, template) of the batch once
        new = [p for p in pairs if p not in tokens]
        if new:
            tokens.update(zip(new, m.tokenizer([templates[t](task.classnames[c]) for c, t in new])))
        device = batch["image"].device
        prompts, inverse = torch.stack([tokens[p] for p in pairs]).to(device), inverse.to(device)  # [P, L], [B]
        with torch.no_grad():
            image_t, text_t = teacher.image_features(batch["image"]), encode_text(teacher.clip, prompts)[inverse]  # [B, D] x2
        return {"image": m.image_features(batch["image"]), "text": encode_text(m.clip, prompts)[inverse],  # [B, D] x2
                "image_t": image_t, "text_t": text_t, "label": batch["label"]}

    def loss(rows, scale, bias):
        proj = once_per_step(visual_projection(model.clip.visual), args.grad_accum)  # L_OC's gradient once per step
        return carot_loss(rows, scale, teacher.scale, proj, args.lam_oc, args.lam_sd, bias)

    return ContrastiveLoss(embed, loss)


def main(argv=None):
    args = parse_args(Args, PRESETS, argv)
    if not 0 <= args.ema_momentum <= 1:
        raise SystemExit(f"error: --ema-momentum {args.ema_momentum}: must be in [0, 1]")
    env = setup(args, "carot")
    model = set_trainable(env.model, image=True, text=True, head=False, scale=True)
    visual_projection(model.clip.visual)  # a tower without one stops here, before training
    teacher = frozen_copy(model)  # ψ = θ0; common.train keeps it the EMA of θ
    trained = train(env, make_loss(model, teacher, env.task, args), args, ema_decay=args.ema_momentum,
                    head_from_text=True, teacher=teacher)
    return finish(env, args, trained, tag=f"oc={args.lam_oc:g},sd={args.lam_sd:g},m={args.ema_momentum:g}")


if __name__ == "__main__":
    main()
