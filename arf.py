"""ARF: Anchor-based Robust Finetuning of vision-language models (Han et al., 2024; seed 000).

Fine-tuning on "a photo of a {class}" alone gives CLIP a target far poorer than the captions it was
pretrained on, and its feature space drifts: domain-shift and zero-shot accuracy fall. ARF fine-tunes
both towers with the CLIP loss on the class prompts (FLYP-style) plus two kinds of anchors with rich
text: the same images paired with captions from a pretrained captioner (text-compensated anchors,
BLIP-2 in the paper), and image-text pairs retrieved from a pretraining-like pool by frozen-CLIP image
similarity (image-text anchors, CC3M in the paper).

    L_ARF = W_FT · L(x, "a photo of a y") + W_CAP · L(x, caption(x)) + W_RET · L(x_r, t_r)
    L(I, T) = ½ [CE(s·n(f(I)) n(g(T))ᵀ, ids) + CE(s·n(g(T)) n(f(I))ᵀ, ids)]      (symmetric InfoNCE)

Choices where the paper is silent (METHODS.md "choose"): weights 1:1:1; retrieval by image-image cosine
similarity of the frozen tower, k nearest per training image, deduplicated by pool row; one retrieved
batch of --ret-batch-size pairs per step (half the
batch: keeps ARF's step within 2x FT's on ViT-B/16); duplicate class prompts (and identical captions) in a batch
are positives of each other, not false negatives (targets uniform over the duplicates); the contrastive
loss sees each process's own micro-batch (no all-gather); the logit scale trains and is clamped at 100
like open_clip's; after training the head is rebuilt from the fine-tuned text tower.

Run:  python arf.py                                   (miniworld: dataset captions, generated 50k pool)
      python arf.py --data imagenet --data-root DIR --model ViT-B-16 --pretrained openai \
          --captioner blip2 --captioner-model Salesforce/blip2-opt-2.7b --pool cc3m.tsv
      python arf.py --no-cap / --no-ret               (ablations: one anchor switched off)
"""
import csv
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import (FileImages, StepBatchSampler, TrainArgs, TransformedImages, barrier, collate_skipping_bad, encode_text,
                    finish, is_main_process, parse_args, set_trainable, setup, train, zeroshot_head)

W_FT, W_CAP, W_RET = 1.0, 1.0, 1.0  # loss weights of the class prompts and the two anchors (paper: 1:1:1)
FT_TEMPLATE = "a photo of a {}."  # L_ft's class prompt
MAX_LOGIT_SCALE = math.log(100)  # open_clip clamps the trained temperature here
EXACT_MAX = 1_000_000  # pools with fewer rows are searched exactly; larger ones with an IVF index
PQ_MIN = 20_000_000  # from here on IVF stores PQ codes (float vectors would not fit in RAM)
IVF_NPROBE = 8  # inverted lists visited per query (recall@10 0.99 on bench/retrieval.py's pool)
CAPTION_MAX_TOKENS = 30  # BLIP-2 generation length


@dataclass
class Args(TrainArgs):
    captioner: str = "dataset"  # dataset (the data's own captions or --captions FILE) | blip2
    captioner_model: str = "Salesforce/blip2-opt-2.7b"  # BLIP-2 hub name or folder (--captioner blip2)
    captions: str = ""  # TSV 'image path<TAB>caption' (--captioner dataset on data without captions)
    caption_batch_size: int = 64  # images per BLIP-2 generate call
    pool: str = ""  # retrieval pool in open_clip's CSV/TSV layout (miniworld: generated when empty)
    pool_img_key: str = "filepath"  # pool column holding the image path (relative to the pool file)
    pool_caption_key: str = "title"  # pool column holding the caption
    pool_sep: str = "\\t"  # pool column separator (escapes like \t are decoded)
    pool_size: int = 50_000  # miniworld only: images in the generated pool
    retrieve_k: int = 8  # pool neighbours retrieved per training image (before deduplication)
    ret_batch_size: int = 0  # retrieved pairs per step (0 = half of --batch-size)
    cap: bool = True  # text-compensated anchors, L_cap (--no-cap: ablation)
    ret: bool = True  # retrieved image-text anchors, L_ret (--no-ret: ablation)
    cache: str = ""  # folder for captions, pool embeddings, retrievals (default $ROBUSTFT_CACHE/arf)


