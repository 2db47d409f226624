"""Lipsum-FT: fine-tune CLIP's image tower while keeping its energies on random texts.

Paper: Nam, Heo, Lee & Lee, "Lipsum-FT: Robust Fine-Tuning of Zero-Shot Models Using Random Text
Guidance", ICLR 2024 (seeds/001_*; official JAX code github.com/cs-giung/lipsum-ft).

Idea. Fine-tuning the image tower weakens its pretrained link to the text tower, and the size of that
change (the energy gap) tracks the robustness lost under distribution shift. Lipsum-FT keeps the link:
every step it feeds M random token strings ("lorem ipsum") through the frozen text tower and asks the
fine-tuned image features to give those texts the same similarities ("energies") as the zero-shot image
tower gives on the same augmented images. Unlike feature distillation, features may still move in
directions that no text reads out, which is where the task-specific learning happens.

    v_m(θ; x) = s · ⟨n(f_θ(x)), n(g(t_m))⟩                          energy of image x with text t_m
    R(θ)      = E_x [ 1/(2M) · Σ_m (v_m(θ; x) − v_m(θ0; x))² ]       (paper eqs. 7-8)
    L(θ, W)   = CE(s · n(f_θ(x)) Wᵀ, y) + λ · R(θ)

s = exp(logit_scale) is the model's own temperature (100 for OpenAI CLIP, the paper's constant; a tiny
CLIP sits near 20, where a hard-coded 100 would make R 25x too strong). The energy gap (paper eq. 6) is
R's expectation, measured with 10,000 random texts: `--report-energy-gap CKPT`.

Choices where the paper is silent (METHODS.md "choose"):
  * A random text is [SOT] + L ids uniform over the vocabulary without padding (0), SOT and EOT,
    + [EOT], then padding. (The official code draws ids from [0, SOT), i.e. it includes 0.) The texts
    are a function of (seed, step): new every step, the same on every process, and the same again
    after --resume, so a resumed run is bit-identical.
  * θ0 is a frozen copy of the image tower in eval mode, run on the same augmented batch under no_grad;
    text features come from the (frozen) text tower once per step; energies are computed in float32.
  * Energy gap: on up to ENERGY_GAP_IMAGES images of every test split (eval transform); every
    checkpoint sees the same 10,000 texts (ENERGY_GAP_SEED); each model scores the texts with its own
    text tower and scale. Written to <run>/energy_gap.json and appended to <runs root>/energy_gap.jsonl
    (results.jsonl rows are accuracies, so the gap lives beside them, not in them).

Run:  python lipsum_ft.py                                   (miniworld + miniclip, CPU, minutes)
      python lipsum_ft.py --data imagenet --data-root DIR --model ViT-B-16 --pretrained openai
      python lipsum_ft.py --report-energy-gap runs/lipsum_ft-miniworld-miniclip-s0
"""
import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (TrainArgs, encode_text, finish, get_device, image_transforms, load_classifier, load_clip, load_task,
                    parse_args, predict, seed_everything, set_trainable, setup, special_token_ids,
                    template_embeddings, train)

NUM_TEXTS = 80  # M, random texts per step (paper: 80; its Table 8 finds 10-320 equivalent)
TEXT_LENGTH = 8  # L, random tokens per text (paper: 8; much shorter or longer texts do worse)
REG_LOSS = "mse"  # default --reg-loss: "mse" on energies (Lipsum-FT) | "kld": KL(softmax(v0) ‖ softmax(v))
TEXT_GUIDANCE = "random"  # default --text-guidance: "random" texts (Lipsum-FT) | "fixed": CAR-FT's contexts
ENERGY_GAP_TEXTS = 10_000  # texts of the energy-gap metric (paper: 10,000 of length 8)
ENERGY_GAP_IMAGES = 2_000  # images per test split scored by the energy gap (evenly spaced subset)
ENERGY_GAP_SEED = 0  # the same texts for every checkpoint, so gaps are comparable


