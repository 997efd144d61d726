"""The settings of a run outside the model: data, training, and the top level that holds them.

Each dataclass is the one declaration of its section: every key a config may set, its type and its
default. Presets (YAML) only state what differs. The `model` section is declared by the model family
that `model.arch` names (models/<family>/family.py); `omniseg config PRESET` prints a whole resolved
config. A key that is not declared here or there is refused before anything runs (omniseg/schema.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omniseg.schema import choice
from omniseg.tasks import TASKS

DATA_FORMATS = ("coco_panoptic", "coco_instance", "semantic_folder", "yolo_seg", "labelme", "synthetic")


@dataclass
class DatasetSettings:
    """One split (`data.train`, `data.val`, `data.test`): which reader and where its files are. Paths are
    relative to `root`; null paths take the format's usual layout (data/build.py); `{split}` in a path is
    replaced by the split name."""

    format: str = choice("synthetic", DATA_FORMATS)
    root: Optional[str] = None
    split: Optional[str] = None        # the split's name in the dataset (default: the section name)
    split_name: Optional[str] = None   # the name used in `{split}` paths when it differs (ADE20K "training")
    name: Optional[str] = None         # dataset name shown in reports
    image_dir: Optional[str] = None    # (labelme: the images; label_dir, default the same folder: the JSONs)
    json: Optional[str] = None         # COCO formats: annotation file
    png_dir: Optional[str] = None      # COCO panoptic: segment PNGs
    label_dir: Optional[str] = None    # semantic_folder: label PNGs
    preset: Optional[str] = None       # semantic_folder: camvid | ade20k | cityscapes | binary (classes, ids)
    classes: Optional[List[str]] = None
    stuff_classes: Optional[List[str]] = None  # yolo_seg / labelme: these classes are stuff (panoptic samples)
    data_yaml: Optional[str] = None    # yolo_seg: Ultralytics' data YAML (classes and split folders)
    label_map: Optional[Dict[Any, Any]] = None  # semantic_folder: raw label value -> class id (255: ignore)
    class_info: Optional[str] = None   # semantic_folder: ADE20K-style objectInfo150.csv
    image_suffix: Optional[str] = None
    label_suffix: Optional[str] = None
    ignore_index: int = 255
    view: Optional[str] = None         # synthetic: panoptic | instance | semantic reader of the same files
    sequences: Optional[List[str]] = None  # semantic_folder: only the frames of these video sequences (file
                                       # names <sequence>_<frame>, as CamVid's 0001TP_006690.png)
    exclude_sequences: Optional[List[str]] = None  # semantic_folder: all frames but those of these sequences


@dataclass
class SyntheticSettings:
    """The built-in synthetic set, generated into the split's root when that folder is missing."""

    num_train: int = 600
    num_val: int = 100
    image_size: int = 128
    seed: int = 0


@dataclass
class DataSettings:
    root: Optional[str] = None         # free for the splits to share: root: ${data.root}
    train: DatasetSettings = field(default_factory=lambda: DatasetSettings(root="runs/data/synthetic", split="train"))
    val: DatasetSettings = field(default_factory=lambda: DatasetSettings(root="runs/data/synthetic", split="val"))
    test: Optional[DatasetSettings] = None
    synthetic: SyntheticSettings = field(default_factory=SyntheticSettings)
    # Training augmentation (data/transforms.py): resize, crop, flip, photometric, as the official pipelines.
    train_resize: str = choice("scale_jitter", ("scale_jitter", "shortest_edge", "ratio_range"))
                                       # scale_jitter: detectron2's large-scale jitter, the crop square x a factor
                                       # of scale_range, then a crop padded to crop_size (ignore / void);
                                       # shortest_edge: detectron2's ResizeShortestEdge (short_edge, max_size);
                                       # ratio_range: MMSeg's RandomResize, resize_scale x a factor of scale_range
    crop_size: Any = 512               # training crop, px: int (square) or [h, w]; null: no crop
    scale_range: List[float] = field(default_factory=lambda: [0.1, 2.0])  # scale_jitter / ratio_range factor
    resize_scale: List[int] = field(default_factory=lambda: [2048, 512])  # ratio_range: [long, short] edge bound
    short_edge: List[int] = field(default_factory=lambda: [640, 672, 704, 736, 768, 800])  # shortest_edge sizes
    short_edge_sampling: str = choice("choice", ("choice", "range"))  # one of short_edge / uniform in [min, max]
    max_size: int = 1333               # shortest_edge: the long side's bound
    cat_max_ratio: float = 1.0         # shortest_edge / ratio_range: retry a crop (10 times) whose most frequent
                                       # class covers this fraction of its labelled pixels or more (1: any crop)
    hflip: bool = True
    photometric: bool = True
    photometric_style: str = choice("color_jitter", ("color_jitter", "distortion"))  # distortion: MMSeg's
                                       # PhotoMetricDistortion = detectron2's ColorAugSSDTransform
    min_size_test: Optional[int] = None  # resize the shorter side for inference (null: keep)
    max_size_test: Optional[int] = None  # ... and bound the longer side (MMSeg Resize (2048, 512): 512 and 2048)
    size_divisibility: int = 32
    batch_size: int = 16
    num_workers: int = 2
    skip_bad_samples: bool = False     # report and skip unreadable samples instead of stopping
    repeat_factor_threshold: Optional[float] = None  # LVIS repeat-factor sampling: images of classes in fewer
                                                     # than this fraction of images repeat (e.g. 0.001)


