"""``clipforge study`` at the smoke scale: the report's structure (md and self-contained html), numbers that
come from runs (another seed changes them), the command line and its errors, and a study killed after its
first experiment that resumes without recomputing it."""
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clipforge.cli import main
from clipforge.study import EXPERIMENTS, SCALES, Result, run_study
from clipforge.study.core import STUDY_MARKER, Study
from clipforge.study.experiments import matching_shots
from clipforge.study.report import format_cell

SMOKE = ["--scale", "smoke"]


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """A smoke study of two experiments through the command line (the baseline run is shared)."""
    out = tmp_path_factory.mktemp("study") / "out"
    assert main(["study", "prompts", "few-shot", "--output", str(out), *SMOKE]) == 0
    return out


def _sections(markdown: str) -> dict[str, str]:
    parts = re.split(r"^## ", markdown, flags=re.M)[1:]
    return {part.split("\n", 1)[0]: part for part in parts}


def test_report_has_every_experiment_section_table_figure_and_verdict(study_dir, capsys):
    markdown = (study_dir / "report.md").read_text()
    sections = _sections(markdown)
    assert list(sections) == ["Summary", "5. Prompt engineering and ensembling [3.1.4, Fig. 4]",
                              "6. Zero-shot against few-shot linear probes [3.2, Fig. 6-7]"]
    summary = sections["Summary"]
    assert summary.count("\n| ") == 3 and "| experiment | paper says | measured here | agrees? |" in summary
    for name, (title, body) in zip(["prompts", "few-shot"], list(sections.items())[1:]):
        result = Result.from_json((study_dir / "results" / f"{name}.json").read_text())
        assert f"**The paper:** {result.paper}" in body and f"**Verdict:** {result.verdict}" in body
        rows = [line for line in body.splitlines() if line.startswith("| ")]
        assert len(rows) == 1 + len(result.table)  # header + one row per variant
        assert f"![{result.title}]({name}.png)" in body and (study_dir / f"{name}.png").stat().st_size > 1000
        assert "Mean ± standard deviation over 1 seed." in body
    few = Result.from_json((study_dir / "results" / "few-shot.json").read_text())
    assert [row["variant"] for row in few.table] == ["zero-shot", "1-shot linear probe", "2-shot linear probe"]


def test_html_report_is_self_contained(study_dir):
    page = (study_dir / "report.html").read_text()
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert len(sources) == 2 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<link" not in page and "<script" not in page
    assert page.count("<table>") == 3 and "Zero-shot against few-shot linear probes" in page


def test_numbers_come_from_runs_another_seed_changes_them(study_dir):
    one_seed = json.loads((study_dir / "results" / "prompts.json").read_text())
    run_study(study_dir, ["prompts"], "smoke", seeds=2, progress=False)  # trains the baseline of seed 1
    two_seeds = json.loads((study_dir / "results" / "prompts.json").read_text())
    assert two_seeds["seeds"] == 2 and one_seed["seeds"] == 1  # a saved result of other seeds is recomputed
    for variant, per_seed in two_seeds["numbers"]["zeroshot_top1"].items():
        assert per_seed[0] == one_seed["numbers"]["zeroshot_top1"][variant][0]  # seed 0: the same run
    seed0, seed1 = ([v[k] for v in two_seeds["numbers"]["zeroshot_top1"].values()] for k in (0, 1))
    assert seed0 != seed1  # another training seed, other numbers
    assert (study_dir / "runs" / "baseline" / "clip-seed1").is_dir()


def test_a_result_of_a_changed_scale_is_computed_again_from_the_same_runs(study_dir):
    baseline = study_dir / "runs" / "baseline" / "clip-seed0" / "run_config.json"
    stamp = baseline.stat().st_mtime_ns
    fewer = dataclasses.replace(SCALES["smoke"], eval_samples=32)  # same name, other evaluation size
    run_study(study_dir, ["prompts"], fewer, seeds=1, progress=False)
    result = Result.from_json((study_dir / "results" / "prompts.json").read_text())
    assert result.settings["eval_samples"] == 32 and result.scale == "smoke"
    for per_seed in result.numbers["zeroshot_top1"].values():
        assert (per_seed[0] * 32) == pytest.approx(round(per_seed[0] * 32))  # a fraction of 32 images
    assert baseline.stat().st_mtime_ns == stamp  # evaluation changed, training did not: the run is reused


