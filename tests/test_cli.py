"""The command line end to end: train -> eval -> predict, with the files users feed to other tools."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import TINY_MODEL  # noqa: E402
from omniseg.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    args = ["train", "mask2former_demo", *TINY_MODEL, f"data.train.root={synth_root}", f"data.val.root={synth_root}",
            "data.crop_size=64", "data.batch_size=2", "data.num_workers=0", "train.max_iters=3",
            "train.eval_period=3", f"train.output_dir={out}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def test_models_lists_presets():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    for name in ("mask2former_r50", "mask2former_swin_t", "maskformer_r50", "mask2former_demo",
                 "mp_former_r50", "mp_former_swin_t", "mp_former_demo", "oneformer_r50", "oneformer_swin_t",
                 "oneformer_demo", "pspnet_r50", "danet_r50", "fastfcn_jpu_r50", "gscnn_r50", "pspnet_demo",
                 "danet_demo", "fastfcn_jpu_demo", "gscnn_demo", "camvid_best"):
        assert name in result.output
    assert "dilated, output stride 8" in result.output and "JPU neck" in result.output


def test_train_writes_checkpoint_config_and_metrics(trained):
    assert (trained / "model_final.safetensors").is_file()
    assert (trained / "config.yaml").is_file()
    final = json.loads((trained / "final_metrics.json").read_text())
    assert {"PQ", "mIoU", "AP"} <= set(final["metrics"])


def test_eval_prints_all_metrics(trained, tmp_path):
    out = tmp_path / "metrics.json"
    result = runner.invoke(app, ["eval", "--weights", str(trained / "model_final.safetensors"), "--output", str(out),
                                 "--max-images", "3"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert {"PQ", "SQ", "RQ"} <= set(metrics["panoptic"]) and "mIoU" in metrics["semantic"] and "AP" in metrics["instance"]


def test_eval_consistency_reports_per_layer_metrics_and_figure(trained, tmp_path):
    out, fig = tmp_path / "metrics.json", tmp_path / "layers.png"
    result = runner.invoke(app, ["eval", "--weights", str(trained / "model_final.safetensors"), "--output", str(out),
                                 "--max-images", "2", "--task", "semantic", "--consistency", "--figure", str(fig)])
    assert result.exit_code == 0, result.output
    consistency = json.loads(out.read_text())["consistency"]
    assert consistency["images"] == 2 and consistency["objects"] > 0
    # Util and mIoU-Li compare sets 0..2 with a later set; mIoU-Li-gt covers the 4 sets
    assert len(consistency["Util"]) == 3 and len(consistency["mIoU-Li"]) == 3 and len(consistency["mIoU-Li-gt"]) == 4
    assert all(0.0 <= v <= 100.0 for v in consistency["mIoU-Li"] + consistency["Util"])
    assert Image.open(fig).size[0] > 200


def test_predict_writes_standard_formats(trained, synth_root, tmp_path):
    from pycocotools.coco import COCO

    from omniseg.outputs import rgb_to_id

    images = synth_root / "val" / "images"
    out = tmp_path / "pred"
    result = runner.invoke(app, ["predict", "--weights", str(trained / "model_final.safetensors"),
                                 "--input", str(images), "--output", str(out),
                                 "--image-ids", str(synth_root / "annotations" / "instances_val.json")])
    assert result.exit_code == 0, result.output
    names = sorted(p.stem for p in images.glob("*.png"))
    # semantic: one PNG per image, same name, values are the dataset's category ids (or 255)
    meta = json.loads((synth_root / "annotations" / "panoptic_val.json").read_text())
    dataset_ids = {c["id"] for c in meta["categories"]} | {255}
    for n in names:
        sem = np.array(Image.open(out / "semantic" / f"{n}.png"))
        assert sem.shape == (64, 64) and set(np.unique(sem).tolist()) <= dataset_ids
    # panoptic: COCO panoptic JSON whose segments are exactly the ids in each PNG
    pan = json.loads((out / "panoptic.json").read_text())
    assert len(pan["annotations"]) == len(names)
    for ann in pan["annotations"]:
        ids = set(np.unique(rgb_to_id(np.array(Image.open(out / "panoptic" / ann["file_name"]))))) - {0}
        assert ids == {s["id"] for s in ann["segments_info"]}
        assert all(s["category_id"] in dataset_ids for s in ann["segments_info"])
    # instances: a COCO results file pycocotools accepts
    results = json.loads((out / "instances_results.json").read_text())
    if results:
        gt = COCO(str(synth_root / "annotations" / "instances_val.json"))
        gt.loadRes(str(out / "instances_results.json"))
    assert len(list((out / "overlay").glob("*_panoptic.png"))) == len(names)


def test_predict_fast_postprocessing_writes_the_same_panoptic_pngs(trained, synth_root, tmp_path):
    images = synth_root / "val" / "images"
    maps = {}
    for flag in ([], ["--fast"]):
        out = tmp_path / ("fast" if flag else "official")
        result = runner.invoke(app, ["predict", "--weights", str(trained / "model_final.safetensors"), "--input",
                                     str(images), "--output", str(out), "--task", "panoptic", "--no-overlay", *flag])
        assert result.exit_code == 0, result.output
        maps[bool(flag)] = {p.name: np.array(Image.open(p)) for p in sorted((out / "panoptic").glob("*.png"))}
    assert maps[True].keys() == maps[False].keys() and maps[True]
    agree = np.mean([(maps[True][k] == maps[False][k]).all(-1).mean() for k in maps[True]])
    assert agree > 0.999  # identical decisions; only pixels within float rounding of a tie may differ


def test_predict_reports_bad_inputs(trained, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    result = runner.invoke(app, ["predict", "--weights", str(trained / "model_final.safetensors"),
                                 "--input", str(bad), "--output", str(tmp_path / "o")])
    assert result.exit_code != 0
    assert "broken.png" in str(result.exception) or "broken.png" in result.output
    result = runner.invoke(app, ["predict", "--weights", str(trained / "model_final.safetensors"),
                                 "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o")])
    assert result.exit_code == 2 and "missing" in result.output


def test_data_synth_and_check(tmp_path):
    result = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "s"), "--num-train", "4", "--num-val", "2",
                                 "--image-size", "64"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["data", "check", "mask2former_demo", f"data.train.root={tmp_path / 's'}"])
    assert result.exit_code == 0, result.output
    for name in ("circle", "square", "triangle", "cross", "stripes", "dots"):
        assert name in result.output


def test_train_continual_needs_steps():
    result = runner.invoke(app, ["train-continual", "segvit_demo"])
    assert result.exit_code == 2
    assert "model.continual.steps" in result.output
