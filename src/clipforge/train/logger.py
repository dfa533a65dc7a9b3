"""Training logs: a tqdm progress bar, ``metrics.jsonl`` (one JSON object per logged step) and, when the
``tensorboard`` package is installed, TensorBoard scalars under ``OUTPUT/tensorboard``. Rank 0 only.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

from tqdm import tqdm

from clipforge.io.runs import METRICS_NAME, TENSORBOARD_DIR

_BAR_FIELDS = {"samples_per_s": "{:.0f}", "loss": "{:.4f}", "lr": "{:.2e}", "logit_scale": "{:.2f}"}


def read_metrics(output: str | Path) -> list[dict]:
    """The records of ``OUTPUT/metrics.jsonl`` (a torn last line, from a killed process, is skipped)."""
    path = Path(output) / METRICS_NAME
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(output: str | Path, step: int) -> None:
    """Drop records after ``step``: a resumed run logs those steps again."""
    path = Path(output) / METRICS_NAME
    if path.is_file():
        kept = [r for r in read_metrics(output) if r.get("step", 0) <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def _flat_scalars(record: dict, prefix: str = ""):
    for key, value in record.items():
        if isinstance(value, dict):
            yield from _flat_scalars(value, f"{prefix}{key}_")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            yield prefix + key, value


class RunLogger:
    """Progress bar + metrics file + TensorBoard; every method is a no-op when ``enabled`` is False."""

    def __init__(self, output: str | Path, enabled: bool, total_steps: int, start_step: int = 0):
        self.enabled = enabled
        self.path = Path(output) / METRICS_NAME
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", disable=not enabled,
                        dynamic_ncols=True, mininterval=1.0)
        self.tensorboard = None
        if enabled and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(Path(output) / TENSORBOARD_DIR))

    def advance(self) -> None:
        """One optimiser step done."""
        self.bar.update(1)

    def log(self, record: dict) -> None:
        """Append ``record`` (with ``step`` and ``split``) to metrics.jsonl, TensorBoard and the bar."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        split = record.get("split", "train")
        if self.tensorboard is not None:
            for key, value in _flat_scalars(record):
                if key not in ("step", "split"):
                    self.tensorboard.add_scalar(f"{split}/{key}", value, record["step"])
        if split == "train":
            fields = [f"{key}={fmt.format(record[key])}" for key, fmt in _BAR_FIELDS.items() if key in record]
            if record.get("skipped"):
                fields.append(f"skipped={sum(record['skipped'].values())}")
            self.bar.set_postfix_str(", ".join(fields))
        else:
            self.bar.write(f"step {record['step']} {split}: " + ", ".join(
                f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float)))

    def warn(self, message: str) -> None:
        """A warning line on stderr, above the progress bar."""
        if self.enabled:
            self.bar.write(f"warning: {message}", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
