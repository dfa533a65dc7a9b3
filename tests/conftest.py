"""Shared fixtures. Add yours below; do not remove others'."""
import pytest
import torch


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
