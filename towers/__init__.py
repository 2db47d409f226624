"""The towers in training: what common.train does so that every open_clip model family keeps the
guarantee 1 process = torchrun ×N = --grad-accum N (METHODS.md, "Model families"), or stops at once
with one message saying why. Below common.py: only common.py imports it.

  train_mode               frozen parts and every BatchNorm in eval mode (θ0's statistics, never updated)
  keyed_noise, KeyedDrop   dropout and drop_path masks as a pure function of (seed, step, sample, layer)
  check_batch_independent  a probe that stops a tower whose output for a sample depends on its batch
  grad_checkpointing       --grad-checkpointing on the trained towers, or why it cannot be
"""
import math
import re
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

MASK63 = (1 << 63) - 1  # the mask hash works on non-negative int64
MIX = (0x5BD1E9955BD1E995, 0x27D4EB2F165667C5, 0x165667B19E3779F9, 0x61C8864680B583EB)  # odd multipliers of the mask hash
PROBE_SAMPLES = 3  # images (texts) of check_batch_independent's probe
PROBE_TOL = 1e-4  # relative difference above which a tower's output for a sample depends on the rest of its batch


def train_mode(model: nn.Module) -> nn.Module:
    """model.train(), except (1) a part whose parameters are all frozen (LP's image tower, FT's text
    tower) runs as it does at evaluation: dropout off, BatchNorm statistics untouched; and (2) every
    BatchNorm runs in eval mode, in the trained tower too: it normalises with θ0's running statistics
    and never updates them; its affine weight and bias train. Batch statistics would make an image's
    output depend on the rest of its micro-batch, so 1 process, torchrun ×N and --grad-accum could not
    agree (the usual choice for fine-tuning pretrained BatchNorm networks; METHODS.md, "Model families")."""
    model.train()

    def freeze(m):
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            m.eval()
            return
        for child in m.children():
            freeze(child)

    freeze(model)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def text_modules(clip) -> list:
    """The text tower's modules: CLIP keeps them on itself, CustomTextCLIP (SigLIP, EVA...) in .text."""
    return [clip.transformer, clip.token_embedding, clip.ln_final] if hasattr(clip, "transformer") else [clip.text]


def trained_towers(clip) -> dict:
    """{"image": module, "text": module} for the towers with a trainable parameter: the module is the
    tower's entry (the one called on the pixels or the token ids)."""
    text_entry = clip.token_embedding if hasattr(clip, "transformer") else clip.text
    towers = {"image": (clip.visual, [clip.visual]), "text": (text_entry, text_modules(clip))}
    return {name: entry for name, (entry, parts) in towers.items()
            if any(p.requires_grad for m in parts for p in m.parameters())}


def mix64(h: torch.Tensor) -> torch.Tensor:
    """A 63-bit integer hash (xor-shift-multiply rounds, wrapping int64 arithmetic): [...] -> [...]."""
    h = h & MASK63
    h = ((h ^ (h >> 29)) * MIX[0]) & MASK63
    h = ((h ^ (h >> 32)) * MIX[1]) & MASK63
    return h ^ (h >> 29)


def sample_keys(x: torch.Tensor) -> torch.Tensor:
    """One int64 key per sample of a tower's input [B, ...] (the bits of its pixels or token ids): the
    same wherever the sample is embedded, since the input is computed sample by sample. -> [B]"""
    flat = x.detach().reshape(len(x), -1)
    bits = flat.float().contiguous().view(torch.int32).long() if flat.is_floating_point() else flat.long()  # [B, E]
    weights = mix64(torch.arange(1, flat.shape[1] + 1, device=x.device))  # [E]
    return mix64((bits * weights).sum(1))  # [B]


class KeyedNoise:
    """Dropout and stochastic-depth masks as a pure function of (seed, step, sample, layer, element): a
    sample draws the same masks alone, in a micro-batch, on another process and in the feature cache's
    no-grad pass, so 1 process = torchrun ×N = --grad-accum holds for models with them. Each trained
    tower's entry hashes its input sample by sample into keys[tower]; the KeyedDrop layers inside it
    draw from those keys; train sets `step` before every step."""

    def __init__(self, seed: int):
        self.seed, self.step, self.keys = seed, 0, {}

    def uniform(self, tower: str, layer: int, shape, device) -> torch.Tensor:
        """U[0, 1) of `shape` = [B, ...], element (i, ...) a hash of sample i's key and the rest."""
        keys = self.keys[tower]  # [B]
        if shape[0] != len(keys):
            raise RuntimeError(f"a stochastic layer of the {tower} tower saw a batch of {shape[0]}, its input {len(keys)}")
        salt = (self.seed * MIX[1] + self.step * MIX[2] + (layer + 1) * MIX[3]) & MASK63
        h = mix64(keys * MIX[0] + salt)  # [B]
        per_sample = math.prod(shape[1:])
        if per_sample > 1:
            h = mix64(h[:, None] + torch.arange(per_sample, device=device) * MIX[2])  # [B, E]
        return ((h >> 39).float() / 2**24).view(shape)  # 24 random bits: exact in float32