# FT's recipes (baselines.py) so that ARF and FT differ only in the loss.
PRESETS = {
    "miniworld": dict(steps=300, batch_size=128, lr=1e-4, weight_decay=0.1, crop_scale=0.5, eval_every=100,
                      ckpt_every=100, captioner="dataset", retrieve_k=8),
    "imagenet": dict(steps=50_000, batch_size=256, lr=1e-5, weight_decay=0.1, crop_scale=0.08, workers=8,
                     eval_every=5_000, ckpt_every=5_000, captioner="blip2", retrieve_k=4),
    "domainnet": dict(steps=5_000, batch_size=256, lr=1e-5, weight_decay=0.1, crop_scale=0.08, workers=8,
                      eval_every=1_000, ckpt_every=1_000, captioner="blip2", retrieve_k=8),
    "folder": dict(steps=1_000, batch_size=128, lr=1e-5, weight_decay=0.1, crop_scale=0.08, workers=4,
                   captioner="blip2", retrieve_k=8),
}


def clip_contrastive_loss(image_emb, text_emb, logit_scale, groups=None):
    """Symmetric CLIP loss of unit-norm pairs image_emb, text_emb [B, D] at temperature logit_scale
    (= s, already exponentiated). `groups` [B]: pairs with the same id are positives of each other
    (one class prompt shared by several images), the target spread evenly over them."""
    logits = (logit_scale * image_emb @ text_emb.t()).float()  # [B, B]
    if groups is None:
        ids = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, ids) + F.cross_entropy(logits.t(), ids)) / 2
    same = (groups[:, None] == groups[None, :]).float()  # [B, B], symmetric
    target = same / same.sum(1, keepdim=True)
    return -((target * logits.log_softmax(1)).sum(1).mean() + (target * logits.t().log_softmax(1)).sum(1).mean()) / 2


def arf_loss(image_emb, class_emb, labels, logit_scale, caption_emb=None, caption_ids=None,
             ret_image_emb=None, ret_text_emb=None, ret_ids=None):
    """L_ARF = W_FT·L(x, prompt) + W_CAP·L(x, caption) + W_RET·L(x_r, t_r); an anchor left None is off."""
    l_ft = clip_contrastive_loss(image_emb, class_emb, logit_scale, labels)
    terms = {"l_ft": l_ft.detach()}
    loss = W_FT * l_ft
    if caption_emb is not None:
        l_cap = clip_contrastive_loss(image_emb, caption_emb, logit_scale, caption_ids)
        loss, terms["l_cap"] = loss + W_CAP * l_cap, l_cap.detach()
    if ret_image_emb is not None:
        l_ret = clip_contrastive_loss(ret_image_emb, ret_text_emb, logit_scale, ret_ids)
        loss, terms["l_ret"] = loss + W_RET * l_ret, l_ret.detach()
    return loss, terms


# ----------------------------------------------------------------------------------------------
# Captions (text-compensated anchors)
# ----------------------------------------------------------------------------------------------
def cache_root(args) -> Path:
    root = Path(args.cache or Path(os.environ.get("ROBUSTFT_CACHE", Path.home() / ".cache" / "robust-ft")) / "arf")
    root.mkdir(parents=True, exist_ok=True)
    return root


def digest(*parts) -> str:
    return hashlib.sha1("\x1f".join(map(str, parts)).encode()).hexdigest()[:16]


def image_keys(images) -> list:
    """Stable per-image cache keys: the absolute path of a file, the content hash of an in-memory array."""
    if isinstance(images, FileImages):
        return [os.path.abspath(p) for p in images.paths]
    return [hashlib.sha1(np.ascontiguousarray(images.images[i]).tobytes()).hexdigest() for i in range(len(images))]


def clean(text: str) -> str:
    return " ".join(str(text).split())  # one line, no tabs: the caption cache is a TSV


