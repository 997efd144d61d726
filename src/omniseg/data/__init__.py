"""Datasets, targets, transforms and loaders. See docs/design.md for the sample and batch contract."""

from omniseg.data.build import build_dataset, describe_dataset
from omniseg.data.errors import DataError
from omniseg.data.formats import CocoInstanceDataset, CocoPanopticDataset, SemanticFolderDataset
from omniseg.data.loader import Batch, collate
from omniseg.data.meta import DatasetMeta
from omniseg.data.synthetic import synthetic_meta
from omniseg.data.targets import instances_from_panoptic, mask_targets, semantic_from_panoptic
from omniseg.data.transforms import build_transforms

__all__ = [
    "Batch",
    "CocoInstanceDataset",
    "CocoPanopticDataset",
    "DataError",
    "DatasetMeta",
    "SemanticFolderDataset",
    "build_dataset",
    "build_transforms",
    "collate",
    "describe_dataset",
    "instances_from_panoptic",
    "mask_targets",
    "semantic_from_panoptic",
    "synthetic_meta",
]
