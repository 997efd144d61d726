"""`omniseg predict` over folders: workers and batches give the same files, interrupted runs restart with
--skip-existing without redoing finished images, unreadable images are reported and the rest goes on."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from omniseg.cli import app
from serving import tiny_weights

runner = CliRunner()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_weights(tmp_path_factory.mktemp("predict") / "m2f.safetensors")


def _folder(path, count: int, size=(64, 80)):
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path / f"img{i:02d}.png")
    return path


def _predict(weights, images, out, *extra):
    result = runner.invoke(app, ["predict", "-w", str(weights), "-i", str(images), "-o", str(out), "--no-overlay",
                                 *extra])
    return result


def _files(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_workers_and_batches_write_the_same_files(weights, tmp_path):
    images = _folder(tmp_path / "images", 5)
    one = _predict(weights, images, tmp_path / "one", "--num-workers", "0", "--batch-size", "1")
    many = _predict(weights, images, tmp_path / "many", "--num-workers", "2", "--batch-size", "3")
    assert one.exit_code == 0 and many.exit_code == 0, (one.output, many.output)
    a, b = _files(tmp_path / "one"), _files(tmp_path / "many")
    assert a.keys() == b.keys() and len([k for k in a if k.startswith("records/")]) == 5
    pngs = [k for k in a if k.endswith(".png")]
    assert pngs and all(a[k] == b[k] for k in pngs)  # label and panoptic PNGs: identical
    images_json = json.loads(a["images.json"])["images"]
    assert [im["file_name"] for im in images_json] == [f"img{i:02d}.png" for i in range(5)]
    assert [im["id"] for im in images_json] == list(range(5))
    pan = json.loads(a["panoptic.json"])
    assert [ann["file_name"] for ann in pan["annotations"]] == [f"img{i:02d}.png" for i in range(5)]
    assert "categories" in pan and isinstance(json.loads(a["instances_results.json"]), list)


def test_skip_existing_restarts_where_it_stopped(weights, tmp_path):
    images = _folder(tmp_path / "images", 4)
    out = tmp_path / "out"
    assert _predict(weights, images, out).exit_code == 0
    reference = _files(out)
    # An interrupted run: the last image's record never got written; a new image arrived meanwhile.
    (out / "records" / "img03.json").unlink()
    shutil.copy(images / "img00.png", images / "img04.png")
    before = {p.name: p.stat().st_mtime_ns for p in (out / "semantic").glob("*.png")}
    result = _predict(weights, images, out, "--skip-existing")
    assert result.exit_code == 0, result.output
    assert "2 image(s) predicted, 3 already done" in result.output
    after = {p.name: p.stat().st_mtime_ns for p in (out / "semantic").glob("*.png")}
    assert all(after[n] == before[n] for n in ("img00.png", "img01.png", "img02.png"))  # not redone
    files = _files(out)
    for key in reference:  # the restarted folder is the one an uninterrupted run writes, plus the new image
        assert files[key] == reference[key] or key.endswith(".json"), key
    assert files["semantic/img04.png"] == files["semantic/img00.png"]
    assert len(json.loads(files["panoptic.json"])["annotations"]) == 5


def test_unreadable_images_are_reported_and_the_rest_is_predicted(weights, tmp_path):
    images = _folder(tmp_path / "images", 3)
    (images / "img01.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out"
    result = _predict(weights, images, out, "--num-workers", "2")
    assert result.exit_code == 2 and "img01.png" in result.output
    assert "img01.png" in (out / "failed.txt").read_text()
    assert sorted(p.name for p in (out / "records").iterdir()) == ["img00.json", "img02.json"]
    assert len(json.loads((out / "images.json").read_text())["images"]) == 2


def test_names_that_would_collide_are_refused(weights, tmp_path):
    images = _folder(tmp_path / "images", 1)
    Image.open(images / "img00.png").save(images / "img00.jpg")
    result = _predict(weights, images, tmp_path / "out")
    assert result.exit_code == 2 and "same name stem" in result.output
    assert not os.path.exists(tmp_path / "out")
