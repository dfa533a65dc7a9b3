"""Training: optimiser groups, schedule, exact accumulation, arguments, LiT/SigLIP runs and (the ~1-minute
test) a tiny model learning the built-in data well enough for zero-shot transfer to held-out pairs."""
import argparse
import json
import math
from contextlib import nullcontext

import pytest
import torch

import clipforge
from clipforge.cli import main as cli_main
from clipforge.loss import SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE
from clipforge.models import CLIP, CLIPConfig
from clipforge.train import TrainConfig, train
from clipforge.train.config import add_arguments, config_from_args
from clipforge.train.logger import read_metrics
from clipforge.train.optim import CosineSchedule, build_optimizer, cosine_lr, param_groups
from clipforge.train.step import Stepper, TrainingLoss, TrainModule, accumulated_backward
from clipforge.train.validate import label_by_caption

# A two-layer model (full BPE vocabulary, so real captions tokenize) that trains in milliseconds a step.
MICRO = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                         "head_width": 16},
         "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def micro_json(tmp_path):
    path = tmp_path / "micro.json"
    path.write_text(json.dumps(MICRO))
    return str(path)


def _micro_clip(seed=0):
    torch.manual_seed(seed)
    return CLIP(CLIPConfig.from_dict(MICRO))


def _batch(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 49000, (n, 32), generator=g)
    tokens[:, 0], tokens[:, 12:] = 49406, 0
    tokens[:, 11] = 49407
    return images, tokens


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _stepper(module, **kw):
    opt = build_optimizer(module, 1e-3)
    return Stepper(module, module, opt, TrainingLoss(**kw), torch.amp.GradScaler("cuda", enabled=False), nullcontext)


# ------------------------------------------------------------------------------------------- optimiser

def test_weight_decay_only_on_matrices_that_are_not_embeddings():
    module = TrainModule(clipforge.create_model("tiny-vit"), loss="sigmoid")
    decayed, plain = param_groups(module, 0.2)
    assert decayed["weight_decay"] == 0.2 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in module.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    plain_names = {names[id(p)] for p in plain["params"]}
    for name in ("clip.token_embedding.weight", "clip.positional_embedding", "clip.visual.class_embedding",
                 "clip.visual.positional_embedding", "clip.logit_scale", "logit_bias", "clip.ln_final.weight",
                 "clip.visual.transformer.resblocks.0.attn.in_proj_bias", "clip.visual.ln_pre.bias"):
        assert name in plain_names, name
    for name in ("clip.visual.conv1.weight", "clip.visual.proj", "clip.text_projection",
                 "clip.transformer.resblocks.0.attn.in_proj_weight", "clip.transformer.resblocks.3.mlp.c_fc.weight",
                 "clip.visual.transformer.resblocks.0.attn.out_proj.weight"):
        assert name in decayed_names, name
    assert all(p.ndim >= 2 for p in decayed["params"])
    assert len(decayed_names) + len(plain_names) == len(list(module.parameters()))
    opt = build_optimizer(module, 1e-3)
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6


def test_frozen_tower_is_left_out_of_the_optimizer():
    clip = _micro_clip()
    clip.freeze(image=True)
    groups = param_groups(TrainModule(clip), 0.2)
    optimised = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in optimised for p in clip.visual.parameters())
    assert id(clip.logit_scale) in optimised


