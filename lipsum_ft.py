"""Lipsum-FT: fine-tune CLIP's image tower while keeping its energies on random texts.

Paper: Nam, Heo & Lee, "Lipsum-FT: Robust Fine-Tuning of Zero-Shot Models Using Random Text
Guidance", ICLR 2024 (official JAX code github.com/cs-giung/lipsum-ft). METHODS.md, "Lipsum-FT".

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

Choices where the paper is silent:
  * A random text is L ids uniform over the tokenizer's vocabulary without its special ids, laid out
    exactly as the tokenizer lays out a real text of L tokens, so that the text tower pools it where it
    pools real text (the EOT at the argmax id, the last or first position, a [CLS]): for open_clip's BPE
    (and miniclip's words) [SOT] + ids + [EOT] + padding 0 (the official code draws ids from [0, SOT),
    i.e. it includes 0); for a Hugging Face tokenizer (SigLIP's, through open_clip's HFTokenizer) the
    tokenizer's own prefix and suffix (found by tokenizing LAYOUT_PROBE with and without special
    tokens: SigLIP's is no start token and an EOS after the ids) + its padding to the context length,
    which is where SigLIP's tower (pool_type "last") reads the text. A tokenizer laid out otherwise
    (open_clip's "clips" mode, left padding) stops with a message at once. The texts are a function of
    (seed, step): new every step, the same on every process, and the same again after --resume, so a
    resumed run is bit-identical.
  * Energies leave out a SigLIP's logit bias b: in R both sides share the frozen b (it cancels), and in
    the energy gap a moved b would shift every energy of an image alike, which says nothing about the
    image-text link R protects.
  * θ0 is a frozen copy of the image tower in eval mode, run on the same augmented batch under no_grad;
    text features come from the (frozen) text tower once per step; energies, R and the energy gap are
    computed in float32 with autocast off (bf16 would round away the differences R measures near θ0).
  * Energy gap: on up to ENERGY_GAP_IMAGES images of every test split (eval transform); every
    checkpoint sees the same 10,000 texts (ENERGY_GAP_SEED); each model scores the texts with its own
    text tower and scale. Written to <run>/energy_gap.json and appended to <runs root>/energy_gap.jsonl
    (results.jsonl rows are accuracies, so the gap lives beside them, not in them).

miniworld's λ is 0.5, chosen on its held-out slice (PRESETS); the paper's 1 elsewhere.

Run:  python lipsum_ft.py                                   (miniworld + miniclip, CPU, minutes)
      python lipsum_ft.py --data imagenet --data-root DIR --model ViT-B-16 --pretrained openai
      python lipsum_ft.py --report-energy-gap runs/lipsum_ft-miniworld-k10-miniclip-s0
"""
import json
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from common import (TrainArgs, append_lines, cosine_logits, encode_text, finish, frozen_copy, get_device, load_run,
                    parse_args, predict, run_theta0, set_trainable, setup, template_embeddings, train)

NUM_TEXTS = 80  # M, random texts per step (paper: 80; its Table 8 finds 10-320 equivalent)
TEXT_LENGTH = 8  # L, random tokens per text (paper: 8; much shorter or longer texts do worse)
ENERGY_GAP_TEXTS = 10_000  # texts of the energy-gap metric (paper: 10,000 of length 8)
ENERGY_GAP_IMAGES = 2_000  # images per test split scored by the energy gap (evenly spaced subset)
ENERGY_GAP_SEED = 0  # the same texts for every checkpoint, so gaps are comparable
LAYOUT_PROBE = "a photo of a cat."  # a real text, tokenized to see where a Hugging Face tokenizer puts its special tokens


@dataclass
class Args(TrainArgs):
    lam: float = 1.0  # λ, weight of the energy regulariser R (paper: 1 on every dataset)
    reg_loss: str = "mse"  # mse | kld: how energies are compared (paper Table 3's ablation; kld = KL(softmax(v0) ‖ softmax(v)))
    text_guidance: str = "random"  # random | fixed: random texts, or CAR-FT's template contexts (paper Table 3's ablation)
    report_energy_gap: str = ""  # a run dir or .pt: print its energy gap to the zero-shot model and exit


