"""Pickled checkpoints (omniseg.hub.pickled): detectron2 .pkl and torch .pth files load as tensors, and any
pickle naming a global outside the allow-list is refused by name, in every format, without running it."""

from __future__ import annotations

import collections
import os
import pickle
import subprocess

import numpy as np
import pytest
import torch

from omniseg.hub import CheckpointError, load_state_dict_file
from omniseg.hub.pickled import UnsafePickleError, read_pickled


class RunsShell:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class CallsEval:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (eval, (f"open({self.marker!r}, 'w').close()",))


class StartsProcess:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (subprocess.Popen, (["touch", self.marker],))


PAYLOADS = [(RunsShell, "system"), (CallsEval, "builtins.eval"), (StartsProcess, "subprocess.Popen")]


def detectron2_pickle(path, protocol=pickle.HIGHEST_PROTOCOL):
    """What detectron2's model zoo ships: pickle.dump of numpy arrays with its metadata keys."""
    model = collections.OrderedDict([
        ("backbone.res2.0.conv1.weight", np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)),
        ("backbone.res2.0.conv1.norm.num_batches_tracked", np.array(7, dtype=np.int64)),
        ("sem_seg_head.predictor.query_embed.weight", np.ones((4, 8), dtype=np.float16)),
    ])
    with open(path, "wb") as f:
        pickle.dump({"model": model, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True,
                     "iteration": np.int64(368749)}, f, protocol=protocol)
    return model


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_detectron2_pkl_loads_as_tensors_with_its_metadata(tmp_path, protocol):
    model = detectron2_pickle(tmp_path / "model_final.pkl", protocol)
    ckpt = read_pickled(tmp_path / "model_final.pkl")
    assert ckpt["__author__"] == "Detectron2 Model Zoo" and ckpt["matching_heuristics"] is True
    assert int(ckpt["iteration"]) == 368749
    assert list(ckpt["model"]) == list(model)
    for name, array in model.items():
        tensor = ckpt["model"][name]
        assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.from_numpy(array).dtype
        assert torch.equal(tensor, torch.from_numpy(array))
    # load_state_dict_file unwraps "model", as for torch checkpoints
    assert set(load_state_dict_file(tmp_path / "model_final.pkl")) == set(model)


def test_pickles_written_by_numpy_1_load(tmp_path):
    """numpy 1.x names its reconstruction function numpy.core.multiarray._reconstruct (numpy 2: numpy._core)."""
    path = tmp_path / "old.pkl"
    detectron2_pickle(path, protocol=2)  # protocol 2 writes global names as text lines
    data = path.read_bytes()
    assert b"numpy._core.multiarray" in data
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    ckpt = read_pickled(path)
    assert torch.equal(ckpt["model"]["backbone.res2.0.conv1.weight"], torch.arange(24.0).reshape(2, 3, 2, 2))


def test_torch_checkpoints_with_numpy_arrays_and_ordered_dicts_load(tmp_path):
    state = collections.OrderedDict(weight=torch.randn(3, 2), bias=torch.zeros(3))
    for zipped in (True, False):
        path = tmp_path / f"ckpt_{zipped}.pth"
        torch.save({"state_dict": state, "meta": {"epoch": 12, "mean": np.array([0.5, 0.25])}}, path,
                   _use_new_zipfile_serialization=zipped)
        ckpt = read_pickled(path)
        assert torch.equal(ckpt["state_dict"]["weight"], state["weight"]) and ckpt["meta"]["epoch"] == 12
        assert torch.equal(ckpt["meta"]["mean"], torch.tensor([0.5, 0.25], dtype=torch.float64))
        assert set(load_state_dict_file(path)) == {"weight", "bias"}


def _write(kind: str, path, payload) -> None:
    if kind == "pkl":
        with open(path, "wb") as f:
            pickle.dump({"model": {"w": np.zeros(2)}, "evil": payload}, f)
    elif kind == "pth-zip":
        torch.save({"state_dict": {"w": torch.zeros(2)}, "evil": payload}, path)
    elif kind == "pth-legacy":
        torch.save({"state_dict": {"w": torch.zeros(2)}, "evil": payload}, path, _use_new_zipfile_serialization=False)
    else:  # a plain pickle under a torch suffix
        with open(path, "wb") as f:
            pickle.dump({"state_dict": {"w": np.zeros(2)}, "evil": payload}, f)


@pytest.mark.parametrize("payload,named", PAYLOADS, ids=[p[0].__name__ for p in PAYLOADS])
@pytest.mark.parametrize("kind,suffix", [("pkl", ".pkl"), ("pth-zip", ".pth"), ("pth-legacy", ".pth"),
                                         ("plain-as-pth", ".pt")])
def test_malicious_pickles_are_refused_by_name_without_running(tmp_path, kind, suffix, payload, named):
    marker = tmp_path / "ran"
    path = tmp_path / f"evil{suffix}"
    _write(kind, path, payload(marker))
    with pytest.raises(UnsafePickleError) as refused:
        read_pickled(path)
    message = str(refused.value)
    assert str(path) in message and named in message and "nothing in the file was run" in message
    with pytest.raises(CheckpointError):  # and through the loader every weights option uses
        load_state_dict_file(path)
    assert not marker.exists()


def test_persistent_ids_in_a_pkl_are_refused(tmp_path):
    class WithPersistentIds(pickle.Pickler):
        def persistent_id(self, obj):
            return "storage-0" if isinstance(obj, np.ndarray) else None

    path = tmp_path / "pid.pkl"
    with open(path, "wb") as f:
        WithPersistentIds(f).dump({"model": {"w": np.zeros(2)}})
    with pytest.raises(UnsafePickleError, match="persistent ids"):
        read_pickled(path)


def test_unreadable_files_name_the_file(tmp_path):
    path = tmp_path / "cut.pkl"
    detectron2_pickle(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{path}: not a readable pickle"):
        read_pickled(path)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        read_pickled(tmp_path / "missing.pkl")
