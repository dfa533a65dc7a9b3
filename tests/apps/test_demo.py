"""The built-in demo end to end through the command line, shortened: data, training, evaluation, report."""
import json

import pytest

from clipforge.cli import main


@pytest.mark.slow
def test_demo_trains_evaluates_and_writes_a_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--steps", "100", "--eval-samples", "64", "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert f"report written to {out / 'report.md'}" in printed
    report = (out / "report.md").read_text()
    for figure in ("loss_curve.png", "examples.png", "similarity_heatmap.png"):
        assert (out / figure).stat().st_size > 10_000
        assert f"]({figure})" in report
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"zeroshot_ensemble", "zeroshot_single", "zeroshot_all_pairs", "linear_probe", "retrieval"}
    values = [v for metrics in results.values() for v in metrics.values()]
    assert all(0.0 <= v <= 1.0 for v in values)
    # Even 100 steps move the model well above chance on the pairs it never saw (chance 1/8).
    assert results["zeroshot_ensemble"]["top1"] > 0.3
    assert results["linear_probe"]["top1"] > 0.5
    losses = [json.loads(line)["loss"] for line in (out / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line and '"val"' not in line]
    assert losses[-1] < losses[0] - 0.5