@dataclass
class EmaSettings:
    """`train.ema`: an exponential moving average of the weights (engine/optim.py ModelEMA), updated after
    every optimiser step; when enabled it is what validation evaluates and what model_best / model_final
    hold (the periodic model_<iter> files keep the trained weights; the average is in state_<iter>.pt)."""

    enabled: bool = False
    decay: float = 0.9999
    warmup: bool = False               # decay of update n: min(decay, (1 + n) / (10 + n))


@dataclass
class TrainSettings:
    output_dir: str = "runs/train"
    max_iters: int = 90000
    optimizer: str = choice("adamw", ("adamw", "sgd"))
    lr: float = 1.0e-4
    momentum: float = 0.9              # sgd
    nesterov: bool = False             # sgd
    weight_decay: float = 0.05
    weight_decay_norm: float = 0.0     # parameters of norm layers
    weight_decay_embed: float = 0.0    # embeddings, Swin position tables
    weight_decay_bias: Optional[float] = None  # other biases; null: weight_decay (detectron2's WEIGHT_DECAY_BIAS)
    backbone_multiplier: float = 0.1
    custom_keys: Dict[str, Any] = field(default_factory=dict)  # {name substring: {lr_mult, decay_mult}}: the longest
                                       # key in a parameter's name scales its lr / weight decay (MMSeg paramwise_cfg)
    schedule: str = choice("poly", ("poly", "step", "cosine"))
    warmup: str = choice("linear", ("linear", "constant"))
    warmup_iters: int = 10
    warmup_factor: float = 1.0
    poly_power: float = 0.9
    min_lr: float = 0.0                # poly / cosine end value (MMSeg PolyLR eta_min)
    decay_iters: Optional[int] = None  # poly / cosine reach min_lr here; null: max_iters (MMSeg PolyLR end=E: E - 1)
    steps: List[int] = field(default_factory=list)  # step: lr x gamma at each of these iterations
    gamma: float = 0.1                 # step
    ema: EmaSettings = field(default_factory=EmaSettings)
    clip_grad: float = 0.01            # full-model L2 norm (Mask2Former); 0: no clipping
    accumulate: int = 1                # gradient accumulation steps per iteration
    amp: str = choice("none", ("none", "bf16", "fp16"))  # fp16: GradScaler; on CPUs slow (bf16 there)
    eval_period: int = 5000            # evaluate every N iterations; 0: only after the last iteration
    checkpoint_period: int = 5000      # checkpoint every N iterations; 0: only after the last iteration
    log_period: int = 20               # log every N iterations; 0: only after the last iteration
    seed: int = 0
    deterministic: bool = False
    tensorboard: bool = False
    stop_at_iter: Optional[int] = None  # end this invocation after that iteration (checkpointed); --resume continues
    weights: Optional[str] = None      # initialise the model from these weights (fine-tuning); iteration 0
    save_best: Optional[str] = None    # keep model_best.safetensors: the highest value of this evaluation metric
    early_stop_patience: Optional[int] = None  # with save_best: stop after this many evaluations without a new best
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    sync_bn: bool = False              # DDP on CUDA: BatchNorm statistics over all ranks


@dataclass
class InferenceSettings:
    """How semantic results are computed at test time (omniseg eval, predict, validation during training
    and the Predictor), as MMSegmentation's test modes; omniseg/test_time.py. The defaults (one pass
    over the whole test-resized image) are plain inference."""

    mode: str = choice("whole", ("whole", "slide"))  # slide: windows of crop_size every stride px, scores averaged
    crop_size: Any = None              # slide: window size on the test-resized image, px: int (square) or [h, w]
    stride: Any = None                 # slide: step between windows, px: int or [h, w], at most crop_size
    scales: List[float] = field(default_factory=lambda: [1.0])  # test-time augmentation: each a factor of the
                                       # test resize (data.min_size_test; null: the image's own size)
    flip: bool = False                 # test-time augmentation: also each scale flipped horizontally


@dataclass
class RunSettings:
    """A whole config. `model` is the dataclass of the family `model.arch` names."""

    model: Any = None
    task: str = choice("panoptic", (*TASKS, "sampled"))  # training targets; sampled: one task per image (OneFormer)
    eval_tasks: List[str] = field(default_factory=lambda: ["panoptic", "semantic", "instance"])
    eval_boundary_f: bool = False      # also the Gated-SCNN boundary F-score with semantic results
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    inference: InferenceSettings = field(default_factory=InferenceSettings)  # slide window / multi-scale + flip