# Lipsum-FT trains with FT's recipe (common.FT_RECIPES) on every dataset, with the paper's λ = 1 (the default
# above) everywhere but miniworld, whose λ was chosen on its held-out slice at its recipe's 10 images per class
# (reproduce/sweep.py's rule; docs/sweep_lipsum_ft_lam_k10.md: λ = 1 gives up 1.5 held-out points, 0.5 gives up 1.0).
PRESETS = {"miniworld": dict(lam=0.5)}


def energies(image_features: torch.Tensor, text_features: torch.Tensor, scale) -> torch.Tensor:
    """v = s · n(f) n(g)ᵀ in at least float32, with autocast off: under bf16 autocast the product would
    round v to 3 significant digits, more than the differences R measures near θ0."""
    dtype = torch.promote_types(image_features.dtype, torch.float32)
    with torch.autocast(image_features.device.type, enabled=False):
        f = F.normalize(image_features.to(dtype), dim=-1)  # [B, D]
        g = F.normalize(text_features.to(dtype), dim=-1)  # [M, D]
        return torch.as_tensor(scale, dtype=dtype, device=f.device) * f @ g.t()  # [B, M]


def lipsum_regularizer(image_features, image_features_init, text_features, scale, loss: str = "mse") -> torch.Tensor:
    """R = mean_x 1/(2M) Σ_m (v_m(θ) − v_m(θ0))²  (eq. 7), or the KL ablation KL(softmax(v0) ‖ softmax(v));
    in at least float32 with autocast off (`energies`)."""
    v = energies(image_features, text_features, scale)  # [B, M]
    v0 = energies(image_features_init, text_features, scale)  # [B, M]
    with torch.autocast(v.device.type, enabled=False):
        if loss == "mse":
            return (v - v0).pow(2).sum(-1).div(2 * v.shape[-1]).mean()
        if loss == "kld":
            return F.kl_div(v.log_softmax(-1), v0.log_softmax(-1), reduction="batchmean", log_target=True)
    raise ValueError(f"unknown regulariser loss {loss!r} (mse | kld)")


def lipsum_ft_loss(logits, labels, image_features, image_features_init, text_features, scale, lam: float,
                   loss: str = "mse"):
    """CE(s · n(f_θ(x)) Wᵀ, y) + λ · R. Returns (loss, terms)."""
    ce = F.cross_entropy(logits, labels)
    reg = lipsum_regularizer(image_features, image_features_init, text_features, scale, loss)
    return ce + lam * reg, {"ce": ce.detach(), "reg": reg.detach()}


def random_texts(num_texts: int, length: int, sot: int, eot: int, vocab_size: int, context_length: int,
                 generator: torch.Generator) -> torch.Tensor:
    """Token ids [M, context] laid out as open_clip's BPE lays out a text: [SOT] + `length` ids uniform over
    [1, vocab) without SOT/EOT + [EOT] + 0s. EOT must stay the largest id in each row: open_clip pools
    CLIP's text at the argmax token."""
    assert length + 2 <= context_length, f"{length} random tokens + SOT + EOT exceed the context ({context_length})"
    vocab = torch.arange(1, vocab_size)
    vocab = vocab[(vocab != sot) & (vocab != eot)]  # [V-3]: no padding, no special tokens
    tokens = torch.zeros(num_texts, context_length, dtype=torch.long)  # [M, context]
    tokens[:, 0] = sot
    tokens[:, 1:length + 1] = vocab[torch.randint(len(vocab), (num_texts, length), generator=generator)]
    tokens[:, length + 1] = eot
    return tokens


