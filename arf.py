"""ARF: Anchor-based Robust Finetuning of vision-language models.

Paper: Han, Lin, Sun, Gao, Yan, Ding, Gao & Xia, "Anchor-based Robust Finetuning of Vision-Language
Models", CVPR 2024. METHODS.md, "ARF".

Fine-tuning on "a photo of a {class}" alone gives CLIP a target far poorer than the captions it was
pretrained on, and its feature space drifts: domain-shift and zero-shot accuracy fall. ARF fine-tunes
both towers with the CLIP loss on the class prompts (FLYP-style) plus two kinds of anchors with rich
text: the same images paired with captions from a pretrained captioner (text-compensated anchors,
BLIP-2 in the paper), and image-text pairs retrieved from a pretraining-like pool by frozen-CLIP image
similarity (image-text anchors, CC3M in the paper).

    L_ARF = W_FT · L(x, "a photo of a y") + W_CAP · L(x, caption(x)) + W_RET · L(x_r, t_r)
    L(I, T) = ½ [CE(s·n(f(I)) n(g(T))ᵀ, ids) + CE(s·n(g(T)) n(f(I))ᵀ, ids)]      (symmetric InfoNCE;
              SigLIP: its sigmoid loss with its logit bias b, the loss each model was pretrained with)

Choices where the paper is silent:
  * Weights 1:1:1. Retrieval by the frozen image tower's cosine similarity, k nearest per training image,
    deduplicated by pool row. One retrieved batch of --ret-batch-size pairs per step (half the batch: ARF's
    step stays within 2x FT's on ViT-B/16), from its own StepBatchSampler stream: resumed exactly.
  * Duplicate class prompts (and identical captions) in a batch are positives of each other, not false
    negatives; each InfoNCE is over the global batch, exact under torchrun and --grad-accum
    (common.ContrastiveLoss). The logit scale (and SigLIP's bias) trains, the scale clamped at 100 like
    open_clip's; the head is rebuilt from the fine-tuned text tower for every evaluation.
  * The anchors are prepared before training (below `main`): captions (the data's, a TSV, or BLIP-2) and
    retrieval from --pool or the dataset's own pool (miniworld's). Under torchrun every process captions
    and embeds its share; each finished batch of captions and chunk of embeddings is on disk at once (a
    killed run resumes there); only the faiss search runs on one process. `--prepare` does just this, so
    that ImageNet's hours of BLIP-2 captioning run (and resume) as a job of their own.

Run:  python arf.py               (miniworld: dataset captions, generated 50k pool; --no-cap / --no-ret: ablations)
      python arf.py --data imagenet --data-root DIR --model ViT-B-16 --pretrained openai \
          --captioner blip2 --captioner-model Salesforce/blip2-opt-2.7b --pool cc3m.tsv
"""
import csv
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import (ContrastiveLoss, FileImages, TrainArgs, TransformedImages, append_lines, autocast, barrier,
                    check_batch, collate_skipping_bad, encode_text, finish, is_main_process, parse_args,
                    pretraining_loss, set_trainable, setup, train, wait_for_file)

W_FT, W_CAP, W_RET = 1.0, 1.0, 1.0  # loss weights of the class prompts and the two anchors (paper: 1:1:1)
FT_TEMPLATE = "a photo of a {}."  # L_ft's class prompt
CAPTION_MAX_TOKENS = 30  # BLIP-2 generation length
CAPTION_CHUNK = 1024  # training images per captioning share: chunk c goes to process c mod world
CAPTIONER_CHECK_TIMEOUT = 10  # seconds to wait for the hub when the captioner is not on disk
EXACT_MAX = 1_000_000  # pools with fewer rows are searched exactly; larger ones with an IVF index
PQ_MIN = 20_000_000  # from here on IVF stores PQ codes (float vectors would not fit in RAM)
IVF_NPROBE = 8  # inverted lists visited per query (recall@10 0.99 on bench/retrieval.py's pool)
EMBED_CHUNK = 8192  # images per embedding chunk: the unit of sharding over processes and of resuming


