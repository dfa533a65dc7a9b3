"""A run sized by wall time (``--time-budget``): a few probe steps, checkpoint and validation are timed on a
copy of the training state that is then put back, and the total number of steps is fixed from them.
"""
from __future__ import annotations

import copy
import math
import tempfile
import time
from dataclasses import dataclass

import torch

from clipforge.io.folder import save as save_model
from clipforge.runtime.distributed import gather_objects
from clipforge.train.checkpoint import rng_state, set_rng_state
from clipforge.train.validate import validate

PROBE_STEPS = 8  # at least: the first step starts the data workers and warms caches; the rest give the step time
PROBE_SHARE, MAX_PROBE_STEPS = 0.03, 200  # probe longer, up to this share of the budget, to reach steady state
SAFETY = 0.8  # the plan uses this share of the time left, for noise in step times


@dataclass(frozen=True)
class RunCosts:
    """Measured seconds: one training step, starting an epoch's data stream, a checkpoint, a validation."""

    step_s: float
    epoch_start_s: float
    save_s: float
    validate_s: float

    def to_dict(self) -> dict:
        return {k: round(v, 4) for k, v in self.__dict__.items()}


def planned_steps(seconds_left: float, costs: RunCosts, steps_per_epoch: int, save_every: int,
                  val_every: int | None, validating: bool) -> int:
    """The most steps whose training, periodic and final checkpoints and validations fit ``seconds_left``.

    Raises ValueError when not even one step fits.
    """
    per_step = (costs.step_s + costs.epoch_start_s / steps_per_epoch + costs.save_s / save_every
                + (costs.validate_s / val_every if val_every and validating else 0.0))
    once = costs.epoch_start_s + costs.save_s + (costs.validate_s if validating else 0.0)
    steps = math.floor((SAFETY * seconds_left - once) / per_step)
    if steps < 1:
        raise ValueError(f"--time-budget leaves {seconds_left:.1f} s after set-up, too little for one step "
                         f"({costs.step_s:.2f} s a step, {once:.2f} s for the final checkpoint and validation); "
                         "give a longer budget or --steps")
    return steps


def measure_costs(trainer, budget_s: float) -> RunCosts:
    """Time ``PROBE_STEPS`` training steps (more, up to ``PROBE_SHARE`` of ``budget_s``), a model save and a
    validation, then restore the trainer's model,
    optimiser, scaler and RNG states so that the run trains exactly as if the probe had not happened."""
    saved = _snapshot(trainer)
    try:
        step_times = _time_steps(trainer, PROBE_STEPS)
        # then more steps, up to PROBE_SHARE of the budget; as many on every rank (rank 0 decides)
        extra = min(MAX_PROBE_STEPS, int(PROBE_SHARE * budget_s / max(step_times[-1], 1e-6))) - PROBE_STEPS
        extra = gather_objects(max(0, extra), trainer.env)[0]
        step_times += _time_steps(trainer, extra, first_epoch=1) if extra else []
        save_s = _time_save(trainer)
        validate_s = _time_validation(trainer) if trainer.validating else 0.0
    finally:
        _restore(trainer, saved)
    steady = sum(step_times[1:]) / len(step_times[1:])  # the mean, so that stalls count
    return RunCosts(steady, max(0.0, step_times[0] - steady), save_s, validate_s)


def _snapshot(trainer) -> dict:
    return {"module": copy.deepcopy(trainer.module.state_dict()),
            "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
            "scaler": copy.deepcopy(trainer.scaler.state_dict()), "rng": rng_state()}


def _restore(trainer, saved: dict) -> None:
    trainer.module.load_state_dict(saved["module"])
    trainer.optimizer.load_state_dict(saved["optimizer"])
    trainer.scaler.load_state_dict(saved["scaler"])
    set_rng_state(saved["rng"])


def _time_steps(trainer, count: int, first_epoch: int = 0) -> list[float]:
    """Seconds of each of ``count`` steps from the start of an epoch's data, crossing epochs as the run does."""
    times, epoch = [], first_epoch
    while len(times) < count:
        batches = trainer.data.batches(epoch)
        try:
            for _ in range(min(trainer.steps_per_epoch, count - len(times))):
                start = time.perf_counter()
                micro = [tuple(t.to(trainer.env.device) for t in next(batches))
                         for _ in range(trainer.cfg.accum_freq)]
                trainer.schedule.set_step(0)
                trainer.stepper.step(micro)
                times.append(time.perf_counter() - start)
        finally:
            batches.close()
        epoch += 1
    return times


def _time_save(trainer) -> float:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        save_model(trainer.clip, folder)
        torch.save(trainer.optimizer.state_dict(), f"{folder}/optimizer.pt")
    return time.perf_counter() - start


def _time_validation(trainer) -> float:
    start = time.perf_counter()
    if trainer.env.is_master:
        with torch.random.fork_rng(devices=[]):
            validate(trainer.clip, trainer.val_set, trainer.zeroshot_set, trainer.cfg.batch_size, trainer.autocast)
    return time.perf_counter() - start
