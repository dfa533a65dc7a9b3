"""``clipforge study`` at the smoke scale: every experiment through the command line, killed after its first
experiment and resumed without recomputing it; the report's structure (md and self-contained html); numbers
that come from runs (another seed changes them); the command line's errors."""
import dataclasses
import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clipforge.cli import main
from clipforge.apps.study import EXPERIMENTS, SCALES, Result, run_study
from clipforge.apps.study.experiments.few_shot import matching_shots
from clipforge.apps.study.framework import STUDY_MARKER, Study
from clipforge.apps.study.report import format_cell

SMOKE = ["--scale", "smoke"]


@dataclasses.dataclass
class KilledStudy:
    out: Path
    first_result: bytes  # the first experiment's result file when the study was killed
    first_stamp: int
    first_runs: dict  # that experiment's run_config.json files and their modification times


def _kill_after_first_result(out: Path) -> None:
    """Run the whole study in a child process and SIGKILL it once the first experiment's result is saved."""
    command = [sys.executable, "-m", "clipforge", "study", "--output", str(out), *SMOKE]
    first = out / "results" / f"{next(iter(EXPERIMENTS))}.json"
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not first.is_file() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.is_file(), "the first experiment's result never appeared"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL, "the study finished before it could be killed"


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> KilledStudy:
    """All experiments at the smoke scale through the command line: killed after the first experiment's
    result is saved, then run again to the end with the same command."""
    out = tmp_path_factory.mktemp("study") / "out"
    _kill_after_first_result(out)
    assert not (out / "report.md").exists()
    first = out / "results" / f"{next(iter(EXPERIMENTS))}.json"
    runs = {p: p.stat().st_mtime_ns for p in (out / "runs" / next(iter(EXPERIMENTS))).glob("*/run_config.json")}
    state = KilledStudy(out, first.read_bytes(), first.stat().st_mtime_ns, runs)
    assert main(["study", "--output", str(out), *SMOKE]) == 0
    return state


@pytest.fixture(scope="module")
def study_dir(killed) -> Path:
    return killed.out


def _sections(markdown: str) -> dict[str, str]:
    parts = re.split(r"^## ", markdown, flags=re.M)[1:]
    return {part.split("\n", 1)[0]: part for part in parts}


@pytest.mark.slow
def test_killed_study_resumes_at_the_experiment_it_was_in(killed):
    first = killed.out / "results" / f"{next(iter(EXPERIMENTS))}.json"
    assert first.read_bytes() == killed.first_result and first.stat().st_mtime_ns == killed.first_stamp
    assert len(killed.first_runs) == 3  # contrastive, bag-of-words and caption runs, none trained again
    assert all(path.stat().st_mtime_ns == stamp for path, stamp in killed.first_runs.items())
    assert sorted(p.stem for p in (killed.out / "results").glob("*.json")) == sorted(EXPERIMENTS)
    assert (killed.out / STUDY_MARKER).is_file()


@pytest.mark.slow
def test_report_has_every_experiment_section_table_figure_and_verdict(study_dir):
    sections = _sections((study_dir / "report.md").read_text())
    assert [title.split(".")[0] for title in sections] == ["Summary"] + [str(i) for i in range(1, 9)]
    summary = sections.pop("Summary")
    assert summary.count("\n| ") == 1 + len(EXPERIMENTS)  # header + one row per experiment
    assert "| experiment | paper says | measured here | agrees? |" in summary
    for name, body in zip(EXPERIMENTS, sections.values()):
        result = Result.from_json((study_dir / "results" / f"{name}.json").read_text())
        assert body.startswith(f"{list(EXPERIMENTS).index(name) + 1}. {result.title} [{result.section}]")
        assert f"**The paper:** {result.paper}" in body and f"**Verdict:** {result.verdict}" in body
        rows = [line for line in body.splitlines() if line.startswith("| ")]
        assert len(rows) == 1 + len(result.table)  # header + one row per variant
        assert f"![{result.title}]({name}.png)" in body and (study_dir / f"{name}.png").stat().st_size > 1000
        assert "Mean ± standard deviation over 1 seed." in body
        assert result.verdict in summary and result.scale == "smoke" and result.seeds == 1
    few = Result.from_json((study_dir / "results" / "few-shot.json").read_text())
    assert [row["variant"] for row in few.table] == ["zero-shot", "1-shot linear probe", "2-shot linear probe"]
    scaling = Result.from_json((study_dir / "results" / "scaling.json").read_text())
    flops = list(scaling.numbers["training_flops"].values())
    assert len(flops) == 2 and flops[0] < flops[1]  # the deeper model costs more per step


@pytest.mark.slow
def test_html_report_is_self_contained(study_dir):
    page = (study_dir / "report.html").read_text()
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert len(sources) == len(EXPERIMENTS) and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<link" not in page and "<script" not in page
    assert page.count("<table>") == 1 + len(EXPERIMENTS) and "Zero-shot against few-shot linear probes" in page


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    from clipforge.apps.study.figures import new_figure

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if matplotlib were absent
    with pytest.raises(RuntimeError, match=r"pip install 'clipforge\[plot\]'"):
        new_figure()
