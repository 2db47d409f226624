"""The tiny CLIP (open_clip's own CLIP class, config `miniclip`): create, preprocess, pretrain, save and load it."""
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .text import WordTokenizer, captions
from .world import BACKGROUNDS, COLOURS, IMAGE_SIZE, _digest, cache_dir, render_many, world_config

# ----------------------------------------------------------------------------------------------------
# Knobs
ASSETS = Path(__file__).resolve().parents[1] / "assets"
CONFIG_JSON = ASSETS / "miniclip.json"
CHECKPOINT = ASSETS / "miniclip.pt"

PREPROCESS = dict(size=IMAGE_SIZE, mean=(0.50, 0.50, 0.45), std=(0.26, 0.25, 0.28))
AUG_SCALE = (0.7, 1.0)  # RandomResizedCrop scale range used in pretraining

PRETRAIN_SEED = 1
PRETRAIN_IMAGES = 60_000
PRETRAIN_STEPS = 1500
PRETRAIN_BATCH = 256
PRETRAIN_LR = 1e-3
PRETRAIN_WD = 0.1
PRETRAIN_GROUP = 8  # images per (style, background, colour) group in a pretraining batch

# ----------------------------------------------------------------------------------------------------
# Tiny CLIP (open_clip's own CLIP class)
_REGISTERED = set()


def create_miniclip(cfg: dict = None):
    """open_clip.create_model on the committed `miniclip` config, or on a custom cfg dict (tests)."""
    path = CONFIG_JSON
    if cfg is not None:
        path = cache_dir() / "configs" / f"miniclip_{_digest(cfg)}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(cfg, indent=1))
    cfg = json.loads(path.read_text())
    if cfg["text_cfg"]["vocab_size"] != WordTokenizer().vocab_size:
        raise ValueError(f"{path}: vocab_size {cfg['text_cfg']['vocab_size']} != tokenizer's "
                         f"{WordTokenizer().vocab_size}; the caption grammar changed, rebuild the config")
    if path not in _REGISTERED:
        open_clip.add_model_config(path)
        _REGISTERED.add(path)
    logger = logging.getLogger()  # open_clip warns "No pretrained weights loaded": false here, the caller loads them
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return open_clip.create_model(path.stem), cfg
    finally:
        logger.setLevel(level)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [B,32,32,3] -> normalised float [B,3,32,32] (the eval transform)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255  # [B,3,H,W]
    mean, std = torch.tensor(PREPROCESS["mean"]).view(1, 3, 1, 1), torch.tensor(PREPROCESS["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(x: torch.Tensor, gen: torch.Generator, scale=AUG_SCALE):
    """Per-image RandomResizedCrop(scale, ratio 3/4..4/3) + horizontal flip as one affine resample.
    x [B,3,H,W] -> (x', flipped bool [B])."""
    B = x.shape[0]
    r = lambda: torch.rand(B, generator=gen)  # noqa: E731
    area = scale[0] + (scale[1] - scale[0]) * r()
    ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * r())
    w, h = torch.sqrt(area * ratio).clamp(max=1), torch.sqrt(area / ratio).clamp(max=1)  # crop size / image
    tx, ty = (2 * r() - 1) * (1 - w), (2 * r() - 1) * (1 - h)
    flip = r() < 0.5
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = torch.where(flip, -w, w), tx
    theta[:, 1, 1], theta[:, 1, 2] = h, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False), flip


def pretrain_corpus(n: int = PRETRAIN_IMAGES, seed: int = PRETRAIN_SEED):
    """Captionable pretraining images of every style/class/attribute, cached: (uint8 [n,32,32,3], attrs)."""
    stem = cache_dir() / f"corpus-{_digest([world_config(), n, seed])}"
    if not Path(f"{stem}.npy").exists():
        images, attrs = render_many(seed, np.arange(n), progress=n > 10_000)
        np.savez(f"{stem}.tmp.npz", **attrs)
        os.replace(f"{stem}.tmp.npz", f"{stem}.npz")
        np.save(f"{stem}.tmp.npy", images)
        os.replace(f"{stem}.tmp.npy", f"{stem}.npy")
    attrs = dict(np.load(f"{stem}.npz"))
    return np.load(f"{stem}.npy"), attrs


