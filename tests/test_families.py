"""Model families: every method on a ModifiedResNet (BatchNorm towers, open_clip's RN50 family), on a
timm ConvNeXt tower with stochastic depth (drop_path 0.2) and on a SigLIP-style model (conftest's
tiny_siglip: a Hugging Face tokenizer, last-token pooling, logit_bias, the sigmoid loss for FLYP and
ARF) ends with the same weights from 1 process,
`--grad-accum 2` and `torchrun --nproc_per_node 2` (tests/test_scale.py: the ViT with OpenAI's
tokenizer), or stops at once with one message. LP leaves every frozen weight and buffer bitwise as θ0.
Tiny random-weight configs built here; nothing is downloaded."""
import json

import pytest
import torch

from conftest import METHODS, REPO, close, run_script, train_matrix

TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
FAMILIES = {
    "resnet": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
               "text_cfg": TEXT},
    "convnext": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "timm_model_name": "test_convnext", "timm_pool": "avg",
                                                 "timm_proj": "linear", "timm_drop_path": 0.2}, "text_cfg": TEXT},
}
PORTS = {"resnet": 29561, "convnext": 29562, "siglip": 29563}


def family_config(tmp_path, family: str, **vision) -> str:
    cfg = json.loads(json.dumps(FAMILIES[family]))
    cfg["vision_cfg"].update(vision)
    path = tmp_path / f"tiny-{family}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.fixture(scope="module", params=list(PORTS))
def family(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(request.param)
    model = request.getfixturevalue("tiny_siglip") if request.param == "siglip" else family_config(base, request.param)
    finals, _ = train_matrix(base, model, port=PORTS[request.param])
    return request.param, finals


def test_every_method_gives_one_process_weights_under_accumulation_and_torchrun(family):
    name, finals = family
    for method in METHODS:
        one = finals["one"][method]
        for config in ("accum2", "torchrun2"):
            other = finals[config][method]
            assert set(one) == set(other)
            assert not close(one, other), f"{name} {method} under {config}: {close(one, other)[:4]}"
        moved = [k for k in one if k.startswith("clip.visual") and not torch.equal(one[k], finals["one"]["zeroshot"][k])]
        assert moved or method == "lp", f"{name}: {method} did not train its image tower"
        if name == "siglip" and method in ("flyp", "arf"):  # the sigmoid loss's bias trains with the scale
            assert not torch.equal(one["clip.logit_bias"], finals["one"]["zeroshot"]["clip.logit_bias"])


def test_lp_leaves_every_frozen_weight_and_buffer_bitwise_unchanged(family):
    name, finals = family
    theta0, lp = finals["one"]["zeroshot"], finals["one"]["lp"]
    buffers = [k for k in theta0 if "running_" in k or "num_batches_tracked" in k]
    assert bool(buffers) == (name == "resnet")  # the ResNet's BatchNorm statistics are among the compared tensors
    changed = [k for k in theta0 if k != "head" and not torch.equal(theta0[k], lp[k])]
    assert not changed, f"{name}: LP changed {changed[:5]}"
    assert not torch.equal(theta0["head"], lp["head"])


def test_batchnorm_statistics_stay_at_theta0_when_the_tower_trains(family):
    name, finals = family
    if name != "resnet":
        pytest.skip("no BatchNorm")
    theta0, ft = finals["one"]["zeroshot"], finals["one"]["ft"]
    stats = [k for k in theta0 if "running_" in k]
    assert stats and all(torch.equal(theta0[k], ft[k]) for k in stats)
    affine = [k for k in theta0 if k.startswith("clip.visual.bn") and k.endswith("weight")]
    assert any(not torch.equal(theta0[k], ft[k]) for k in affine)  # BatchNorm's affine weights train


def micro(folder_data, model, out, *extra):
    return [str(REPO / "baselines.py"), "--method", "ft", "--data", "folder", "--data-root", folder_data, "--model", model,
            "--steps", "2", "--batch-size", "8", "--workers", "0", "--eval-every", "0", "--ckpt-every", "0", "--out", out, *extra]


def test_a_random_layer_that_cannot_be_keyed_stops_at_once_naming_it(tmp_path, folder_data, tiny_model):
    """open_clip's patch dropout draws a random token subset per batch: the probe catches it before training."""
    cfg = json.loads(open(tiny_model).read())
    cfg["vision_cfg"]["patch_dropout"] = 0.5
    model = tmp_path / "tiny-patchdrop.json"
    model.write_text(json.dumps(cfg))
    proc = run_script(micro(folder_data, str(model), "runs/pd"), cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "depends on the other samples of its batch" in proc.stderr and "patch_dropout" in proc.stderr
    assert not (tmp_path / "runs" / "pd" / "log.jsonl").exists() or not (tmp_path / "runs" / "pd" / "log.jsonl").read_text()


@pytest.mark.parametrize("method", ["ft", "flyp", "lora"])  # the image tower; both towers; low-rank updates
def test_grad_checkpointing_gives_the_same_weights(tmp_path, folder_data, tiny_model, method):
    run_script(micro(folder_data, tiny_model, "runs/plain", "--method", method), cwd=tmp_path)
    run_script(micro(folder_data, tiny_model, "runs/ckpt", "--method", method, "--grad-checkpointing"), cwd=tmp_path)
    a, b = (torch.load(tmp_path / "runs" / r / "final.pt", weights_only=False)["model"] for r in ("plain", "ckpt"))
    assert not close(a, b, atol=1e-6)
    args = json.loads((tmp_path / "runs" / "ckpt" / "args.json").read_text())
    assert args["grad_checkpointing"] is True


@pytest.mark.parametrize("family, message", [("resnet", "has no gradient checkpointing"),
                                             ("convnext", "dropout or drop_path in a trained tower")])
def test_grad_checkpointing_where_it_cannot_work_stops_with_why(tmp_path, folder_data, family, message):
    proc = run_script(micro(folder_data, family_config(tmp_path, family), "runs/x", "--grad-checkpointing"), cwd=tmp_path,
                      check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and message in proc.stderr, proc.stderr[-1500:]
