"""A Ray cluster whose nodes share no disk: a head node that sees the test's files and a second node
in its own mount namespace (``unshare --mount``, an empty tmpfs over pytest's temporary folder), on
this machine. Nothing is mocked: real Ray, Ray Data, Ray Train, Ray Serve and MLflow.

The second node joins as ``127.0.0.2`` so that the driver (this process) attaches to the head.
A folder under ``/tmp`` outside pytest's stands in for an NFS mount that every node sees.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch

from conftest import AUXILIARY, TINY_BACKBONE, TINY_PREP
from ptame.explainer import Explainer

ray = pytest.importorskip("ray")

#: Ray processes of the test cluster: no token (the second node would need the head's), quiet
RAY_ENV = {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _can_unshare() -> str | None:
    """Why a private mount namespace cannot be made here (``None``: it can)."""
    if os.geteuid() != 0:
        return "needs root for unshare --mount (CI runs as root)"
    if not shutil.which("unshare"):
        return "needs unshare (util-linux)"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "mount", "-t", "tmpfs", "tmpfs", "/mnt"],
                           capture_output=True, text=True)  # fmt: skip
    return None if probe.returncode == 0 else f"unshare --mount fails here: {probe.stderr.strip()}"


def _stop(process: subprocess.Popen) -> None:
    """Stop a ``ray start --block`` we started and the processes of its session."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def _node_sees(node_id: str, path: str) -> bool:
    from ptame.cluster import on_node

    return ray.get(ray.remote(num_cpus=0)(os.path.exists).options(**on_node(node_id)).remote(path), timeout=60)


# ------------------------------------------------------------------------------ without a cluster


def test_shipped_explainer_loads_as_the_saved_one_and_one_node_ships_nothing(tmp_path, tiny_explainer) -> None:
    from ptame.cluster import _tar, load_shipped, nodes_missing, refusal, require_shared, ship_explainer

    saved = tiny_explainer.save(tmp_path / "model")
    loaded = load_shipped({"files": _tar(saved), "model_uri": str(saved), "version": "3"})
    assert (loaded.model_uri, loaded.version) == (str(saved), "3")
    for name, tensor in tiny_explainer.head.state_dict().items():
        torch.testing.assert_close(loaded.explainer.head.state_dict()[name], tensor)
    # without Ray, or on one node, every path is everyone's
    assert ship_explainer(str(saved)) is None and nodes_missing(str(saved)) == []
    require_shared("train.storage_path", str(tmp_path / "nowhere"), "why")
    assert not (tmp_path / "nowhere").exists()
    line = refusal("train.storage_path", "/x", "Ray Train writes there")
    assert "\n" not in line and line.startswith("train.storage_path '/x' is on this machine's disk") and "s3://" in line


def _authenticate_as_ray_start() -> None:
    """Ray's token authentication on (``RAY_AUTH_MODE=token`` in this process, so in both nodes' env)
    when a token exists (``~/.ray/auth_token``, written by the first local ``ray.init``), as a head's
    ``ray start`` would decide alone; a joining node and this process would otherwise stay off."""
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


