"""The training loop of CLIP (Radford et al. 2021): set-up from a ``TrainConfig``, then steps with
logging, validation and checkpoints; resumable mid-epoch from any checkpoint, on one or many processes.
"""
from __future__ import annotations

import functools
import gc
import json
import logging
import math
import random
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

import clipforge
from clipforge.data import REASONS, build_train_data
from clipforge.data.labelled import open_labelled_source
from clipforge.io.factory import create_model_and_transforms
from clipforge.io.runs import (
    CHECKPOINTS_DIR,
    METRICS_NAME,
    RUN_CONFIG_NAME,
    TRAIN_FILES,
    checkpoints_dir,
    is_complete,
    is_run_dir,
    latest_checkpoint,
    read_best,
    step_folders,
)
from clipforge.io.tensors import CheckpointError
from clipforge.runtime.allocator import retain_freed_memory
from clipforge.runtime.distributed import DistEnv, all_reduce_sum, barrier, cleanup, gather_objects, init_distributed
from clipforge.runtime.threads import intraop_threads
from clipforge.tokenizer import model_tokenizer
from clipforge.train.budget import measure_costs, planned_steps
from clipforge.train.checkpoint import best_mode, load_checkpoint, rng_state, save_best, save_checkpoint, set_rng_state
from clipforge.train.config import TWO_TOWER_LOSSES, TrainConfig, default_resume, objective_of, parse_duration
from clipforge.train.logger import RunLogger, truncate_metrics
from clipforge.train.optim import CosineSchedule, build_optimizer, fitted_lr, fitted_warmup
from clipforge.train.step import Stepper, TrainingLoss, TrainModule
from clipforge.train.validate import (
    HELDOUT,
    heldout_zeroshot_set,
    label_by_classnames,
    load_val_pairs,
    validate,
    zeroshot_from_val,
)

_log = logging.getLogger(__name__)
_RUN_IDENTITY_KEYS = ("model", "train_data", "seed", "loss", "projection", "fixed_temperature", "classnames", "lr",
                      "warmup", "accum_freq")


def train(cfg: TrainConfig) -> dict:
    """Train as ``cfg`` says (one process, or one per rank under torchrun/SLURM); return the final metrics.

    The result holds ``step``, ``epoch``, the last training record under ``train`` and the last
    validation metrics under ``val`` (if any), and the final checkpoint folder.
    """
    cfg.validate()
    retain_freed_memory()  # a training process reuses its activations' memory instead of page-faulting it in
    env = init_distributed(cfg.device)
    try:
        with intraop_threads(cfg.threads):
            return Trainer(cfg, env).run()
    finally:
        # Free the run (model, optimiser, data workers, the last step's graph) while the process group is
        # still up: collective work objects destroyed after it, at interpreter exit, can abort the process.
        gc.collect()
        cleanup(env)


