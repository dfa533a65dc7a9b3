"""Shared fixtures. Add yours below; do not remove others'."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread: faster on a small shared CPU, and the same results in every run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def saved_tiny_model(tmp_path_factory):
    """A randomly initialised (seed 0) tiny-vit saved as a clipforge model folder, for CLI end-to-end tests.

    Random init on purpose: training even ~100 steps costs minutes on a shared 2-core CPU, and the
    tests check the plumbing and output formats; metric values are proven on fake models in test_evaluate.
    """
    from clipforge.factory import create_model, save
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models") / "tiny-vit-random"
    save(create_model("tiny-vit"), folder)
    return folder


@pytest.fixture(scope="session")
def trained_tiny_model(tmp_path_factory):
    """A tiny-vit trained by ``clipforge train`` on the built-in data (about 15 s): a run directory whose
    model has learned colours and shapes well enough for zero-shot transfer to the held-out pairs."""
    from clipforge.cli import main
    run = tmp_path_factory.mktemp("runs") / "tiny"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--model", "tiny-vit", "--train-data", "builtin:5000", "--steps", "120",
                     "--batch-size", "32", "--lr", "1.5e-3", "--warmup", "20", "--workers", "0",
                     "--save-every", "120", "--output", str(run)]) == 0
    finally:
        torch.set_num_threads(threads)
    return run
