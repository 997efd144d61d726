"""`omniseg serve`'s API in-process: every endpoint, every task, every error path, answers equal to the
Predictor's for the same image, and the batching queue."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

pytest.importorskip("fastapi", reason="omniseg[serve] is not installed")
from fastapi.testclient import TestClient  # noqa: E402

from omniseg.api import Predictor  # noqa: E402
from omniseg.data.formats import files  # noqa: E402
from omniseg.outputs import rgb_to_id, semantic_to_dataset_ids  # noqa: E402
from omniseg.serve.app import create_app  # noqa: E402
from omniseg.serve.batching import BatchQueue  # noqa: E402
from serving import tiny_weights  # noqa: E402


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(b64: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(b64))))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    return {"mask2former": tiny_weights(folder / "m2f.safetensors"),
            "pspnet": tiny_weights(folder / "psp.safetensors", "pspnet_demo")}


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 255, (72, 88, 3), dtype=np.uint8)
    picture[10:40, 20:60] = (220, 30, 30)
    return picture


@pytest.fixture(scope="module")
def m2f(weights):
    predictor = Predictor(weights["mask2former"], device="cpu")
    with TestClient(create_app(predictor, name="m2f", max_batch=4, max_upload_bytes=200_000, max_wait_s=0.05)) as client:
        yield client, predictor


def test_health_model_and_openapi(m2f):
    client, predictor = m2f
    assert client.get("/healthz").json() == {"status": "ok", "model": "MaskFormer (mask2former)"}
    info = client.get("/v1/model").json()
    assert info["tasks"] == ["semantic", "instance", "panoptic"] and info["layers"] is True
    assert [c["name"] for c in info["classes"]] == predictor.meta.classes
    assert [c["category_id"] for c in info["classes"]] == predictor.meta.dataset_ids
    assert info["classes"][0]["color"] == list(predictor.meta.colors[0])
    assert info["limits"]["max_upload_bytes"] == 200_000 and info["limits"]["max_batch"] == 4
    schema = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/model", "/v1/layers", "/healthz"} <= set(schema["paths"])
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text and "cdn" not in page.text.lower()
    assert client.get("/static/app.js").status_code == 200


def test_predict_equals_the_predictor_for_every_task(m2f, image):
    client, predictor = m2f
    expected = predictor.predict_batch([torch.from_numpy(image).permute(2, 0, 1).contiguous()])[0]
    meta = predictor.meta
    answer = client.post("/v1/predict?tasks=semantic,instance,panoptic&view=true",
                         files={"image": ("x.png", png(image), "image/png")}).json()
    assert answer["tasks"] == ["semantic", "instance", "panoptic"] and (answer["height"], answer["width"]) == (72, 88)
    # semantic: a label PNG of dataset ids
    assert np.array_equal(decode_png(answer["semantic"]["png"]), semantic_to_dataset_ids(expected["semantic"], meta))
    # panoptic: the COCO PNG and segments_info, dataset category ids
    ids = rgb_to_id(decode_png(answer["panoptic"]["png"]))
    assert np.array_equal(ids, expected["panoptic"]["segment_map"].numpy())
    infos = {s["id"]: s for s in answer["panoptic"]["segments_info"]}
    for s in expected["panoptic"]["segments_info"]:
        assert infos[s["id"]]["category_id"] == meta.to_dataset_id(s["category"])
        assert infos[s["id"]]["area"] == int((expected["panoptic"]["segment_map"] == s["id"]).sum())
    # instances: COCO RLE, scores, dataset category ids
    inst = expected["instances"]
    assert len(answer["instances"]) == len(inst["scores"]) > 0
    for record, mask, label, score in zip(answer["instances"], inst["masks"], inst["labels"], inst["scores"]):
        assert np.array_equal(mask_utils.decode(record["segmentation"]).astype(bool), mask.numpy())
        assert record["category_id"] == meta.to_dataset_id(int(label)) and record["score"] == pytest.approx(float(score))
    # the page's view: id maps that decode to the same segments
    view = answer["view"]
    assert view["display"] == {"width": 88, "height": 72}
    semantic_view = rgb_to_id(decode_png(view["semantic"]["png"]))
    assert np.array_equal(semantic_view, expected["semantic"].numpy() + 1)
    assert {s["class"] for s in view["semantic"]["segments"]} == set(expected["semantic"].unique().tolist())
    assert np.array_equal(rgb_to_id(decode_png(view["panoptic"]["png"])), ids)
    shown = [s for s in view["instances"]["segments"]]
    assert all(s["score"] >= 0.5 for s in shown) and shown == sorted(shown, key=lambda s: -s["score"])


def test_raw_body_rle_and_one_task(m2f, image):
    client, predictor = m2f
    expected = predictor.predict_batch([torch.from_numpy(image).permute(2, 0, 1).contiguous()], tasks=["semantic"])[0]
    answer = client.post("/v1/predict?tasks=semantic&semantic_format=rle", content=png(image),
                         headers={"content-type": "application/octet-stream"}).json()
    assert set(answer) == {"tasks", "width", "height", "semantic"}
    labels = np.full((72, 88), -1)
    for segment in answer["semantic"]["segments"]:
        cls = predictor.meta.to_contiguous(segment["category_id"])
        labels[mask_utils.decode(segment["segmentation"]).astype(bool)] = cls
    assert np.array_equal(labels, expected["semantic"].numpy())
    repeated = client.post("/v1/predict?tasks=semantic&tasks=panoptic", content=png(image)).json()
    assert repeated["tasks"] == ["semantic", "panoptic"]


@pytest.mark.parametrize("request_kwargs, status, problem", [
    (dict(files={"image": ("a.txt", b"not an image at all", "text/plain")}), 400, "a.txt: cannot read image"),
    (dict(content=b""), 400, "upload: empty"),
    (dict(content=png(np.zeros((30, 30, 3), np.uint8))[:60]), 400, "truncated"),
    (dict(content=b"x" * 250_000), 413, "above the 200000-byte limit"),
    (dict(files={"file": ("x.png", png(np.zeros((8, 8, 3), np.uint8)), "image/png")}), 400, "field named 'image'"),
    (dict(content=b"--xx\r\ngarbage", headers={"content-type": "multipart/form-data; boundary=xx"}), 400, "multipart"),
])
def test_bad_uploads_get_a_4xx_naming_the_problem(m2f, request_kwargs, status, problem):
    client, _ = m2f
    response = client.post("/v1/predict", **request_kwargs)
    assert response.status_code == status and problem in response.json()["error"], response.text
    assert client.get("/healthz").status_code == 200  # the server keeps answering


def test_bad_parameters_and_pixel_limit(m2f, image, monkeypatch):
    client, _ = m2f
    body = png(image)
    for query, status, problem in [("tasks=depth", 400, "unknown task"), ("semantic_format=jpeg", 400, "png, rle"),
                                   ("score_threshold=high", 422, "score_threshold"), ("score_threshold=2", 422, "")]:
        response = client.post(f"/v1/predict?{query}", content=body)
        assert response.status_code == status and problem in response.json()["error"], (query, response.text)
    monkeypatch.setattr(files, "MAX_IMAGE_PIXELS", 72 * 88 - 1)
    response = client.post("/v1/predict", content=body)
    assert response.status_code == 413 and "pixels, above the 6335-pixel limit" in response.json()["error"]
    assert client.get("/v1/nothing").status_code == 404 and "error" in client.get("/v1/nothing").json()


def test_layers_of_a_query_model(m2f, image):
    client, predictor = m2f
    answer = client.post("/v1/layers?max_queries=2", content=png(image)).json()
    assert answer["sets"] == predictor.model.settings.dec_layers + 1
    assert 1 <= len(answer["queries"]) <= 2 and (answer["height"], answer["width"]) == (72, 88)
    for row in answer["queries"]:
        assert len(row["masks"]) == answer["sets"] and row["name"] in predictor.meta.classes
        mask = decode_png(row["masks"][-1])
        assert mask.shape == (72, 88) and set(np.unique(mask)) <= {0, 255}


def test_a_semantic_model_refuses_other_tasks_and_layers(weights, image):
    predictor = Predictor(weights["pspnet"], device="cpu")
    with TestClient(create_app(predictor)) as client:
        info = client.get("/v1/model").json()
        assert info["tasks"] == ["semantic"] and info["layers"] is False
        answer = client.post("/v1/predict", content=png(image)).json()
        expected = predictor.predict_batch([torch.from_numpy(image).permute(2, 0, 1).contiguous()])[0]
        assert np.array_equal(decode_png(answer["semantic"]["png"]),
                              semantic_to_dataset_ids(expected["semantic"], predictor.meta))
        response = client.post("/v1/predict?tasks=panoptic", content=png(image))
        assert response.status_code == 400 and "predicts semantic, not panoptic" in response.json()["error"]
        response = client.post("/v1/layers", content=png(image))
        assert response.status_code == 400 and "no query decoder" in response.json()["error"]


def test_concurrent_requests_are_batched(m2f, image):
    client, predictor = m2f
    before = client.get("/v1/stats").json()
    body = png(image)

    async def burst():
        import httpx

        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as c:
            return await asyncio.gather(*(c.post("/v1/predict?tasks=semantic", content=body) for _ in range(8)))

    answers = client.portal.call(burst)
    assert all(a.status_code == 200 for a in answers)
    first = answers[0].json()["semantic"]["png"]
    assert all(a.json()["semantic"]["png"] == first for a in answers)
    after = client.get("/v1/stats").json()
    assert after["requests"] == before["requests"] + 8
    new = {int(k): v - before["forward_passes_by_batch_size"].get(k, 0)
           for k, v in after["forward_passes_by_batch_size"].items()}
    assert sum(k * v for k, v in new.items()) == 8 and max(k for k, v in new.items() if v) > 1


def test_batch_queue_groups_by_key_and_passes_errors_on():
    calls = []

    def run(payloads):
        calls.append(list(payloads))
        if "boom" in payloads:
            raise ValueError("boom")
        return [p * 2 for p in payloads]

    async def main():
        queue = BatchQueue(run, max_batch=3, max_wait_s=0.05)
        queue.start()
        try:
            jobs = [queue.submit("a", 1), queue.submit("b", 10), queue.submit("a", 2), queue.submit("a", 3),
                    queue.submit("c", "boom")]
            return await asyncio.gather(*jobs, return_exceptions=True), queue.group_sizes
        finally:
            await queue.stop()

    results, sizes = asyncio.run(main())
    assert results[:4] == [2, 20, 4, 6] and isinstance(results[4], ValueError)
    assert [1, 2] in calls and [10] in calls and sum(len(c) for c in calls) == 5
    assert all(len(c) <= 3 for c in calls) and sum(sizes.values()) == len(calls)
    with pytest.raises(ValueError, match="max_batch"):
        BatchQueue(run, max_batch=0)


@pytest.mark.parametrize("preset", ["oneformer_demo", "segvit_shrunk_demo", "maskrcnn_demo", "blendmask_panoptic_demo"])
def test_every_family_serves_its_declared_tasks(preset, synth_root, tmp_path, image):
    """One preset per family beyond the two above: every task it declares answers as the Predictor does."""
    from omniseg.config import to_yaml
    from omniseg.data.build import build_datasets
    from omniseg.engine.checkpoint import save_weights
    from omniseg.models.registry import build_model_from_config
    from tiny_presets import tiny_config

    cfg = tiny_config(preset, synth_root, tmp_path / "run")
    _, meta = build_datasets(cfg, splits=("val",))
    torch.manual_seed(0)
    path = tmp_path / "w.safetensors"
    save_weights(path, build_model_from_config(cfg, meta), config_yaml=to_yaml(cfg), meta=meta.to_dict())
    predictor = Predictor(path, device="cpu")
    with TestClient(create_app(predictor)) as client:
        info = client.get("/v1/model").json()
        assert info["tasks"] == list(predictor.model.tasks)
        for task in predictor.model.tasks:
            expected = predictor.predict_batch([torch.from_numpy(image).permute(2, 0, 1).contiguous()], tasks=[task])[0]
            answer = client.post(f"/v1/predict?tasks={task}&view=true", content=png(image)).json()
            key = "instances" if task == "instance" else task
            assert key in answer and key in answer["view"], answer.get("error")
            if task == "semantic":
                assert np.array_equal(decode_png(answer["semantic"]["png"]),
                                      semantic_to_dataset_ids(expected["semantic"], meta))
            elif task == "panoptic":
                assert np.array_equal(rgb_to_id(decode_png(answer["panoptic"]["png"])),
                                      expected["panoptic"]["segment_map"].numpy())
            else:
                assert len(answer["instances"]) == len(expected["instances"]["scores"])


def test_large_images_are_shown_downscaled_and_computed_at_full_size(weights):
    predictor = Predictor(weights["pspnet"], device="cpu")
    wide = np.random.default_rng(3).integers(0, 255, (64, 320, 3), dtype=np.uint8)
    with TestClient(create_app(predictor, view_max_side=80)) as client:
        answer = client.post("/v1/predict?view=true", content=png(wide)).json()
    assert (answer["height"], answer["width"]) == (64, 320)
    assert decode_png(answer["semantic"]["png"]).shape == (64, 320)  # the result: full size
    assert answer["view"]["display"] == {"width": 80, "height": 16}  # the picture: downscaled
    assert decode_png(answer["view"]["semantic"]["png"]).shape[:2] == (16, 80)
    areas = sum(s["area"] for s in answer["view"]["semantic"]["segments"])
    assert areas == 64 * 320  # areas are counted at full resolution


def test_cli_serve_refuses_a_missing_weights_file(tmp_path):
    from typer.testing import CliRunner

    from omniseg.cli import app

    result = CliRunner().invoke(app, ["serve", "-w", str(tmp_path / "nope.safetensors")])
    assert result.exit_code == 2 and "nope.safetensors" in result.output
    result = CliRunner().invoke(app, ["serve", "-w", str(tmp_path / "nope.safetensors"), "--max-batch", "0"])
    assert result.exit_code == 2 and "--max-batch" in result.output
