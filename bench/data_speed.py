"""Data throughput: JPEG decode + transform per DataLoader worker, and a WiSE-FT sweep with each image
decoded once for every α vs one pass per α, side by side.

  python bench/data_speed.py                      # 64 generated ~500x375 JPEGs, ViT-B/16's transforms, 11 α
  python bench/data_speed.py --model ViT-B-16 --device cuda   # the sweep with the real image tower

Per worker: one thread, as a DataLoader worker runs, loading each image as the loaders do
(tasks.FileImages: PIL decode to RGB) and applying the training transform (RandomResizedCrop 0.08-1 +
flip, common.image_transforms) or the evaluation one (resize + centre crop), at 224 px. Images are
generated like ImageNet's: 500x375 or 375x500, smooth content, JPEG quality 90 (ImageNet's average file is
~110 kB). Workers a GPU needs = its images/s over a worker's training images/s (--gpu-rate: ~3k images/s
for ViT-B/16 training on one H100).

The sweep: `common.predict` over the images once per α model (before) vs once with a forward that runs
every α model on each batch (after: merge.py wise), on --threads torch threads (0 = the free cores). The
default model is a small CLIP at 224 px (--model: an open_clip name or config), so the decoding share is
what a GPU leaves: on CPU a ViT-B/16 forward would dwarf it. Rounds alternate the variants, so a slow
moment of a shared machine hits both; tables show medians.

Writes its tables into the "Data throughput" section of bench/RESULTS.md (--no-write: print only).
"""
import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import common  # noqa: E402
from retrieval import write_section  # noqa: E402
from tasks import FileImages  # noqa: E402

