"""Two gloo processes on CPU against one process on the concatenated batch: the distributed losses (full and
local, plain and tiled, sigmoid) give the same loss and, after DDP-style averaging, the same parameter
gradients; and all_gather_with_grad sends every rank its share of the gradient."""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from clipforge.runtime.distributed import all_gather_with_grad, process_env
from clipforge.loss import contrastive_loss, sigmoid_loss

WORLD_SIZE = 2
N_PER_RANK, D_IN, D_OUT = 6, 5, 4
CASES = {  # name -> loss(images, texts, log_scale, bias, gather)
    "full": lambda i, t, s, b, g: contrastive_loss(i, t, s.exp(), gather=g),
    "full-tiled": lambda i, t, s, b, g: contrastive_loss(i, t, s.exp(), 4, gather=g),
    "local": lambda i, t, s, b, g: contrastive_loss(i, t, s.exp(), gather=g, local_loss=g),
    "local-tiled": lambda i, t, s, b, g: contrastive_loss(i, t, s.exp(), 5, gather=g, local_loss=g),
    "sigmoid": lambda i, t, s, b, g: sigmoid_loss(i, t, s.exp(), b, gather=g),
}
# With the full loss every rank computes the global loss; otherwise the mean over ranks is the global loss.
PER_RANK_IS_GLOBAL = {"full": True, "full-tiled": True, "local": False, "local-tiled": False, "sigmoid": False}


def _towers():
    """Tiny linear image and text towers plus the temperature and bias, identical on every process."""
    torch.manual_seed(0)
    image_tower = torch.nn.Linear(D_IN, D_OUT).double()
    text_tower = torch.nn.Linear(D_IN, D_OUT).double()
    log_scale = torch.nn.Parameter(torch.tensor(2.5, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.tensor(-1.0, dtype=torch.float64))
    return [image_tower, text_tower], [*image_tower.parameters(), *text_tower.parameters(), log_scale, bias]


def _global_batch():
    generator = torch.Generator().manual_seed(1)
    n = N_PER_RANK * WORLD_SIZE
    return (torch.randn(n, D_IN, generator=generator, dtype=torch.float64),
            torch.randn(n, D_IN, generator=generator, dtype=torch.float64))


def _loss_and_grads(case: str, rows: slice, gather: bool):
    (image_tower, text_tower), params = _towers()
    images, texts = _global_batch()
    image_features = F.normalize(image_tower(images[rows]), dim=1)
    text_features = F.normalize(text_tower(texts[rows]), dim=1)
    loss = CASES[case](image_features, text_features, params[-2], params[-1], gather)
    loss.backward()
    used = params if case == "sigmoid" else params[:-1]  # the contrastive loss has no bias
    return loss.detach(), [p.grad for p in used]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
    try:
        env = process_env()
        results = {"world": (env.rank, env.world_size, env.initialized)}
        for case in CASES:
            loss, grads = _loss_and_grads(case, slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK), True)
            for grad in grads:  # what DDP does: average parameter gradients over ranks
                dist.all_reduce(grad)
                grad /= WORLD_SIZE
            results[case] = (loss, grads)
        results["gather"] = _gather_case(rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _gather_case(rank: int):
    """Each rank weights the gathered tensor differently; rank r's grad is the sum of the weights' slice r."""
    local = torch.full((2, 3), float(rank + 1), dtype=torch.float64, requires_grad=True)
    gathered = all_gather_with_grad(local)
    weights = torch.arange(12, dtype=torch.float64).reshape(4, 3) * (rank + 1)
    (gathered * weights).sum().backward()
    return gathered.detach(), local.grad


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("ranks"))
    mp.start_processes(_worker, args=(_free_port(), out_dir), nprocs=WORLD_SIZE, start_method="fork")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD_SIZE)]


def test_world_info_inside_the_process_group(rank_results):
    assert [r["world"] for r in rank_results] == [(0, 2, True), (1, 2, True)]


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_process_on_the_concatenated_batch(rank_results, case):
    loss, grads = _loss_and_grads(case, slice(None), gather=False)
    rank_losses = torch.stack([r[case][0] for r in rank_results])
    if PER_RANK_IS_GLOBAL[case]:
        torch.testing.assert_close(rank_losses, loss.expand(WORLD_SIZE), rtol=0, atol=1e-6)
    else:
        assert not torch.allclose(rank_losses[0], rank_losses[1])  # genuinely rank-local
    torch.testing.assert_close(rank_losses.mean(), loss, rtol=0, atol=1e-6)
    for rank_result in rank_results:
        for got, want in zip(rank_result[case][1], grads):
            assert want.abs().sum() > 0
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_all_gather_with_grad_returns_each_rank_its_summed_slice(rank_results):
    expected = torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)]).double()
    weights = torch.arange(12, dtype=torch.float64).reshape(4, 3)
    summed = weights * 1 + weights * 2  # both ranks' weights reach every slice
    for rank, result in enumerate(rank_results):
        gathered, grad = result["gather"]
        torch.testing.assert_close(gathered, expected)
        torch.testing.assert_close(grad, summed[2 * rank:2 * rank + 2])


def test_all_gather_with_grad_is_identity_without_process_group():
    tensor = torch.ones(3, 2)
    assert all_gather_with_grad(tensor) is tensor
