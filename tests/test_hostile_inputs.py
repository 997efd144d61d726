"""A corpus of broken and hostile files: each is read correctly or refused with a DataError naming it.

Nothing may crash with an unrelated traceback, allocate memory a header merely claims, or be
silently dropped; `data.skip_bad_samples` reports every skip and counts them.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from omniseg.data.formats import files as formats  # the shared readers and their limits
from omniseg.data.errors import DataError
from omniseg.data.formats import CocoInstanceDataset, CocoPanopticDataset, SemanticFolderDataset, load_rgb_image
from omniseg.data.formats.coco_panoptic import id_to_rgb


def _png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming width x height 8-bit RGB, with a tiny IDAT and IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("name,content,problem", [
    ("empty.jpg", b"", "cannot read image"),
    ("text.png", b"hello, I am not an image\n" * 10, "cannot read image"),
    ("html.jpg", b"<html><body>404 Not Found</body></html>", "cannot read image"),
])
def test_unreadable_images_name_the_file(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"{name}: {problem}"):
        load_rgb_image(path)


def test_truncated_jpeg_and_png_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    for ext in ("jpeg", "png"):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=ext.upper())
        path = tmp_path / f"cut.{ext}"
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        with pytest.raises(DataError, match=rf"cut\.{ext}: cannot read image \(corrupt, truncated"):
            load_rgb_image(path)


def test_decompression_bombs_are_refused_before_decoding(tmp_path):
    # 10^10 pixels claimed by a 70-byte file: PIL's own hard limit trips while opening.
    huge = tmp_path / "bomb_huge.png"
    huge.write_bytes(_png_header_only(100_000, 100_000))
    with pytest.raises(DataError, match=r"bomb_huge\.png: .*decompression bomb"):
        load_rgb_image(huge)
    # 10^8 pixels (between PIL's warning and error thresholds): omniseg's own limit trips.
    mid = tmp_path / "bomb_mid.png"
    mid.write_bytes(_png_header_only(10_000, 10_000))
    with pytest.raises(DataError, match=r"bomb_mid\.png: image claims 10000x10000 = 100000000 pixels.*"
                                        r"OMNISEG_MAX_IMAGE_PIXELS"):
        load_rgb_image(mid)
    with pytest.raises(DataError, match=r"bomb_mid\.png: label PNG claims 10000x10000"):
        formats.load_png_array(mid)


def test_pixel_limit_is_configurable(tmp_path, monkeypatch):
    path = tmp_path / "small.png"
    path.write_bytes(_png_bytes(np.zeros((20, 30, 3), np.uint8)))
    monkeypatch.setattr(formats, "MAX_IMAGE_PIXELS", 599)
    with pytest.raises(DataError, match="600 pixels, above the 599-pixel limit"):
        load_rgb_image(path)
    monkeypatch.setattr(formats, "MAX_IMAGE_PIXELS", 600)
    assert load_rgb_image(path).shape == (3, 20, 30)


def test_every_image_mode_becomes_uint8_rgb(tmp_path):
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3) * 3
    cases = {}
    cases["rgba.png"] = (np.dstack([rgb, np.full((4, 5), 7, np.uint8)]), "RGBA", rgb)  # alpha dropped
    grey = np.arange(20, dtype=np.uint8).reshape(4, 5) * 10
    cases["grey.png"] = (grey, "L", np.repeat(grey[..., None], 3, axis=2))
    for name, (arr, mode, expected) in cases.items():
        Image.fromarray(arr, mode=mode).save(tmp_path / name)
        out = load_rgb_image(tmp_path / name)
        assert out.dtype == torch.uint8 and out.shape == (3, 4, 5), name
        assert np.array_equal(out.permute(1, 2, 0).numpy(), expected), name
    # 16-bit greyscale is rescaled to 0..255 (not clipped to white).
    grey16 = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    out = load_rgb_image(tmp_path / "grey16.png")
    assert out[0].tolist() == [[0, 1, 128, 255]] and torch.equal(out[0], out[2])
    # Palette images are expanded through their palette.
    pal = Image.fromarray(np.array([[0, 1], [1, 2]], np.uint8), mode="P")
    pal.putpalette([10, 20, 30, 200, 100, 0, 5, 5, 250] + [0] * (256 * 3 - 9))
    pal.save(tmp_path / "pal.png")
    out = load_rgb_image(tmp_path / "pal.png")
    assert out[:, 0, 0].tolist() == [10, 20, 30] and out[:, 1, 1].tolist() == [5, 5, 250]
    # CMYK JPEG.
    Image.new("CMYK", (6, 3), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    out = load_rgb_image(tmp_path / "cmyk.jpg")
    assert out.shape == (3, 3, 6) and int(out.min()) >= 250  # no ink = white


# --------------------------------------------------------------------------- label maps


def _semantic(tmp_path: Path, label_bytes: bytes, image_hw=(4, 5)) -> SemanticFolderDataset:
    (tmp_path / "img").mkdir(parents=True, exist_ok=True)
    (tmp_path / "lbl").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((*image_hw, 3), np.uint8)).save(tmp_path / "img" / "s.png")
    (tmp_path / "lbl" / "s.png").write_bytes(label_bytes)
    return SemanticFolderDataset(tmp_path / "img", tmp_path / "lbl", classes=["a", "b", "c"])


def test_palette_label_png_gives_its_indices(tmp_path):
    lbl = Image.fromarray(np.array([[0, 1, 2, 255, 0]] * 4, np.uint8), mode="P")
    lbl.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [255] * (256 * 3 - 9))
    buf = io.BytesIO()
    lbl.save(buf, format="PNG")
    assert _semantic(tmp_path, buf.getvalue())[0]["sem_seg"][0].tolist() == [0, 1, 2, 255, 0]


def test_16bit_label_png_in_range_loads_and_out_of_range_is_named(tmp_path):
    ok = np.array([[0, 1, 2, 255, 0]] * 4, np.uint16)
    assert _semantic(tmp_path / "ok", _png_bytes(ok))[0]["sem_seg"][0].tolist() == [0, 1, 2, 255, 0]
    bad = ok.copy()
    bad[0, 0] = 300
    with pytest.raises(DataError, match=r"lbl/s\.png: label values \[300\]"):
        _semantic(tmp_path / "bad", _png_bytes(bad))[0]


def test_rgba_label_png_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"s\.png: label PNG must be single-channel"):
        _semantic(tmp_path, _png_bytes(np.zeros((4, 5, 4), np.uint8)))[0]


def test_truncated_and_zero_byte_label_pngs(tmp_path):
    full = _png_bytes(np.random.default_rng(1).integers(0, 3, (64, 64), dtype=np.uint8))
    with pytest.raises(DataError, match=r"lbl/s\.png: cannot read label PNG"):
        _semantic(tmp_path / "cut", full[: len(full) // 2], image_hw=(64, 64))[0]
    with pytest.raises(DataError, match=r"lbl/s\.png: cannot read label PNG"):
        _semantic(tmp_path / "empty", b"")[0]


# --------------------------------------------------------------------------- JSON


def _panoptic_files(tmp_path: Path, data: object) -> tuple[Path, Path, Path]:
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "pan").mkdir(exist_ok=True)
    path = tmp_path / "pan.json"
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else json.dumps(data))
    return tmp_path / "images", path, tmp_path / "pan"


CATS = [{"id": 5, "name": "cat", "isthing": 1}]


@pytest.mark.parametrize("data,problem", [
    ([1, 2, 3], "panoptic JSON must hold a JSON object at the top level, got list"),
    ({"annotations": [], "categories": "cat"}, "malformed panoptic JSON"),
    ({"annotations": "none", "categories": CATS}, "malformed panoptic JSON"),
    ({"annotations": [{"file_name": "a.png"}], "categories": CATS}, "malformed panoptic JSON: KeyError: 'image_id'"),
    ({"annotations": [], "categories": [{"name": "no id"}]}, "malformed panoptic JSON: KeyError: 'id'"),
    ({"annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": [{"id": 1, "category_id": [5]}]}],
      "categories": CATS}, "malformed panoptic JSON: TypeError"),
    ({"annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": [{"id": "x", "category_id": 5}]}],
      "categories": CATS}, "malformed panoptic JSON: ValueError"),
    ("[" * 100_000 + "]" * 100_000, "panoptic JSON is nested too deeply"),
    (b'{"annotations": [], "categories": [], "x": "\xff\xfe"}', "panoptic JSON is not valid JSON"),
])
def test_malformed_panoptic_json_names_the_file(tmp_path, data, problem):
    with pytest.raises(DataError, match=r"pan\.json: " + problem.replace("(", r"\(").replace("[", r"\[")):
        CocoPanopticDataset(*_panoptic_files(tmp_path, data))


def test_oversized_json_is_refused_before_parsing(tmp_path, monkeypatch):
    files = _panoptic_files(tmp_path, {"annotations": [], "categories": CATS, "pad": "x" * 5000})
    monkeypatch.setattr(formats, "MAX_JSON_BYTES", 1000)
    with pytest.raises(DataError, match=r"pan\.json: panoptic JSON is \d+ bytes, above the 1000-byte limit"):
        CocoPanopticDataset(*files)


def test_instance_json_claiming_a_giant_image_is_refused_before_allocating(tmp_path):
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 200_000, "width": 200_000}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "segmentation": [[0, 0, 1, 0, 1, 1]]}],
            "categories": CATS}
    (tmp_path / "inst.json").write_text(json.dumps(data))
    ds = CocoInstanceDataset(tmp_path / "images", tmp_path / "inst.json")
    with pytest.raises(DataError, match=r"inst\.json: image 1 \(JSON height/width\) claims 200000x200000"):
        ds.load_instances(0)


def test_panoptic_png_id_absent_from_json(tmp_path):
    images, js, pan = _panoptic_files(tmp_path, {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 2, "width": 2}],
        "annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": [{"id": 9, "category_id": 5}]}],
        "categories": CATS})
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(images / "a.jpg")
    Image.fromarray(id_to_rgb(np.array([[9, 9], [9, 12]]))).save(pan / "a.png")
    with pytest.raises(DataError, match=r"a\.png: segment ids \[12\] appear in the PNG but have no segments_info"):
        CocoPanopticDataset(images, js, pan)[0]


# --------------------------------------------------------------------------- generated cases


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400), prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a",
                                                               b"BM", b"RIFF\x00\x00\x00\x00WEBP"]))
def test_random_bytes_never_escape_as_other_errors(tmp_path, data, prefix):
    path = tmp_path / "fuzz.img"
    path.write_bytes(prefix + data)
    try:
        out = load_rgb_image(path)
    except DataError as e:
        assert str(e).startswith(str(path))
    else:
        assert out.dtype == torch.uint8 and out.ndim == 3 and out.shape[0] == 3


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(["id", "image_id", "file_name", "segments_info", "category_id", "name", "isthing",
                         "iscrowd", "images", "color"]), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(annotations=json_values, categories=json_values, images=json_values)
def test_random_json_structures_load_or_fail_with_the_file_named(tmp_path, annotations, categories, images):
    files = _panoptic_files(tmp_path, {"annotations": annotations, "categories": categories, "images": images})
    try:
        CocoPanopticDataset(*files)
    except DataError as e:
        assert str(e).startswith(str(files[1]))
    try:
        data = {"annotations": annotations, "categories": categories, "images": images}
        (tmp_path / "inst.json").write_text(json.dumps(data))
        CocoInstanceDataset(files[0], tmp_path / "inst.json")
    except DataError as e:
        assert str(e).startswith(str(tmp_path / "inst.json"))


# --------------------------------------------------------------------------- skipping


def test_skip_bad_samples_reports_each_and_counts_them(make_tiny_config, synth_root, tmp_path, capfd):
    """Two broken training images: without the option training stops naming the first; with it each
    skip is printed and final_metrics.json counts both (num_workers=1: the count crosses processes)."""
    import shutil

    from omniseg.engine.trainer import train

    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    images = sorted((root / "train" / "images").iterdir())
    images[0].write_bytes(b"")
    images[3].write_bytes(images[3].read_bytes()[:100])
    cfg = make_tiny_config(f"data.train.root={root}", "train.max_iters=4", "data.batch_size=4",
                           "data.num_workers=1", "train.checkpoint_period=100")
    with pytest.raises(DataError, match=rf"{images[0].name}|{images[3].name}"):
        train(cfg, progress=False)
    cfg.data.skip_bad_samples = True
    train(cfg, progress=False)
    out = capfd.readouterr().out
    skips = [line for line in out.splitlines() if "skipping bad sample" in line]
    assert len(skips) == 2 and images[0].name in out and images[3].name in out  # 16 draws = one epoch
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["skipped_samples"] == 2
    assert "2 bad training samples were skipped" in out
    # stopped and resumed half-way: the skips before the stop are still counted (the checkpoint holds them)
    shutil.rmtree(tmp_path / "run")
    cfg.train.checkpoint_period = 2
    cfg.train.stop_at_iter = 2
    train(cfg, progress=False)
    before_stop = capfd.readouterr().out.count("skipping bad sample")
    assert 1 <= before_stop <= 2  # (the seeded order puts a bad image before the stop)
    cfg.train.stop_at_iter = 0
    train(cfg, resume=True, progress=False)
    assert json.loads((tmp_path / "run" / "final_metrics.json").read_text())["skipped_samples"] == 2
