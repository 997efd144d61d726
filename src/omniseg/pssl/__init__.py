"""PSSL: pseudo segmentation labels from an ensemble of classifier explanations (Li et al. 2022,
arXiv 2207.03335), for pre-training segmentation models without pixel annotations.

Pipeline (each step also an `omniseg pssl` command):
  make_crops          instance dataset -> classification folder root/<class>/<crop>.png
  train_classifier    one timm classifier per seed (an ensemble is several seeds)
  write_pseudo_labels ensemble SmoothGrad -> per-image deciles -> top decile = class, rest background
then `omniseg train <preset> ...` (the command is printed and stored in pssl.json) pre-trains with
class weights 1.0 per object class and 0.1 for background.
"""

from omniseg.pssl.classifier import Classifier, load_classifier, train_classifier
from omniseg.pssl.crops import CropReport, dataset_cfg_from_root, make_crops
from omniseg.pssl.folder import ClassificationFolder, split_indices
from omniseg.pssl.labels import LabelReport, class_weights, pseudo_label, train_command, write_pseudo_labels
from omniseg.pssl.saliency import decile_map, ensemble_saliency, normalize_maps, smoothgrad

__all__ = [
    "ClassificationFolder", "split_indices",
    "make_crops", "dataset_cfg_from_root", "CropReport",
    "train_classifier", "load_classifier", "Classifier",
    "smoothgrad", "ensemble_saliency", "decile_map", "normalize_maps",
    "write_pseudo_labels", "pseudo_label", "class_weights", "train_command", "LabelReport",
]
