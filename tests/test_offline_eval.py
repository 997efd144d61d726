"""`omniseg eval --predictions`: saved predictions scored with the same evaluators as a model, the same
numbers to the last digit, and every missing, extra or malformed prediction refused naming the file."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from omniseg.api import load_model
from omniseg.cli import app
from omniseg.config import load_config
from omniseg.data.build import build_datasets
from omniseg.data.errors import DataError
from omniseg.engine.evaluate import evaluate
from omniseg.evaluation.offline import evaluate_predictions
from serving import tiny_weights

runner = CliRunner()


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


@pytest.fixture(scope="module")
def setup(synth_root, tmp_path_factory):
    """A tiny model, its evaluation on the synthetic val split, and its predictions of the val images."""
    folder = tmp_path_factory.mktemp("offline")
    weights = tiny_weights(folder / "m2f.safetensors")
    model, _, meta = load_model(weights)
    cfg = load_config("mask2former_demo", [f"data.val.root={synth_root}", "data.min_size_test=null"])
    dataset = build_datasets(cfg, splits=("val",))[0]["val"]
    expected = evaluate(model, dataset, cfg, meta, progress=False, bbox=True)
    out = folder / "pred"
    result = runner.invoke(app, ["predict", "-w", str(weights), "-i", str(synth_root / "val" / "images"),
                                 "-o", str(out), "--no-overlay"])
    assert result.exit_code == 0, result.output
    return {"cfg": cfg, "dataset": dataset, "meta": meta, "expected": expected, "pred": out, "root": synth_root}


def test_scoring_written_predictions_gives_the_model_evaluation_numbers(setup):
    scored = evaluate_predictions(setup["pred"], setup["dataset"], setup["meta"], bbox=True, progress=False)
    assert set(scored) == {"panoptic", "semantic", "instance"}
    assert _same(scored, setup["expected"]), (scored, setup["expected"])
    assert scored["instance"]["AP"] >= 0 and scored["instance"]["bbox_AP"] >= 0


def test_cli_scores_predictions_against_a_config_dataset(setup, tmp_path):
    result = runner.invoke(app, ["eval", "--predictions", str(setup["pred"]), "--dataset", "mask2former_demo",
                                 f"data.val.root={setup['root']}", "--task", "semantic", "--task", "panoptic",
                                 "-o", str(tmp_path / "metrics.json")])
    assert result.exit_code == 0, result.output
    scored = json.loads((tmp_path / "metrics.json").read_text())
    assert set(scored) == {"semantic", "panoptic"}
    assert _same(scored["semantic"], setup["expected"]["semantic"])
    assert _same(scored["panoptic"], setup["expected"]["panoptic"])
    for args, problem in [([], "either --weights"), (["--predictions", str(setup["pred"])], "needs --config"),
                          (["-w", "x", "--predictions", str(setup["pred"])], "either --weights")]:
        result = runner.invoke(app, ["eval", *args])
        assert result.exit_code == 2 and problem in result.output


def test_each_format_alone(setup, tmp_path):
    """A bare folder of label PNGs; a results JSON with the dataset's own image ids; box-only results."""
    dataset, meta = setup["dataset"], setup["meta"]
    semantic = evaluate_predictions(setup["pred"] / "semantic", dataset, meta, progress=False)
    assert set(semantic) == {"semantic"} and _same(semantic["semantic"], setup["expected"]["semantic"])
    # results keyed by the dataset's image ids (what --image-ids makes omniseg predict write)
    ids = {im["id"]: im["file_name"] for im in json.loads((setup["pred"] / "images.json").read_text())["images"]}
    dataset_id = {s["file_name"].rsplit("/", 1)[-1]: s["image_id"] for s in (dataset[i] for i in range(len(dataset)))}
    records = json.loads((setup["pred"] / "instances_results.json").read_text())
    for r in records:
        r["image_id"] = dataset_id[ids[r["image_id"]]]
    (tmp_path / "results.json").write_text(json.dumps(records))
    instance = evaluate_predictions(tmp_path / "results.json", dataset, meta, progress=False)
    assert _same(instance["instance"]["AP"], setup["expected"]["instance"]["AP"])
    boxes = [{k: v for k, v in r.items() if k != "segmentation"} for r in records]
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    boxed = evaluate_predictions(tmp_path / "boxes.json", dataset, meta, progress=False)["instance"]
    assert math.isnan(boxed["AP"]) and boxed["bbox_AP"] == setup["expected"]["instance"]["bbox_AP"]