@dataclass
class Args(TrainArgs):
    lam: float = 1.0  # λ, weight of the energy regulariser R (paper: 1)
    reg_loss: str = REG_LOSS  # mse | kld: how energies are compared (paper Table 3's ablation)
    text_guidance: str = TEXT_GUIDANCE  # random | fixed: which texts give the energies (paper Table 3's ablation)
    report_energy_gap: str = ""  # a run dir or .pt: print its energy gap to the zero-shot model and exit


# The paper's recipe: lr 1e-5, batch 256, 10% warm-up + cosine, ImageNet 50k / DomainNet 5k steps, λ = 1,
# M = 80, L = 8. The shared fields equal baselines.py's FT presets so that the regulariser is the only
# difference from FT (the paper used weight decay 0 for every method, FT included).
PRESETS = {
    "miniworld": dict(steps=300, batch_size=128, lr=1e-4, weight_decay=0.1, crop_scale=0.5, eval_every=100,
                      ckpt_every=100, lam=1.0),
    "imagenet": dict(steps=50_000, batch_size=256, lr=1e-5, weight_decay=0.1, crop_scale=0.08, workers=8,
                     eval_every=5_000, ckpt_every=5_000, lam=1.0),
    "domainnet": dict(steps=5_000, batch_size=256, lr=1e-5, weight_decay=0.1, crop_scale=0.08, workers=8,
                      eval_every=1_000, ckpt_every=1_000, lam=1.0),
    "folder": dict(steps=1_000, batch_size=128, lr=1e-5, weight_decay=0.1, crop_scale=0.08, workers=4, lam=1.0),
}


def random_texts(num_texts: int, length: int, sot: int, eot: int, vocab_size: int, context_length: int,
                 generator: torch.Generator) -> torch.Tensor:
    """Token ids [M, context]: [SOT] + `length` ids uniform over [1, vocab) without SOT/EOT + [EOT] + 0s.
    EOT must stay the largest id in each row: open_clip pools the text at the argmax token."""
    assert length + 2 <= context_length, f"{length} random tokens + SOT + EOT exceed the context ({context_length})"
    vocab = torch.arange(1, vocab_size)
    vocab = vocab[(vocab != sot) & (vocab != eot)]  # [V-3]: no padding, no special tokens
    tokens = torch.zeros(num_texts, context_length, dtype=torch.long)  # [M, context]
    tokens[:, 0] = sot
    tokens[:, 1:length + 1] = vocab[torch.randint(len(vocab), (num_texts, length), generator=generator)]
    tokens[:, length + 1] = eot
    return tokens


