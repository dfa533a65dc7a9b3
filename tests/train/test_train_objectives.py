"""The trainer's objectives beside contrastive and sigmoid (--loss bow|caption|classify), the MLP projection
and a fixed temperature: losses fall, accumulation is exact, a stopped run resumes to the same weights,
checkpoints load and score zero-shot, and the command line refuses what does not fit."""
import json
import math
from contextlib import nullcontext

import pytest
import torch
from safetensors.torch import load_file

import clipforge
from clipforge.cli import main
from clipforge.data import ShapesDataset, class_names, shapes, write_classification
from clipforge.models import CLIP, CLIPConfig
from clipforge.train import TrainConfig, train
from clipforge.train import logger as train_logger
from clipforge.train.logger import read_metrics
from clipforge.train.step import Stepper, TrainingLoss, TrainModule
from clipforge.zeroshot import ZeroShotClassifier

# A micro ViT; the caption decoder's logits are (B, L, vocab), so a short context keeps caption runs fast.
MICRO = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                         "head_width": 16},
         "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture
def micro_json(tmp_path, one_thread):
    path = tmp_path / "micro.json"
    path.write_text(json.dumps(MICRO))
    return str(path)


def _cfg(tmp_path, model, name="run", **kw):
    base = dict(model=model, train_data="builtin:256", output=str(tmp_path / name), steps=16, warmup=2, lr=2e-3,
                batch_size=16, workers=0, log_every=1, save_every=100)
    return TrainConfig(**{**base, **kw})


def _losses(run) -> list[float]:
    return [r["loss"] for r in read_metrics(run) if "split" not in r]


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["bow", "caption", "classify"])
def test_each_objective_trains_and_its_checkpoint_scores_zero_shot(tmp_path, micro_json, loss):
    # zero-shot scoring of a caption model runs its decoder over images x classes x templates prompts: the
    # 512 held-out images are left to bow here, and the caption checkpoint is scored on a few images below
    validation = {"zeroshot_classes": "builtin-heldout"} if loss == "bow" else {}
    result = train(_cfg(tmp_path, micro_json, loss=loss, val_data="builtin:48", **validation))
    losses = _losses(tmp_path / "run")
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05, losses
    assert "logit_scale" not in read_metrics(tmp_path / "run")[0]  # no temperature to report
    val = result["val"]
    assert {"loss", "val_samples" if loss != "classify" else "zeroshot_samples"} <= set(val)
    assert ("zeroshot_top1" in val) == (loss != "caption") and not any("recall" in k for k in val)

    model, preprocess = clipforge.load(tmp_path / "run", device="cpu")
    assert model.objective == loss and model.config.learn_logit_scale
    if loss == "classify":
        assert list(model.config.classnames) == class_names("train")
    classes = class_names("heldout") if loss != "classify" else class_names("train")[:5]
    data = ShapesDataset(8, "heldout" if loss != "classify" else "train", seed=3, image_size=32)
    images = torch.stack([preprocess(data.image(i)) for i in range(8)])
    scores = ZeroShotClassifier(model, classes, ["a photo of the {}."]).scores(images)
    assert scores.shape == (8, len(classes)) and torch.isfinite(scores).all()


@pytest.mark.slow
def test_classify_on_a_labelled_folder_beats_chance(tmp_path, micro_json):
    root = write_classification(tmp_path / "colours", "train", 256, by="colour", image_size=32, seed=0)
    train(_cfg(tmp_path, micro_json, loss="classify", train_data=root, steps=120, lr=5e-3, batch_size=32))
    model, preprocess = clipforge.load(tmp_path / "run", device="cpu")
    names = class_names("train", by="colour")
    assert list(model.config.classnames) == names  # the folders' classes, in label order
    data = ShapesDataset(256, "train", seed=0, image_size=32)
    images = torch.stack([preprocess(data.image(i)) for i in range(256)])
    labels = torch.tensor([data.label(i, "colour") for i in range(256)])
    accuracy = (ZeroShotClassifier(model, names).scores(images).argmax(-1) == labels).float().mean().item()
    assert accuracy > 0.5, accuracy  # 8 classes: chance is 0.125


@pytest.mark.parametrize("fmt", ["wds", "csv"])
def test_classify_reads_labelled_shards_and_csv(tmp_path, micro_json, fmt):
    spec = write_classification(tmp_path / fmt, "train", 40, fmt=fmt, by="shape", image_size=32, seed=0)
    names = {"classnames": str(tmp_path / fmt / "classnames.txt")} if fmt == "wds" else {}  # .cls: numbers
    train(_cfg(tmp_path, micro_json, loss="classify", train_data=spec, steps=2, warmup=1, **names))
    model, _ = clipforge.load(tmp_path / "run", device="cpu")
    assert list(model.config.classnames) == class_names("train", by="shape")
    if fmt == "wds":
        with pytest.raises(ValueError, match="the labels are integers; pass class names"):
            train(_cfg(tmp_path, micro_json, "unnamed", loss="classify", train_data=spec, steps=2, warmup=1))


