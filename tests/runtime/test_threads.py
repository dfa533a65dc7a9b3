"""The single-intra-op-thread setting is counted across overlapping holders and always undone."""
import threading
import warnings

import numpy as np
import pytest

import torch

from clipforge.runtime.threads import single_intraop_thread, torch_matmul


def test_overlapping_holders_on_two_threads_restore_the_count_once_both_leave():
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
        seen = {}

        def first():
            with single_intraop_thread() as previous:
                seen["previous"] = previous
                first_in.set()
                second_in.wait(5)
            seen["after_first"] = torch.get_num_threads()
            first_out.set()

        def second():
            first_in.wait(5)
            with single_intraop_thread():
                second_in.set()
                first_out.wait(5)
                seen["inside_after_first_left"] = torch.get_num_threads()

        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert seen == {"previous": 3, "after_first": 1, "inside_after_first_left": 1}
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_the_count_is_restored_after_an_error():
    before = torch.get_num_threads()
    try:
        with single_intraop_thread():
            assert torch.get_num_threads() == 1
            raise KeyError("boom")
    except KeyError:
        pass
    assert torch.get_num_threads() == before


@pytest.mark.slow
def test_training_runs_with_the_threads_asked_for_and_restores_the_count(tmp_path, monkeypatch):
    from clipforge.train import TrainConfig, loop, train

    seen = []
    run = loop.Trainer.run
    monkeypatch.setattr(loop.Trainer, "run", lambda self: (seen.append(torch.get_num_threads()), run(self))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train(TrainConfig(model="tiny-vit", train_data="builtin:16", batch_size=8, steps=1, warmup=0, workers=0,
                          output=str(tmp_path / "run"), threads=1, log_every=1))
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_threads_must_be_positive():
    from clipforge.train import TrainConfig

    with pytest.raises(ValueError, match="--threads must be a positive integer"):
        TrainConfig(model="tiny-vit", train_data="builtin", steps=1, output="x", threads=0).validate()


def test_torch_matmul_is_numpys_product_for_views_memory_maps_and_mixed_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((300, 64)).astype(np.float16)
    np.save(tmp_path / "rows.npy", rows)
    mapped = np.load(tmp_path / "rows.npy", mmap_mode="r")  # read-only, as the index's segments
    query = rng.standard_normal(64).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not writable" warning from torch
        for a, b in ((mapped, query), (mapped[::3], query.astype(np.float64)), (mapped[:50], mapped[50:80].T)):
            out = torch_matmul(a, b)
            expected = a @ b
            assert out.dtype == expected.dtype and out.shape == expected.shape
            np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