def special_token_ids(tokenizer) -> Optional[tuple[int, int, int]]:
    """(sot, eot, vocab_size) of an open_clip SimpleTokenizer or the miniworld word tokenizer; None for
    any other tokenizer (a Hugging Face one: hf_text_layout)."""
    if not hasattr(tokenizer, "sot_token_id") or not hasattr(tokenizer, "eot_token_id"):
        return None
    vocab_size = getattr(tokenizer, "vocab_size", None) or len(tokenizer.encoder)
    return tokenizer.sot_token_id, tokenizer.eot_token_id, vocab_size


def hf_text_layout(tokenizer) -> tuple[list, list, int, torch.Tensor]:
    """(prefix, suffix, pad, vocab) of a Hugging Face tokenizer behind open_clip (HFTokenizer,
    SigLipTokenizer): the special ids it puts before and after a text's ids (found on LAYOUT_PROBE, with
    and without special tokens), its padding id, and its ids that are not special [V']."""
    hf, mode = getattr(tokenizer, "tokenizer", None), getattr(tokenizer, "tokenizer_mode", "")
    name = type(tokenizer).__name__ + (f" in mode {mode!r}" if mode else "")
    if hf is None or not callable(hf) or getattr(hf, "pad_token_id", None) is None or mode:
        raise SystemExit(f"error: Lipsum-FT cannot lay out random texts the way this model's tokenizer ({name}) lays "
                         "out real text: it knows open_clip's BPE, miniclip's words and plain Hugging Face tokenizers "
                         "padded to the context. Use --text-guidance fixed (template texts, any tokenizer).")
    body = hf(LAYOUT_PROBE, add_special_tokens=False)["input_ids"]
    full = hf(LAYOUT_PROBE)["input_ids"]
    at = [i for i in range(len(full) - len(body) + 1) if body and full[i:i + len(body)] == body]
    if not at or getattr(hf, "padding_side", "right") != "right":
        raise SystemExit(f"error: Lipsum-FT cannot find where the tokenizer {name} puts a text's ids among its special "
                         f"tokens ({body} in {full}, padding side {getattr(hf, 'padding_side', '?')}). "
                         "Use --text-guidance fixed (template texts, any tokenizer).")
    prefix, suffix = full[:at[0]], full[at[0] + len(body):]
    if getattr(tokenizer, "strip_sep_token", False):  # HFTokenizer's option: the separator becomes 0
        prefix, suffix = ([0 if t == hf.sep_token_id else t for t in part] for part in (prefix, suffix))
    vocab = torch.arange(len(hf))
    return prefix, suffix, hf.pad_token_id, vocab[~torch.isin(vocab, torch.tensor(hf.all_special_ids))]  # [V']


def laid_out_texts(body: torch.Tensor, prefix: list, suffix: list, pad: int, context_length: int) -> torch.Tensor:
    """Token ids [M, context]: prefix + body [M, L] + suffix, then padding, as the tokenizer lays out a text."""
    n, length = len(prefix), body.shape[1]
    if n + length + len(suffix) > context_length:
        raise SystemExit(f"error: {length} random tokens and the tokenizer's {n + len(suffix)} special tokens "
                         f"exceed the text context ({context_length})")
    tokens = torch.full((len(body), context_length), pad, dtype=torch.long)  # [M, context]
    tokens[:, :n] = torch.tensor(prefix, dtype=torch.long)
    tokens[:, n:n + length] = body
    tokens[:, n + length:n + length + len(suffix)] = torch.tensor(suffix, dtype=torch.long)
    return tokens