def test_cosine_schedule_values():
    base, warmup, total = 1e-3, 10, 110
    assert [cosine_lr(s, base, warmup, total) for s in range(3)] == pytest.approx([1e-4, 2e-4, 3e-4])
    assert cosine_lr(9, base, warmup, total) == pytest.approx(base)
    assert cosine_lr(10, base, warmup, total) == pytest.approx(base)  # decay starts at the peak
    assert cosine_lr(60, base, warmup, total) == pytest.approx(base / 2)  # half-way through the decay
    assert cosine_lr(35, base, warmup, total) == pytest.approx(base * (1 + math.cos(math.pi / 4)) / 2)
    assert cosine_lr(110, base, warmup, total) == pytest.approx(0.0, abs=1e-12)
    values = [cosine_lr(s, base, warmup, total) for s in range(warmup, total)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    opt = build_optimizer(TrainModule(_micro_clip()), base)
    schedule = CosineSchedule(opt, base, warmup, total)
    assert schedule.set_step(60) == pytest.approx(base / 2)
    assert all(g["lr"] == pytest.approx(base / 2) for g in opt.param_groups)


# ---------------------------------------------------------------------------------------- accumulation

@pytest.mark.parametrize("loss", ["contrastive", "sigmoid"])
def test_accumulation_gives_the_gradients_of_one_big_batch(loss):
    images, tokens = _batch(8)
    big = TrainModule(_micro_clip(), loss)
    _stepper(big, kind=loss).forward_backward([(images, tokens)])
    accumulated = TrainModule(_micro_clip(), loss)
    _stepper(accumulated, kind=loss).forward_backward([(images[:4], tokens[:4]), (images[4:], tokens[4:])])
    expected, got = _grads(big), _grads(accumulated)
    assert expected.keys() == got.keys() and "clip.logit_scale" in got
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)

    # Naive accumulation (a separate loss per micro-batch) sees other negatives: different gradients.
    naive = TrainModule(_micro_clip(), loss)
    for part in (slice(0, 4), slice(4, 8)):
        img, txt = naive(images[part], tokens[part])
        (TrainingLoss(kind=loss)(naive, img, txt) / 2).backward()
    naive_grads = _grads(naive)
    assert not torch.allclose(naive_grads["clip.text_projection"], expected["clip.text_projection"], atol=1e-4)


def test_accumulated_backward_counts_the_temperature_once():
    calls = []
    feats = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)

    def forward(images, tokens):
        return feats[images], feats[tokens]

    def loss_fn(images, texts, temperature_grad):
        calls.append(temperature_grad)
        return (images * texts).sum()

    accumulated_backward(forward, [(torch.tensor([0, 1]), torch.tensor([0, 1])),
                                   (torch.tensor([2, 3]), torch.tensor([2, 3]))], loss_fn, lambda loss: None)
    assert calls == [False, True]


