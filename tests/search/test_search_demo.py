"""The end of ``clipforge demo``: its own images indexed with its model, two example searches printed exactly
as the library returns them, and the ``clipforge serve`` command that shows them."""
import torch

from clipforge.apps.demo import DemoConfig, search_own_images
from clipforge.data import write_classification, write_shapes
from clipforge.io.factory import create_model, save
from clipforge.search import Index


def test_demo_ends_with_two_searches_of_its_own_images(tmp_path, one_thread):
    out = tmp_path / "demo"
    write_classification(out / "data" / "heldout_test", "heldout", 16, seed=101)
    write_shapes(out / "data" / "captions", 16, split="all", fmt="csv", seed=103)
    torch.manual_seed(0)
    save(create_model("tiny-vit"), out / "run")
    text = search_own_images(DemoConfig(output=str(out), workers=0))
    index = Index.open(out / "index")
    assert len(index) == 32 and len(index.ids(captions=True)) == 16
    assert text.startswith(f"Indexed 32 demo images into {out / 'index'}.")
    for query in ("a blue cross", "id:1"):
        block = text.split(f"$ clipforge search {out / 'index'} {query!r} --top 3\n")[1].split("\n\n")[0]
        shown = [line.split()[2] for line in block.splitlines()]
        assert shown == [r.path for r in index.search(query, top_k=3)]
    assert text.rstrip().endswith(f"clipforge serve {out / 'index'}  (then open http://127.0.0.1:8000/)")
