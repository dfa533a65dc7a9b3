"""Running ``clipforge study``: the registry's experiments in paper order, each result saved as soon as it is
done (an interrupted study resumes at the experiment it was in), then the report.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from clipforge.apps.study.framework import RESULTS_DIR, SCALES, STUDY_MARKER, Result, Scale, Study
from clipforge.apps.study.registry import EXPERIMENTS
from clipforge.apps.study.report import write_report
from clipforge.io.runs import claim_output, write_files


def run_study(output: str | Path, experiments: Sequence[str] | None = None, scale: str | Scale = "quick",
              seeds: int | None = None, progress: bool = True) -> Path:
    """Run ``experiments`` (default: all, in paper order) and write ``report.md`` and ``report.html``.

    Each experiment's result is saved as ``output/results/<name>.json`` (its figure as ``<name>.png``) as
    soon as it is done; an experiment whose result exists for the same scale and seeds is not run again.
    ``output`` must be new, empty or an earlier study's folder. Returns the path of ``report.md``.
    """
    scale = SCALES[scale] if isinstance(scale, str) else scale
    names = check_experiments(experiments)
    study = Study(output, scale, scale.seeds if seeds is None else seeds, progress)
    claim_output(study.output, STUDY_MARKER, "study")
    results = []
    bar = tqdm(names, desc="study", unit="experiment", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        results.append(_result(study, name))
    bar.close()
    return write_report(study.output, results, scale, study.seeds, paper_order=tuple(EXPERIMENTS))


def check_experiments(experiments: Sequence[str] | None) -> list[str]:
    """The experiments to run, in paper order; ValueError naming unknown ones and listing the known."""
    if not experiments:
        return list(EXPERIMENTS)
    unknown = [n for n in experiments if n not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"unknown experiment{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                         f"the experiments are: {', '.join(EXPERIMENTS)}")
    return [n for n in EXPERIMENTS if n in experiments]


def _result(study: Study, name: str) -> Result:
    """The saved result of ``name`` at this scale and seed count, else a fresh run of it (then saved)."""
    path = study.output / RESULTS_DIR / f"{name}.json"
    saved = _read_result(path)
    if saved is not None and (saved.settings, saved.seeds) == (study.scale.to_dict(), study.seeds) \
            and (study.output / str(saved.figure)).is_file():
        return saved
    study.tasks = tqdm(desc=name, unit="task", leave=False, disable=not study.progress)
    try:
        result = EXPERIMENTS[name](study)
    finally:
        study.tasks.close()
        study.tasks = None
    result.scale, result.seeds, result.settings = study.scale.name, study.seeds, study.scale.to_dict()
    result.figure = _save_figure(result, study.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_files(path.parent, {path.name: lambda p: p.write_text(result.to_json() + "\n")})
    return result


def _read_result(path: Path) -> Result | None:
    if not path.is_file():
        return None
    try:
        return Result.from_json(path.read_text())
    except (ValueError, TypeError):  # a result written by another version: computed again
        return None


def _save_figure(result: Result, output: Path) -> str:
    """Write the result's figure as ``output/<name>.png``; returns the file name."""
    name = f"{result.name}.png"
    figure = result.figure
    write_files(output, {name: lambda p: figure.savefig(p, dpi=110, format="png")})
    return name