def test_classify_on_a_builtin_world_and_style_takes_its_pairs(tmp_path, micro_json):
    train(_cfg(tmp_path, micro_json, loss="classify", train_data="builtin-hard:64:outline", steps=2, warmup=1))
    model, _ = clipforge.load(tmp_path / "run", device="cpu")
    assert list(model.config.classnames) == class_names("train", config=shapes.world("hard"))
    assert len(model.config.classnames) < len(class_names("train"))  # the hard world holds out more pairs


@pytest.mark.slow
def test_time_budget_plans_a_caption_run(tmp_path, micro_json):
    result = train(_cfg(tmp_path, micro_json, loss="caption", steps=None, warmup=None, time_budget="10s",
                        val_data="builtin:16", batch_size=8))
    resolved = json.loads((tmp_path / "run" / "run_config.json").read_text())["resolved"]
    assert result["step"] == resolved["total_steps"] >= 1 and resolved["time_budget_costs"]["validate_s"] > 0
    assert "loss" in result["val"]


def _micro_batches(objective: str, sizes=(3, 5), seed=0) -> list:
    """Micro-batches of images and targets: caption lengths differ, so token counts differ between them."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for size in sizes:
        images = torch.randn(size, 3, 32, 32, generator=gen)
        if objective == "classify":
            batches.append((images, torch.randint(0, 4, (size,), generator=gen)))
            continue
        tokens = torch.zeros(size, 24, dtype=torch.long)
        for row in range(size):
            length = int(torch.randint(2, 20, (), generator=gen))
            tokens[row, 0], tokens[row, length + 1] = 49406, 49407
            tokens[row, 1:length + 1] = torch.randint(1, 49000, (length,), generator=gen)
        batches.append((images, tokens))
    return batches


@pytest.mark.parametrize("objective", ["bow", "caption", "classify"])
def test_accumulation_is_exact_for_per_sample_losses(objective, one_thread):
    extra = {"classnames": ("a", "b", "c", "d")} if objective == "classify" else {}
    torch.manual_seed(0)
    module = TrainModule(CLIP(CLIPConfig.from_dict(MICRO).replace(objective=objective, **extra)), objective)
    stepper = Stepper(module, module, torch.optim.SGD(module.parameters(), lr=0.1), TrainingLoss(objective),
                      torch.amp.GradScaler("cpu", enabled=False), nullcontext)
    micro = _micro_batches(objective)
    accumulated = stepper.forward_backward(micro)
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    whole = stepper.forward_backward([tuple(torch.cat(parts) for parts in zip(*micro))])
    assert torch.allclose(accumulated, whole, atol=1e-6)
    for name, p in module.named_parameters():
        if name in grads:
            assert torch.allclose(grads[name], p.grad, rtol=1e-4, atol=1e-7), name


@pytest.mark.slow
def test_caption_trains_data_parallel(tmp_path, micro_json):
    from test_train_distributed import _args, _launch_torchrun  # the data-parallel tests' launcher
    run = tmp_path / "ddp"
    # the decoder reads the image tokens, so the image projection (and MLP head) take no gradient there
    _launch_torchrun(_args(micro_json, run, 4, "--loss", "caption", "--projection", "mlp"), run)
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert json.loads((run / "run_config.json").read_text())["resolved"]["world_size"] == 2


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_stopped_bow_run_resumes_to_the_same_weights(tmp_path, micro_json, monkeypatch):
    settings = dict(loss="bow", steps=10, save_every=4, keep=3, train_data="builtin:96")
    train(_cfg(tmp_path, micro_json, "whole", **settings))

    log = train_logger.RunLogger.log

    def log_then_stop(self, record):
        log(self, record)
        if record.get("step") == 6:
            raise _Stop

    monkeypatch.setattr(train_logger.RunLogger, "log", log_then_stop)
    with pytest.raises(_Stop):
        train(_cfg(tmp_path, micro_json, "broken", **settings))
    monkeypatch.setattr(train_logger.RunLogger, "log", log)
    train(_cfg(tmp_path, micro_json, "broken", resume="latest", **settings))

    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert [r["loss"] for r in read_metrics(broken)] == [r["loss"] for r in read_metrics(whole)]
    final = [load_file(run / "checkpoints" / "step_00000010" / "model.safetensors") for run in (whole, broken)]
    assert final[0].keys() == final[1].keys() and "bow_head.weight" in final[0]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


@pytest.mark.parametrize("loss, temperature", [("contrastive", 0.05), ("sigmoid", 0.5), ("contrastive", 0.005)])
def test_fixed_temperature_stays_exactly_fixed(tmp_path, micro_json, loss, temperature):
    train(_cfg(tmp_path, micro_json, loss=loss, fixed_temperature=temperature, steps=6))
    expected = torch.tensor(math.log(1 / temperature))  # float32, as the parameter
    # 0.005 is a scale of 200, above the clamp of learned scales at 100: a fixed one is not clamped
    assert {r["logit_scale"] for r in read_metrics(tmp_path / "run")} == {expected.exp().item()}
    model, _ = clipforge.load(tmp_path / "run", device="cpu")
    assert torch.equal(model.logit_scale.detach(), expected) and not model.logit_scale.requires_grad
    assert model.config.learn_logit_scale is False


def test_mlp_projection_trains_and_round_trips(tmp_path, micro_json):
    train(_cfg(tmp_path, micro_json, projection="mlp", steps=12))
    losses = _losses(tmp_path / "run")
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    model, preprocess = clipforge.load(tmp_path / "run", device="cpu")
    assert model.config.projection == "mlp" and hasattr(model, "image_mlp") and hasattr(model, "text_mlp")
    saved = load_file(tmp_path / "run" / "checkpoints" / "step_00000012" / "model.safetensors")
    assert {k for k in saved if k.startswith(("image_mlp.", "text_mlp."))}


@pytest.mark.slow
def test_resume_refuses_changed_objective_settings(tmp_path, micro_json):
    train(_cfg(tmp_path, micro_json, steps=2, warmup=1))
    for change, shown in (({"projection": "mlp"}, "projection: None -> 'mlp'"),
                          ({"fixed_temperature": 0.1}, "fixed_temperature: None -> 0.1"),
                          ({"loss": "bow"}, "loss: 'contrastive' -> 'bow'")):
        with pytest.raises(ValueError, match="settings differ") as error:
            train(_cfg(tmp_path, micro_json, steps=2, warmup=1, resume="latest", **change))
        assert shown in str(error.value)


def test_cli_trains_bow_end_to_end(tmp_path, micro_json, capsys):
    run = tmp_path / "cli"
    assert main(["train", "--model", micro_json, "--loss", "bow", "--train-data", "builtin:64", "--steps", "4",
                 "--batch-size", "16", "--warmup", "1", "--workers", "0", "--val-data", "builtin:32",
                 "--zeroshot-classes", "builtin-heldout", "--keep-best", "zeroshot_top1",
                 "--output", str(run)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 4 and "val_loss" in summary and "val_zeroshot_top1" in summary
    config = json.loads((run / "checkpoints" / "step_00000004" / "config.json").read_text())
    assert config["model_cfg"]["objective"] == "bow"
    assert (run / "checkpoints" / "best").is_dir()
    assert json.loads((run / "run_config.json").read_text())["loss"] == "bow"


@pytest.mark.parametrize("extra, message", [
    (["--loss", "bow", "--fixed-temperature", "0.07"], "a --loss bow model has no temperature"),
    (["--fixed-temperature", "0"], "--fixed-temperature must be positive"),
    (["--loss", "caption", "--lock-text"], "no text tower to lock"),
    (["--loss", "classify", "--zeroshot-classes", "builtin-heldout"], "a classifier scores only its own classes"),
    (["--loss", "bow", "--loss-tile-size", "8"], "apply to the contrastive loss, not --loss bow"),
    (["--loss", "classify", "--train-data", "builtin::builtin"], "one labelled set"),
    (["--loss", "classify", "--classnames", "names.txt"], "the built-in data's classes are its colour-shape pairs"),
    (["--classnames", "names.txt"], "--loss contrastive trains on captions"),
])
def test_cli_refuses_what_an_objective_does_not_have(tmp_path, micro_json, capsys, extra, message):
    args = ["train", "--model", micro_json, "--train-data", "builtin:64", "--steps", "2", "--workers", "0",
            "--output", str(tmp_path / "refused"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("clipforge train: error: ") and message in err and "Traceback" not in err


def test_cli_rejects_an_unknown_projection(tmp_path, micro_json, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--model", micro_json, "--train-data", "builtin", "--steps", "1", "--projection", "deep",
              "--output", str(tmp_path / "x")])
    assert "invalid choice: 'deep'" in capsys.readouterr().err
