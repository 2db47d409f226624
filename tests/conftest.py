"""Shared fixtures: a tiny random open_clip architecture (as a config file, the way a user passes a
custom model) and folder trees of generated JPEGs in the layouts the real datasets use."""
import json
import math
import os
import subprocess
import zlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Tests compare separate trainings bit for bit, so every run in them (in-process or subprocess) uses
# torch's default thread count, not the cores that happen to be free (common.set_threads).
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): the tiny model
    gains nothing from threads, and on a shared 2-core box they cost 10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Path of an open_clip config for a ~100k-parameter random CLIP (`--model PATH.json`)."""
    path = tmp_path_factory.mktemp("models") / "tiny-vit.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return str(path)


# the words of the tests' prompts (open_clip's simple templates, the folder classes, a few more): the tiny
# SigLIP's tokenizer knows them; any other word is its [UNK]
SIGLIP_WORDS = ("itap of a bad photo the origami large in video game art small . cat dog red fox owl grass on "
                "number copy image noise caption").split()


def write_hf_tokenizer(folder: Path, template: str = "$A </s>") -> Path:
    """A Hugging Face tokenizer laid out like SigLIP's: lower-cased words, an EOS appended, no start token,
    padded with [PAD] (id 0) at the right (another `template`, e.g. BERT's "[CLS] $A </s>", puts other
    special tokens around the words); built with `tokenizers` and saved where
    transformers.AutoTokenizer.from_pretrained (open_clip's HFTokenizer) loads it."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "</s>": 2, "[CLS]": 3, **{w: i + 4 for i, w in enumerate(dict.fromkeys(SIGLIP_WORDS))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("</s>", 2), ("[CLS]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>",
                            cls_token="[CLS]").save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_siglip(tmp_path_factory) -> str:
    """Path of an open_clip config for a tiny random SigLIP-style CLIP (`--model PATH.json`): sigmoid-loss
    parameters (a learned logit bias), a bidirectional text tower pooled at the last position of the
    context, and a local Hugging Face tokenizer (open_clip's HFTokenizer, nothing downloaded)."""
    folder = tmp_path_factory.mktemp("siglip")
    tokenizer = write_hf_tokenizer(folder / "tokenizer")
    vocab_size = len(json.loads((tokenizer / "tokenizer.json").read_text())["model"]["vocab"])
    config = {"embed_dim": 32, "init_logit_bias": -10, "init_logit_scale": math.log(10), "custom_text": True,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
              "text_cfg": {"context_length": 16, "vocab_size": vocab_size, "hf_tokenizer_name": str(tokenizer),
                           "width": 32, "heads": 2, "layers": 1, "no_causal_mask": True, "pool_type": "last",
                           "proj_bias": True}}
    path = folder / "tiny-siglip.json"
    path.write_text(json.dumps(config))
    return str(path)


def write_images(folder: Path, n: int, seed: int, size=(40, 40), fmt="JPEG", colour=None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
        if colour is not None:  # a class-dependent tint so a model can learn something
            arr = (0.5 * arr + 0.5 * np.array(colour)).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img{i}.{'jpg' if fmt == 'JPEG' else fmt.lower()}", fmt)


COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def stable_seed(*parts) -> int:
    """A seed from strings and numbers that is the same in every Python process (hash() of a str is
    salted per process, which made the generated images, and so the round-off, differ between runs)."""
    return zlib.crc32(repr(parts).encode())


@pytest.fixture
def folder_data(tmp_path) -> str:
    """--data folder layout: train/ + test/ (ID) + sketch/ (OOD), 4 classes."""
    root = tmp_path / "folder"
    for split, n in (("train", 12), ("test", 4), ("sketch", 4)):
        for k, name in enumerate(["cat", "dog", "red_fox", "owl"]):
            write_images(root / split / name, n, seed=stable_seed(split, k), colour=COLOURS[k])
    return str(root)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def perturb_(module, seed=0):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))


@pytest.fixture
def tiny_classifier(tiny_model):
    """A ClipClassifier on the tiny random CLIP over 3 classes, FT's parts trainable."""
    import common

    torch.manual_seed(0)
    clip, tokenizer, _ = common.load_clip(tiny_model)
    head = common.zeroshot_head(clip, tokenizer, ["cat", "dog", "owl"], ["a photo of a {}."])
    return common.set_trainable(common.ClipClassifier(clip, head, tokenizer))