@dataclass
class Args(TrainArgs):
    captioner: str = "dataset"  # dataset (the data's own captions or --captions FILE) | blip2
    captioner_model: str = "Salesforce/blip2-opt-2.7b"  # BLIP-2 hub name or folder (--captioner blip2)
    captions: str = ""  # TSV 'image path<TAB>caption' (--captioner dataset on data without captions)
    caption_batch_size: int = 64  # images per BLIP-2 generate call
    pool: str = ""  # retrieval pool in open_clip's CSV/TSV layout (default: the one --data offers, e.g. miniworld's)
    pool_img_key: str = "filepath"  # pool column holding the image path (relative to the pool file)
    pool_caption_key: str = "title"  # pool column holding the caption
    pool_sep: str = "\\t"  # pool column separator (escapes like \t are decoded)
    retrieve_k: int = 8  # pool neighbours retrieved per training image (before deduplication)
    ret_batch_size: int = 0  # retrieved pairs per step (0 = half of --batch-size)
    cap: bool = True  # text-compensated anchors, L_cap (--no-cap: ablation)
    ret: bool = True  # retrieved image-text anchors, L_ret (--no-ret: ablation)
    cache: str = ""  # folder for captions, pool embeddings, retrievals (default $ROBUSTFT_CACHE/arf)
    prepare: bool = False  # only prepare the anchors into --cache (sharded under torchrun, resumable), then exit


# ARF trains with FT's recipe (common.FT_RECIPES) so that ARF and FT differ only in the loss. Real data
# has no captions of its own: BLIP-2 writes them (the paper); ImageNet's 1.28M images need fewer
# neighbours each to give a pool of anchors of the paper's size.
PRESETS = {"imagenet": dict(captioner="blip2", retrieve_k=4), "domainnet": dict(captioner="blip2"),
           "folder": dict(captioner="blip2"), "domainbed": dict(captioner="blip2")}


def arf_loss(image_emb, class_emb, labels, logit_scale, caption_emb=None, caption_ids=None,
             ret_image_emb=None, ret_text_emb=None, ret_ids=None, logit_bias=None):
    """L_ARF = W_FT·L(x, prompt) + W_CAP·L(x, caption) + W_RET·L(x_r, t_r); an anchor left None is off.
    L is the pretraining loss (common.pretraining_loss: with logit_bias, SigLIP's sigmoid loss). Duplicate
    class prompts (labels), captions (caption_ids) and retrieved captions (ret_ids) are positives of each other."""
    l_ft = pretraining_loss(image_emb, class_emb, logit_scale, logit_bias, labels)
    loss, terms = W_FT * l_ft, {"l_ft": l_ft.detach()}
    if caption_emb is not None:
        l_cap = pretraining_loss(image_emb, caption_emb, logit_scale, logit_bias, caption_ids)
        loss, terms["l_cap"] = loss + W_CAP * l_cap, l_cap.detach()
    if ret_image_emb is not None:
        l_ret = pretraining_loss(ret_image_emb, ret_text_emb, logit_scale, logit_bias, ret_ids)
        loss, terms["l_ret"] = loss + W_RET * l_ret, l_ret.detach()
    return loss, terms


def make_loss_fn(model, classnames: list, captions=None, retrieved_captions=None) -> ContrastiveLoss:
    """The training loss for `model` (both towers + scale trainable): class prompts of the batch, the
    batch's captions (captions[i] of training image i; None = no L_cap) and the step's retrieved pairs
    batch["retrieved"] (their captions in retrieved_captions; None = no L_ret). Each InfoNCE runs over
    the global batch (common.ContrastiveLoss); duplicates are found by text across it (text_ids)."""
    device = model.head.device

    def embed(model, batch, step):  # a micro-batch's rows
        images, host, n = batch["image"], batch["host"], len(batch["label"])  # host: label, index on the CPU (no device sync)
        classes, inverse = host["label"].unique(return_inverse=True)  # encode each class prompt once
        texts = [FT_TEMPLATE.format(classnames[c]) for c in classes.tolist()]
        cap_texts = [captions[i] for i in host["index"].tolist()] if captions else []
        ret = batch.get("retrieved") if retrieved_captions is not None else None
        ret_texts = [retrieved_captions[i] for i in ret["host"]["index"].tolist()] if ret else []
        if ret:  # one forward pass per tower for everything in the step
            images = torch.cat([images, ret["image"]])
        img = model.image_features(images)  # [B (+ B_r), D]
        txt = encode_text(model.clip, model.tokenizer(texts + cap_texts + ret_texts).to(device))  # [K_b + B (+ B_r), D]
        k = len(texts)
        rows = {"image": img[:n], "class_text": txt[:k][inverse.to(device)], "label": batch["label"]}
        if captions:
            rows.update(caption=txt[k:k + n], caption_id=text_ids(cap_texts, device))
        if ret:
            rows.update(ret_image=img[n:], ret_text=txt[k + n * bool(captions):], ret_id=text_ids(ret_texts, device))
        return rows

    def loss(rows, scale, bias):
        return arf_loss(rows["image"], rows["class_text"], rows["label"], scale, rows.get("caption"), rows.get("caption_id"),
                        rows.get("ret_image"), rows.get("ret_text"), rows.get("ret_id"), bias)

    return ContrastiveLoss(embed, loss)