@pytest.fixture(scope="module")
def no_shared_disk(tmp_path_factory):
    """``(driver's files, shared folder, second node's id)`` of a two-node cluster of 2 CPUs per node."""
    reason = _can_unshare()
    if reason:
        pytest.skip(reason)
    if ray.is_initialized():
        ray.shutdown()
    hidden = tmp_path_factory.getbasetemp()
    files = tmp_path_factory.mktemp("driver")
    shared = Path(tempfile.mkdtemp(prefix="ptame-nfs-"))
    temp_dir = tempfile.mkdtemp(prefix="ptr-")  # short: Ray's socket paths live under it
    port = _free_port()
    _authenticate_as_ray_start()  # before env: both nodes and this process then agree on the mode
    env = {**os.environ, **RAY_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")]))}
    common = f"--num-cpus=2 --block --temp-dir={temp_dir} --object-store-memory=200000000 --disable-usage-stats"
    log = open(files / "ray.log", "w")  # noqa: SIM115 - open for the cluster's lifetime
    head = subprocess.Popen(["ray", "start", "--head", f"--port={port}", "--include-dashboard=false", *common.split()],
                            env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    second = f"mount -t tmpfs tmpfs {hidden} && exec ray start --address=127.0.0.1:{port} --node-ip-address=127.0.0.2 {common}"
    worker = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", second],
                              env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)
    try:
        deadline = time.monotonic() + 120
        while not ray.is_initialized():
            try:
                ray.init(address=f"127.0.0.1:{port}", logging_level="WARNING")
            except (ConnectionError, RuntimeError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert time.monotonic() < deadline, (files / "ray.log").read_text()[-3000:]
            time.sleep(0.5)
        me = ray.get_runtime_context().get_node_id()
        other = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != me)
        (files / "probe").write_text("driver only")
        assert _node_sees(me, str(files / "probe")), "the head must see the driver's files"
        assert not _node_sees(other, str(files / "probe")), "the second node must not see the driver's files"
        assert _node_sees(other, str(shared)), "the stand-in NFS folder must be seen by every node"
        yield files, shared, other
    finally:
        ray.shutdown()
        for process in (worker, head):
            _stop(process)
        log.close()
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
        shutil.rmtree(shared, ignore_errors=True)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def saved_model(no_shared_disk) -> Path:
    files, _, _ = no_shared_disk
    torch.manual_seed(0)
    return Explainer.from_uris(TINY_BACKBONE, AUXILIARY, preprocessing=TINY_PREP).save(files / "model")


@pytest.fixture(scope="module")
def registry_uri(no_shared_disk, saved_model) -> str:
    """A SQLite registry in the driver's files holding ``saved_model`` as ``models:/tiny@champion`` (version 1)."""
    from mlflow import MlflowClient

    from ptame.registry import configure, log_explainer

    files, _, _ = no_shared_disk
    (files / "registry").mkdir()
    uri = configure(f"sqlite:///{files}/registry/mlflow.db", experiment="no-shared-disk", artifact_root=files / "registry" / "art")
    _, version = log_explainer(saved_model, "tiny")
    MlflowClient().set_registered_model_alias("tiny", "champion", version)
    return uri


def _images(folder: Path, n: int) -> dict[str, bytes]:
    """``n`` small PNGs written under ``folder`` plus one that is not an image; returns name -> bytes."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    data = {}
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)).save(buf, "PNG")
        data[f"img-{i:02d}.png"] = buf.getvalue()
    data["not-an-image.txt"] = b"hello"
    folder.mkdir(parents=True)
    for name, blob in data.items():
        (folder / name).write_bytes(blob)
    return data


# ------------------------------------------------------------------------------------ explain


def test_explain_a_driver_folder_into_a_driver_folder_exactly_once(no_shared_disk, saved_model) -> None:
    """Four one-CPU actors need both nodes; the second sees neither the model, the images nor the output."""
    from ptame.batch import explain_to_parquet
    from ptame.explanations import read_explanations

    files, _, _ = no_shared_disk
    data = _images(files / "images", 11)
    out = files / "out"
    summary = explain_to_parquet(str(saved_model), str(files / "images"), str(out), chunk_size=2, batch_size=2,
                                 concurrency=4, topk=3, progress=False)  # fmt: skip
    assert (summary.images, summary.errors, summary.chunks_written) == (12, 1, 6)
    df = read_explanations(str(out))
    assert sorted(df["image_id"]) == sorted(data) and df["image_id"].is_unique
    errors = {i: e for i, e in zip(df["image_id"], df["error"]) if isinstance(e, str)}
    assert list(errors) == ["not-an-image.txt"] and "cannot read" not in errors["not-an-image.txt"], errors
    assert set(df["model_uri"]) == {str(saved_model.resolve())}
    again = explain_to_parquet(str(saved_model), str(files / "images"), str(out), topk=3, progress=False)
    assert (again.images, again.chunks_skipped) == (0, 6)


@pytest.mark.slow  # ~25 s on 2 cores
def test_explain_a_registry_version_and_a_list_that_is_only_partly_shared(no_shared_disk, registry_uri) -> None:
    """A version of the driver's SQLite registry reaches the actors as files, pinned in every row; a
    ``.txt`` list on shared storage whose first file every node sees (so actors read the files
    themselves) but whose other files only the driver has: those are read again on the driver's node."""
    from ptame.batch import explain_to_parquet
    from ptame.explanations import read_explanations

    files, shared, _ = no_shared_disk
    first = _images(shared / "images", 1)
    rest = _images(files / "few", 3)
    paths = [str(shared / "images" / n) for n in first] + [str(files / "few" / n) for n in rest]
    (shared / "list.txt").write_text("\n".join(paths) + "\n")
    out = files / "out-registry"
    summary = explain_to_parquet("models:/tiny@champion", str(shared / "list.txt"), str(out), chunk_size=1,
                                 concurrency=4, progress=False, tracking_uri=registry_uri)  # fmt: skip
    assert summary.images == 6 and summary.model_uri == "models:/tiny/1"
    df = read_explanations(str(out))
    assert sorted(df["image_id"]) == sorted(paths) and set(df["model_uri"]) == {"models:/tiny/1"}
    errors = {i: e for i, e in zip(df["image_id"], df["error"]) if isinstance(e, str)}
    assert sorted(errors) == sorted(p for p in paths if p.endswith(".txt")), errors
    assert not any("cannot read" in e for e in errors.values()), errors


# ------------------------------------------------------------------------------------ training


def _train_config(files: Path, storage_path: Path):  # -> TrainConfig
    """Two one-CPU workers, one per node, 2 steps on 32 scenes written in the driver's files."""
    from ptame.train import TrainConfig
    from test_train import write_scenes

    data = files / "scenes"
    if not data.exists():
        write_scenes(data, 32)
    return TrainConfig(backbone=TINY_BACKBONE, auxiliary=AUXILIARY, data=str(data), preprocessing=TINY_PREP.to_dict(),
                       batch_size=8, max_steps=2, checkpoint_every=2, num_workers=2, cpus_per_worker=1,
                       placement_strategy="STRICT_SPREAD", output_dir=str(files / "trained"),
                       storage_path=str(storage_path))  # fmt: skip


def test_training_refuses_a_storage_path_on_the_driver_disk(no_shared_disk) -> None:
    """Ray Train's checkpoints need storage every node sees: refused before any worker starts."""
    from ptame.train import train

    files, _, _ = no_shared_disk
    _images(files / "train-images", 2)  # not Parquet: would be prepared under storage_path
    cfg = replace(_train_config(files, files / "ray_results"), data=str(files / "train-images"))
    with pytest.raises(ValueError, match=r"^train\.storage_path '.*ray_results' is on this machine's disk, .* checkpoints"):
        train(cfg)
    assert not (files / "trained").exists() and list((files / "ray_results").iterdir()) == []  # nothing prepared


@pytest.mark.slow  # ~60 s on 2 cores: a Ray Train run over both nodes
def test_training_reads_the_driver_data_and_checkpoints_to_shared_storage(no_shared_disk) -> None:
    """The prepared data lives on the driver's disk only; a worker on each node trains on its share."""
    from ptame.train import train

    files, shared, other = no_shared_disk
    result = train(_train_config(files, shared / "ray_results"))
    assert result.steps == 2 and other in result.worker_nodes and len(set(result.worker_nodes)) == 2
    assert result.run_path.startswith(str(shared))
    assert Explainer.load(result.explainer_dir).preprocessing.input_size == TINY_PREP.input_size


# ------------------------------------------------------------------------------------ serving


@pytest.mark.slow  # ~40 s on 2 cores: Serve's controller, a proxy and a replica on each node
def test_serve_one_replica_per_node_answers_http(no_shared_disk, registry_uri) -> None:
    """Two replicas of 1.5 CPUs on nodes of 2: one per node, each loading the alias's version (resolved
    in the driver's SQLite registry) from bytes."""
    from ray import serve

    from ptame.serve import deploy

    files, _, _ = no_shared_disk
    port = _free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    try:
        args = {"model": "models:/tiny@champion", "tracking_uri": registry_uri, "replicas": 2, "num_cpus": 1.5}
        info = deploy(args, name="noshare", route_prefix="/")
        assert info["model_uri"] == "models:/tiny/1" and info["alias"] == "champion"
        assert ray.available_resources().get("CPU", 0) <= 1, "both replicas must run, one on each node"
        body = next(iter(_images(files / "served", 1).values()))
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            answers = [client.post("/explain", content=body, headers={"content-type": "image/png"}) for _ in range(8)]
        assert [a.status_code for a in answers] == [200] * 8, answers[0].text
        assert {a.json()["model_uri"] for a in answers} == {"models:/tiny/1"}
    finally:
        serve.shutdown()