SMALL_CLIP = {"embed_dim": 64, "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32, "head_width": 32},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def write_jpegs(folder: Path, n: int, seed: int = 0) -> FileImages:
    """n JPEGs of ImageNet's typical sizes: smooth colour fields (upsampled noise) with a little grain."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = (500, 375) if i % 2 == 0 else (375, 500)
        small = Image.fromarray(rng.integers(0, 255, (h // 25, w // 25, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        arr = np.clip(np.asarray(small, dtype=np.int16) + rng.integers(-36, 36, (h, w, 3)), 0, 255).astype(np.uint8)
        paths.append(folder / f"img{i}.jpg")
        Image.fromarray(arr).save(paths[-1], "JPEG", quality=90)
    return FileImages(paths, np.arange(n) % 10)


def per_worker(images: FileImages, transform) -> float:
    """Seconds to load and transform every image in this process, one thread."""
    t = time.perf_counter()
    for i in range(len(images)):
        transform(images.load(i))
    return time.perf_counter() - t


def sweep_forwards(models: list) -> list:
    """images -> logits [B, K] of each (image tower, head)."""
    def forward_of(clip, head):
        return lambda x: common.cosine_logits(F.normalize(clip.encode_image(x).float(), dim=-1), head, 100.0)  # [B, K]

    return [forward_of(clip, head) for clip, head in models]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=64, help="generated JPEGs")
    p.add_argument("--model", default="", help="open_clip model of the sweep (default: a small 224 px CLIP)")
    p.add_argument("--alphas", type=int, default=11, help="α models of the sweep (the paper's 0:1:0.1 is 11)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="")
    p.add_argument("--threads", type=int, default=0, help="torch threads of the sweep (0 = the free cores)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--gpu-rate", type=float, default=3000, help="training images/s one GPU consumes (ViT-B/16, H100)")
    p.add_argument("--no-write", action="store_true", help="print the tables only")
    a = p.parse_args(argv)
    device = common.get_device(a.device)
    import open_clip

    cfg = {"size": 224, "mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD,
           "interpolation": "bicubic", "resize_mode": "shortest"}  # ViT-B/16's (openai) preprocessing
    train_tf, eval_tf = common.image_transforms(cfg, 0.08)
    with tempfile.TemporaryDirectory() as tmp:
        images = write_jpegs(Path(tmp), a.images)
        kb = sum(Path(q).stat().st_size for q in images.paths) / len(images) / 1024
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a DataLoader worker's own
        times = {"train": [], "eval": []}
        for r in range(a.rounds):
            for name, tf in (("train", train_tf), ("eval", eval_tf)):
                times[name].append(per_worker(images, tf))
            print(f"round {r + 1}: train {len(images) / times['train'][-1]:.0f}, eval {len(images) / times['eval'][-1]:.0f} "
                  "images/s per worker")
        torch.set_num_threads(threads)
        ips = {k: len(images) / statistics.median(v) for k, v in times.items()}
        need = math.ceil(a.gpu_rate / ips["train"])

        threads = common.set_threads(a.threads)
        model_name = a.model or str(Path(tmp) / "small-clip.json")
        if not a.model:
            Path(model_name).write_text(json.dumps(SMALL_CLIP))
        models = []
        for i in range(a.alphas):  # stand-ins for θ_α: distinct weights, one architecture
            torch.manual_seed(i)
            clip = common.load_clip(model_name, "", device)[0].eval()
            models.append((clip, F.normalize(torch.randn(10, clip.visual.output_dim, device=device), dim=-1)))
        forwards = sweep_forwards(models)
        one = lambda: [common.predict(f, images, eval_tf, device, a.batch_size)[0] for f in forwards]  # noqa: E731
        once = lambda: common.predict(lambda x: torch.stack([f(x) for f in forwards]), images, eval_tf, device,  # noqa: E731
                                      a.batch_size)[0]
        sweep = {"per α": [], "once": []}
        for r in range(a.rounds):
            t = time.perf_counter()
            before = one()
            sweep["per α"].append(time.perf_counter() - t)
            t = time.perf_counter()
            after = once()
            sweep["once"].append(time.perf_counter() - t)
            print(f"round {r + 1}: sweep one pass per α {sweep['per α'][-1]:.2f} s, decoded once {sweep['once'][-1]:.2f} s")
        if not torch.allclose(torch.stack(before), after, atol=1e-6):
            raise SystemExit("the two sweeps disagree on the logits: not the same evaluation")
    per_alpha, decoded_once = statistics.median(sweep["per α"]), statistics.median(sweep["once"])
    command = "python bench/data_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    stamp = f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {platform.machine()}. Command: `{command.strip()}`"
    workers = [f"{len(images)} generated JPEGs (500x375 / 375x500, {kb:.0f} kB average), 224 px, one thread per worker; median of "
               f"{a.rounds} alternating rounds; {stamp}", "",
               "| transform | images / s per worker | workers for one GPU at {:,.0f} images/s |".format(a.gpu_rate), "|---|---|---|",
               f"| train (RandomResizedCrop 0.08-1 + flip) | {ips['train']:.0f} | {need} |",
               f"| eval (resize + centre crop) | {ips['eval']:.0f} | {math.ceil(a.gpu_rate / ips['eval'])} |"]
    wise = [f"WiSE-FT sweep of {a.alphas} α models ({a.model or 'a small 224 px CLIP, 2 layers of width 64'}) over the "
            f"{len(images)} JPEGs, batch {a.batch_size}, {device.type} ({threads} torch threads, 0 loader workers); median of "
            f"{a.rounds} alternating rounds; {stamp}", "",
            "| sweep | wall s | ratio |", "|---|---|---|",
            f"| one pass per α (before) | {per_alpha:.2f} | 1.00 |",
            f"| each image decoded once, every α scored on the batch (merge.py wise) | {decoded_once:.2f} | "
            f"{decoded_once / per_alpha:.2f} |"]
    print("\n".join(workers + [""] + wise))
    if not a.no_write:
        write_section(workers, "data-workers", "## Data throughput")
        write_section(wise, f"wise-sweep-{Path(a.model).stem or 'small'}-{device.type}", "## Data throughput")


if __name__ == "__main__":
    main()
