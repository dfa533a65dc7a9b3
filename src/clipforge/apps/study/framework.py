"""The framework of ``clipforge study``: its scales, the ``Study`` an experiment trains and evaluates
with, the ``Result`` it returns, and the measures the experiments share (noise margins, runs against
the baseline, checkpoints scored along a run). It knows no experiment: those import it, and the registry
lists them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from tqdm import tqdm

from clipforge.data import shapes
from clipforge.io.factory import load
from clipforge.io.runs import MODEL_FILES, RUN_CONFIG_NAME, is_complete, step_folder, step_folders, write_files
from clipforge.runtime.threads import threads_beside_workers
from clipforge.train import TrainConfig, train
from clipforge.train.logger import read_metrics
from clipforge.train.validate import ZeroShotSet as EvalSet
from clipforge.transforms import image_transform
from clipforge.zeroshot import ZeroShotClassifier

STUDY_MARKER = ".clipforge-study"  # marks a folder a study wrote, which a later study may write into again
RESULTS_DIR, RUNS_DIR, CONFIGS_DIR = "results", "runs", "model_configs"
CHECKPOINTS_PER_RUN = 3  # an interrupted run resumes from the newest of these (keep=1: only it stays)
EVAL_SEED = 1000  # evaluation images are drawn apart from the training data's seed (0)
BASELINE = ("baseline", "clip")  # the experiment and variant of the scale's default contrastive run
CHECKPOINT_FRACTIONS = 8  # train_with_checkpoints keeps a checkpoint every eighth of the run


@dataclass(frozen=True)
class Scale:
    """How big a study is: the model, data and schedule of every training run, evaluation sizes, seeds.

    ``model`` is a registry name or a model-config dict; ``sizes`` are the model configs of the compute
    scaling experiment; ``world`` is the built-in world trained and evaluated on ("default" or "hard").
    """

    name: str
    model: str | dict
    train_samples: int
    steps: int
    batch_size: int
    eval_samples: int
    probe_shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    seeds: int = 1
    sizes: tuple = ()
    world: str = "hard"
    lr: float | None = None
    probe_draws: int = 3  # k-shot training sets drawn per k and seed (experiment 6)
    workers: int = 1  # data-loading processes of each training run

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples as lists, as read back from JSON


def _vit(embed: int, width: int, layers: int, context: int = 20) -> dict:
    """A small ViT CLIP config for 32-pixel images (patches of 8: a 4x4 grid)."""
    return {"embed_dim": embed,
            "vision_cfg": {"image_size": 32, "layers": layers, "width": width, "patch_size": 8, "head_width": 32},
            "text_cfg": {"context_length": context, "vocab_size": 49408, "width": width,
                         "heads": max(1, width // 32), "layers": layers}}


SCALES = {
    "quick": Scale("quick", "study-vit", train_samples=50_000, steps=300, batch_size=128, eval_samples=500,
                   seeds=1, sizes=(_vit(32, 32, 1), "study-vit", _vit(96, 96, 3))),
    "full": Scale("full", "study-vit", train_samples=100_000, steps=400, batch_size=128, eval_samples=1000,
                  seeds=3, sizes=(_vit(32, 32, 1), "study-vit", _vit(96, 96, 3))),
    "smoke": Scale("smoke", _vit(16, 32, 1), train_samples=256, steps=3, batch_size=16, eval_samples=48,
                   probe_shots=(1, 2), seeds=1, sizes=(_vit(16, 32, 1), _vit(16, 32, 2)), probe_draws=1, workers=0),
}
CHOICES = ("quick", "full")  # the scales offered on the command line; "smoke" is the tests'


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """A table cell: mean and sample standard deviation over seeds (0 for one seed)."""
    values = [float(v) for v in values]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": spread}


@dataclass
class Result:
    """What an experiment measured, in the report's terms.

    ``table``: one dict per variant (cells: numbers, strings or ``mean_std`` dicts); ``figure``: a
    ``matplotlib.figure.Figure`` (after ``run_study``, the name of its PNG beside the report);
    ``agrees``: whether the small-scale result agrees with the paper (None: cannot tell); ``numbers``:
    every measured number, per seed. ``scale``, ``seeds`` and ``settings`` are filled by ``run_study``.
    """

    name: str
    title: str
    section: str
    paper: str
    table: list[dict]
    figure: Any
    verdict: str
    agrees: bool | None
    numbers: dict
    scale: str | None = None
    seeds: int | None = None
    settings: dict | None = None  # the whole Scale, so that a changed scale of the same name is run again

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        if not isinstance(self.figure, (str, type(None))):
            raise ValueError(f"result {self.name!r}: save its figure first (run_study writes it as a PNG)")
        return json.dumps(fields, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Result":
        return cls(**json.loads(text))


class Study:
    """Trains and evaluates an experiment's runs under ``output`` at one ``Scale``, ``seeds`` seeds.

    Runs live in ``output/runs/<experiment>/<variant>-seed<k>``; a run whose final checkpoint exists is
    not trained again, an interrupted one resumes from its newest checkpoint, and one trained with other
    settings (another scale) is trained again from scratch.
    """

    def __init__(self, output: str | Path, scale: Scale, seeds: int, progress: bool = True):
        if seeds < 1:
            raise ValueError(f"--seeds must be a positive integer, got {seeds}")
        self.output, self.scale, self.seeds, self.progress = Path(output), scale, seeds, progress
        self.tasks: tqdm | None = None  # the current experiment's bar over runs and evaluations
        self._evalsets: dict[tuple, EvalSet] = {}

    # ------------------------------------------------------------------------------------ training
    def seed_range(self) -> range:
        """The seeds every variant is trained with: 0 .. seeds - 1."""
        return range(self.seeds)

    def run_dir(self, experiment: str, variant: str, seed: int) -> Path:
        return self.output / RUNS_DIR / experiment / f"{variant}-seed{seed}"

    def model_file(self, model: str | dict, **changes: dict) -> str:
        """A registry name as is, or a model-config dict (with ``changes`` merged into its sections, e.g.
        ``text_cfg={"encoder": "cbow"}``) written to a JSON file under ``output``, named by its content."""
        if isinstance(model, str) and not changes:
            return model
        config = _config_dict(model)
        for section, values in changes.items():
            config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
        text = json.dumps(config, indent=2, sort_keys=True)
        path = self.output / CONFIGS_DIR / f"{hashlib.sha256(text.encode()).hexdigest()[:12]}.json"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_files(path.parent, {path.name: lambda p: p.write_text(text + "\n")})
        return str(path)

    def train_config(self, experiment: str, variant: str, seed: int, **overrides) -> TrainConfig:
        """The scale's training run of one variant and seed; ``overrides`` are TrainConfig fields (``model``
        may also be a config dict)."""
        scale = self.scale
        spec = shapes.BuiltinSpec(scale.train_samples, ("filled",), scale.world)
        settings = dict(model=scale.model, train_data=str(spec), steps=scale.steps, batch_size=scale.batch_size,
                        lr=scale.lr, seed=seed, output=str(self.run_dir(experiment, variant, seed)),
                        resume="auto", workers=scale.workers, log_every=max(1, scale.steps // 20),
                        save_every=max(1, scale.steps // CHECKPOINTS_PER_RUN), keep=1,
                        threads=threads_beside_workers(scale.workers))
        settings.update(overrides)
        settings["model"] = self.model_file(settings["model"])
        return TrainConfig(**settings).validate()

    def train(self, experiment: str, variant: str, seed: int, **overrides) -> Path:
        """Train one run (or finish an interrupted one); returns its run directory."""
        cfg = self.train_config(experiment, variant, seed, **overrides)
        run_dir = Path(cfg.output)
        _drop_if_other_settings(run_dir, cfg)
        if not is_complete(step_folder(run_dir, cfg.steps), MODEL_FILES):
            self._describe(f"{experiment}: training {variant}, seed {seed}")
            train(cfg)
        self._advance()
        return run_dir

    def baseline(self, seed: int) -> Path:
        """The scale's default contrastive CLIP run, trained once and shared by the experiments."""
        return self.train(*BASELINE, seed)

    @staticmethod
    def load(run_dir: str | Path):
        """(model, preprocess) of a run's newest checkpoint, or of a checkpoint folder: CPU, eval mode."""
        return load(run_dir, device="cpu")

    # ---------------------------------------------------------------------------------- evaluation
    def labelled(self, split: str = "heldout", style: str = "filled", n: int | None = None, seed: int = EVAL_SEED,
                 by: str = "pair", world: str | None = None) -> EvalSet:
        """``n`` (default ``eval_samples``) images of a split of the scale's world (or ``world``), rendered as
        the training data is and preprocessed as the study's models evaluate, labelled by ``by``."""
        key = (split, style, n or self.scale.eval_samples, seed, by, world or self.scale.world)
        if key not in self._evalsets:
            spec = shapes.BuiltinSpec(key[2], shapes.check_styles(style), key[5])
            data = spec.dataset(spec.num_samples, split, seed)
            preprocess = image_transform(_image_size(self.scale.model))
            images = torch.stack([preprocess(data.image(i)) for i in range(len(data))])
            labels = torch.tensor([data.label(i, by) for i in range(len(data))])
            self._evalsets[key] = EvalSet(images, labels, data.class_names(by), shapes.templates())
        return self._evalsets[key]

    def heldout(self, style: str = "filled", world: str | None = None) -> EvalSet:
        """Images of the colour-shape pairs never seen in training, ``eval_samples`` of them."""
        return self.labelled("heldout", style, world=world)

    def zeroshot_top1(self, model, preprocess, evalset: EvalSet, templates: Sequence[str] | None = None) -> float:
        """Zero-shot top-1 on ``evalset`` (its templates unless given) for a model of any objective."""
        del preprocess  # evalset images are already preprocessed (Study.labelled)
        classifier = ZeroShotClassifier(model, evalset.classnames, templates or evalset.templates)
        with torch.no_grad():
            scores = classifier.scores(evalset.images)
        self._advance()
        return float((scores.argmax(dim=-1) == evalset.labels).float().mean())

    # ------------------------------------------------------------------------------------ progress
    def track(self, items: Iterable, description: str) -> Iterable:
        """``items`` with a progress bar (when the study shows progress)."""
        return tqdm(items, desc=description, leave=False, disable=not self.progress)

    def _describe(self, text: str) -> None:
        if self.tasks is not None:
            self.tasks.set_description_str(text)

    def _advance(self) -> None:
        if self.tasks is not None:
            self.tasks.update(1)


