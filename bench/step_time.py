"""Training-step cost of every method, as a ratio to FT measured side by side in one process.

  python bench/step_time.py                      # miniworld + miniclip on this machine (CPU)
  python bench/step_time.py --model ViT-B-16 --batch-size 256 --device cuda --fake-data 224   # the real figure, GPU box
  python bench/step_time.py --model ViT-B-16 --batch-size 16 --fake-data 224 --rounds 3 --steps 1   # its shape on CPU

--fake-data SIZE times the methods without a dataset: a generated folder tree (4 classes of random
SIZE px JPEGs) with captions of captioner-like length for ARF's L_cap and a 256-pair captioned pool
for its L_ret, so ViT-B/16's real 77-token text tower and 197-token image tower can be measured
(random weights: the step's cost does not depend on them).

Every method gets its own copy of one zero-shot classifier, its own loss closure built by its own
file (baselines.METHODS, lipsum_ft.make_loss_fn, car_ft.make_loss_fn, arf.make_loss_fn) and AdamW
on exactly the parameters its script trains. One step = loss (every forward the method needs),
backward, AdamW update, and what common.train does after it for that method (EMA update, logit-scale
clamp). All methods see the same augmented batch, loaded before timing; ARF's retrieved pairs (its
extra data stream) are one batch of the retrieved pairs, also loaded before timing, so no method pays
for image decoding (ARF's stream took 22 ms per 64 miniworld pool images, 0.28x FT's step, in an
inline timing).
Rounds are interleaved: round r times `--steps` steps of every method in turn, so a slow moment of a
shared machine hits every method alike (the order rotates by one method per round, so none always
runs first, right after the floor timings); the table shows the median over rounds of each method's
time per step, and its ratio to FT's median.

Floor: KD, FeatKD, CAR-FT and Lipsum-FT each need one forward of the frozen θ0 image tower on the
batch, which no implementation can skip. Each round also times that forward alone (no_grad, the
teachers' own call), so the table gives the floor (FT + θ0 forward) / FT beside those methods: what
is left above it is overhead a fix could remove. Lipsum-FT's floor adds its M new random texts per
step through the frozen text tower (timed alone the same way). ARF's floor is its two towers' forward
and backward on everything it trains on (the batch plus the retrieved images; class prompts, captions
and retrieved captions) and the AdamW update of both towers, timed alone each round with a plain sum
as the loss: its design cost, before any overhead. CaRot's floor is FLYP's step (its L_MCL, both
towers trained) plus its EMA teacher's forward of both towers on the same images and class prompts
(timed alone; the teacher's own update, every 2% of the run, is not timed). LoRA's floor is the image
tower's forward and a backward that reaches the first block without any weight gradient (the low-rank
factors sit in every block, so the input gradient of each must be computed): timed alone, on a copy
with every weight frozen and the images requiring gradient.

Memory: on CUDA the peak allocated memory during a step (weights, optimiser state, teachers and
activations); on CPU, which has no allocator statistics, the bytes of the new tensors autograd saves
for backward in one step (activation memory, where the methods differ most; weights, θ0 copies and the
batch, which autograd saves by reference, are not counted).

Writes its table into the "Step time" section of bench/RESULTS.md (--no-write: print only).
"""
import argparse
import copy
import gc
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import arf  # noqa: E402
import baselines  # noqa: E402
import car_ft  # noqa: E402
import carot  # noqa: E402
import common  # noqa: E402
import lipsum_ft  # noqa: E402
from retrieval import write_section  # noqa: E402

# method: issue #10's target ratio to FT
TARGETS = {"ft": 1.0, "lp": None, "ema": 1.05, "l2sp": 1.1, "kd": 1.2, "featkd": 1.2, "flyp": None, "lora": None,
           "car_ft": 1.2, "lipsum_ft": 1.25, "arf": 2.0, "carot": None}
TEACHER = ("kd", "featkd", "car_ft", "lipsum_ft")  # methods that run the frozen θ0 image tower every step


