"""Dataset metadata: the bridge between a dataset's own class ids and the model's contiguous ids."""

from __future__ import annotations

from dataclasses import dataclass, field


def _default_color(i: int) -> tuple[int, int, int]:
    # Deterministic, well-spread colours (golden-ratio hue walk) for datasets that ship none.
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


@dataclass
class DatasetMeta:
    """Classes of a dataset. Models see contiguous ids 0..K-1; files hold `dataset_ids`."""

    classes: list[str]
    isthing: list[bool] | None = None
    dataset_ids: list[int] | None = None
    colors: list[tuple[int, int, int]] | None = None
    ignore_index: int = 255
    name: str = "dataset"
    _to_contiguous: dict[int, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        k = len(self.classes)
        if self.isthing is None:
            self.isthing = [False] * k
        if self.dataset_ids is None:
            self.dataset_ids = list(range(k))
        if self.colors is None:
            self.colors = [_default_color(i) for i in range(k)]
        self.colors = [tuple(int(v) for v in c) for c in self.colors]
        if not (len(self.isthing) == len(self.dataset_ids) == len(self.colors) == k):
            raise ValueError("DatasetMeta: classes, isthing, dataset_ids and colors must have equal length")
        self._to_contiguous = {int(d): i for i, d in enumerate(self.dataset_ids)}
        if len(self._to_contiguous) != k:
            raise ValueError("DatasetMeta: dataset_ids must be unique")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def thing_ids(self) -> list[int]:
        """Contiguous ids of thing classes."""
        return [i for i, t in enumerate(self.isthing) if t]

    @property
    def stuff_ids(self) -> list[int]:
        return [i for i, t in enumerate(self.isthing) if not t]

    def to_contiguous(self, dataset_id: int) -> int:
        """Dataset id -> contiguous id; KeyError if unknown (callers turn it into a DataError)."""
        return self._to_contiguous[int(dataset_id)]

    def has_dataset_id(self, dataset_id: int) -> bool:
        return int(dataset_id) in self._to_contiguous

    def to_dataset_id(self, contiguous_id: int) -> int:
        return int(self.dataset_ids[int(contiguous_id)])

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "classes": list(self.classes),
            "isthing": list(self.isthing),
            "dataset_ids": list(self.dataset_ids),
            "colors": [list(c) for c in self.colors],
            "ignore_index": self.ignore_index,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetMeta":
        return cls(
            classes=list(d["classes"]),
            isthing=list(d.get("isthing") or []) or None,
            dataset_ids=list(d.get("dataset_ids") or []) or None,
            colors=[tuple(c) for c in d["colors"]] if d.get("colors") else None,
            ignore_index=int(d.get("ignore_index", 255)),
            name=d.get("name", "dataset"),
        )
