"""Ray Serve on localhost over real HTTP, with MLflow on a temporary SQLite file.

The served answer for an image is ``Explainer.explain``'s for the same image; bad bodies get 4xx
with a reason and the server keeps answering; 200 concurrent requests all get their own image's
answer from shared forward passes; overload gets 503; moving the alias and redeploying switches
versions without a failed request. One Ray + Serve for the whole module (``served``).
"""

import asyncio
import base64
import html
import io
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import AUXILIARY, TINY_BACKBONE, TINY_PREP, red_scene
from ptame import registry
from ptame.data import decode_image, prepare_image
from ptame.explainer import Explainer
from ptame.records import dequantize, explain_prepared, quantize
from ptame.serve_config import BatchConfig, ServeConfig, ServeSettings

NAME = "tiny"
V1, V2 = f"models:/{NAME}/1", f"models:/{NAME}/2"
TIMEOUT = httpx.Timeout(120.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def make_images() -> list[bytes]:
    """Eight distinct JPEG/PNG bodies of different sizes (real photos and synthetic scenes)."""
    from skimage import data

    from ptame.testing import object_scenes

    photos = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    bodies = [
        encode(Image.fromarray(p).reduce(3), "JPEG" if i % 2 else "PNG") for i, p in enumerate(photos)
    ]
    scenes, _, _ = object_scenes(4, size=80, seed=7)
    for i, s in enumerate(scenes):
        im = Image.fromarray((s.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).resize((80 + 20 * i, 80))
        bodies.append(encode(im, "PNG" if i % 2 else "JPEG"))
    return bodies



@dataclass
class Expected:
    pred_class: int
    topk_classes: list[int]
    topk_scores: list[float]
    saliency: np.ndarray  # uint8 (h, w)
    crop_box: list[int]
    size: tuple[int, int]


def expected_answer(explainer: Explainer, body: bytes) -> Expected:
    """What ``Explainer.explain`` says for one image, alone in its batch."""
    prepared = prepare_image(body, explainer.preprocessing)
    result = explainer.explain(prepared.tensor[None], topk=explainer.backbone.num_classes)
    sal = result.saliency[0, 0]
    return Expected(
        int(result.classes[0, 0]),
        result.classes[0].tolist(),
        result.scores[0].tolist(),
        np.frombuffer(quantize(sal), np.uint8).reshape(sal.shape),
        list(prepared.crop_box),
        (prepared.width, prepared.height),
    )


def saliency_of(answer: dict) -> np.ndarray:
    png = Image.open(io.BytesIO(base64.b64decode(answer["saliency_png"])))
    assert png.format == "PNG" and png.mode == "L"
    arr = np.asarray(png)
    assert list(arr.shape) == answer["saliency_shape"]
    return arr


def check_answer(answer: dict, expected: Expected, topk: int) -> None:
    """Same class, top-k and scores; the map equal up to one quantisation step (batching reorders sums)."""
    assert answer["pred_class"] == expected.pred_class
    assert answer["pred_label"] == str(expected.pred_class)  # the tiny CNN's class names are "0".."3"
    assert answer["topk_classes"] == expected.topk_classes[:topk]
    assert answer["topk_labels"] == [str(c) for c in answer["topk_classes"]]
    assert (answer["saliency_class"], answer["saliency_label"]) == (answer["pred_class"], answer["pred_label"])
    np.testing.assert_allclose(answer["topk_scores"], expected.topk_scores[:topk], atol=1e-5)
    assert answer["pred_score"] == answer["topk_scores"][0]
    diff = np.abs(saliency_of(answer).astype(int) - expected.saliency.astype(int))
    assert diff.max() <= 1, f"map differs by up to {diff.max()} levels"
    assert answer["crop_box"] == expected.crop_box
    assert (answer["width"], answer["height"]) == expected.size


# ------------------------------------------------------------------------------------- fixtures


@dataclass
class Served:
    url: str
    config: ServeConfig
    images: list[bytes]
    expected: dict[str, list[Expected]]  # model_uri -> one Expected per image
    tracking_uri: str
    explainers: dict[str, Explainer]  # model_uri -> the registered explainer


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Two registered versions (different heads), alias ``champion`` -> 1, served on a free port."""
    import ray
    from mlflow import MlflowClient
    from ray import serve

    from ptame.serve import deploy

    root = tmp_path_factory.mktemp("serve")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    registry.configure(tracking_uri, artifact_root=root / "mlartifacts")
    explainers = {}
    for uri, seed in ((V1, 0), (V2, 1)):
        torch.manual_seed(seed)
        explainer = Explainer.from_uris(TINY_BACKBONE, AUXILIARY, preprocessing=TINY_PREP)
        _, version = registry.log_explainer(explainer, NAME, metrics={"AD@100": 10.0 + seed}, description=f"head seed {seed}")
        assert f"models:/{NAME}/{version}" == uri
        explainers[uri] = explainer
    MlflowClient().set_registered_model_alias(NAME, "champion", "1")

    images = make_images()
    expected = {uri: [expected_answer(ex, body) for body in images] for uri, ex in explainers.items()}
    for answers in expected.values():  # distinct maps, so that a mixed-up answer cannot pass
        maps = [e.saliency.tobytes() for e in answers]
        assert len(set(maps)) == len(maps)
    assert not np.array_equal(expected[V1][0].saliency, expected[V2][0].saliency)

    port = free_port()
    config = ServeConfig(
        f"models:/{NAME}@champion",
        tracking_uri=tracking_uri,
        settings=ServeSettings(max_body_bytes=2_000_000, max_pixels=4_000_000),
        batch=BatchConfig(max_batch_size=8, batch_wait_timeout_s=0.02),
        max_ongoing_requests=16,
        max_queued_requests=16,
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # never a cluster another process left
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        info = deploy(config)
        assert info["model_uri"] == V1
        yield Served(f"http://127.0.0.1:{port}", config, images, expected, tracking_uri, explainers)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture()
def client(served):
    with httpx.Client(base_url=served.url, timeout=TIMEOUT) as c:
        yield c


def serving_uri(client: httpx.Client) -> str:
    return client.get("/model").json()["model_uri"]


# ------------------------------------------------------------------------------------- answers


def test_answer_equals_explainer_explain(served, client) -> None:
    uri = serving_uri(client)
    for i, body in enumerate(served.images):
        kind = "image/png" if body.startswith(b"\x89PNG") else "image/jpeg"
        r = client.post("/explain", content=body, headers={"content-type": kind}, params={"topk": 3})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["model_uri"] == uri
        check_answer(answer, served.expected[uri][i], topk=3)
    # the same image as a multipart upload, with the server's default top-k (5, capped at 4 classes)
    r = client.post("/explain", files={"file": ("cat.png", served.images[0], "image/png")})
    assert r.status_code == 200, r.text
    check_answer(r.json(), served.expected[uri][0], topk=4)


def test_overlay_png_blends_the_crop_only(served, client) -> None:
    body = served.images[0]  # PNG: the server decodes exactly what we decode here
    r = client.post("/explain", content=body, params={"format": "png"}, headers={"content-type": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-model-uri"] == serving_uri(client)
    shown = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")).astype(int)
    original = np.asarray(decode_image(body)).astype(int)
    out, strip = shown[: original.shape[0]], shown[original.shape[0] :]
    assert out.shape == original.shape and strip.shape[0] >= 10  # label and score in a strip below
    assert (strip < 128).any() and (strip == 255).mean() > 0.5  # dark text on white
    assert r.headers["x-ptame-class"] == str(served.expected[V1][0].pred_class)
    left, top, right, bottom = served.expected[V1][0].crop_box
    inside = np.zeros(out.shape[:2], bool)
    inside[top:bottom, left:right] = True
    assert inside.sum() < inside.size  # the photo is not square: some of it lies outside the crop
    assert np.array_equal(out[~inside], original[~inside])
    assert np.abs(out[inside] - original[inside]).mean() > 5


def test_full_view_maps_and_overlays_the_whole_image(served, client) -> None:
    uri = serving_uri(client)
    body = red_scene()  # 128 x 64: its centre square leaves out a quarter of the picture on each side
    want = explain_prepared(served.explainers[uri], [prepare_image(body, TINY_PREP, view="full")], topk=4)[0]
    r = client.post("/explain", content=body, params={"view": "full"}, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["crop_box"] == [0, 0, 128, 64] and answer["saliency_shape"] == [8, 16] == want["saliency_shape"]
    assert (answer["pred_class"], answer["topk_classes"]) == (want["pred_class"], want["topk_classes"])
    expected = dequantize(want["saliency"], want["saliency_shape"])
    assert np.abs(saliency_of(answer) / 255.0 - expected).max() <= 1 / 255 + 1e-6

    r = client.post("/explain", content=body, params={"view": "full", "format": "png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    original = np.asarray(decode_image(body)).astype(int)
    shown = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")).astype(int)[: original.shape[0]]
    assert shown.shape == original.shape and np.abs(shown - original).sum(2).min() > 0  # every pixel under the map

    (param,) = [q for q in client.get("/openapi.json").json()["paths"]["/explain"]["post"]["parameters"] if q["name"] == "view"]
    assert param["schema"]["enum"] == ["crop", "full"] and param["schema"]["default"] == "crop"
    r = client.post("/explain", content=body, params={"view": "wide"})
    assert r.status_code == 400 and "view must be one of ['crop', 'full'], got 'wide'" in r.json()["error"]
    r = client.post("/explain", content=body)  # the default stays the classifier's centre crop
    assert r.status_code == 200 and r.json()["crop_box"] == [32, 0, 96, 64] and r.json()["saliency_shape"] == [16, 16]


def test_class_query_chooses_the_map_and_bad_classes_get_400(served, client) -> None:
    uri = serving_uri(client)
    explainer, body, expected = served.explainers[uri], served.images[4], served.expected[uri][4]
    target = expected.topk_classes[-1]  # the least likely class: never the predicted one
    want = explainer.explain(prepare_image(body, explainer.preprocessing).tensor[None], classes=target)
    want_map = np.frombuffer(quantize(want.saliency[0, 0]), np.uint8).reshape(want.saliency.shape[-2:])
    r = client.post("/explain", content=body, params={"class": str(target)}, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["pred_class"] == expected.pred_class != target  # the prediction is still answered
    assert (answer["saliency_class"], answer["saliency_label"]) == (target, str(target))
    np.testing.assert_allclose(answer["saliency_score"], float(want.scores[0, 0]), atol=1e-5)
    assert np.abs(saliency_of(answer).astype(int) - want_map.astype(int)).max() <= 1

    r = client.post("/explain", content=body, params={"class": str(target), "format": "png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert (r.headers["x-ptame-class"], r.headers["x-ptame-label"]) == (str(target), str(target))
    assert abs(float(r.headers["x-ptame-score"]) - float(want.scores[0, 0])) < 1e-5
    r = client.post("/explain", content=body, params={"format": "png"})
    assert r.headers["x-ptame-class"] == str(expected.pred_class)
    r = client.post("/explain", content=body, params={"class": "-1"})  # -1: the prediction, as everywhere
    assert r.status_code == 200 and r.json()["saliency_class"] == expected.pred_class, r.text

    for bad, why in (("4", "class 4 is out of range"), ("-2", "out of range"), ("zebra", "unknown class 'zebra'")):
        r = client.post("/explain", content=body, params={"class": bad})
        assert r.status_code == 400 and why in r.json()["error"], (bad, r.text)
    assert client.get("/healthz").status_code == 200


def test_model_health_and_docs(served, client) -> None:
    assert client.get("/healthz").status_code == 200
    info = client.get("/model").json()
    assert info["name"] == NAME and info["alias"] == "champion" and info["model"] == f"models:/{NAME}@champion"
    assert info["model_uri"] == f"models:/{NAME}/{info['version']}"
    assert info["metrics"]["AD_at_100"] == 10.0 + int(info["version"]) - 1
    assert info["description"] == f"head seed {int(info['version']) - 1}"
    docs = client.get("/docs")  # a page that renders offline: no script or stylesheet from a CDN
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=[\"']?(https?:)?//", docs.text, re.I), docs.text[:2000]
    assert "<script" not in docs.text.lower() and "cdn" not in docs.text.lower()
    assert "/explain" in docs.text and "curl -X POST --data-binary @image.jpg" in html.unescape(docs.text)
    assert f"'{served.url}/healthz'" in html.unescape(docs.text)
    spec = client.get("/openapi.json").json()
    assert set(spec["paths"]) >= {"/explain", "/healthz", "/model"}
    assert "multipart/form-data" in spec["paths"]["/explain"]["post"]["requestBody"]["content"]


def test_config_file_builds_and_unknown_models_are_refused(served) -> None:
    """deploy/serve.yaml is a valid Serve config whose args build the app; bad references fail early."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from ptame.serve import build_app, deploy

    config = yaml.safe_load((Path(__file__).parents[1] / "deploy" / "serve.yaml").read_text())
    app = ServeDeploySchema.model_validate(config).applications[0]
    assert app.import_path == "ptame.serve:build_app"
    assert build_app(app.args) is not None
    with pytest.raises(ValueError, match="unknown serve options"):
        build_app({**app.args, "max_batchsize": 4})
    with pytest.raises(ValueError, match="name the model"):
        build_app({})
    with pytest.raises(LookupError, match="not in the registry"):  # before Serve is asked anything
        deploy(replace(served.config, model=f"models:/{NAME}@nobody"), name="never")
    with pytest.raises(FileNotFoundError, match="neither"):
        deploy(replace(served.config, model="/nonexistent/explainer"), name="never")


def test_flags_and_config_file_args_make_one_frozen_config() -> None:
    """``ptame serve``'s flags and a Serve config file's ``args`` dict become the same ServeConfig."""
    from dataclasses import FrozenInstanceError

    from ptame.cli import build_parser
    from ptame.commands.serve import _config

    argv = ["serve", "--model", "models:/m@champion", "--replicas", "2", "--num-cpus", "2", "--max-batch-size", "4"]
    flags = _config(build_parser().parse_args([*argv, "--max-body-mb", "1", "--topk", "3", "--max-queued", "-1"]))
    args = {"model": "models:/m@champion", "replicas": 2, "num_cpus": 2, "max_batch_size": 4, "max_body_bytes": 2**20,
            "default_topk": 3, "max_queued_requests": -1, "revision": 7}  # fmt: skip
    from_file = ServeConfig.from_args(args)
    assert from_file.max_ongoing_requests == 8 == flags.ongoing_limit == from_file.ongoing_limit  # twice the batch
    assert flags == replace(from_file, max_ongoing_requests=None)
    assert (flags.settings.max_body_bytes, flags.batch.batch_wait_timeout_s, flags.device) == (2**20, 0.01, "cpu")
    with pytest.raises(FrozenInstanceError):
        flags.replicas = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="replicas must be >= 1"):
        ServeConfig.from_args({**args, "replicas": 0})
    with pytest.raises(TypeError, match="args must be a dict"):
        ServeConfig.from_args([("model", "m")])  # type: ignore[arg-type]
    assert Path(ServeConfig("rel/dir").located().model).is_absolute()
    assert ServeConfig("models:/m/1", tracking_uri="sqlite:///x.db").located().tracking_uri == f"sqlite:///{Path.cwd() / 'x.db'}"


# ------------------------------------------------------------------------------------- bad input


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` (a decompression bomb's calling card)."""
    png = encode(Image.new("L", (1, 1)), "PNG")
    ihdr = struct.pack(">II", width, height) + png[24:29]
    chunk = b"IHDR" + ihdr
    return png[:12] + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[33:]


def test_bad_bodies_get_4xx_with_a_reason(served, client) -> None:
    jpeg = served.images[1]
    assert jpeg.startswith(b"\xff\xd8")
    cases = {
        "empty": (400, dict(content=b"", headers={"content-type": "image/jpeg"}), "empty"),
        "text": (400, dict(content=b"hello, I am not an image", headers={"content-type": "text/plain"}), "format"),
        "truncated": (400, dict(content=jpeg[: len(jpeg) // 2], headers={"content-type": "image/jpeg"}), "truncated"),
        "oversized": (413, dict(content=b"\xff" * 2_100_000, headers={"content-type": "image/jpeg"}), "limit"),
        "oversized, chunked": (413, dict(content=iter([b"\xff" * 500_000] * 5)), "limit"),
        "bomb": (400, dict(content=png_claiming(30_000, 30_000)), "pixels"),
        "sliver": (400, dict(content=encode(Image.new("RGB", (400, 4)), "PNG")), "aspect ratio"),
        "no file field": (400, dict(files={"image": ("a.jpg", jpeg, "image/jpeg")}), "'file'"),
        "topk 0": (422, dict(content=jpeg, params={"topk": 0}), "topk"),
        "topk too large": (422, dict(content=jpeg, params={"topk": 99}), "topk"),
        "format": (422, dict(content=jpeg, params={"format": "gif"}), "format"),
    }
    for case, (status, request, reason) in cases.items():
        r = client.post("/explain", **request)
        assert r.status_code == status, f"{case}: {r.status_code} {r.text}"
        assert reason in r.json()["error"], f"{case}: {r.json()}"
    # a request cannot pick a model or a file: unknown parameters change nothing
    r = client.post("/explain", content=jpeg, params={"model": "models:/other/1", "path": "/etc/passwd"})
    assert r.status_code == 200 and r.json()["model_uri"] == serving_uri(client)
    # and the server still answers correctly
    r = client.post("/explain", content=served.images[2], params={"topk": 2})
    assert r.status_code == 200
    check_answer(r.json(), served.expected[serving_uri(client)][2], topk=2)


# ------------------------------------------------------------------------------------- load


def test_200_concurrent_requests_share_forward_passes(served, client) -> None:
    uri = serving_uri(client)
    before = client.get("/model").json()["replica"]

    def one(i: int) -> tuple[int, httpx.Response]:
        k = i % len(served.images)
        return k, client.post("/explain", content=served.images[k], params={"topk": 1 + i % 4})

    with ThreadPoolExecutor(16) as pool:  # a bounded client: 16 requests in flight
        results = list(pool.map(one, range(200)))
    for i, (k, r) in enumerate(results):
        assert r.status_code == 200, f"request {i}: {r.status_code} {r.text}"
        check_answer(r.json(), served.expected[uri][k], topk=1 + i % 4)
    after = client.get("/model").json()["replica"]
    images, passes = after["images"] - before["images"], after["forward_passes"] - before["forward_passes"]
    assert images == 200
    assert passes < images  # concurrent requests were batched together


def test_overload_is_answered_503_not_queued(served, client) -> None:
    """More requests at once than the replica takes (16) plus the proxy queues (16): 503 for the rest."""
    big = encode(decode_image(served.images[2]).resize((1900, 1900)), "JPEG")  # ~0.1 s of decoding each
    assert len(big) < served.config.settings.max_body_bytes

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=served.url, timeout=TIMEOUT, limits=limits) as c:
            return await asyncio.gather(*(c.post("/explain", content=big) for _ in range(160)))

    statuses = [r.status_code for r in asyncio.run(burst())]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) > 0 and statuses.count(200) >= 16
    r = client.post("/explain", content=served.images[3])  # and it recovers
    assert r.status_code == 200
    check_answer(r.json(), served.expected[serving_uri(client)][3], topk=4)


# ------------------------------------------------------------------------------------- versions


def test_moving_the_alias_and_redeploying_drops_no_request(served) -> None:
    from mlflow import MlflowClient

    from ptame.serve import deploy

    with httpx.Client(base_url=served.url, timeout=TIMEOUT) as c:
        assert serving_uri(c) == V1
    stop = threading.Event()
    answers: list[tuple[int, int, dict | str]] = []

    def fire(worker: int) -> None:
        with httpx.Client(base_url=served.url, timeout=TIMEOUT) as c:
            i = worker
            while not stop.is_set():
                k = i % len(served.images)
                r = c.post("/explain", content=served.images[k])
                answers.append((k, r.status_code, r.json() if r.status_code == 200 else r.text))
                i += 4

    threads = [threading.Thread(target=fire, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 120
        while len(answers) < 8 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(answers) >= 8, answers
        MlflowClient().set_registered_model_alias(NAME, "champion", "2")
        assert deploy(served.config)["model_uri"] == V2
        switched = len(answers)
        deadline = time.monotonic() + 120
        while len(answers) < switched + 12 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    failed = [(k, s, a) for k, s, a in answers if s != 200]
    assert not failed, failed[:3]
    uris = [a["model_uri"] for _, _, a in answers]
    assert uris[0] == V1 and set(uris) == {V1, V2}
    assert uris[-8:] == [V2] * 8
    for k, _, answer in answers:
        check_answer(answer, served.expected[answer["model_uri"]][k], topk=4)


@pytest.mark.slow
def test_cli_serves_reloads_on_sighup_and_stops_cleanly(served, tmp_path) -> None:
    """``ptame serve`` in its own process and Ray: after moving the alias, SIGHUP or a second
    ``ptame serve`` against that Ray switches versions; Ctrl-C stops it and frees the port."""
    from mlflow import MlflowClient

    client_ml = MlflowClient()
    client_ml.set_registered_model_alias(NAME, "cli", "1")
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    command = [sys.executable, "-m", "ptame.cli", "serve", "--model", f"models:/{NAME}@cli", "--port", str(port)]
    command += ["--tracking-uri", served.tracking_uri, "--max-batch-size", "4"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen([*command, "--address", "local"], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"

    def wait_for(uri: str) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/model", timeout=10).json().get("model_uri") == uri:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
        raise AssertionError(f"{uri} never served:\n" + (tmp_path / "serve.log").read_text()[-3000:])

    try:
        wait_for(V1)
        r = httpx.post(f"{url}/explain", content=served.images[0], timeout=TIMEOUT)
        check_answer(r.json(), served.expected[V1][0], topk=4)
        client_ml.set_registered_model_alias(NAME, "cli", "2")
        proc.send_signal(signal.SIGHUP)
        wait_for(V2)
        r = httpx.post(f"{url}/explain", content=served.images[0], timeout=TIMEOUT)
        check_answer(r.json(), served.expected[V2][0], topk=4)
        # a second `ptame serve` against the same Ray (the address the first one logged) only updates
        address = re.search(r"ptame serve --address (\S+)", (tmp_path / "serve.log").read_text())[1]
        client_ml.set_registered_model_alias(NAME, "cli", "1")
        second = subprocess.run([*command, "--address", address], capture_output=True, text=True, timeout=300, env=env)
        assert second.returncode == 0, second.stderr[-3000:]
        assert "keeps serving" in second.stderr
        wait_for(V1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=180) == 130  # the shell's code for Ctrl-C, after a clean stop
        assert "interrupted by SIGINT: stopped serving at" in (tmp_path / "serve.log").read_text()
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/healthz", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