def main(argv=None):
    args = parse_args(Args, PRESETS, argv)
    ret_batch = args.ret_batch_size or args.batch_size // 2
    check_anchor_args(args, ret_batch)  # before anything slow
    tag = ",".join(name for name, on in (("no-cap", args.cap), ("no-ret", args.ret)) if not on)
    env = setup(args, "arf", run_dir=not args.prepare, run_name="arf" + ("-" + tag.replace(",", "-") if tag else ""))
    captions = train_captions(args, env) if args.cap else None
    ret_images, ret_captions = retrieve_anchors(args, env) if args.ret else (None, None)
    if args.prepare:  # training (any number of processes) then finds every cache ready
        if is_main_process():
            print(f"anchors prepared in {cache_root(args)}")
        return None
    set_trainable(env.model, image=True, text=True, head=False, scale=True)
    streams = {"retrieved": (ret_images, ret_batch)} if args.ret else None
    loss_fn = make_loss_fn(env.model, env.task.classnames, captions, ret_captions)
    trained = train(env, loss_fn, args, head_from_text=True, streams=streams)  # ARF (like FLYP) classifies with its text tower
    return finish(env, args, trained, tag=tag)


# ----------------------------------------------------------------------------------------------
# Anchor preparation: captions (text-compensated anchors) and retrieval (image-text anchors)
# ----------------------------------------------------------------------------------------------
def cache_root(args) -> Path:
    """--cache, or $ROBUSTFT_CACHE/arf (default ~/.cache/robust-ft/arf); created."""
    root = Path(args.cache or Path(os.environ.get("ROBUSTFT_CACHE", Path.home() / ".cache" / "robust-ft")) / "arf")
    root.mkdir(parents=True, exist_ok=True)
    return root


def digest(*parts) -> str:
    return hashlib.sha1("\x1f".join(map(str, parts)).encode()).hexdigest()[:16]


def clean(text: str) -> str:
    return " ".join(str(text).split())  # one line, no tabs: caption caches are TSVs


def text_ids(texts: list, device) -> torch.Tensor:
    """A group id per text [N], equal exactly for equal texts, on every process (a 56-bit hash, not an
    index into this micro-batch): duplicates are found across the whole global batch."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(t.encode(), digest_size=7).digest(), "big") for t in texts],
                        dtype=torch.long, device=device)


def image_keys(images) -> list:
    """Stable per-image cache keys: the absolute path of a file, the content hash of an in-memory array."""
    if isinstance(images, FileImages):
        return [os.path.abspath(p) for p in images.paths]
    return [hashlib.sha1(np.ascontiguousarray(images.images[i]).tobytes()).hexdigest() for i in range(len(images))]


def shard_chunks(n: int, chunk: int) -> list:
    """This process's chunks of range(n): chunk c (rows c·chunk ...) belongs to process c mod world, so
    every process gets an equal share and the chunks are the same whatever the number of processes."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return all_chunks(n, chunk)[rank::world]


def all_chunks(n: int, chunk: int) -> list:
    """Every chunk of range(n), in order (what shard_chunks hands out over all processes)."""
    return [range(s, min(n, s + chunk)) for s in range(0, n, chunk)]