def pretrain(steps: int = PRETRAIN_STEPS, batch_size: int = PRETRAIN_BATCH, lr: float = PRETRAIN_LR,
             n_images: int = PRETRAIN_IMAGES, cfg: dict = None, out=None, seed: int = 0, progress: bool = True):
    """Symmetric contrastive pretraining on captioned corpus images. -> (model in eval mode, losses list)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model, cfg = create_miniclip(cfg)
    tok = WordTokenizer(context_length=cfg["text_cfg"]["context_length"])
    images, attrs = pretrain_corpus(n_images)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=PRETRAIN_WD), dict(params=rest, weight_decay=0)],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup else
                                              0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    loss_fn, losses, t0 = open_clip.loss.ClipLoss(), [], time.time()
    model.train()
    # Hard-negative batches: GROUP images share (style, background, colour). With random batches the
    # contrastive loss is already low from colour/background/style alone and shape is never learned.
    combo = (attrs["style"] * len(BACKGROUNDS) + attrs["bg"]) * len(COLOURS) + attrs["colour"]
    order = np.argsort(combo, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(combo[order])) + 1)  # image indices per combination
    rng = np.random.default_rng(seed)
    bar = tqdm(range(steps), desc="pretrain miniclip", disable=not progress)
    for step in bar:
        idx = []
        for g in rng.permutation(len(groups)):
            idx.extend(rng.choice(groups[g], min(PRETRAIN_GROUP, len(groups[g]), batch_size - len(idx)), replace=False))
            if len(idx) == batch_size:
                break
        idx = np.array(idx)
        x, flip = augment(to_tensor(images[idx]), gen)  # [B,3,32,32]
        a = {k: v[idx] for k, v in attrs.items()}
        a["cx"] = np.where(flip.numpy(), -a["cx"], a["cx"])  # mirrored image: "left" becomes "right"
        text = tok(captions(a, PRETRAIN_SEED, idx, epoch=step))  # [B, context], captions re-sampled per draw
        img_f, txt_f, scale = model(x, text)
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", scale=f"{scale.item():.1f}")
    model.eval()
    if out is not None:
        save_miniclip(model, cfg, out, meta=dict(steps=steps, batch_size=batch_size, lr=lr, n_images=n_images,
                                                  final_loss=float(np.mean(losses[-50:])),
                                                  minutes=(time.time() - t0) / 60))
    return model, losses


def save_miniclip(model, cfg: dict, path, meta: dict = None):
    """Checkpoint with its config, vocabulary and preprocessing, written atomically (temp + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(dict(state_dict=model.state_dict(), config=cfg, vocab=WordTokenizer().vocab,
                    preprocess=PREPROCESS, meta=meta or {}), tmp)
    os.replace(tmp, path)


def load_miniclip(device="cpu", path=None):
    """-> (model in eval mode, WordTokenizer). Default: assets/miniclip.pt (CHECKPOINT). A missing
    checkpoint is an error (SystemExit), never a silent pretraining run: build the default one with
    `python -m miniworld pretrain` (about 12 minutes on 2 cores)."""
    if path is None:
        path = CHECKPOINT
        if not Path(path).exists():
            raise SystemExit(f"miniworld: the tiny CLIP checkpoint {path} is missing. Build it with "
                             f"`python -m miniworld pretrain` (about 12 minutes on 2 cores; writes {path}).")
    elif not Path(path).exists():
        raise SystemExit(f"miniworld: no checkpoint at {path} (the path given to load_miniclip). Pass an "
                         f"existing file, or omit the path to load {CHECKPOINT} (`python -m miniworld pretrain` "
                         f"builds that one).")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        tok = WordTokenizer(context_length=ckpt["config"]["text_cfg"]["context_length"])
    except Exception as e:  # noqa: BLE001 -- any unreadable file gets the same actionable message
        raise SystemExit(f"error: {path} is not a miniclip checkpoint ({type(e).__name__}: {e}); --model miniclip takes "
                         "a file written by `python -m miniworld pretrain`, or nothing") from None
    if ckpt["vocab"] != tok.vocab or ckpt["preprocess"] != PREPROCESS:
        raise ValueError(f"{path} was trained with another vocabulary/preprocessing than this miniworld; "
                         "rebuild it with `python -m miniworld pretrain`")
    cfg = ckpt["config"]
    model, _ = create_miniclip(None if cfg == json.loads(CONFIG_JSON.read_text()) else cfg)
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), tok

