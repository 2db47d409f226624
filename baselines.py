"""Baselines the robust fine-tuning papers compare against, one short loss each.

  zeroshot  the pretrained CLIP with the text-built head W, no training.
  ft        standard fine-tuning (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"):
            cross-entropy on logits s · n(f_θ(x)) @ Wᵀ, head W initialised from the zero-shot head,
            image tower + head trainable, text tower and logit scale s frozen.

      L_FT(θ, W) = CE(s · n(f_θ(x)) Wᵀ, y)

Run:  python baselines.py --method ft        (miniworld + miniclip, CPU, minutes)
      python baselines.py --method ft --data imagenet --data-root DIR --model ViT-B-16 --pretrained openai
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common import TrainArgs, finish, parse_args, set_trainable, setup, train

METHODS = ("zeroshot", "ft")


@dataclass
class Args(TrainArgs):
    method: str = "ft"  # zeroshot | ft


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


def ft_loss(logits: torch.Tensor, labels: torch.Tensor):
    """Cross-entropy on the classifier logits [B, K]."""
    ce = F.cross_entropy(logits, labels)
    return ce, {"ce": ce.detach()}


def main(argv=None):
    args = parse_args(Args, PRESETS, argv)
    if args.method not in METHODS:
        raise SystemExit(f"error: unknown --method {args.method!r}; choose one of {', '.join(METHODS)}")
    env = setup(args, args.method)
    if args.method == "zeroshot":
        return finish(env, args, step=0)

    set_trainable(env.model, image=True, text=False, head=True)
    train(env, lambda model, batch: ft_loss(model(batch["image"]), batch["label"]), args)
    return finish(env, args)


if __name__ == "__main__":
    main()