def check_anchor_args(args, ret_batch: int):
    """ARF's own inputs, checked before anything slow (offline, the hub would be retried for minutes)."""
    if args.captions and args.captioner != "dataset":
        raise SystemExit(f"error: --captions {args.captions} is read by --captioner dataset, and --captioner is "
                         f"{args.captioner!r} (the default for --data {args.data}): pass --captioner dataset too")
    for flag, path, used in (("--captions", args.captions, args.cap), ("--pool", args.pool, args.ret)):
        if used and path and not os.path.isfile(path):
            raise SystemExit(f"error: {flag} {path}: no such file")
    if args.cap and args.captioner == "blip2":
        check_captioner(args.captioner_model)
    if args.ret:
        check_batch("--ret-batch-size", ret_batch, args.grad_accum)


def check_captioner(name: str):
    """Stops at once, with what to pass instead, unless BLIP-2 `name` is a local folder, is in the local
    Hugging Face cache, or the hub answers (HF_HUB_OFFLINE=1: never asked)."""
    if os.path.isdir(name):
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    reason = "HF_HUB_OFFLINE is set"
    if os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false", "False"):
        try:
            from huggingface_hub import HfApi

            HfApi().model_info(name, timeout=CAPTIONER_CHECK_TIMEOUT)
            return
        except Exception as e:  # noqa: BLE001 -- no network, no such model, no access: the same advice
            reason = f"the hub did not answer ({type(e).__name__})"
    raise SystemExit(f"error: the BLIP-2 captioner {name!r} is not a local folder, not in the Hugging Face cache, and "
                     f"{reason}. Pass --captioner-model DIR (a BLIP-2 saved with save_pretrained), or captions of your "
                     "own with --captioner dataset --captions FILE (lines 'image path<TAB>caption'), or --no-cap.")


def read_caption_file(path, relative: bool = False) -> dict:
    """{key: caption} from 'key<TAB>caption' lines; a torn last line (killed mid-write) is ignored.
    relative: keys are image paths, relative ones resolved against the file's folder."""
    out, base = {}, Path(path).resolve().parent
    if not Path(path).is_file():
        return out
    for line in Path(path).read_text().split("\n")[:-1]:
        key, sep, text = line.partition("\t")
        if sep:
            out[os.path.abspath(base / key) if relative else key] = text  # normalised like image_keys ('../', './')
    return out


def _blip2_pixels(image_processor, image):
    return image_processor(image, return_tensors="pt")["pixel_values"][0]  # [3, H, W]


@torch.inference_mode()
def blip2_captions(images, model_name: str, cache_file: Path, batch_size: int, device, workers: int = 0) -> list:
    """Captions every image with BLIP-2 (bf16 on CUDA). Every process calls it and captions its share
    (shard_chunks of CAPTION_CHUNK images), appending 'key<TAB>caption' lines to cache_file
    batch by batch under a lock, so a rerun (or a killed run) only captions what is missing."""
    from functools import partial

    from tqdm import tqdm

    if is_main_process() and cache_file.is_file() and cache_file.stat().st_size:
        with open(cache_file, "rb+") as f:  # a line torn by a kill: end it, so the next append starts a line
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
    barrier()
    keys, done = image_keys(images), read_caption_file(cache_file)
    todo = [i for r in shard_chunks(len(keys), CAPTION_CHUNK) for i in r if keys[i] not in done]
    if todo:
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        print(f"captioning {len(todo)} images with BLIP-2 {model_name} ({len(keys) - len(todo)} cached in {cache_file})")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        processor = Blip2Processor.from_pretrained(model_name)
        model = Blip2ForConditionalGeneration.from_pretrained(model_name, dtype=dtype).to(device).eval()
        data = TransformedImages(images, partial(_blip2_pixels, processor.image_processor))
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, sampler=todo, num_workers=workers,
                                             collate_fn=collate_skipping_bad)
        with tqdm(total=len(todo), desc="BLIP-2 captions", unit="img") as bar:
            for batch in loader:
                bar.update(len(batch.get("index", [])) + batch["n_bad"])
                if "image" not in batch:
                    continue
                out = model.generate(pixel_values=batch["image"].to(device, dtype), max_new_tokens=CAPTION_MAX_TOKENS)
                texts = [clean(t) for t in processor.batch_decode(out, skip_special_tokens=True)]
                append_lines(cache_file, "".join(f"{keys[i]}\t{t}\n" for i, t in zip(batch["index"].tolist(), texts)))
        del model
    barrier()  # every process's share is in the file
    done = read_caption_file(cache_file)
    return [done.get(k, "") for k in keys]  # unreadable images keep "" and are never drawn in training