def _config_dict(model: str | dict) -> dict:
    if isinstance(model, dict):
        return json.loads(json.dumps(model))
    from clipforge.models import get_model_config

    return get_model_config(model).to_dict()


def _image_size(model: str | dict) -> int:
    return int(_config_dict(model)["vision_cfg"]["image_size"])


_IDENTITY_IGNORED = ("resume", "threads")  # how a run is computed, not what it trains


def _drop_if_other_settings(run_dir: Path, cfg: TrainConfig) -> None:
    """Remove a study run trained with other settings (e.g. another scale), so it is trained again."""
    saved = run_dir / RUN_CONFIG_NAME
    if not saved.is_file():
        return
    before = json.loads(saved.read_text())
    now = cfg.to_dict()
    if any(before.get(k) != v for k, v in now.items() if k not in _IDENTITY_IGNORED):
        shutil.rmtree(run_dir)


# -------------------------------------------------------------------------- measures the experiments share
def noise_margin(a: Sequence[float], b: Sequence[float], num_images: int) -> float:
    """Two standard errors of the difference of two mean accuracies: each mean's error combines the evaluation
    images' binomial error (the same images for every seed, so it does not average out) and the seeds' spread."""
    def variance(values: Sequence[float]) -> float:
        p = statistics.fmean(values)
        spread = statistics.variance(values) / len(values) if len(values) > 1 else 0.0
        return p * (1 - p) / num_images + spread
    return 2 * math.sqrt(variance(a) + variance(b))


