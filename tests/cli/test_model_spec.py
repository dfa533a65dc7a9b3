"""The one model-spec rule (clipforge.io.spec), as clipforge.load and every command follow it: an architecture
without weights is refused with its tags and --random-init named, and nothing written; ``ARCH:TAG`` and
``--pretrained TAG`` go to the download (a stand-in hub on 127.0.0.1); --random-init gives seed-0 weights;
a run directory and ``RUN@best`` load their checkpoints."""
import hashlib
import http.server
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

import clipforge
from clipforge.cli import main
from clipforge.data.shapes import write_classification
from clipforge.io import pretrained
from clipforge.io.factory import create_model, save
from clipforge.io.runs import step_folder
from clipforge.io.spec import NoWeightsError, UnknownModelError, resolve_spec, resolve_weights
from clipforge.search import Index
from clipforge.train.checkpoint import save_best

H14_TAGS = ("laion2b_s32b_b79k", "metaclip_fullcc", "metaclip_altogether", "dfn5b")
H14_HUB = "/laion/CLIP-ViT-H-14-laion2B-s32B-b79K/resolve/main/"


class _Hub(http.server.BaseHTTPRequestHandler):
    """A stand-in of the Hugging Face hub: ``/ORG/REPO/resolve/main/FILE`` answers a redirect whose
    ``X-Linked-Etag`` is the file's SHA-256; anything else is 404. Every request is recorded."""
    files: dict = {}
    requests: list = []

    def do_HEAD(self):
        _Hub.requests.append(f"HEAD {self.path}")
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(302)
        self.send_header("X-Linked-Etag", f'"{hashlib.sha256(body).hexdigest()}"')
        self.send_header("Location", f"/storage{self.path}")
        self.end_headers()

    def do_GET(self):
        _Hub.requests.append(self.path)
        body = self.files.get(self.path.removeprefix("/storage"))
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(loopback_http):
    return loopback_http(_Hub)


