"""The documentation-example runner itself, on the small pages in fixtures/."""
from __future__ import annotations

from pathlib import Path

import pytest

from doc_checks import check_page, clipforge_commands, parse_cli, resolve
from doc_examples import parse, run_page

FIXTURES = Path(__file__).with_name("fixtures")


def test_parse_finds_blocks_languages_markers_and_lines():
    blocks, problems = parse(FIXTURES / "sample.md")
    assert problems == []
    assert [(b.language, b.line, b.marker) for b in blocks] == [
        ("python", 6, None), ("python", 16, None), ("bash", 22, None), ("python", 28, None),
        ("python", 33, "weights"), ("bash", 38, "gpu"), ("bash", 47, "skip"), ("python", 55, None)]
    assert blocks[-2].reason == "shows the syntax only"
    assert blocks[-2].source.startswith("python -m clipforge")  # the list item's indentation is removed
    assert blocks[1].source == "x += 1\nassert x == 42\nassert callable(clipforge.tokenize) and callable(tokenize)\n"


def test_marker_problems_are_reported_with_their_lines():
    _, problems = parse(FIXTURES / "markers.md")
    assert len(problems) == 4, problems
    assert problems[0].endswith("markers.md:3: unknown example marker 'cpu' (known: weights, gpu, skip)")
    assert "markers.md:8:" in problems[1] and "needs a reason" in problems[1]
    assert "markers.md:13:" in problems[2] and "right before" in problems[2]
    assert "markers.md:19:" in problems[3] and "right before" in problems[3]


def test_a_block_with_a_bad_marker_is_not_run():
    blocks, _ = parse(FIXTURES / "markers.md")
    assert [b.marker for b in blocks][:2] == ["skip", "skip"]


def test_static_checks_pass_on_a_good_page():
    blocks, _ = parse(FIXTURES / "sample.md")
    assert check_page(blocks) == []


def test_static_checks_name_file_line_and_reason():
    blocks, _ = parse(FIXTURES / "broken.md")
    problems = check_page(blocks)
    text = "\n".join(problems)
    assert len(problems) == 7, text
    assert "broken.md:5: clipforge index --index idx photos/ --no-such-flag:" in problems[0]
    assert "unrecognized arguments: --no-such-flag" in problems[0]
    assert "broken.md:11: clipforge.no_such_module.thing:" in problems[1]
    assert "broken.md:17: clipforge.no_such_function:" in problems[2]
    assert "broken.md:22:" in problems[3]
    assert "broken.md:" in problems[4] and "syntax error" in problems[4]
    assert "broken.md:45: clipforge.tokenizer.tokenize(...): got an unexpected keyword argument" in problems[5]
    assert "broken.md:46: clipforge.tokenize(...): missing a required argument" in problems[6]


def test_clipforge_commands_in_shell():
    script = ("A=1 clipforge eval --model x \\\n   --json | jq .\n"
              "for s in 1 2; do python3 -m clipforge train --steps $s; done\n"
              "torchrun --nproc_per_node 2 -m clipforge index --index i p > log 2>&1 &\n"
              "pip install 'clipforge[serve]'  # not a command\n"
              "clipforge search idx 'a > b' \"c < d\" 2>/dev/null\n")
    assert clipforge_commands(script, 10) == [
        (10, ["eval", "--model", "x", "--json"]), (12, ["train", "--steps", "\x00"]),
        (13, ["index", "--index", "i", "p"]), (15, ["search", "idx", "a > b", "c < d"])]


@pytest.mark.parametrize("args, ok", [
    (["train", "--help"], True), (["train", "--steps", "\x00"], True), (["train", "--precision", "\x00"], True),
    (["train", "--steps", "many"], False), (["no-such-command"], False), (["train", "--precision", "fp8"], False)])
def test_parse_cli(args, ok):
    assert (parse_cli(args) is None) == ok


def test_resolve():
    assert resolve("clipforge.tokenize") is None
    assert resolve("clipforge.models") is None
    assert resolve("clipforge.tokenizer.tokenize") is None
    assert "no attribute" in resolve("clipforge.tokenizer.no_such_name")
    assert "has no attribute 'x'" in resolve("clipforge.tokenize.x")


@pytest.mark.slow
def test_run_page_passes_and_shares_state(tmp_path):
    result = run_page(FIXTURES / "sample.md", tmp_path / "work")
    assert result.returncode == 0, result.stdout
    assert (tmp_path / "work" / "from_python.txt").exists()
    assert "--- tests/docs/fixtures/sample.md:6 (python)" in result.stdout


@pytest.mark.slow
def test_run_page_names_the_failing_bash_line(tmp_path):
    result = run_page(FIXTURES / "failing.md", tmp_path / "work")
    assert result.returncode == 1
    assert "FAILED tests/docs/fixtures/failing.md:8:" in result.stdout
    assert "failing.md:9: exit 1: false" in result.stdout
    assert "not reached" not in result.stdout


@pytest.mark.slow
def test_run_page_names_the_failing_python_line(tmp_path):
    result = run_page(FIXTURES / "failing_python.md", tmp_path / "work")
    assert result.returncode == 1
    assert "FAILED tests/docs/fixtures/failing_python.md:8:" in result.stdout
    assert 'failing_python.md", line 9' in result.stdout and "the example broke" in result.stdout


@pytest.mark.slow
def test_a_background_process_ends_with_its_block(tmp_path):
    result = run_page(FIXTURES / "background.md", tmp_path / "work")
    assert result.returncode == 0, result.stdout


@pytest.mark.slow
def test_a_page_past_its_time_limit_is_killed_with_what_it_started(tmp_path):
    import os
    import time
    result = run_page(FIXTURES / "sleepy.md", tmp_path / "work", timeout=3)
    assert result.returncode == 124 and "TIMEOUT: tests/docs/fixtures/sleepy.md" in result.stdout, result.stdout
    pid = int((tmp_path / "work" / "sleeper.pid").read_text())
    time.sleep(0.3)
    status = f"/proc/{pid}/status"
    state = open(status).read() if os.path.exists(status) else "State:\tgone"
    assert "State:\tS" not in state and "State:\tR" not in state, state