def _copy(setup, tmp_path):
    target = tmp_path / "pred"
    shutil.copytree(setup["pred"], target)
    return target


def test_missing_extra_and_malformed_predictions_name_the_file(setup, tmp_path):
    dataset, meta = setup["dataset"], setup["meta"]
    pred = _copy(setup, tmp_path)
    first = sorted((pred / "semantic").iterdir())[0]
    first.unlink()
    with pytest.raises(DataError, match=rf"{first.name}: missing: the semantic prediction"):
        evaluate_predictions(pred, dataset, meta, tasks=["semantic"], progress=False)

    pred = _copy(setup, tmp_path / "b")
    shutil.copy(sorted((pred / "semantic").iterdir())[0], pred / "semantic" / "stray.png")
    with pytest.raises(DataError, match=r"stray\.png: predicts no image of the dataset"):
        evaluate_predictions(pred, dataset, meta, tasks=["semantic"], progress=False)

    pred = _copy(setup, tmp_path / "c")
    victim = sorted((pred / "semantic").iterdir())[0]
    Image.fromarray(np.full((10, 12), 1, np.uint8)).save(victim)
    with pytest.raises(DataError, match=rf"{victim.name}: is 12x10 \(WxH\) but its image is 64x64"):
        evaluate_predictions(pred, dataset, meta, tasks=["semantic"], progress=False)
    Image.fromarray(np.full((64, 64), 77, np.uint8)).save(victim)
    with pytest.raises(DataError, match=rf"{victim.name}: holds values \[77\]"):
        evaluate_predictions(pred, dataset, meta, tasks=["semantic"], progress=False)

    pred = _copy(setup, tmp_path / "d")
    panoptic = json.loads((pred / "panoptic.json").read_text())
    annotated = next(a for a in panoptic["annotations"] if a["segments_info"])
    annotated["segments_info"][0]["category_id"] = 999
    (pred / "panoptic.json").write_text(json.dumps(panoptic))
    with pytest.raises(DataError, match=r"panoptic\.json: .*category_id 999"):
        evaluate_predictions(pred, dataset, meta, tasks=["panoptic"], progress=False)

    pred = _copy(setup, tmp_path / "e")
    records = json.loads((pred / "instances_results.json").read_text())
    records.append({**records[0], "image_id": 4242})
    (pred / "instances_results.json").write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"instances_results\.json: results for image_id 4242"):
        evaluate_predictions(pred, dataset, meta, tasks=["instance"], progress=False)
    (pred / "instances_results.json").write_text("[{]")
    with pytest.raises(DataError, match=r"instances_results\.json: prediction JSON is not valid JSON"):
        evaluate_predictions(pred, dataset, meta, tasks=["instance"], progress=False)
    with pytest.raises(DataError, match="no such prediction file"):
        evaluate_predictions(tmp_path / "nothing", dataset, meta, progress=False)


def test_model_evaluation_reports_box_ap_on_request(setup):
    assert "bbox_AP" in setup["expected"]["instance"]
    model, _, meta = load_model(setup["pred"].parent / "m2f.safetensors")
    plain = evaluate(model, setup["dataset"], setup["cfg"], meta, tasks=["instance"], progress=False)
    assert "bbox_AP" not in plain["instance"] and plain["instance"]["AP"] == setup["expected"]["instance"]["AP"]