def fake_data(root: Path, size: int, n_train: int) -> list:
    """Writes --data folder images, a captions file and a pool under root; returns arf.py's flags for them."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    words = "a photo of small large red dog cat bird sitting standing on the grass next to wooden fence sunny day in city street".split()

    def caption(lo, hi):  # BLIP-2 captions and CC3M alt-texts are mostly 8-20 words
        return " ".join(rng.choice(words, rng.integers(lo, hi + 1)))

    def image(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)

    captions, pool = [], ["filepath\ttitle"]
    for split, n in (("train", n_train), ("test", 1)):
        for c in ("cat", "dog", "owl", "fox"):
            for i in range(n):
                image(root / split / c / f"{i}.jpg")
                captions.append(f"{root / split / c / f'{i}.jpg'}\t{caption(8, 20)}")
    for i in range(256):
        image(root / "pool" / f"{i}.jpg")
        pool.append(f"pool/{i}.jpg\t{caption(6, 20)}")
    (root / "captions.tsv").write_text("\n".join(captions) + "\n")
    (root / "pool.tsv").write_text("\n".join(pool) + "\n")
    return ["--captioner", "dataset", "--captions", str(root / "captions.tsv"), "--pool", str(root / "pool.tsv"),
            "--cache", str(root / "cache")]


def build(method: str, base, env, args, batch):
    """(model, loss_fn, post_update, floor, batch) of one method, with the parameters its script trains
    set trainable; post_update: what common.train does after the optimiser step for it (EMA update,
    logit-scale clamp), or None; floor: None, or a callable doing work the method's design cannot
    avoid, timed alone: Lipsum-FT's random texts (on top of the θ0 forward every teacher pays), ARF's
    whole step; batch: the fixed batch plus the method's extra stream (ARF's retrieved pairs)."""
    model = copy.deepcopy(base)
    floor, ema_decay = None, None
    if method in baselines.METHODS:
        bargs = baselines.parse(["--method", method, "--data", args.data, "--steps", str(args.steps * args.rounds)])
        recipe = baselines.METHODS[method](model, bargs, env.task)
        loss_fn, ema_decay = recipe.loss_fn, recipe.ema_decay
    elif method == "lipsum_ft":
        common.set_trainable(model, image=True, text=False, head=True)
        loss_fn = lipsum_ft.make_loss_fn(model, 1.0, 0)

        def floor():  # on top of the θ0 forward: this step's M random texts through the frozen text tower
            g = torch.Generator().manual_seed(0)
            tokens = lipsum_ft.model_random_texts(model.clip, model.tokenizer, lipsum_ft.NUM_TEXTS,
                                                  lipsum_ft.TEXT_LENGTH, g)  # [M, context]
            with torch.no_grad():
                common.encode_text(model.clip, tokens.to(env.device))
    elif method == "car_ft":
        common.set_trainable(model, image=True, text=False, head=True)
        w_ctx = car_ft.context_head(model.clip, model.tokenizer, env.task.classnames, env.task.templates, env.device)
        loss_fn = car_ft.make_loss_fn(model, w_ctx, 1.0)
    elif method == "arf":
        aargs = arf.parse_args(arf.Args, arf.PRESETS, ["--data", args.data, "--model", args.model, "--steps", "1000000",
                                                         "--batch-size", str(args.batch_size), *args.arf_args])
        captions = arf.train_captions(aargs, env)
        ret_images, ret_captions = arf.retrieve_anchors(aargs, env)
        data = common.TransformedImages(ret_images, env.train_tf)
        ret = common.collate_skipping_bad([data[(i, i)] for i in range(min(len(data), args.batch_size // 2))])
        common.pop_unreadable(ret)
        batch = {**batch, "retrieved": {**{k: v.to(env.device) for k, v in ret.items()}, "host": ret}}
        common.set_trainable(model, image=True, text=True, head=False, scale=True)
        loss_fn = arf.make_loss_fn(model, env.task.classnames, captions, ret_captions)
        images = torch.cat([batch["image"], ret["image"].to(env.device)])  # [B + B_r, 3, H, W]
        texts = ([arf.FT_TEMPLATE.format(env.task.classnames[c]) for c in batch["label"].unique().tolist()]
                 + [captions[i] for i in batch["index"].tolist()] + [ret_captions[i] for i in ret["index"].tolist()])
        tokens, towers = model.tokenizer(texts).to(env.device), copy.deepcopy(model)
        towers_opt = torch.optim.AdamW([q for q in towers.parameters() if q.requires_grad], lr=1e-6,
                                       fused=env.device.type == "cuda")

        def floor():  # both towers' forward + backward on all of ARF's inputs (a plain sum as the loss) + AdamW
            with common.autocast(env.device):
                total = towers.image_features(images).sum() + common.encode_text(towers.clip, tokens).sum()
            total.backward()
            towers_opt.step()
            towers_opt.zero_grad(set_to_none=True)
    elif method == "carot":
        cargs = carot.Args(data=args.data, steps=args.steps * args.rounds)
        common.set_trainable(model, image=True, text=True, head=False, scale=True)
        teacher = common.frozen_copy(model)
        loss_fn = carot.make_loss(model, teacher, env.task, cargs)
        template = common.as_template_fns(env.task.templates)[0]
        prompts = model.tokenizer([template(env.task.classnames[c]) for c in batch["label"].unique().tolist()]).to(env.device)  # [P, context]

        def floor():  # the EMA teacher's forward of both towers (on top of FLYP's step)
            with torch.no_grad(), common.autocast(env.device):
                teacher.image_features(batch["image"]), common.encode_text(teacher.clip, prompts)
    else:
        raise SystemExit(f"unknown method {method!r}; choose from {', '.join(TARGETS)}")
    if method == "lora":
        frozen, images = common.frozen_copy(model.clip.visual).train(), batch["image"].detach().clone().requires_grad_(True)

        def floor():  # forward + backward to the input, no weight gradient: what any adapter in every block pays
            with common.autocast(env.device):
                total = frozen(images).float().sum()
            total.backward()
            images.grad = None
    ema = copy.deepcopy(model).requires_grad_(False) if ema_decay is not None else None
    pairs = [(e, q) for e, q in zip(ema.parameters(), model.parameters()) if q.requires_grad] if ema else []

    def post_update():  # common.train's order: clamp a trained scale, then update the EMA
        if model.clip.logit_scale.requires_grad:
            with torch.no_grad():
                model.clip.logit_scale.clamp_(0, common.MAX_LOGIT_SCALE)
        if ema is not None:
            common.ema_update([e for e, _ in pairs], [q for _, q in pairs], ema_decay)

    needs_after = ema is not None or model.clip.logit_scale.requires_grad
    return model, loss_fn, post_update if needs_after else None, floor, batch


class SavedBytes:
    """Counts the bytes of new tensors autograd saves for backward while active (CPU's stand-in for peak
    memory). Tensors alive before (weights, θ0 copies, the batch) are references, not new memory: skipped."""

    def __init__(self):
        self.bytes, self.seen = 0, set()

    def pack(self, t):
        key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))
        if key not in self.seen and key[0] not in self.existing:
            self.seen.add(key)
            self.bytes += t.numel() * t.element_size()
        return t

    def __enter__(self):
        self.existing = {o.untyped_storage().data_ptr() for o in gc.get_objects() if torch.is_tensor(o)}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(TARGETS), help="comma-separated; ft is always included")
    p.add_argument("--data", default="miniworld")
    p.add_argument("--data-root", default="")
    p.add_argument("--model", default="miniclip")
    p.add_argument("--pretrained", default="")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="")
    p.add_argument("--steps", type=int, default=3, help="steps of one method per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median over rounds is reported")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--fake-data", type=int, default=0, help="image size of a generated folder dataset (0 = use --data)")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    a = p.parse_args(argv)
    a.arf_args = []
    if a.fake_data:
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="step-time-data-"))
        # 4 classes, 10% of them held out (tasks.heldout_split): at least one full batch must stay in train
        a.arf_args = fake_data(root, a.fake_data, n_train=max(8, a.batch_size // 3 + 1))
        a.data, a.data_root = "folder", str(root)
    if a.threads:
        torch.set_num_threads(a.threads)
    methods = ["ft"] + [m for m in a.methods.split(",") if m != "ft"]
    targs = common.parse_args(common.TrainArgs, {a.data: {}}, ["--data", a.data, "--model", a.model, "--steps", "1",
                              "--out", f"/tmp/step-time-{time.time_ns()}", "--device", a.device, "--data-root", a.data_root]
                              + (["--pretrained", a.pretrained] if a.pretrained else []))
    env = common.setup(targs, "bench")
    device = env.device
    data = common.TransformedImages(env.task.train.images, env.train_tf)
    batch = common.collate_skipping_bad([data[(i, i)] for i in range(a.batch_size)])  # one fixed augmented batch
    common.pop_unreadable(batch)
    batch = {**{k: v.to(device) for k, v in batch.items()}, "host": batch}  # host: CPU label, index (common.StepData)

    built, floors, times, memory = {}, {}, {m: [] for m in methods}, {}
    for m in methods:
        model, loss_fn, post_update, floor, method_batch = build(m, env.model, env, a, batch)
        params = [q for q in model.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-6, fused=device.type == "cuda")
        built[m] = (model.train(), loss_fn, post_update, opt, method_batch)
        if floor is not None:
            floors[m] = floor

    def step(m, k):
        model, loss_fn, post_update, opt, method_batch = built[m]
        with common.autocast(device):
            if isinstance(loss_fn, common.ContrastiveLoss):  # one process, no accumulation: embed, then the loss
                rows, bias = loss_fn.embed(model, method_batch, k), getattr(model.clip, "logit_bias", None)
                loss, _ = loss_fn.loss(rows, model.scale, bias)
            else:
                loss, _ = loss_fn(model, method_batch, k)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if post_update:
            post_update()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for m in methods:  # warm-up (first-call allocations, caches) and memory
        step(m, 1)
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            step(m, 2)
            sync()
            memory[m] = torch.cuda.max_memory_allocated() / 2**20
        else:
            with SavedBytes() as saved:
                step(m, 2)
            memory[m] = saved.bytes / 2**20
    teacher = common.frozen_copy(env.model.clip.visual)  # θ0, as the methods hold it

    def teacher_forward():
        with torch.no_grad(), common.autocast(device):
            teacher(batch["image"])

    floors["θ0"] = teacher_forward
    floor_times = {name: [] for name in floors}
    for work in floors.values():  # warm-up
        work()
    for r in range(a.rounds):
        for name, work in floors.items():
            sync()
            t0 = time.perf_counter()
            for k in range(a.steps):
                work()
            sync()
            floor_times[name].append((time.perf_counter() - t0) / a.steps * 1000)
        for m in methods[r % len(methods):] + methods[:r % len(methods)]:  # rotated: no method always goes first
            sync()
            t0 = time.perf_counter()
            for k in range(a.steps):
                step(m, 3 + r * a.steps + k)
            sync()
            times[m].append((time.perf_counter() - t0) / a.steps * 1000)
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{m} {times[m][-1]:.0f} ms" for m in methods))

    median = {m: statistics.median(v) for m, v in times.items()}
    forward = statistics.median(floor_times["θ0"])
    own = {m: statistics.median(v) for m, v in floor_times.items()}
    # teachers: FT's step + the θ0 forward (+ Lipsum-FT's random texts); ARF: its whole design cost
    floor_ratio = {m: (median["ft"] + forward + own.get(m, 0)) / median["ft"] for m in TEACHER if m in methods}
    if "arf" in methods:
        floor_ratio["arf"] = own["arf"] / median["ft"]
    if "carot" in methods and "flyp" in methods:
        floor_ratio["carot"] = (median["flyp"] + own["carot"]) / median["ft"]
    if "lora" in methods:
        floor_ratio["lora"] = own["lora"] / median["ft"]
    mem_what = "peak allocated MiB" if device.type == "cuda" else "saved-for-backward MiB"
    threads = torch.get_num_threads()
    command = "python bench/step_time.py " + " ".join(sys.argv[1:] if argv is None else argv)
    data_what = f"generated {a.fake_data} px images" if a.fake_data else a.data
    lines = [f"{a.model} on {data_what}, batch {a.batch_size}, {device.type}"
             + (f" ({threads} torch threads)" if device.type == "cpu" else f" ({torch.cuda.get_device_name()})")
             + f"; median over {a.rounds} interleaved rounds of {a.steps} steps; {time.strftime('%Y-%m-%d')}, "
             f"torch {torch.__version__}, {platform.machine()}. Command: `{command.strip()}`", "",
             f"θ0 image forward alone (no_grad): {forward:.0f} ms, so a method with a frozen θ0 teacher costs at least "
             f"{(median['ft'] + forward) / median['ft']:.2f}× FT here."
             + (f" Lipsum-FT's {lipsum_ft.NUM_TEXTS} random texts through the frozen text tower: {own['lipsum_ft']:.0f} ms more."
                if "lipsum_ft" in own else "") + (f" ARF's two towers' forward + backward on its {len(batch['label'])} images, "
             f"retrieved images and all their texts, plus AdamW on both towers, alone: {floor_ratio['arf']:.2f}× FT." if "arf" in floor_ratio else "")
             + (f" CaRot's EMA teacher on both towers: {own['carot']:.0f} ms on top of FLYP's step." if "carot" in floor_ratio else "")
             + (f" LoRA's image-tower forward + backward to the input, no weight gradient: {own['lora']:.0f} ms." if "lora" in floor_ratio else ""), "",
             f"| method | ms / step | ratio to FT | target | floor | {mem_what} |", "|---|---|---|---|---|---|"]
    for m in methods:
        ratio, target = median[m] / median["ft"], TARGETS.get(m)
        verdict = "" if target is None else f"≤ {target:g}× " + ("(met)" if ratio <= target else "(**missed**)")
        lines.append(f"| {m} | {median[m]:.0f} | {ratio:.2f} | {verdict} | {f'{floor_ratio[m]:.2f}' if m in floor_ratio else ''} | {memory[m]:.0f} |")
    print("\n".join(lines))
    if not a.no_write:
        write_section(lines, f"step-{Path(a.model).stem}-{device.type}", "## Step time")


if __name__ == "__main__":
    main()