def model_random_texts(clip, tokenizer, num_texts: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Random texts laid out by this model's tokenizer, in its vocabulary and context length: [M, context].
    open_clip's BPE and miniclip's words: random_texts; a Hugging Face tokenizer: random ids that are
    not special, with its own special tokens and padding around them (hf_text_layout)."""
    context = getattr(tokenizer, "context_length", None) or clip.context_length
    specials = special_token_ids(tokenizer)
    if specials is not None:
        sot, eot, vocab_size = specials
        return random_texts(num_texts, length, sot, eot, vocab_size, context, generator)
    prefix, suffix, pad, vocab = hf_text_layout(tokenizer)
    embedded = getattr(clip, "vocab_size", None)  # the ids the text tower has embeddings for
    vocab = vocab if embedded is None else vocab[vocab < embedded]  # [V']
    body = vocab[torch.randint(len(vocab), (num_texts, length), generator=generator)]  # [M, L]
    return laid_out_texts(body, prefix, suffix, pad, context)


def text_seed(seed: int, step: int) -> int:
    """The random texts of step `step` come from this generator seed: new every step, the same on every
    process, every micro-batch of the step and after --resume."""
    return (seed * 1_000_003 + step) % 2**63


def make_loss_fn(model, lam: float, seed: int, fixed_texts=None, reg_loss: str = "mse"):
    """The training loss for `model` (image tower + head trainable): θ0 is a frozen copy of the image
    tower taken now; the texts of step t are random_texts from text_seed(seed, t), or `fixed_texts`
    [T, D] if given."""
    visual0 = frozen_copy(model.clip.visual)  # θ0
    device = model.head.device
    if fixed_texts is None:  # a tokenizer whose texts cannot be laid out stops here, before any training
        model_random_texts(model.clip, model.tokenizer, 1, TEXT_LENGTH, torch.Generator())
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

    def loss_fn(model, batch, step):  # the same first lines as car_ft.py's step, on purpose: each file shows its whole step
        images = batch["image"]  # [B, 3, H, W]
        features = model.image_features(images)  # [B, D]
        with torch.no_grad():
            features0 = F.normalize(visual0(images), dim=-1)  # [B, D], θ0 on the same augmented images
        scale = model.scale.detach()
        logits = cosine_logits(features, model.head, scale)  # [B, K], the classifier on the features above
        return lipsum_ft_loss(logits, batch["label"], features, features0, text_features(step), scale, lam, reg_loss)

    return loss_fn


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
    trained = train(env, make_loss_fn(model, args.lam, args.seed, fixed, args.reg_loss), args)
    ablation = [a for a, default in ((args.reg_loss, "mse"), (args.text_guidance, "random")) if a != default]
    return finish(env, args, trained, tag=" ".join([f"lam={args.lam:g}", *ablation]))  # ablations get their own rows


# ----------------------------------------------------------------------------------------------
# The energy gap (paper eq. 6): how far fine-tuning moved the image-text energies
# ----------------------------------------------------------------------------------------------
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
    device = get_device(args.device)
    run = load_run(args.report_energy_gap, device)
    model, clip0 = run.model, run_theta0(run, device).clip
    texts = model_random_texts(model.clip, model.tokenizer, ENERGY_GAP_TEXTS, TEXT_LENGTH,
                               torch.Generator().manual_seed(ENERGY_GAP_SEED))  # [N_t, ctx]
    t, t0 = encode_texts(model.clip, texts, device), encode_texts(clip0, texts, device)  # [N_t, D] each
    splits = {}
    for split in run.task.tests:
        gap = energy_gap(model, clip0, split, run.eval_tf, device, t, t0, args.eval_batch_size)
        splits[split.name] = {"kind": split.kind, "energy_gap": gap}
        print(f"  {split.name:<16} {split.kind:<9} energy gap {gap:.6g}")
    by_kind = lambda k: [v["energy_gap"] for v in splits.values() if v["kind"] == k]  # noqa: E731
    result = {"checkpoint": args.report_energy_gap, "method": run.method, "data": run.task.name, "model": run.meta["model"],
              "seed": run.args.get("seed"), "num_texts": ENERGY_GAP_TEXTS, "text_length": TEXT_LENGTH,
              "id": float(np.mean(by_kind("id"))) if by_kind("id") else None,
              "ood_mean": float(np.mean(by_kind("ood"))) if by_kind("ood") else None, "splits": splits}
    print(f"{run.method}: energy gap ID {result['id']}, OOD mean {result['ood_mean']}")
    (run.dir / "energy_gap.json").write_text(json.dumps(result, indent=2))
    append_lines(run.dir.parent / "energy_gap.jsonl", json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