def train_captions(args, env) -> list:
    """One caption per training image, aligned with env.task.train.images."""
    images = env.task.train.images
    if args.captioner == "blip2":
        cache_file = cache_root(args) / f"captions-blip2-{Path(args.captioner_model).name}-{digest(args.captioner_model)}.tsv"
        return blip2_captions(images, args.captioner_model, cache_file, args.caption_batch_size, env.device, env.workers)
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


def retrieve_anchors(args, env):
    """The deduplicated pool pairs nearest to the training images by frozen image embedding."""
    pool = args.pool
    if not pool and env.task.pool is not None:  # the dataset's own pool (miniworld generates one)
        if is_main_process():
            env.task.pool(cache_root(args))
        barrier()
        pool = env.task.pool(cache_root(args))  # written by now: returns the TSV's path
    if not pool:
        raise SystemExit("error: --ret needs --pool FILE (image-text pairs in open_clip's CSV/TSV layout, e.g. CC3M), or --no-ret")
    sep = args.pool_sep.encode().decode("unicode_escape")
    images, captions, bad = read_pool(pool, args.pool_img_key, args.pool_caption_key, sep)
    model_key = digest(args.model, args.pretrained, sum(float(p.detach().double().sum()) for p in env.clip.visual.parameters()))
    st = os.stat(pool)
    pool_file = cache_root(args) / f"pool-{digest(os.path.abspath(pool), st.st_size, st.st_mtime, sep, model_key)}.npy"
    train_file = cache_root(args) / f"train-{digest(*image_keys(env.task.train.images), model_key)}.npy"
    ret_file = cache_root(args) / f"retrieved-{digest(pool_file.name, train_file.name, args.retrieve_k)}.npy"
    retrieve = not ret_file.is_file()  # decided before any process can write it: every process agrees
    bs, w = args.eval_batch_size, env.workers
    pool_emb, ok = embed_images(env.clip, images, env.eval_tf, pool_file, bs, env.device, w)  # each process its share
    if retrieve:
        query, qok = embed_images(env.clip, env.task.train.images, env.eval_tf, train_file, bs, env.device, w)
        if is_main_process():  # the search itself: one process (faiss uses every core it has)
            rows = np.flatnonzero(ok)  # index row -> pool row
            neighbours = search(build_index(pool_emb[rows]), query[qok], args.retrieve_k)  # [Q, k]
            np.save(ret_file.with_suffix(".tmp.npy"), rows[np.unique(neighbours[neighbours >= 0])])
            os.replace(ret_file.with_suffix(".tmp.npy"), ret_file)
        wait_for_file(ret_file, "rank 0's faiss search")  # not a barrier: the search outlasts NCCL's timeout
    keep, unreadable = np.load(ret_file), int((~np.load(pool_file.with_suffix(".ok.npy"))).sum())
    print(f"pool {pool}: {len(images) - unreadable} usable pairs, skipped {bad} rows (malformed or missing image) "
          f"and {unreadable} unreadable images; retrieved {len(keep)} unique pairs (k={args.retrieve_k} per training image)")
    if len(keep) == 0:
        raise SystemExit("error: retrieval found no pool pairs")
    return images.subset(keep), [captions[i] for i in keep]


# ----------------------------------------------------------------------------------------------
# The retrieval pool: image-text pairs in open_clip's CSV layout, cached embeddings, faiss
# ----------------------------------------------------------------------------------------------
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
            parts = [np.load(part(r)) for r in all_chunks(len(images), chunk)]
            dims = {p["emb"].shape[1] for p in parts if p["ok"].any()}
            if not dims:
                raise SystemExit(f"error: none of the {len(images)} images could be read")
            partial = cache_file.with_suffix(".partial.npy")
            out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=(len(images), dims.pop()))
            for r, p in zip(all_chunks(len(images), chunk), parts):
                if p["ok"].any():
                    out[r.start:r.stop] = p["emb"]
            out.flush()
            del out
            np.save(mask_file, np.concatenate([p["ok"] for p in parts]))
            os.replace(partial, cache_file)
            for r in all_chunks(len(images), chunk):
                part(r).unlink()
        wait_for_file(cache_file, "rank 0 to join the embedding chunks")  # the mask is saved first
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


if __name__ == "__main__":
    main()