def margin_caveat(seeds: int) -> str:
    """What a noise margin leaves out when there is one seed: the spread between training runs."""
    return "; one seed, so the spread between training runs is not in it" if seeds == 1 else ""


def compare(a: Sequence[float], b: Sequence[float], num_images: int) -> tuple[float, float, bool]:
    """(mean of a minus mean of b, the noise margin, whether the difference is within it)."""
    difference = statistics.fmean(a) - statistics.fmean(b)
    margin = noise_margin(a, b, num_images)
    return difference, margin, abs(difference) <= margin


def images_per_step(run_dir: Path) -> int:
    """The global batch of a (single-process) run: images seen per optimiser step."""
    config = json.loads((Path(run_dir) / RUN_CONFIG_NAME).read_text())
    return int(config["batch_size"]) * int(config.get("accum_freq") or 1)


def train_with_checkpoints(study: Study, experiment: str, variant: str, seed: int, **overrides) -> Path:
    """A run that keeps a checkpoint every eighth of its steps, for accuracy against images seen."""
    steps = overrides.get("steps") or study.scale.steps
    every = max(1, steps // CHECKPOINT_FRACTIONS)
    return study.train(experiment, variant, seed, save_every=every, keep=steps // every + 1, **overrides)


def scored_checkpoints(study: Study, run_dir: Path, score, steps: Sequence[int] | None = None) -> list[tuple]:
    """``(images seen, score(model, preprocess))`` for each kept checkpoint of a run (or those of ``steps``),
    oldest first."""
    batch, wanted = images_per_step(run_dir), None if steps is None else set(steps)
    points = [(float(step * batch), score(*study.load(folder))) for step, folder in step_folders(run_dir)
              if is_complete(folder) and (wanted is None or step in wanted)]
    if not points:
        raise RuntimeError(f"{run_dir} has no complete checkpoint to score; delete it and run the study again")
    return points


def final_top1(study: Study, run_dir: Path, evalset) -> float:
    """Zero-shot top-1 of a run's newest checkpoint."""
    model, preprocess = study.load(run_dir)
    return study.zeroshot_top1(model, preprocess, evalset)


def final_loss(run_dir: Path, last: int = 5) -> float:
    """The training loss averaged over a run's last ``last`` logged records (one record is noisy)."""
    losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r and "val" not in r][-last:]
    if not losses:
        raise RuntimeError(f"{run_dir} logged no training loss; delete it and run the study again")
    return statistics.fmean(losses)


def against_baseline(study: Study, baseline: str, variant: str, experiment: str, run_name: str,
                     **overrides) -> dict[str, list[Path]]:
    """The run directories, per seed, of the shared baseline (named ``baseline``) and of one variant trained
    with ``overrides`` (named ``variant``; stored as ``runs/<experiment>/<run_name>-seed<k>``)."""
    return {baseline: [study.baseline(seed) for seed in study.seed_range()],
            variant: [study.train(experiment, run_name, seed, **overrides) for seed in study.seed_range()]}