def test_command_line_refuses_bad_arguments_before_writing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["study", "prompts", "nope", "--output", str(out), *SMOKE]) == 2
    err = capsys.readouterr().err
    assert "clipforge study: error: unknown experiment nope" in err and ", ".join(EXPERIMENTS) in err
    assert main(["study", "--scale", "huge", "--output", str(out)]) == 2
    assert "--scale 'huge': expected one of quick, full" in capsys.readouterr().err
    assert main(["study", "prompts", "--seeds", "0", "--output", str(out), *SMOKE]) == 2
    assert "--seeds must be a positive integer" in capsys.readouterr().err
    assert not out.exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["study", "prompts", "--output", str(other), *SMOKE]) == 2
    assert "is not empty and is not a previous study folder" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_killed_study_resumes_at_the_experiment_it_was_in(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "clipforge", "study", "text-encoder", "scaling", "--output", str(out), *SMOKE]
    first = out / "results" / "text-encoder.json"
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 240
        while not first.is_file() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.is_file(), "the first experiment's result never appeared"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL, "the study finished before it could be killed"
    assert not (out / "report.md").exists()
    saved, stamp = first.read_bytes(), first.stat().st_mtime_ns
    baseline = out / "runs" / "baseline" / "clip-seed0" / "run_config.json"
    baseline_stamp = baseline.stat().st_mtime_ns
    assert main(["study", "text-encoder", "scaling", "--output", str(out), *SMOKE]) == 0
    assert first.read_bytes() == saved and first.stat().st_mtime_ns == stamp  # not recomputed
    assert baseline.stat().st_mtime_ns == baseline_stamp  # the finished baseline run was not trained again
    sections = _sections((out / "report.md").read_text())
    assert [s.split(".")[0] for s in sections] == ["Summary", "4", "8"]
    scaling = Result.from_json((out / "results" / "scaling.json").read_text())
    flops = list(scaling.numbers["training_flops"].values())
    assert len(flops) == 2 and flops[0] < flops[1]  # the deeper model costs more per step
    assert (out / STUDY_MARKER).is_file() and (out / "scaling.png").is_file()


def test_a_run_trained_at_another_scale_is_trained_again(tmp_path):
    smoke = SCALES["smoke"]
    study = Study(tmp_path, smoke, 1, progress=False)
    run = study.train("demo", "a", 0)
    longer = Study(tmp_path, dataclasses.replace(smoke, steps=smoke.steps + 1), 1, progress=False)
    assert longer.train("demo", "a", 0) == run
    assert json.loads((run / "run_config.json").read_text())["steps"] == smoke.steps + 1


def test_matching_shots_is_interpolated_in_log2_k():
    shots = (1, 2, 4, 8, 16)
    # 0.5 is reached between 4 shots (0.4) and 8 shots (0.6): half-way in log2, 2 ** 2.5
    assert matching_shots(shots, [0.1, 0.2, 0.4, 0.6, 0.7], 0.5) == pytest.approx(2 ** 2.5)
    assert matching_shots(shots, [0.6, 0.7, 0.8, 0.9, 0.9], 0.5) == 1.0
    assert matching_shots(shots, [0.1, 0.1, 0.2, 0.3, 0.4], 0.5) is None
    assert math.log2(matching_shots(shots, [0.1, 0.5, 0.5, 0.6, 0.7], 0.3)) == pytest.approx(0.5)


def test_table_cells():
    assert format_cell("zero-shot top-1", {"mean": 0.4567, "std": 0.0123}) == "45.7% ± 1.2%"
    assert format_cell("final training loss", {"mean": 1.23456, "std": 0.01}) == "1.235 ± 0.01"
    assert format_cell("images seen", 38400) == "38,400" and format_cell("x", None) == ""


def test_figures_without_matplotlib_name_the_plot_extra(monkeypatch):
    from clipforge.study.report import new_figure

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if matplotlib were absent
    with pytest.raises(RuntimeError, match=r"pip install 'clipforge\[plot\]'"):
        new_figure()