def read_caption_file(path, relative: bool = False) -> dict:
    """{key: caption} from 'key<TAB>caption' lines; a torn last line (killed mid-write) is ignored.
    relative: keys are image paths, relative ones resolved against the file's folder."""
    out, base = {}, Path(path).resolve().parent
    if not Path(path).is_file():
        return out
    for line in Path(path).read_text().split("\n")[:-1]:
        key, sep, text = line.partition("\t")
        if sep:
            out[str(base / key) if relative and not os.path.isabs(key) else key] = text
    return out


def _blip2_pixels(image_processor, image):
    return image_processor(image, return_tensors="pt")["pixel_values"][0]  # [3, H, W]


@torch.inference_mode()
def blip2_captions(images, model_name: str, cache_file: Path, batch_size: int, device, workers: int = 0) -> list:
    """Captions every image with BLIP-2, appending 'key<TAB>caption' to cache_file batch by batch,
    so a rerun (or a killed run) only captions what is missing."""
    from functools import partial

    from tqdm import tqdm

    keys, done = image_keys(images), read_caption_file(cache_file)
    todo = [i for i, k in enumerate(keys) if k not in done]
    if todo:
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        print(f"captioning {len(todo)} images with BLIP-2 {model_name} ({len(keys) - len(todo)} cached in {cache_file})")
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        processor = Blip2Processor.from_pretrained(model_name)
        model = Blip2ForConditionalGeneration.from_pretrained(model_name, dtype=dtype).to(device).eval()
        data = TransformedImages(images, partial(_blip2_pixels, processor.image_processor))
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, sampler=todo, num_workers=workers,
                                             collate_fn=collate_skipping_bad)
        with open(cache_file, "a") as f:
            for batch in tqdm(loader, desc="BLIP-2 captions"):
                if "image" not in batch:
                    continue
                out = model.generate(pixel_values=batch["image"].to(device, dtype), max_new_tokens=CAPTION_MAX_TOKENS)
                for i, text in zip(batch["index"].tolist(), processor.batch_decode(out, skip_special_tokens=True)):
                    done[keys[i]] = clean(text)
                    f.write(f"{keys[i]}\t{done[keys[i]]}\n")
                f.flush()
        del model
    return [done.get(k, "") for k in keys]  # unreadable images keep "" and are never drawn in training


def train_captions(args, env) -> list:
    """One caption per training image, aligned with env.task.train.images."""
    images = env.task.train.images
    if args.captioner == "blip2":
        cache_file = cache_root(args) / f"captions-blip2-{Path(args.captioner_model).name}-{digest(args.captioner_model)}.tsv"
        if is_main_process():
            blip2_captions(images, args.captioner_model, cache_file, args.caption_batch_size, env.device, args.workers)
        barrier()
        return blip2_captions(images, args.captioner_model, cache_file, args.caption_batch_size, env.device)
    if args.captioner != "dataset":
        raise SystemExit(f"error: unknown --captioner {args.captioner!r}; choose dataset or blip2")
    if args.captions:
        given, keys = read_caption_file(args.captions, relative=True), image_keys(images)
        missing = [k for k in keys if k not in given]
        if missing:
            raise SystemExit(f"error: {args.captions} has no caption for {len(missing)} of {len(keys)} training images, "
                             f"e.g. {missing[0]} (lines are 'path<TAB>caption', paths absolute or relative to the file)")
        return [given[k] for k in keys]
    if getattr(images, "captions", None) is None:
        raise SystemExit(f"error: --data {args.data} provides no captions: pass --captions FILE or --captioner blip2")
    return [c if isinstance(c, str) else c[0] for c in images.captions]  # one fixed caption, like a captioner's


# ----------------------------------------------------------------------------------------------
# Retrieval (image-text anchors)
# ----------------------------------------------------------------------------------------------
def miniworld_pool(args) -> str:
    """LEAD: move into common.py (arf.py should import only common). miniworld's pool, written once."""
    import miniworld

    out = cache_root(args) / f"miniworld-pool-{args.pool_size}-{digest(sorted(miniworld.world_config().items()))}"
    return str(miniworld.write_pool(out, args.pool_size))


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


