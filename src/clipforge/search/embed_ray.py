"""The Ray engine of ``clipforge embed``: a Ray Data pipeline whose CPU tasks list, read, hash, decode and
preprocess one partition each, and whose actor pool (the model loaded once per actor, one GPU per actor when the
cluster has GPUs) encodes; the driver writes each partition as soon as its last image arrives. Ray Data retries
the tasks of a dead worker and restarts a dead actor, and the driver keeps each image once by its position, so the
folder ends complete and as the local engine writes it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from clipforge.encode import encode_captions, encode_images
from clipforge.search import embeddings
from clipforge.search.model import indexed_precision, load_model, model_identity, model_name, weights_checksum
from clipforge.search.partitions import (
    EmbedOptions,
    HashedImages,
    Progress,
    Work,
    folder_config,
    metadata_row,
    partition_data,
    plan_partitions,
    prepare_folder,
    summary,
)


def _ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise RuntimeError("--engine ray needs Ray Data: pip install 'clipforge[ray]'") from None
    return ray


def embed_ray(folder: Path, sources: list[str], model: str, options: EmbedOptions, random_init: bool,
              address: str | None, actors: int | None, precision: str = "fp32") -> dict:
    """``clipforge.search.embed.embed`` on Ray: the cluster at ``address`` (else the one this process is
    connected to, or a new local one, which is shut down after). An int8 run encodes on CPU actors only."""
    ray = _ray()  # before the work of planning, to fail fast without Ray
    works = plan_partitions(sources, options)
    # for the identity and the preprocessing
    network, preprocess = load_model(str(model), "cpu", random_init, precision)
    identity = model_identity(str(model), network, preprocess, random_init)
    config = folder_config(identity, sources, works, options)
    prepare_folder(folder, config, options.rebuild)
    done = embeddings.finished(folder, len(works))
    todo = [w for w in works if w.number not in done]
    started = not ray.is_initialized()
    if started:
        ray.init(address=address)
    try:
        progress = Progress(works, todo, options.progress)
        if todo:
            _run(ray, folder, works, todo, config, model_name(str(model), random_init), random_init, preprocess,
                 options, actors, progress)
        progress.close()
    finally:
        if started:
            ray.shutdown()
    return summary(folder, works, len(done))


def _run(ray, folder: Path, works: list[Work], todo: list[Work], config: dict, spec: str, random_init: bool,
         preprocess, options: EmbedOptions, actors: int | None, progress: Progress) -> None:
    precision = indexed_precision(config)  # int8 runs on the CPU: no GPU actors
    gpus = int(ray.cluster_resources().get("GPU", 0)) if precision == "fp32" else 0
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if not gpus and actors and actors >= cpus:  # each CPU actor holds a CPU for good: decoding would never run
        raise ValueError(f"--ray-actors {actors} on a cluster of {cpus} CPUs and no GPU leaves no CPU for decoding "
                         f"the images: use at most {max(1, cpus - 1)} actors, or add CPUs")
    draft = preprocess.config.image_size if options.fast_decode else None
    rows = [{"work": w.to_json()} for w in todo]
    # A row-by-row flat_map before batches of the encoder's size is a pair that Ray Data does not fuse, so the
    # decoding stays in CPU tasks; fused into the actors, each would decode its own images on its one core. A dead
    # worker's tasks are retried and a dead actor restarted by Ray Data's defaults (max_retries, max_restarts -1).
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).flat_map(
        _decode, num_cpus=1, fn_kwargs={"preprocess": preprocess, "max_pixels": options.max_pixels, "draft": draft})
    dataset = dataset.map_batches(
        _Encoder, batch_size=options.batch_size, compute=ray.data.ActorPoolStrategy(size=actors or max(1, gpus)),
        num_cpus=1, num_gpus=1 if gpus else 0,
        fn_constructor_kwargs={"spec": spec, "random_init": random_init, "weights_sha256": config["weights_sha256"],
                               "text": config["text"], "precision": precision,
                               "gpu": bool(gpus)})
    assembler = _Assembler(folder, {w.number: w for w in todo}, len(works), config, progress)
    context = ray.data.DataContext.get_current()
    bars, context.enable_progress_bars = context.enable_progress_bars, False  # ours counts images, Ray's blocks
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            assembler.add(batch)
    finally:
        context.enable_progress_bars = bars
    missing = sorted(set(assembler.works) - assembler.written)
    if missing:
        raise RuntimeError(f"the Ray pipeline ended without the images of partitions {missing[:10]}; run the "
                           "command again to finish them")


def _decode(row: dict, preprocess, max_pixels: int | None, draft: int | None):
    """A CPU task: one partition's images, listed, read, hashed, decoded and preprocessed, one row each:
    ``position`` in the partition, ``rows`` (how many rows the partition sends), ``ok``, ``pixels`` (zeros for a
    skipped image) and ``meta`` (JSON: the metadata row, or name, reason and message; position 0 also says what
    the source listed). A partition without images sends one row at position -1, so that its record is written."""
    work = Work.from_json(row["work"])
    entries, problems = work.listed()
    dataset = HashedImages([e.ref for e in entries], preprocess, max_pixels, draft)
    size = preprocess.config.image_size
    first = {"listed": len(entries), "problems": problems}
    if not entries:
        yield _row(work.number, -1, 1, None, first, size)
    for i, entry in enumerate(entries):
        _, pixels, info, problem = dataset[i]
        meta = (metadata_row(entry, *info) if problem is None
                else {"name": entry.name, "reason": problem[0], "message": problem[1]})
        yield _row(work.number, i, len(entries), pixels, {**meta, **(first if i == 0 else {})}, size)


def _row(number: int, position: int, rows: int, pixels, meta: dict, size: int) -> dict:
    return {"partition": number, "position": position, "rows": rows, "ok": pixels is not None,
            "pixels": np.zeros((3, size, size), np.float32) if pixels is None else pixels.numpy(),
            "meta": json.dumps(meta)}


class _Encoder:
    """An actor: the model, loaded once (on its GPU when it has one), checked against the driver's weights."""

    def __init__(self, spec: str, random_init: bool, weights_sha256: str, text: bool, precision: str = "fp32",
                 gpu: bool = False):
        device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
        self.network, _ = load_model(spec, device, random_init, precision)
        if weights_checksum(self.network) != weights_sha256:
            raise RuntimeError(f"a Ray worker loaded {spec} with other weights than the driver's (sha256 "
                               f"{weights_sha256[:12]}): every node must see the same model files")
        self.text, self.dim = text, int(self.network.config.embed_dim)

    def __call__(self, batch: dict) -> dict:
        ok = batch["ok"].astype(bool)
        vectors = np.zeros((len(ok), self.dim), np.float32)
        texts = np.zeros_like(vectors)
        if ok.any():
            vectors[ok] = encode_images(self.network, torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])),
                                        batch_size=int(ok.sum())).cpu().numpy()
            if self.text:
                captions = [json.loads(m).get("caption") for m in batch["meta"][ok]]
                texts[ok] = encode_captions(self.network, captions, self.dim).numpy()
        return {"partition": batch["partition"], "position": batch["position"], "rows": batch["rows"],
                "ok": ok, "meta": batch["meta"], "vector": vectors, "text": texts}