def resolve_resume(cfg: TrainConfig, output: Path) -> Path | None:
    """The checkpoint folder to resume from, or None to start; refuses to overwrite another run."""
    resume = cfg.resume if cfg.resume is not None else default_resume()
    if resume is None:
        found = [name for name in (RUN_CONFIG_NAME, METRICS_NAME, CHECKPOINTS_DIR) if (output / name).exists()]
        if found and latest_checkpoint(output, require=TRAIN_FILES) is None:
            raise ValueError(f"--output {output} holds a training run that stopped before its first checkpoint "
                             f"({', '.join(found)}); pass --resume auto to start it again there from step 0, "
                             "or choose another --output directory")
        if found:
            raise ValueError(f"--output {output} already holds a training run ({', '.join(found)}); pass "
                             "--resume latest to continue it, or choose another --output directory")
        return None
    if resume in ("latest", "auto"):
        folder = latest_checkpoint(output, require=TRAIN_FILES)
        if folder is None and resume == "latest":
            raise FileNotFoundError(f"--resume latest: no complete checkpoint under {checkpoints_dir(output)}; "
                                    "pass --resume auto to start the run there from step 0 (or choose another "
                                    "--output directory)")
        return folder
    path = Path(resume)
    folder = latest_checkpoint(path, require=TRAIN_FILES) if is_run_dir(path) else path
    if folder is None or not is_complete(folder, TRAIN_FILES):
        raise FileNotFoundError(f"--resume {resume}: not a complete training checkpoint (a checkpoints/step_* "
                                "folder with model.safetensors, config.json and train_state.pt) or a run holding one")
    return folder


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on a GPU that supports it, else fp32; fp16 needs a GPU (loss scaling)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA GPU (it trains with loss scaling); use bf16 or fp32 on a CPU")
    return precision


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _check_paths(cfg: TrainConfig) -> None:
    existing = next(p for p in (Path(cfg.output).absolute(), *Path(cfg.output).absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--output {cfg.output}: {existing} is a file, not a folder; --output names the run "
                         "directory (created if missing): choose another path")
    if cfg.pretrained:  # the model-spec rule's weights (a tag, a path, a run, RUN@best, a name), checked unread
        from clipforge.io.spec import resolve_weights
        resolve_weights(cfg.model, cfg.pretrained)
    if cfg.zeroshot_classes and cfg.zeroshot_classes != HELDOUT:
        if not Path(cfg.zeroshot_classes).is_file():
            raise FileNotFoundError(f"--zeroshot-classes {cfg.zeroshot_classes}: no such file (one class name "
                                    f"per line), and not '{HELDOUT}'")
        if not cfg.val_data:
            raise ValueError("--zeroshot-classes FILE labels the --val-data images by the class their caption "
                             "names; give --val-data too")


class Trainer:
    """One run: model, data, optimiser, logs and checkpoints; ``run`` trains to the last step."""

    def __init__(self, cfg: TrainConfig, env: DistEnv):
        self.cfg, self.env, self.output = cfg, env, Path(cfg.output)
        self.started = time.perf_counter()  # --time-budget counts from here
        _check_paths(cfg)
        self.resume_from = resolve_resume(cfg, self.output)
        barrier(env)  # every rank has looked at the output folder before rank 0 writes into it
        self.precision = resolve_precision(cfg.precision, env.device)
        self._build_model()
        self._build_data()
        self._build_optimizer()
        _seed_all(cfg.seed + env.rank)
        self.step, self.skipped = 0, dict(self.base_skips)
        if self.resume_from is not None:
            self.resume_from = self._restore_intact(self.resume_from)
        self.stepper = Stepper(self.module, self._wrap(), self.optimizer,
                               TrainingLoss(cfg.loss, cfg.gather, cfg.local_loss, cfg.loss_tile_size),
                               self.scaler, self.autocast, cfg.grad_clip_norm)
        self._build_validation()
        if cfg.time_budget and self.resume_from is None:
            self._plan_time_budget()
        if env.is_master:
            self.output.mkdir(parents=True, exist_ok=True)
            truncate_metrics(self.output, self.step)
            self._write_run_config()
        self.logger = RunLogger(self.output, env.is_master, self.total_steps, self.step)
        self._warned: set[str] = set()  # reasons of bad samples already shown on the console
        self.last_train: dict = {}
        self.last_val: dict = {}
        self.checkpoint: Path | None = self.resume_from

    # ----------------------------------------------------------------------------------------- set-up
    def _build_model(self) -> None:
        cfg = self.cfg
        # a classifier's classes are its data's: opened before the model, which needs them for its head
        self.labelled = (open_labelled_source(cfg.train_data, cfg.classnames, builtin_samples=cfg.train_num_samples)
                         if cfg.loss == "classify" else None)
        _seed_all(cfg.seed)  # the same initial weights on every rank
        clip, train_tf, eval_tf = create_model_and_transforms(cfg.model, pretrained=cfg.pretrained,
                                                              **self._model_overrides())
        if clip.objective != objective_of(cfg.loss):
            raise ValueError(f"--model {cfg.model} is a {clip.objective!r} model; --loss {cfg.loss} trains a "
                             f"{objective_of(cfg.loss)!r} one: give a model config without 'objective'")
        if cfg.lock_image or cfg.lock_text:
            clip.freeze(image=cfg.lock_image, text=cfg.lock_text, text_unlocked_layers=cfg.lock_text_unlocked_layers)
        if cfg.loss not in TWO_TOWER_LOSSES:
            clip.logit_scale.requires_grad_(False)  # an image-only loss has no temperature: nothing to learn
        clip.set_grad_checkpointing(cfg.grad_checkpointing)
        self.clip, self.train_transform, self.eval_transform = clip, train_tf, eval_tf
        init_siglip_scale = cfg.pretrained is None and cfg.fixed_temperature is None
        self.module = TrainModule(clip, cfg.loss, init_siglip_scale=init_siglip_scale).to(self.env.device)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.autocast = functools.partial(torch.autocast, self.env.device.type, dtype=dtype,
                                          enabled=dtype is not None)
        self.tokenizer = model_tokenizer(clip)

    def _model_overrides(self) -> dict:
        """What the run sets in the model config: the loss's objective, the projection head, a fixed
        temperature (``init_logit_scale = log(1 / T)``, not learned) and a classifier's classes."""
        cfg, overrides = self.cfg, {}
        if cfg.loss not in TWO_TOWER_LOSSES:
            overrides["objective"] = objective_of(cfg.loss)
        if cfg.projection is not None:
            overrides["projection"] = cfg.projection
        if cfg.fixed_temperature is not None:
            overrides.update(learn_logit_scale=False, init_logit_scale=math.log(1 / cfg.fixed_temperature))
        if self.labelled is not None:
            overrides["classnames"] = tuple(self.labelled.classnames)
        return overrides

    def _build_data(self) -> None:
        cfg, env = self.cfg, self.env
        self.data = build_train_data(
            cfg.train_data, self.train_transform if cfg.augment else self.eval_transform, self.tokenizer,
            cfg.batch_size, seed=cfg.seed, workers=cfg.workers, rank=env.rank, world_size=env.world_size,
            resampled=cfg.resampled, weights=cfg.data_weights, csv_img_key=cfg.csv_img_key,
            csv_caption_key=cfg.csv_caption_key, csv_separator=cfg.csv_separator,
            num_samples=cfg.train_num_samples, pin_memory=env.device.type == "cuda", labelled=self.labelled)
        if self.data.steps_per_epoch is None:
            raise ValueError("--resampled without --train-num-samples is an endless stream; give "
                             "--train-num-samples to define the length of an epoch")
        self.base_skips = self.data.skip_counts()  # found while indexing (e.g. CSV rows), on every rank alike
        self.steps_per_epoch = self.data.steps_per_epoch // cfg.accum_freq
        if self.steps_per_epoch == 0:
            raise ValueError(f"an epoch has {self.data.steps_per_epoch} batches per process, fewer than "
                             f"--accum-freq {cfg.accum_freq}; use more data or a smaller batch")
        self.global_batch = cfg.batch_size * cfg.accum_freq * env.world_size
        # a --time-budget run has no length until _plan_time_budget has timed it: a long placeholder
        self._fit_schedule(cfg.steps or (cfg.epochs * self.steps_per_epoch if cfg.epochs else 10 ** 9))

    def _fit_schedule(self, total_steps: int) -> None:
        """The run's length, peak learning rate and warm-up: as given, else fitted to the run (optim.fitted_*)."""
        cfg = self.cfg
        self.total_steps = total_steps
        self.lr = cfg.lr if cfg.lr is not None else fitted_lr(self.global_batch, cfg.pretrained is not None)
        self.warmup = cfg.warmup if cfg.warmup is not None else fitted_warmup(total_steps, cfg.beta2)
        if self.warmup >= total_steps:
            raise ValueError(f"--warmup {self.warmup} is not shorter than the run ({total_steps} steps); "
                             f"use e.g. --warmup {max(1, total_steps // 10)}, or leave it out to fit it")
        if self.warmup > total_steps / 2:
            warnings.warn(f"the warm-up ({self.warmup} steps) covers most of the run ({total_steps} steps): "
                          "the learning rate is near its peak for few steps; leave --warmup out to fit it")

    def _plan_time_budget(self) -> None:
        """Time probe steps, a checkpoint and a validation, then fix the total steps that fit the budget."""
        budget = parse_duration(self.cfg.time_budget)
        costs = measure_costs(self, budget)
        self.base_skips = self.data.skip_counts()  # bad samples the probe met are met again by the run
        left = budget - (time.perf_counter() - self.started)
        steps = planned_steps(left, costs, self.steps_per_epoch, self.cfg.save_every, self.cfg.val_every,
                              self.validating)
        self.costs = costs
        self._fit_schedule(gather_objects(steps, self.env)[0])  # every rank follows rank 0's plan
        self.schedule.load_state_dict({"base_lr": self.lr, "warmup_steps": self.warmup,
                                       "total_steps": self.total_steps})

    def _build_optimizer(self) -> None:
        cfg = self.cfg
        self.optimizer = build_optimizer(self.module, self.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)
        self.schedule = CosineSchedule(self.optimizer, self.lr, self.warmup, self.total_steps)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")

    def _wrap(self) -> torch.nn.Module:
        wrapped = self.module
        if self.env.distributed:
            device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
            # a caption decoder reads the image tokens: the image tower's projection takes no gradient
            wrapped = DistributedDataParallel(wrapped, device_ids=device_ids,
                                              find_unused_parameters=self.cfg.loss == "caption")
        return torch.compile(wrapped) if self.cfg.compile else wrapped

    def _build_validation(self) -> None:
        cfg = self.cfg
        self.val_set = self.zeroshot_set = None
        self.validating = bool(cfg.val_data or cfg.zeroshot_classes)
        if not self.env.is_master:
            return
        if cfg.val_data:
            self.val_set = load_val_pairs(cfg.val_data, self.eval_transform, self.tokenizer,
                                          csv_img_key=cfg.csv_img_key, csv_caption_key=cfg.csv_caption_key,
                                          csv_separator=cfg.csv_separator)
        if cfg.zeroshot_classes == HELDOUT:
            self.zeroshot_set = heldout_zeroshot_set(self.eval_transform, self.clip.image_size)
        elif cfg.zeroshot_classes:
            self.zeroshot_set = zeroshot_from_val(self.val_set, cfg.zeroshot_classes)
        elif self.labelled is not None and self.val_set is not None:
            self.zeroshot_set = label_by_classnames(self.val_set, self.labelled.classnames,
                                                    f"--val-data {cfg.val_data}")

    def _run_identity(self) -> dict:
        """Settings a resumed run must share with the checkpoint, or its data position means nothing."""
        ident = {k: getattr(self.cfg, k) for k in _RUN_IDENTITY_KEYS}
        ident.update(lr=self.lr, warmup=self.warmup, global_batch=self.global_batch, total_steps=self.total_steps,
                     steps_per_epoch=self.steps_per_epoch)
        return ident

    def _write_run_config(self) -> None:
        resolved = {"precision": self.precision, "device": str(self.env.device), "world_size": self.env.world_size,
                    "global_batch_size": self.global_batch, "steps_per_epoch": self.steps_per_epoch,
                    "total_steps": self.total_steps, "lr": self.lr, "warmup": self.warmup,
                    "time_budget_costs": getattr(self, "costs", None) and self.costs.to_dict(),
                    "train_samples": self.data.num_samples,
                    "data_split": self.data.split_by,  # how ranks and workers share the data (TrainData.split_by)
                    "resumed_from": str(self.resume_from) if self.resume_from else None,
                    "clipforge_version": clipforge.__version__, "torch_version": torch.__version__}
        text = json.dumps({**self.cfg.to_dict(), "resolved": resolved}, indent=2)
        (self.output / RUN_CONFIG_NAME).write_text(text + "\n")

    # ------------------------------------------------------------------------------------ checkpoints
    def _restore_intact(self, folder: Path) -> Path:
        """Restore from ``folder``; if it is damaged and was chosen as the run's newest checkpoint, from the
        newest intact older one instead (logged). Returns the folder restored from."""
        resume = self.cfg.resume
        chosen_newest = resume is None or resume in ("latest", "auto") or is_run_dir(resume)
        older = [f for _, f in reversed(step_folders(folder.parent.parent))
                 if f.name < folder.name and is_complete(f, TRAIN_FILES)] if chosen_newest else []
        errors = []
        for candidate in [folder, *older]:
            try:
                state = load_checkpoint(candidate, self.clip, functools.partial(self._check_identity, candidate))
            except CheckpointError as error:
                errors.append(str(error))
                continue
            if errors:
                _log.warning("warning: %s; resuming from the newest intact checkpoint instead: %s",
                             "; ".join(errors), candidate)
            self._restore(candidate, state)
            return candidate
        raise CheckpointError("cannot resume: " + "; ".join(errors))

    def _check_identity(self, folder: Path, state: dict) -> None:
        """Refuse a checkpoint of other run settings (before its weights, whose architecture they may set)."""
        if self.cfg.time_budget and "total_steps" in state["run"]:
            self._fit_schedule(state["run"]["total_steps"])  # the plan made when the run started
        saved, now = state["run"], self._run_identity()
        changed = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now if saved.get(k) != now[k]]
        if changed:
            raise ValueError(f"cannot resume from {folder}: these settings differ from the checkpoint's "
                             f"({'; '.join(changed)}). Resume with the same settings, or start a new run "
                             f"with --pretrained {folder}")

    def _restore(self, folder: Path, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        if self.module.logit_bias is not None:
            with torch.no_grad():
                self.module.logit_bias.copy_(state["logit_bias"])
        if len(state["rng"]) == self.env.world_size:
            set_rng_state(state["rng"][self.env.rank])
        self.step, self.skipped = state["step"], dict(state["skipped"])

    def _global_skips(self) -> dict[str, int]:
        """Skipped samples by reason over all ranks since the run began (checkpoint counts included)."""
        mine = Counter(self.data.skip_counts())
        mine.subtract(self.base_skips)
        total = Counter(self.skipped)
        for counts in gather_objects(dict(mine), self.env):
            total.update(counts)
        return {k: v for k, v in sorted(total.items()) if v}

    def _save(self, epoch: int) -> None:
        state = {"step": self.step, "epoch": epoch, "batch_in_epoch": (self.step % self.steps_per_epoch)
                 * self.cfg.accum_freq, "optimizer": self.optimizer.state_dict(),
                 "schedule": self.schedule.state_dict(), "scaler": self.scaler.state_dict(),
                 "rng": gather_objects(rng_state(), self.env), "skipped": self._global_skips(),
                 "run": self._run_identity()}
        if self.module.logit_bias is not None:
            state["logit_bias"] = self.module.logit_bias.detach().cpu()
        if self.env.is_master:
            self.checkpoint = save_checkpoint(self.output, self.step, self.clip, state, self.cfg.keep)
        barrier(self.env)

    # ------------------------------------------------------------------------------------------ loop
    def run(self) -> dict:
        """Train from the current step to the last; returns the final metrics."""
        self._interval = _Interval()
        while self.step < self.total_steps:
            epoch, index = divmod(self.step, self.steps_per_epoch)
            batches = self.data.batches(epoch, start_batch=index * self.cfg.accum_freq)
            try:
                for _ in range(self.steps_per_epoch - index):
                    self._train_step(batches, epoch)
                    if self.step >= self.total_steps:
                        break
            finally:
                batches.close()
        if self.last_train.get("skipped"):
            self.logger.warn("skipped bad samples in total: " + ", ".join(
                f"{n} {reason} ({REASONS.get(reason, reason)})" for reason, n in self.last_train["skipped"].items()))
        self.logger.close()
        return {"rank": self.env.rank, "step": self.step, "epoch": max(0, self.step - 1) // self.steps_per_epoch,
                "train": self.last_train, "val": self.last_val,
                "checkpoint": str(self.checkpoint) if self.checkpoint else None}

    def _next_micro_batches(self, batches) -> list:
        start = time.perf_counter()
        device = self.env.device
        micro = [tuple(t.to(device, non_blocking=True) for t in next(batches)) for _ in range(self.cfg.accum_freq)]
        self._interval.data_s += time.perf_counter() - start
        return micro

    def _train_step(self, batches, epoch: int) -> None:
        micro = self._next_micro_batches(batches)
        lr = self.schedule.set_step(self.step)
        out = self.stepper.step(micro)
        self.step += 1
        self._interval.steps += 1
        self.logger.advance()
        self._warn_new_skips()
        last = self.step == self.total_steps
        if self.step % self.cfg.log_every == 0 or last:
            self._log_train(epoch, lr, out)
        paused = time.perf_counter()
        if self.validating and (last or (self.cfg.val_every and self.step % self.cfg.val_every == 0)):
            self._validate(epoch)
        if self.step % self.cfg.save_every == 0 or last:
            self._save(epoch)
        self._interval.start += time.perf_counter() - paused  # validation and saving are not training time

    def _warn_new_skips(self) -> None:
        """One console warning per reason, when this process meets its first bad sample of it."""
        for reason, example in self.data.skip_examples().items():
            if reason not in self._warned:
                self._warned.add(reason)
                self.logger.warn(f"skipping bad samples: {REASONS.get(reason, reason)}, first {example}")

    def _log_train(self, epoch: int, lr: float, out: dict) -> None:
        world = self.env.world_size
        loss, grad_norm = (v / world for v in all_reduce_sum([out["loss"].item(), out["grad_norm"].item()], self.env))
        elapsed = time.perf_counter() - self._interval.start
        temperature = {"logit_scale": self.clip.logit_scale.exp().item()} if self.cfg.loss in TWO_TOWER_LOSSES else {}
        record = {"step": self.step, "epoch": epoch, "loss": loss, "lr": lr, **temperature, "grad_norm": grad_norm,
                  "samples_per_s": self._interval.steps * self.global_batch / max(elapsed, 1e-9),
                  "data_s": self._interval.data_s / self._interval.steps, "samples": self.step * self.global_batch}
        if self.module.logit_bias is not None:
            record["logit_bias"] = self.module.logit_bias.item()
        skipped = self._global_skips()
        if skipped:
            record["skipped"] = skipped
        self.last_train = record
        self.logger.log(record)
        self._interval = _Interval()

    def _keep_best(self, metrics: dict) -> None:
        """Write checkpoints/best when ``metrics`` beat the best so far of ``--keep-best``'s metric."""
        name, mode = best_mode(self.cfg.keep_best)
        if name not in metrics:
            raise ValueError(f"--keep-best {self.cfg.keep_best}: validation measured no {name!r}; it measured "
                             f"{', '.join(sorted(metrics))}")
        value, best = float(metrics[name]), read_best(self.output)
        if best is None or (value < best["value"] if mode == "min" else value > best["value"]):
            save_best(self.output, self.step, self.clip, name, mode, value)

    def _validate(self, epoch: int) -> None:
        if self.env.is_master:
            with torch.random.fork_rng(devices=[]):
                metrics = validate(self.clip, self.val_set, self.zeroshot_set, self.cfg.batch_size, self.autocast)
            self.last_val = metrics
            self.logger.log({"step": self.step, "epoch": epoch, "split": "val", **metrics})
            if self.cfg.keep_best:
                self._keep_best(metrics)
        barrier(self.env)


class _Interval:
    """Wall time, steps and data-loading time since the last training log record."""

    def __init__(self):
        self.start, self.steps, self.data_s = time.perf_counter(), 0, 0.0