@torch.inference_mode()
def embed_images(clip, images, transform, cache_file: Path, batch_size: int, device, workers: int = 0):
    """n(f(x)) of every image as a float16 [N, D] memmap cached in cache_file, plus a [N] mask of the
    readable ones. Computed once; a rerun memory-maps the file."""
    from tqdm import tqdm

    mask_file = cache_file.with_suffix(".ok.npy")
    if not cache_file.is_file():
        partial_file, emb = cache_file.with_suffix(".partial.npy"), None
        ok = np.zeros(len(images), dtype=bool)
        loader = torch.utils.data.DataLoader(TransformedImages(images, transform), batch_size=batch_size,
                                             num_workers=workers, collate_fn=collate_skipping_bad)
        for batch in tqdm(loader, desc=f"embedding {len(images)} images"):
            if "image" in batch:
                z = F.normalize(clip.encode_image(batch["image"].to(device)).float(), dim=-1).cpu().numpy()  # [b, D]
                if emb is None:
                    emb = np.lib.format.open_memmap(partial_file, mode="w+", dtype=np.float16, shape=(len(images), z.shape[1]))
                emb[batch["index"].numpy()] = z
                ok[batch["index"].numpy()] = True
        if emb is None:
            raise SystemExit(f"error: none of the {len(images)} images could be read")
        emb.flush()
        del emb
        np.save(mask_file, ok)
        os.replace(partial_file, cache_file)
    return np.load(cache_file, mmap_mode="r"), np.load(mask_file)


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


def retrieve_anchors(args, env):
    """The deduplicated pool pairs nearest to the training images by frozen image embedding."""
    pool = args.pool
    if not pool and args.data == "miniworld":
        if is_main_process():
            miniworld_pool(args)
        barrier()
        pool = miniworld_pool(args)  # written by now: returns the TSV's path
    if not pool:
        raise SystemExit("error: --ret needs --pool FILE (image-text pairs in open_clip's CSV/TSV layout, e.g. CC3M), or --no-ret")
    sep = args.pool_sep.encode().decode("unicode_escape")
    images, captions, bad = read_pool(pool, args.pool_img_key, args.pool_caption_key, sep)
    model_key = digest(args.model, args.pretrained, sum(float(p.detach().double().sum()) for p in env.clip.visual.parameters()))
    st = os.stat(pool)
    pool_file = cache_root(args) / f"pool-{digest(os.path.abspath(pool), st.st_size, st.st_mtime, sep, model_key)}.npy"
    train_file = cache_root(args) / f"train-{digest(*image_keys(env.task.train.images), model_key)}.npy"
    ret_file = cache_root(args) / f"retrieved-{digest(pool_file, train_file, args.retrieve_k)}.npy"
    if is_main_process():
        bs, w = args.eval_batch_size, args.workers
        pool_emb, ok = embed_images(env.clip, images, env.eval_tf, pool_file, bs, env.device, w)
        if not ret_file.is_file():
            query, qok = embed_images(env.clip, env.task.train.images, env.eval_tf, train_file, bs, env.device, w)
            rows = np.flatnonzero(ok)  # index row -> pool row
            neighbours = search(build_index(pool_emb[rows]), query[qok], args.retrieve_k)  # [Q, k]
            np.save(ret_file, rows[np.unique(neighbours[neighbours >= 0])])
    barrier()
    keep, unreadable = np.load(ret_file), int((~np.load(pool_file.with_suffix(".ok.npy"))).sum())
    print(f"pool {pool}: {len(images) - unreadable} usable pairs, skipped {bad} rows (malformed or missing image) "
          f"and {unreadable} unreadable images; retrieved {len(keep)} unique pairs (k={args.retrieve_k} per training image)")
    if len(keep) == 0:
        raise SystemExit("error: retrieval found no pool pairs")
    return images.subset(keep), [captions[i] for i in keep]