class KeyedDrop(nn.Module):
    """timm's DropPath (per_sample: a whole residual branch per sample) or nn.Dropout (per element)
    with KeyedNoise masks; the identity at evaluation. `p` and `drop_prob` as the layers it replaces."""

    def __init__(self, noise: KeyedNoise, tower: str, layer: int, p: float, per_sample: bool, scale: bool = True):
        super().__init__()
        self.noise, self.tower, self.layer, self.p, self.per_sample, self.scale = noise, tower, layer, p, per_sample, scale
        self.drop_prob = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        shape = (len(x),) + (1,) * (x.dim() - 1) if self.per_sample else x.shape
        keep = (self.noise.uniform(self.tower, self.layer, shape, x.device) >= self.p).to(x.dtype)  # [B, 1...] or x's
        return x * (keep / (1 - self.p) if self.scale else keep)


def keyed_noise(clip: nn.Module, seed: int) -> Optional[KeyedNoise]:
    """Replaces every DropPath and Dropout with p > 0 in the trained towers by a KeyedDrop (timm's fused
    attention is switched to its explicit path so that its attention dropout is a layer too) and hooks
    each such tower's entry to key its samples. None when the trained towers have no such layer."""
    noise, layer = KeyedNoise(seed), 0
    for tower, entry in trained_towers(clip).items():
        found = 0
        parts = [clip.visual] if tower == "image" else text_modules(clip)
        for parent in [m for part in parts for m in part.modules()]:
            if isinstance(getattr(parent, "attn_drop", None), nn.Dropout) and parent.attn_drop.p > 0 and hasattr(parent, "fused_attn"):
                parent.fused_attn = False
            for name, child in list(parent.named_children()):
                if type(child).__name__ == "DropPath" and child.drop_prob > 0:
                    setattr(parent, name, KeyedDrop(noise, tower, layer, child.drop_prob, True, child.scale_by_keep))
                elif isinstance(child, nn.Dropout) and child.p > 0:
                    setattr(parent, name, KeyedDrop(noise, tower, layer, child.p, False))
                else:
                    continue
                layer, found = layer + 1, found + 1
        if found:
            entry.register_forward_pre_hook(lambda m, args, tower=tower: noise.keys.__setitem__(tower, sample_keys(args[0]))
                                            if m.training else None)
    return noise if layer else None


def check_batch_independent(clip: nn.Module, eval_tf, tokenizer, prompts: list, device: torch.device):
    """Stops at once, with the layers that may be why, when a trained tower in training mode gives a
    sample an output that depends on the rest of its batch (a random layer we cannot key, such as
    patch dropout or attention dropout inside a fused kernel, or normalisation over the batch): such a
    model cannot keep 1 process = torchrun ×N = --grad-accum. A probe of PROBE_SAMPLES synthetic images
    and of the first `prompts` (the task's own: a tokenizer may know no others), each embedded with the
    others and alone, in float32."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = torch.stack([eval_tf(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
                          for _ in range(PROBE_SAMPLES)]).to(device)  # [P, 3, H, W]
    texts = tokenizer(prompts[:PROBE_SAMPLES]).to(device)  # [P, ctx]
    run = {"image": clip.encode_image, "text": clip.encode_text}
    for tower in trained_towers(clip):
        x = images if tower == "image" else texts
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            together = run[tower](x).float()  # [P, D]
            alone = torch.cat([run[tower](x[i:i + 1]).float() for i in range(len(x))])  # [P, D]
        if (together - alone).abs().max() > PROBE_TOL * together.abs().max():
            suspects = sorted({f"{n} ({type(m).__name__})" for n, m in clip.named_modules()
                               if m.training and re.search("drop|norm", type(m).__name__, re.I)
                               and not isinstance(m, (KeyedDrop, nn.LayerNorm)) and "Layer" not in type(m).__name__})
            raise SystemExit(f"error: in training mode the {tower} tower of {type(clip).__name__} gives a sample an output that "
                             "depends on the other samples of its batch, so 1 process, torchrun and --grad-accum would train "
                             f"different models. Layers that may be why: {', '.join(suspects[:6]) or 'none found by name'}. "
                             "Set their rate to 0 in the model config (e.g. patch_dropout, attention dropout), "
                             "or see METHODS.md, 'Model families'.")


def grad_checkpointing(clip: nn.Module, noise: Optional[KeyedNoise]):
    """--grad-checkpointing: open_clip's set_grad_checkpointing on the trained towers, or a message where
    a tower has none (open_clip's ModifiedResNet, a timm trunk without it) or where recomputation would
    redraw keyed masks from another call's keys (a tower that keys dropout or drop_path)."""
    towers = trained_towers(clip)
    if noise is not None:
        raise SystemExit("error: --grad-checkpointing with dropout or drop_path in a trained tower is not supported: "
                         "the recomputed blocks would draw their masks from the tower's latest call. Drop the flag, or set "
                         "the rates to 0 in the model config.")
    for tower in towers:
        part = clip.visual if tower == "image" else getattr(clip, "text", clip)
        trunk = getattr(part, "trunk", None)
        if type(part).__name__ == "ModifiedResNet" or (trunk is not None and not hasattr(trunk, "set_grad_checkpointing")):
            raise SystemExit(f"error: --grad-checkpointing: the {tower} tower ({type(trunk or part).__name__}) has no gradient "
                             "checkpointing in open_clip/timm; drop the flag.")
    if "image" in towers:
        clip.visual.set_grad_checkpointing(True)
    if "text" in towers:
        (clip.text.set_grad_checkpointing(True) if hasattr(clip, "text")
         else setattr(clip.transformer, "grad_checkpointing", True))