def model_random_texts(clip, tokenizer, num_texts: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """random_texts with the special ids, vocabulary and context length of this model's tokenizer: [M, context]."""
    sot, eot, vocab_size = special_token_ids(tokenizer)
    context = getattr(tokenizer, "context_length", None) or clip.context_length
    return random_texts(num_texts, length, sot, eot, vocab_size, context, generator)


def energies(image_features: torch.Tensor, text_features: torch.Tensor, scale) -> torch.Tensor:
    """v = s · n(f) n(g)ᵀ, in at least float32 whatever the autocast dtype."""
    f = F.normalize(image_features.to(torch.promote_types(image_features.dtype, torch.float32)), dim=-1)  # [B, D]
    g = F.normalize(text_features.to(f.dtype), dim=-1)  # [M, D]
    return scale * f @ g.t()  # [B, M]


def lipsum_regularizer(image_features, image_features_init, text_features, scale, loss: str = "mse") -> torch.Tensor:
    """R = mean_x 1/(2M) Σ_m (v_m(θ) − v_m(θ0))²  (eq. 7), or the KL ablation KL(softmax(v0) ‖ softmax(v))."""
    v = energies(image_features, text_features, scale)  # [B, M]
    v0 = energies(image_features_init, text_features, scale)  # [B, M]
    if loss == "mse":
        return (v - v0).pow(2).sum(-1).div(2 * v.shape[-1]).mean()
    if loss == "kld":
        return F.kl_div(v.log_softmax(-1), v0.log_softmax(-1), reduction="batchmean", log_target=True)
    raise ValueError(f"unknown regulariser loss {loss!r} (mse | kld)")


def lipsum_ft_loss(logits, labels, image_features, image_features_init, text_features, scale, lam: float,
                   loss: str = REG_LOSS):
    """CE(s · n(f_θ(x)) Wᵀ, y) + λ · R. Returns (loss, terms)."""
    ce = F.cross_entropy(logits, labels)
    reg = lipsum_regularizer(image_features, image_features_init, text_features, scale, loss)
    return ce + lam * reg, {"ce": ce.detach(), "reg": reg.detach()}


class StepCounter(nn.Module):
    """The optimiser step as a buffer, checkpointed with the model, so that a resumed run draws the
    random texts of the step it resumes at."""

    def __init__(self):
        super().__init__()
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def set(self, step: int):
        self.step.fill_(step)


def text_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % 2**63


def make_loss_fn(model, lam: float, seed: int, counter: StepCounter, fixed_texts=None, reg_loss: str = REG_LOSS):
    """The training loss for `model` (image tower + head trainable): θ0 is a frozen copy of the image
    tower taken now; the texts are those of step `counter.step`, or `fixed_texts` [T, D] if given."""
    visual0 = copy.deepcopy(model.clip.visual).requires_grad_(False).eval()  # θ0
    device = model.head.device
    cache = {}

    def text_features(step: int) -> torch.Tensor:
        if fixed_texts is not None:
            return fixed_texts
        if cache.get("step") != step:  # once per step, shared by the micro-batches of gradient accumulation
            g = torch.Generator().manual_seed(text_seed(seed, step))
            tokens = model_random_texts(model.clip, model.tokenizer, NUM_TEXTS, TEXT_LENGTH, g).to(device)  # [M, ctx]
            with torch.no_grad():
                cache.update(step=step, features=encode_text(model.clip, tokens).float())  # [M, D]
        return cache["features"]

    def loss_fn(model, batch):
        images = batch["image"]  # [B, 3, H, W]
        features = model.image_features(images)  # [B, D]
        with torch.no_grad():
            features0 = F.normalize(visual0(images), dim=-1)  # [B, D], θ0 on the same augmented images
        scale = model.scale.detach()
        logits = scale * features @ model.head.t()  # [B, K], ClipClassifier.forward without a second encode
        texts = text_features(int(counter.step))  # [M, D]
        return lipsum_ft_loss(logits, batch["label"], features, features0, texts, scale, lam, reg_loss)

    return loss_fn


@torch.no_grad()
def encode_texts(clip, tokens: torch.Tensor, device, chunk: int = 1000) -> torch.Tensor:
    return torch.cat([encode_text(clip, c.to(device)).float() for c in tokens.split(chunk)])  # [N_t, D]


@torch.no_grad()
def energy_gap(model, clip0, split, transform, device, text_features, text_features0, batch_size: int = 512) -> float:
    """½ E_x mean_t (v(θ; x, t) − v(θ0; x, t))² on one split; each model scores the texts with its own
    text tower (text_features from the fine-tuned one, text_features0 from the zero-shot one) and s."""
    s, s0 = model.scale, clip0.logit_scale.exp()

    def per_image(x):
        v = energies(model.image_features(x), text_features, s)  # [B, N_t]
        v0 = energies(clip0.encode_image(x), text_features0, s0)  # [B, N_t]
        return (v - v0).pow(2).mean(-1, keepdim=True) / 2  # [B, 1]

    images = split.images
    if len(images) > ENERGY_GAP_IMAGES:
        images = images.subset(np.linspace(0, len(images) - 1, ENERGY_GAP_IMAGES).round().astype(int))
    gaps, _, _ = predict(per_image, images, transform, device, batch_size)  # common's batched, bad-image-safe loop
    return gaps.mean().item()


def report_energy_gap(args) -> dict:
    """The energy gap of a fine-tuned checkpoint to the zero-shot model it started from."""
    path = Path(args.report_energy_gap)
    run = path if path.is_dir() else path.parent
    saved = json.loads((run / "args.json").read_text()) if (run / "args.json").exists() else {}
    device = get_device(args.device)
    task = load_task(saved.get("data", args.data), saved.get("data_root", args.data_root), saved.get("seed", args.seed))
    model, meta, pp = load_classifier(str(path), device, task)
    seed_everything(saved.get("seed", args.seed))  # a randomly initialised --model is rebuilt as setup() built it
    clip0 = load_clip(meta["model"], meta["pretrained"], device)[0].eval()
    texts = model_random_texts(model.clip, model.tokenizer, ENERGY_GAP_TEXTS, TEXT_LENGTH,
                               torch.Generator().manual_seed(ENERGY_GAP_SEED))  # [N_t, ctx]
    t, t0 = encode_texts(model.clip, texts, device), encode_texts(clip0, texts, device)  # [N_t, D] each
    eval_tf = image_transforms(pp, 1.0)[1]
    splits = {}
    for split in task.tests:
        gap = energy_gap(model, clip0, split, eval_tf, device, t, t0, args.eval_batch_size)
        splits[split.name] = {"kind": split.kind, "energy_gap": gap}
        print(f"  {split.name:<16} {split.kind:<9} energy gap {gap:.6g}")
    by_kind = lambda k: [v["energy_gap"] for v in splits.values() if v["kind"] == k]  # noqa: E731
    result = {"checkpoint": str(path), "method": meta["method"], "data": task.name, "model": meta["model"],
              "seed": saved.get("seed"), "num_texts": ENERGY_GAP_TEXTS, "text_length": TEXT_LENGTH,
              "id": float(np.mean(by_kind("id"))) if by_kind("id") else None,
              "ood_mean": float(np.mean(by_kind("ood"))) if by_kind("ood") else None, "splits": splits}
    print(f"{meta['method']}: energy gap ID {result['id']}, OOD mean {result['ood_mean']}")
    (run / "energy_gap.json").write_text(json.dumps(result, indent=2))
    with open(run.parent / "energy_gap.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    return result


def main(argv=None):
    args = parse_args(Args, PRESETS, argv)
    if args.report_energy_gap:
        return report_energy_gap(args)
    if args.reg_loss not in ("mse", "kld") or args.text_guidance not in ("random", "fixed"):
        raise SystemExit(f"error: --reg-loss {args.reg_loss!r} / --text-guidance {args.text_guidance!r}: "
                         "choose mse or kld / random or fixed")
    env = setup(args, "lipsum_ft")
    model = set_trainable(env.model, image=True, text=False, head=True)
    fixed = None
    if args.text_guidance == "fixed":  # CAR-FT's contexts: per template, n(mean over classes of n(g(prompt)))
        prompts = template_embeddings(env.clip, env.tokenizer, env.task.classnames, env.task.templates, env.device)
        fixed = F.normalize(prompts.mean(0), dim=-1)  # [T, D]
    counter = StepCounter()
    loss_fn = make_loss_fn(model, args.lam, args.seed, counter, fixed, args.reg_loss)
    train(env, loss_fn, args, after_step=counter.set, extra_state={"text_step": counter})
    ablation = [a for a, default in ((args.reg_loss, "mse"), (args.text_guidance, "random")) if a != default]
    return finish(env, args, tag=" ".join([f"lam={args.lam:g}", *ablation]))  # ablations get their own rows


if __name__ == "__main__":
    main()