class AnchorStream(torch.nn.Module):
    """Batches of retrieved pairs as a function of the step: `step` is a buffer, checkpointed with the
    model, so --resume continues the same stream."""

    def __init__(self, images, captions, transform, args):
        super().__init__()
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.images, self.captions, self.transform, self.args = images, captions, transform, args
        self.batches = None

    def next(self) -> dict:
        if self.batches is None:  # built lazily: after train() has restored `step` on --resume
            a = self.args
            rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
            sampler = StepBatchSampler(len(self.images), a.ret_batch_size or a.batch_size // 2, a.grad_accum, rank, world,
                                       a.seed + 1, int(self.step), a.steps)
            self.batches = iter(torch.utils.data.DataLoader(TransformedImages(self.images, self.transform), batch_sampler=sampler,
                                                            num_workers=a.workers, collate_fn=collate_skipping_bad))
        return next(self.batches)


def group_ids(texts: list, device) -> torch.Tensor:
    ids = {}
    return torch.tensor([ids.setdefault(t, len(ids)) for t in texts], device=device)  # [B]


def make_loss_fn(model, classnames: list, captions=None, stream=None):
    """The training loss for `model` (both towers + scale trainable): class prompts of the batch, the
    batch's captions (captions[i] of training image i; None = no L_cap) and a batch of retrieved pairs
    drawn from `stream` (None = no L_ret)."""
    device = model.head.device

    def embed_texts(texts: list) -> torch.Tensor:
        return encode_text(model.clip, model.tokenizer(texts).to(device))  # [N, D]

    def loss_fn(model, batch):
        images, labels, n = batch["image"], batch["label"], len(batch["label"])
        classes, inverse = labels.unique(return_inverse=True)  # encode each class prompt once
        texts = [FT_TEMPLATE.format(classnames[c]) for c in classes.tolist()]
        cap_texts = [captions[i] for i in batch["index"].tolist()] if captions else []
        ret = stream.next() if stream else None
        ret_texts = [stream.captions[i] for i in ret["index"].tolist()] if ret else []
        if ret:  # one forward pass per tower for everything in the step
            images = torch.cat([images, ret["image"].to(device)])
        img = model.image_features(images)  # [B (+ B_r), D]
        txt = embed_texts(texts + cap_texts + ret_texts)  # [K_b + B (+ B_r), D]
        k = len(texts)
        return arf_loss(img[:n], txt[:k][inverse], labels, model.scale,
                        txt[k:k + n] if captions else None, group_ids(cap_texts, device),
                        img[n:] if ret else None, txt[k + len(cap_texts):], group_ids(ret_texts, device))

    return loss_fn


def main(argv=None):
    args = parse_args(Args, PRESETS, argv)
    tag = ",".join(name for name, on in (("no-cap", args.cap), ("no-ret", args.ret)) if not on)
    if not args.out:
        args.out = f"runs/arf{'-' + tag.replace(',', '-') if tag else ''}-{args.data}-{Path(args.model).stem}-s{args.seed}"
    env = setup(args, "arf")
    model, device, classnames = env.model, env.device, env.task.classnames
    captions = train_captions(args, env) if args.cap else None
    stream = AnchorStream(*retrieve_anchors(args, env), env.train_tf, args) if args.ret else None
    set_trainable(model, image=True, text=True, head=False, scale=True)
    loss_fn = make_loss_fn(model, classnames, captions, stream)

    def after_step(step):
        with torch.no_grad():
            model.clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        if args.eval_every and step % args.eval_every == 0:  # train() evaluates next: give it the current head
            model.head.data = zeroshot_head(model.clip, model.tokenizer, classnames, env.task.templates, device)
        if stream is not None:
            stream.step.fill_(step)

    train(env, loss_fn, args, after_step=after_step, extra_state={"anchors": stream} if stream else None)
    # the classifier of the fine-tuned text tower: what ARF (like FLYP) evaluates with
    model.head.data = zeroshot_head(model.clip, model.tokenizer, classnames, env.task.templates, device)
    return finish(env, args, tag=tag)


if __name__ == "__main__":
    main()
