"""What each speed fix of bench/step_time.py's methods bought, measured against the code it replaced.

  python bench/fixes.py                                   # miniclip (CPU)
  python bench/fixes.py --model ViT-B-16 --batch-size 8   # ViT-B/16 shapes (random weights: cost does not depend on them)

Fix 1, common.encode_text: the text tower runs only up to the batch's last EOT token. Before, open_clip's
clip.encode_text ran every text over the whole context (77 positions on OpenAI CLIP) although Lipsum-FT's
random texts fill L + 2 of them. Timed here on Lipsum-FT's per-step texts (M = lipsum_ft.NUM_TEXTS of
L = lipsum_ft.TEXT_LENGTH random tokens), frozen tower, no_grad, as lipsum_ft.make_loss_fn calls it.

Fix 2, frozen teachers in eval mode: baselines.py's KD / FeatKD teacher used to run in training mode
(to match the student's attention kernel bit for bit); in eval mode nn.MultiheadAttention takes its
fused kernel. Timed here on the θ0 image-tower forward, no_grad, on a batch of --batch-size images.

Fix 3, L2SP's ‖θ − θ0‖² as F.mse_loss(θ, θ0, reduction="sum") per tensor: the old Σ((θ − θ0)²).sum() made
autograd keep a copy of θ − θ0 (the whole image tower: 329 MiB on ViT-B/16) for backward; the fused op
keeps references to θ and θ0. Timed here on the distance's forward + backward over the image tower, θ
1e-3 away from θ0 (bench/step_time.py's memory column shows the saved bytes).

Rounds alternate old and new, so a slow moment of a shared machine hits both; the table shows medians.
Writes its table into the "Step time" section of bench/RESULTS.md (--no-write: print only).
"""
import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import common  # noqa: E402
import lipsum_ft  # noqa: E402
from retrieval import write_section  # noqa: E402


def timed(fn, rounds: int) -> list:
    fn()  # warm-up
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="miniclip")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    clip, tokenizer, _ = common.load_clip(a.model)
    clip.requires_grad_(False)

    g = torch.Generator().manual_seed(0)
    tokens = lipsum_ft.model_random_texts(clip, tokenizer, lipsum_ft.NUM_TEXTS, lipsum_ft.TEXT_LENGTH, g)  # [M, context]
    context = tokens.shape[1]
    with torch.no_grad():  # the fix must not change the result
        err = (common.encode_text(clip, tokens) - clip.encode_text(tokens, normalize=True)).abs().max().item()

    size = clip.visual.image_size
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(a.batch_size, 3, size, size, generator=g)  # [B, 3, H, W]
    teacher = copy.deepcopy(clip.visual)
    with torch.no_grad():
        feat_err = (teacher.train()(images) - teacher.eval()(images)).abs().max().item()

    params = [q.requires_grad_(True) for q in clip.visual.parameters()]
    params0 = [q.detach() + 1e-3 for q in params]

    def l2sp(new: bool):
        dist = sum(F.mse_loss(q, q0, reduction="sum") if new else ((q - q0) ** 2).sum() for q, q0 in zip(params, params0))
        dist.backward()
        for q in params:
            q.grad = None
        return dist.item()

    l2sp_err = abs(l2sp(True) - l2sp(False)) / l2sp(False)

    def texts_old():
        with torch.no_grad():
            clip.encode_text(tokens, normalize=True)

    def texts_new():
        with torch.no_grad():
            common.encode_text(clip, tokens)

    def teacher_old():
        with torch.no_grad():
            teacher.train()(images)

    def teacher_new():
        with torch.no_grad():
            teacher.eval()(images)

    fns = dict(texts_old=texts_old, texts_new=texts_new, teacher_old=teacher_old, teacher_new=teacher_new,
               l2sp_old=lambda: l2sp(False), l2sp_new=lambda: l2sp(True))
    times = {name: [] for name in fns}
    for _ in range(a.rounds):  # alternate: one timing of each per round
        for name, fn in fns.items():
            times[name] += timed(fn, 1)
    med = {name: statistics.median(v) for name, v in times.items()}
    command = "python bench/fixes.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"What each fix bought: {a.model}, cpu ({torch.get_num_threads()} torch threads), median of {a.rounds} "
             f"alternating rounds; {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {platform.machine()}. "
             f"Command: `{command.strip()}`", "",
             "| fix | timed on | before (ms) | after (ms) | speed-up | max abs difference of the output |",
             "|---|---|---|---|---|---|",
             f"| common.encode_text: text tower up to the last EOT | Lipsum-FT's {lipsum_ft.NUM_TEXTS} random texts "
             f"({lipsum_ft.TEXT_LENGTH + 2} of {context} positions) | {med['texts_old']:.1f} | {med['texts_new']:.1f} | "
             f"{med['texts_old'] / med['texts_new']:.1f}x | {err:.1e} |",
             f"| KD / FeatKD teacher in eval mode (fused attention) | θ0 image forward, batch {a.batch_size} | "
             f"{med['teacher_old']:.1f} | {med['teacher_new']:.1f} | {med['teacher_old'] / med['teacher_new']:.2f}x | "
             f"{feat_err:.1e} |",
             f"| L2SP distance as F.mse_loss (no θ − θ0 copy kept) | ‖θ − θ0‖² forward + backward, image tower | "
             f"{med['l2sp_old']:.1f} | {med['l2sp_new']:.1f} | {med['l2sp_old'] / med['l2sp_new']:.2f}x | "
             f"{l2sp_err:.1e} (relative) |"]
    print("\n".join(lines))
    if not a.no_write:
        write_section(lines, f"fixes-{Path(a.model).stem}-cpu", "## Step time")


if __name__ == "__main__":
    main()