class _Assembler:
    """The driver's side: collects each partition's rows by position (a retried task may send some again) and
    writes the partition when it has them all."""

    def __init__(self, folder: Path, works: dict[int, Work], partitions: int, config: dict, progress: Progress):
        self.folder, self.works, self.partitions, self.config = folder, works, partitions, config
        self.progress, self.pending, self.written = progress, {}, set()

    def add(self, batch: dict) -> None:
        for j in range(len(batch["partition"])):
            number, position = int(batch["partition"][j]), int(batch["position"][j])
            if number in self.written:
                continue
            rows = self.pending.setdefault(number, {})
            if position not in rows:
                self.progress.images(1 if position >= 0 else 0)
            rows[position] = (bool(batch["ok"][j]), json.loads(batch["meta"][j]), batch["vector"][j],
                              batch["text"][j])
            if len(rows) == int(batch["rows"][j]):
                self._write(number, self.pending.pop(number))

    def _write(self, number: int, rows: dict) -> None:
        first = dict(rows[min(rows)][1])  # position 0 (or -1) also says what the partition's source listed
        encoded = [(p, vector, text, meta) for p, (ok, meta, vector, text) in rows.items() if ok]
        for _, _, _, meta in encoded:
            meta.pop("listed", None), meta.pop("problems", None)
        skipped = [(m["name"], m["reason"], m["message"]) for p, (ok, m, _, _) in rows.items() if not ok and p >= 0]
        data = partition_data(number, first["listed"], encoded, skipped, first["problems"], self.config["text"],
                              self.config["dtype"], int(self.config["dim"]))
        embeddings.write_partition(self.folder, data, self.partitions, self.config["text"])
        self.written.add(number)
        self.progress.partition(self.works[number], data.listed)