def test_gradient_checkpointing_gives_the_same_gradients():
    images, tokens = _batch(4)
    plain = TrainModule(_micro_clip())
    _stepper(plain).forward_backward([(images, tokens)])
    clip = _micro_clip()
    clip.set_grad_checkpointing(True)
    checkpointed = TrainModule(clip)
    _stepper(checkpointed).forward_backward([(images, tokens)])
    for name, grad in _grads(plain).items():
        torch.testing.assert_close(_grads(checkpointed)[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_logit_scale_is_clamped_after_the_step():
    module = TrainModule(_micro_clip())
    with torch.no_grad():
        module.clip.logit_scale.fill_(5.0)
    _stepper(module).step([_batch(4)])
    assert module.clip.logit_scale.item() == pytest.approx(math.log(100))


def test_caption_labels_for_zeroshot_validation():
    classes = ["circle", "red circle", "square"]
    captions = ["A Red Circle at the top", "a blue circle", "a circle and a square", "nothing here", "squares"]
    assert label_by_caption(captions, classes) == [1, 0, None, None, None]


# ------------------------------------------------------------------------------------------- arguments

def _parse(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_config_file_with_command_line_overrides(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": "tiny-vit", "train-data": "builtin", "batch_size": 16, "steps": 50,
                                "lr": 1e-4, "output": "runs/x", "lock-image": True}))
    cfg = _parse("--config", str(path), "--lr", "2e-3", "--no-gather")
    assert (cfg.model, cfg.batch_size, cfg.steps, cfg.lr, cfg.lock_image, cfg.gather) == (
        "tiny-vit", 16, 50, 2e-3, True, False)
    assert cfg.warmup is None and cfg.weight_decay == 0.2  # defaults where neither says otherwise (None: fitted)
    path.write_text(json.dumps({"model": "tiny-vit", "batchsize": 16}))
    with pytest.raises(ValueError, match="unknown option 'batchsize'"):
        _parse("--config", str(path))
    path.write_text(json.dumps({"lr": "fast"}))
    with pytest.raises(ValueError, match="'lr' must be float"):
        _parse("--config", str(path))


@pytest.mark.parametrize("argv, message", [
    (["--steps", "5", "--epochs", "1"], "exactly one of --epochs, --steps and --time-budget"),
    ([], "exactly one of --epochs, --steps and --time-budget"),
    (["--steps", "5", "--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--steps", "5", "--lock-image", "--lock-text"], "nothing to train"),
    (["--steps", "5", "--loss", "sigmoid", "--loss-tile-size", "64"], "contrastive loss"),
    (["--steps", "5", "--local-loss", "--no-gather"], "--local-loss needs --gather"),
])
def test_argument_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        _parse("--model", "tiny-vit", "--train-data", "builtin", "--output", "x", *argv)


@pytest.mark.slow
def test_cli_reports_bad_runs_clearly(tmp_path, capsys, micro_json):
    base = ["train", "--train-data", "builtin:64", "--steps", "2", "--warmup", "0", "--workers", "0"]
    assert cli_main(base + ["--model", "no-such-model", "--output", str(tmp_path / "a")]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert cli_main(["train", "--model", micro_json, "--train-data", str(tmp_path / "missing.csv"), "--steps", "2",
                     "--output", str(tmp_path / "b")]) == 2
    assert "missing.csv" in capsys.readouterr().err
    assert cli_main(base + ["--model", micro_json, "--warmup", "5", "--output", str(tmp_path / "c")]) == 2
    assert "--warmup 5 is not shorter than the run" in capsys.readouterr().err


def test_refuses_to_overwrite_another_run(tmp_path, micro_json):
    cfg = TrainConfig(model=micro_json, train_data="builtin:64", output=str(tmp_path / "run"), steps=2, warmup=0,
                      batch_size=8, workers=0, save_every=2)
    train(cfg)
    with pytest.raises(ValueError, match="already holds a training run"):
        train(cfg)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [2]


# -------------------------------------------------------------------------------------------- variants

def test_lit_run_trains_the_text_tower_only_and_loads_back(tmp_path, micro_json):
    start = _micro_clip(seed=0)  # what the run initialises from --seed 0
    cfg = TrainConfig(model=micro_json, train_data="builtin:64", output=str(tmp_path), steps=3, warmup=1,
                      batch_size=8, workers=0, lock_image=True, lr=1e-3, log_every=1, accum_freq=2)
    result = train(cfg)
    model, _ = clipforge.load(tmp_path, device="cpu")
    before, after = start.state_dict(), model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("visual."))
    assert not torch.equal(before["text_projection"], after["text_projection"])
    assert result["step"] == 3 and [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    resolved = json.loads((tmp_path / "run_config.json").read_text())
    assert resolved["lock_image"] and resolved["resolved"]["global_batch_size"] == 16


def test_sigmoid_loss_run_learns_a_bias(tmp_path, micro_json):
    cfg = TrainConfig(model=micro_json, train_data="builtin:64", output=str(tmp_path), steps=2, warmup=0,
                      batch_size=8, workers=0, loss="sigmoid", log_every=1, lr=1e-3)
    train(cfg)
    first, last = read_metrics(tmp_path)
    assert first["logit_scale"] == pytest.approx(math.exp(SIGLIP_INIT_LOGIT_SCALE), rel=0.01)
    assert first["logit_bias"] == pytest.approx(SIGLIP_INIT_LOGIT_BIAS, abs=0.01)
    assert last["logit_bias"] != first["logit_bias"]
    state = torch.load(tmp_path / "checkpoints" / "step_00000002" / "train_state.pt", weights_only=True)
    assert state["logit_bias"].item() == pytest.approx(last["logit_bias"])


# ------------------------------------------------------------------- the ~1-minute test: it really learns

@pytest.mark.slow
def test_tiny_model_learns_builtin_data_and_transfers_zero_shot(tmp_path):
    """About a minute on a CPU: tiny-vit on the built-in shapes; the loss falls far below ln(batch) and
    zero-shot accuracy on the colour-shape pairs never seen in training is far above chance (1/8)."""
    cfg = TrainConfig(model="tiny-vit", train_data="builtin:5000", output=str(tmp_path), steps=140, batch_size=32,
                      lr=1.5e-3, warmup=20, workers=1, log_every=10, save_every=1000,
                      zeroshot_classes="builtin-heldout", val_data="builtin:256")
    result = train(cfg)
    train_records = [r for r in read_metrics(tmp_path) if r.get("split") != "val"]
    assert train_records[0]["loss"] > 0.95 * math.log(32)
    assert result["train"]["loss"] < 0.7 * math.log(32)
    assert result["val"]["zeroshot_classes"] == 8
    assert result["val"]["zeroshot_top1"] > 0.5
    assert result["val"]["image_to_text_recall@10"] > 10 / 256
    for key in ("step", "epoch", "loss", "lr", "logit_scale", "samples_per_s", "grad_norm"):
        assert key in train_records[-1]