def assert_gradients_reach_only_image_tower_and_head(model, loss_fn):
    """One step of a regularised FT loss on a perturbed image tower: the regulariser is on, and the
    gradient reaches the image tower and the head only."""
    perturb_(model.clip.visual)
    batch = {"image": randn(4, 3, 32, 32, seed=14).float(), "label": torch.tensor([0, 1, 2, 0])}
    loss, terms = loss_fn(model, batch, 0)
    assert list(terms.values())[1] > 0
    loss.backward()
    visual = {id(p) for p in model.clip.visual.parameters()}
    for name, p in model.named_parameters():
        if id(p) in visual or name == "head":
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


PACS_DOMAINS = ("art_painting", "cartoon", "photo", "sketch")


def write_domain_tree(root: Path, domains=PACS_DOMAINS, classes=("cat", "red_fox"), n: int = 5) -> str:
    """--data domainbed layout: root/<domain>/<class>/*.jpg, n images per class and domain, a tint per class
    and a pixel pattern per domain; the default domains are PACS's, so the dataset is recognised."""
    for d, domain in enumerate(domains):
        for k, name in enumerate(classes):
            write_images(root / domain / name, n, seed=100 * d + k, colour=COLOURS[k])
    return str(root)


def run_script(args, cwd, env_extra=None, check=True):
    """`python ARGS` as a subprocess with the repo importable; with check, a failure shows its output."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def make_pool(folder: Path, copies: list) -> Path:
    """Pool TSV: copies of the given images, random distractors, and 4 rows that must be skipped
    (no caption column, empty caption, missing file, extra column) plus one unreadable image."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["filepath\ttitle"]
    for i, src in enumerate(copies):
        Image.open(src).save(folder / f"copy{i}.png")
        rows.append(f"copy{i}.png\ta copy of image {i}")
    rng = np.random.default_rng(3)
    for i in range(30):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"noise{i}.png")
        rows.append(f"noise{i}.png\tnoise number {i}")
    (folder / "corrupt.png").write_bytes(b"\x89PNG not really")
    rows += ["copy0.png", "copy0.png\t ", "gone.png\ta missing file", "copy1.png\ta caption\textra", "corrupt.png\tunreadable"]
    (folder / "pool.tsv").write_text("\n".join(rows) + "\n")
    return folder / "pool.tsv"


