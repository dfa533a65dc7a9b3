"""Fixtures of the embedding tests (test_embed*.py): a mix of sources, and what the local engine writes of them."""
import pytest
import torch

from embed_sources import EMBED_MODEL, make_embed_sources


@pytest.fixture(scope="session")
def embed_sources(tmp_path_factory):
    return make_embed_sources(tmp_path_factory.mktemp("embed_sources"))


@pytest.fixture(scope="session")
def embedded_locally(embed_sources, tmp_path_factory):
    """(folder, summary): ``embed_sources`` embedded by the local engine, in this process, on one thread, with
    partitions of 4 images and batches of 3."""
    from clipforge.search.embed import EmbedOptions, embed
    folder = tmp_path_factory.mktemp("embed_local") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = embed(folder, embed_sources, EMBED_MODEL, EmbedOptions(batch_size=3, workers=0, partition_size=4,
                                                                         progress=False), random_init=True)
    finally:
        torch.set_num_threads(threads)
    return folder, summary