@pytest.fixture
def hub(server, tmp_path, monkeypatch):
    """HF_ENDPOINT at the stand-in hub, an empty download cache, and a tag 'st' of tiny-vit in OpenCLIP's table
    served from it; returns the model those weights are."""
    torch.manual_seed(7)
    model = clipforge.create_model("tiny-vit").eval()
    body = safetensors.torch.save({k: v.contiguous() for k, v in model.state_dict().items()})
    _Hub.files.clear()
    _Hub.requests.clear()
    _Hub.files["/org/tiny-st/resolve/main/open_clip_model.safetensors"] = body
    monkeypatch.setenv("HF_ENDPOINT", server)
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "cache"))
    table = {**pretrained._open_clip_table(), "tiny-vit": {"st": {"hf_hub": "org/tiny-st", "quick_gelu": False}}}
    monkeypatch.setattr(pretrained, "_open_clip_table", lambda: table)
    return model


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = write_classification(tmp_path_factory.mktemp("shapes") / "val", split="all", num_samples=6,
                                  by="colour", fmt="folder")
    return Path(folder)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with a newest checkpoint (step 2, seed 2) and a best one (step 1, seed 1)."""
    run = tmp_path_factory.mktemp("runs") / "run"
    torch.manual_seed(1)
    best = create_model("tiny-vit")
    save_best(run, 1, best, "loss", "min", 0.5)
    torch.manual_seed(2)
    newest = create_model("tiny-vit")
    save(newest, step_folder(run, 2))
    return run, best, newest


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _refused(capsys, argv, written=None) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--random-init" in err and "'ViT-H-14'" in err, err
    assert all(tag in err for tag in H14_TAGS), err
    assert written is None or not written.exists()
    return err


def _downloads_h14(capsys, argv, written=None) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot download http://127.0.0.1:" in err and H14_HUB in err, err
    assert f"HEAD {H14_HUB}open_clip_model.safetensors" in _Hub.requests
    assert written is None or not written.exists()
    return err


# ------------------------------------------------------------------------------------------ the rule itself

def test_spec_forms_resolve_without_reading_weights(tmp_path, run_dir):
    run, _, _ = run_dir
    assert resolve_spec("ViT-B/32").weights is pretrained.PRETRAINED["ViT-B/32"]
    assert resolve_spec("ViT-B-32").weights is pretrained.PRETRAINED["ViT-B/32"]  # OpenAI's, as load always did
    tagged = resolve_spec("ViT-H-14:laion2b_s32b_b79k")
    assert (tagged.architecture, tagged.tag, tagged.text) == ("ViT-H-14", "laion2b_s32b_b79k",
                                                              "ViT-H-14:laion2b_s32b_b79k")
    assert tagged.weights.url.endswith(f"{H14_HUB}open_clip_model.safetensors")
    assert resolve_spec("ViT-H-14", pretrained="laion2b_s32b_b79k") == tagged
    assert resolve_spec(run).path == run and resolve_spec(run).text == str(run.resolve())
    best = resolve_spec(f"{run}@best")
    assert best.path == run / "checkpoints" / "best" and best.text == f"{run.resolve()}@best"
    random = resolve_spec("tiny-vit", random_init=True)
    assert random.random_init and random.architecture == "tiny-vit" and random.text == "tiny-vit"
    for spec in (tagged, random, resolve_spec(run), best, resolve_spec("ViT-B/32")):
        assert resolve_spec(spec.text, random_init=spec.random_init) == spec  # what config.json records


def test_an_existing_path_wins_over_a_name_with_a_tag(tmp_path):
    folder = save(create_model("tiny-vit"), tmp_path / "tiny-vit:st")
    assert resolve_spec(str(folder)).path == folder


def test_architecture_without_weights_is_refused_with_its_tags_and_random_init():
    with pytest.raises(NoWeightsError) as info:
        resolve_spec("ViT-H-14")
    message = str(info.value)
    assert all(tag in message for tag in H14_TAGS)
    assert "--random-init" in message and "random_init=True" in message and "ViT-H-14:laion2b_s32b_b79k" in message
    assert isinstance(info.value, ValueError)
    with pytest.raises(NoWeightsError, match=r"'tiny-vit' .*tags: none.*--random-init"):
        clipforge.load("tiny-vit")
    with pytest.raises(NoWeightsError, match="--random-init"):
        resolve_spec("study-vit")


def test_contradictions_and_unknown_names_are_explained(tmp_path, run_dir):
    with pytest.raises(ValueError, match="two different weights"):
        resolve_spec("ViT-H-14", pretrained="laion2b_s32b_b79k", random_init=True)
    with pytest.raises(ValueError, match="names weights .* random_init"):
        resolve_spec("ViT-H-14:laion2b_s32b_b79k", random_init=True)
    with pytest.raises(ValueError, match="give them once"):
        resolve_spec("ViT-H-14:laion2b_s32b_b79k", pretrained="dfn5b")
    with pytest.raises(ValueError, match="checkpoint with its own weights"):
        resolve_spec(run_dir[0], random_init=True)
    with pytest.raises(FileNotFoundError, match=r"pretrained='nope' .*tags: laion2b_s32b_b79k"):
        resolve_spec("ViT-H-14:nope")
    with pytest.raises(UnknownModelError, match="did you mean.*ViT-H-14"):
        resolve_spec("vit-h-15")
    with pytest.raises(FileNotFoundError, match=r"no best checkpoint"):
        resolve_spec(f"{save(create_model('tiny-vit'), tmp_path / 'x' / 'checkpoints' / 'step_00000001').parents[1]}"
                     "@best")


def test_random_init_is_seed_0_and_leaves_the_callers_generator_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first, _ = clipforge.load("tiny-vit", device="cpu", random_init=True)
    assert torch.equal(torch.rand(3), expected)
    again, preprocess = clipforge.load("tiny-vit", device="cpu", random_init=True)
    torch.manual_seed(0)
    assert _same_weights(first, again) and _same_weights(first, clipforge.create_model("tiny-vit"))
    assert not first.training and preprocess.config.image_size == 32


def test_json_config_needs_random_init_or_weights(tmp_path, run_dir):
    config = tmp_path / "arch.json"
    config.write_text(json.dumps(clipforge.get_model_config("tiny-vit").to_dict()))
    with pytest.raises(NoWeightsError, match="architecture config without weights.*--random-init"):
        resolve_spec(config)
    assert resolve_spec(config, random_init=True).random_init
    loaded, _ = clipforge.load(config, pretrained=str(run_dir[0]), device="cpu")
    assert _same_weights(loaded, run_dir[2])
    paired = resolve_spec(config, pretrained=str(run_dir[0]))
    assert paired.text == f"{config.resolve()}:{run_dir[0].resolve()}" and resolve_spec(paired.text) == paired


def test_run_directory_and_best_load_their_checkpoints(run_dir):
    run, best, newest = run_dir
    assert _same_weights(clipforge.load(run, device="cpu")[0], newest)
    assert _same_weights(clipforge.load(f"{run}@best", device="cpu")[0], best)
    assert _same_weights(clipforge.create_model("tiny-vit", pretrained=f"{run}@best"), best)
    assert resolve_weights("tiny-vit", f"{run}@best").path == run / "checkpoints" / "best"


def test_one_string_tag_downloads_in_load_and_create_model(hub):
    loaded, _ = clipforge.load("tiny-vit:st", device="cpu")
    assert _same_weights(loaded, hub) and not loaded.training
    assert _same_weights(clipforge.create_model("tiny-vit:st"), hub)
    assert _same_weights(clipforge.load("tiny-vit", pretrained="st", device="cpu")[0], hub)


# ------------------------------------------------------------------------------------------ every command

def test_index_refuses_an_architecture_without_weights_and_writes_nothing(images, tmp_path, capsys, hub):
    index = tmp_path / "X"
    _refused(capsys, ["index", str(images), "--model", "ViT-H-14", "--index", str(index)], written=index)
    _downloads_h14(capsys, ["index", str(images), "--model", "ViT-H-14:laion2b_s32b_b79k", "--index", str(index),
                            "--no-progress"], written=index)
    _Hub.requests.clear()
    _downloads_h14(capsys, ["index", str(images), "--model", "ViT-H-14", "--pretrained", "laion2b_s32b_b79k",
                            "--index", str(index), "--no-progress"], written=index)


def test_index_and_search_with_random_init_and_a_downloaded_tag(images, tmp_path, capsys, hub):
    index = tmp_path / "idx"
    assert main(["index", str(images), "--model", "tiny-vit", "--random-init", "--index", str(index),
                 "--workers", "0", "--no-progress"]) == 0
    config = json.loads((index / "config.json").read_text())
    assert config["model"] == "tiny-vit" and config["random_init"] is True
    capsys.readouterr()
    assert main(["search", str(index), "a red shape", "--json", "--device", "cpu"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 6
    # an update without --model uses the index's own model, random init included
    assert main(["index", str(images), "--index", str(index), "--workers", "0", "--no-progress"]) == 0
    tagged = tmp_path / "tagged"
    assert main(["index", str(images), "--model", "tiny-vit", "--pretrained", "st", "--index", str(tagged),
                 "--workers", "0", "--no-progress"]) == 0
    config = json.loads((tagged / "config.json").read_text())
    assert config["model"] == "tiny-vit:st" and "random_init" not in config
    capsys.readouterr()
    assert main(["search", str(tagged), "a red shape", "--top", "2", "--json", "--device", "cpu"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


@pytest.fixture
def legacy_index(images, tmp_path):
    """An index built with seed-0 tiny-vit weights whose config.json does not record random_init, as every
    index written before the rule: (folder, its config)."""
    folder = tmp_path / "legacy"
    Index.build(folder, [str(images)], model="tiny-vit", random_init=True, workers=0, progress=False)
    config = json.loads((folder / "config.json").read_text())
    del config["random_init"]
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder, config


def test_search_opens_an_old_seed_0_index_and_refuses_one_that_is_not(legacy_index, capsys):
    folder, config = legacy_index
    assert main(["search", str(folder), "a red shape", "--device", "cpu"]) == 0
    capsys.readouterr()
    (folder / "config.json").write_text(json.dumps({**config, "weights_sha256": "0" * 64}))
    assert main(["search", str(folder), "a red shape", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "'tiny-vit', an architecture without weights" in err and "--random-init" in err


def test_search_of_an_index_naming_a_tag_goes_to_the_download(legacy_index, capsys, hub):
    folder, config = legacy_index
    (folder / "config.json").write_text(json.dumps({**config, "model": "ViT-H-14:laion2b_s32b_b79k"}))
    _downloads_h14(capsys, ["search", str(folder), "a red shape", "--device", "cpu"])


def test_serve_refuses_an_index_it_cannot_encode_queries_for(legacy_index, capsys):
    pytest.importorskip("uvicorn")
    folder, config = legacy_index
    (folder / "config.json").write_text(json.dumps({**config, "weights_sha256": "0" * 64}))
    assert main(["serve", str(folder), "--port", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "an architecture without weights" in err and "--random-init" in err


@pytest.mark.slow
@pytest.mark.slow
def test_serve_queries_an_index_built_with_random_init(images, tmp_path):
    pytest.importorskip("uvicorn")
    import urllib.request
    from clipforge.serve.server import start_child
    folder = tmp_path / "idx"
    Index.build(folder, [str(images)], model="tiny-vit", random_init=True, workers=0, progress=False)
    process, base = start_child(folder, "--device", "cpu")
    try:
        request = urllib.request.Request(f"{base}/api/search", data=json.dumps({"query": "a red shape"}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert len(json.loads(response.read())["results"]) == 6
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_classify_refuses_downloads_and_takes_random_init(images, capsys, hub, run_dir):
    image = str(next(images.rglob("*.png")))
    common = ["classify", image, "--labels", "red shape,blue shape", "--device", "cpu"]
    _refused(capsys, [*common, "--model", "ViT-H-14"])
    _downloads_h14(capsys, [*common, "--model", "ViT-H-14:laion2b_s32b_b79k"])
    for model in (["tiny-vit", "--random-init"], ["tiny-vit:st"], ["tiny-vit", "--pretrained", "st"],
                  [str(run_dir[0])], [f"{run_dir[0]}@best"]):
        assert main([*common, "--model", *model, "--json"]) == 0, model
        assert json.loads(capsys.readouterr().out)[0]["image"] == image
    assert main([*common, "--model", "tiny-vit", "--pretrained", "st", "--random-init"]) == 2
    assert "two different weights" in capsys.readouterr().err


def test_explain_refuses_and_takes_random_init(images, capsys, hub):
    image = str(next(images.rglob("*.png")))
    common = ["explain", image, "--texts", "a red shape", "a blue shape", "--device", "cpu"]
    _refused(capsys, [*common, "--model", "ViT-H-14"])
    _downloads_h14(capsys, [*common, "--model", "ViT-H-14:laion2b_s32b_b79k"])
    assert main([*common, "--model", "tiny-vit", "--random-init"]) == 0


def test_eval_refuses_downloads_and_takes_random_init(images, tmp_path, capsys, hub):
    output = tmp_path / "out" / "results.json"
    common = ["eval", "--task", "zeroshot", "--data", str(images), "--device", "cpu", "--output", str(output)]
    _refused(capsys, [*common, "--model", "ViT-H-14"], written=output.parent)
    _downloads_h14(capsys, [*common, "--model", "ViT-H-14", "--pretrained", "laion2b_s32b_b79k"],
                   written=output.parent)
    assert main([*common, "--model", "tiny-vit", "--random-init"]) == 0
    assert json.loads(output.read_text())["model"] == "tiny-vit"
    assert main([*common, "--model", "tiny-vit", "--pretrained", "st"]) == 0
    assert json.loads(output.read_text())["model"] == "tiny-vit:st"


def test_export_refuses_downloads_and_takes_random_init(tmp_path, capsys, hub):
    out = tmp_path / "hf"
    _refused(capsys, ["export", "hf", "--model", "ViT-H-14", "--output", str(out)], written=out)
    _downloads_h14(capsys, ["export", "hf", "--model", "ViT-H-14:laion2b_s32b_b79k", "--output", str(out)],
                   written=out)
    assert main(["export", "hf", "--model", "tiny-vit:st", "--output", str(out)]) == 0
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.slow
def test_train_pretrained_takes_every_spec_form(tmp_path, capsys, hub, run_dir, one_thread):
    run, _, _ = run_dir
    common = ["train", "--model", "tiny-vit", "--train-data", "builtin:64", "--steps", "2", "--warmup", "1",
              "--batch-size", "8", "--workers", "0", "--save-every", "1"]
    for i, weights in enumerate([f"{run}@best", str(run), "st", "tiny-vit:st"]):
        output = tmp_path / f"ft{i}"
        assert main([*common, "--pretrained", weights, "--output", str(output)]) == 0, capsys.readouterr().err
        assert json.loads((output / "run_config.json").read_text())["pretrained"] == weights
    capsys.readouterr()
    assert main([*common, "--pretrained", "nope", "--output", str(tmp_path / "bad")]) == 2
    assert "pretrained='nope'" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["train", "--model", "ViT-H-14", "--pretrained", "laion2b_s32b_b79k", "--train-data", "builtin:64",
                 "--steps", "2", "--warmup", "1", "--output", str(tmp_path / "h14")]) == 2
    assert "cannot download http://127.0.0.1:" in capsys.readouterr().err
    assert f"HEAD {H14_HUB}open_clip_model.safetensors" in _Hub.requests and not (tmp_path / "h14").exists()