def assert_script_trains_on_folders(script: str, tag: str, tiny_model, folder_data, tmp_path):
    """A method file end to end as a subprocess on the folder micro config: one results row per test
    split with the method's tag, and a finite loss logged at each of the 4 steps."""
    run_script([str(REPO / script), "--data", "folder", "--data-root", folder_data, "--model", tiny_model, "--steps", "4",
                "--batch-size", "8", "--out", "runs/r"], cwd=tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "runs" / "results.jsonl").read_text().splitlines()]
    assert {r["split"] for r in rows} == {"test", "sketch"} and {r["tag"] for r in rows} == {tag}
    log = [json.loads(x) for x in (tmp_path / "runs" / "r" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all(math.isfinite(r["loss"]) for r in log)


def close(a: dict, b: dict, atol=1e-5) -> list:
    """Names of the tensors that differ by more than atol. The attention key bias has an exactly-zero
    gradient (softmax is shift-invariant), so Adam divides float round-off by its own magnitude there:
    its key third (the ResNet attention pool's k_proj.bias) is left out, every parameter that learns must match."""
    bad = []
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("attnpool.k_proj.bias"):  # the ResNet's attention pool keeps its key projection apart
            continue
        if k.endswith("attn.in_proj_bias"):
            w = x.shape[0] // 3
            x, y = torch.cat([x[:w], x[2 * w:]]), torch.cat([y[:w], y[2 * w:]])
        if not torch.allclose(x, y, atol=atol, rtol=0):
            bad.append(f"{k} ({(x - y).abs().max().item():.2e})")
    return bad


# The method matrix: every method under 1 process, --grad-accum 2 and torchrun x2 (tests/test_scale.py
# for the ViT, tests/test_families.py for the other model families)
METHODS = ["lp", "ft", "lpft", "scratch", "ema", "l2sp", "kd", "featkd", "flyp", "lora", "lipsum_ft", "car_ft", "arf", "carot"]
CONFIGS = {"one": [], "accum2": ["--grad-accum", "2"], "torchrun2": None}  # None: torchrun --nproc_per_node 2
DRIVER = """
import json, runpy, sys
for script, argv in json.loads(sys.argv[1]):
    sys.argv = [script, *argv]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:  # a run that stops with a message: recorded, the next one runs
        if e.code not in (None, 0):
            open(argv[-1] + ".stopped", "w").write(str(e.code))
"""


def train_matrix(base: Path, model: str, port: int, methods=METHODS, configs=CONFIGS) -> tuple:
    """({config: {method: final.pt weights}}, the jobs of the last configuration): every method (and
    zeroshot, θ0 with its head) on a 4-class folder micro config, each configuration in one driver
    process. A run that stopped with a message has no weights; its message is in runs/<method>.stopped."""
    data = base / "folder"
    for split, n in (("train", 12), ("test", 4), ("sketch", 4)):
        for k, name in enumerate(["cat", "dog", "red_fox", "owl"]):
            write_images(data / split / name, n, seed=stable_seed(split, k), colour=COLOURS[k])
    (base / "caps.tsv").write_text("".join(f"{p}\ta {p.parent.name} number {p.stem}\n"
                                           for p in sorted((data / "train").glob("*/*.jpg"))))
    pool = make_pool(base / "pool", sorted((data / "train" / "owl").iterdir())[:3])
    micro = ["--data", "folder", "--data-root", str(data), "--model", model, "--steps", "3", "--batch-size", "8",
             "--lr", "1e-3", "--eval-every", "0", "--ckpt-every", "0", "--workers", "0", "--crop-scale", "0.5"]
    # LP-FT fine-tunes from a trained head at a tenth of the others' lr (its FT stage's small steps, Kumar et
    # al.): at 1e-3 the sharper logits of that head made Adam's first, sign-like steps turn round-off of
    # near-zero gradients into 1e-5 differences in a ResNet's attention pool
    extra = {"lpft": ["--lr", "1e-4"], "ema": ["--ema-decay", "0.5"], "lipsum_ft": ["--lam", "10"], "car_ft": ["--beta", "10"],
             "carot": ["--ema-momentum", "0.5", "--lam-sd", "10"],  # ψ updated every step of 3
             "arf": ["--captioner", "dataset", "--captions", str(base / "caps.tsv"), "--pool", str(pool), "--retrieve-k", "2",
                     "--ret-batch-size", "4", "--cache", str(base / "cache")]}
    (base / "driver.py").write_text(DRIVER)
    out = {}
    for config, flags in configs.items():
        runs = base / config
        jobs = []
        for m in ["zeroshot", *methods]:
            script = str(REPO / (f"{m}.py" if m in ("lipsum_ft", "car_ft", "arf", "carot") else "baselines.py"))
            method = [] if m in ("lipsum_ft", "car_ft", "arf", "carot") else ["--method", m]
            # LP-FT starts from one LP run's head in every configuration (the first's), so that it compares
            # one run under three configurations, not also the round-off between three LP runs
            lp = ["--lp-run", str(base / next(iter(configs)) / "lp")] if m == "lpft" else []
            jobs.append((script, [*method, *micro, *(flags or []), *extra.get(m, []), *lp, "--out", str(runs / m)]))
        launcher = (["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
                    if flags is None else [])
        run_script([*launcher, str(base / "driver.py"), json.dumps(jobs)], cwd=base, env_extra={"OMP_NUM_THREADS": "1"})
        out[config] = {m: torch.load(runs / m / "final.pt", weights_only=False)["model"]
                       for m in ["zeroshot", *methods] if (runs / m / "final.pt").is_file()}
    return out, jobs


def kill_at_step(module, monkeypatch, step: int):
    """Ctrl-C in a method file's training: its `train` gets a ContrastiveLoss whose embed raises
    KeyboardInterrupt at `step` (the steps before it done, their checkpoints written). Returns the real
    `train`, to put back for the resume."""
    import common

    real_train = module.train

    def train(env, loss_fn, args, **kw):
        def killed(model, batch, s):
            if s == step:
                raise KeyboardInterrupt
            return loss_fn.embed(model, batch, s)
        return real_train(env, common.ContrastiveLoss(killed, loss_fn.loss), args, **kw)

    monkeypatch.setattr(module, "train", train)
    return real_train
