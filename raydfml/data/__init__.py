"""Datasets in the seeds' on-disk layout, the embedded glyph sets, and episodic sampling.

``ensure_dataset`` locates (or, for glyphs, generates) a dataset; ``load_split`` reads one split into
a ``uint8`` array; ``EpisodeSampler`` draws N-way K-shot tasks from it; ``normalize`` turns uint8
images into the float inputs the models expect, on the device.
"""
from .episodes import Episode, EpisodeSampler
from .layout import ImageSplit, ensure_dataset, load_split
from .registry import SPLITS, DatasetSpec, get_spec, known_datasets
from .transforms import denormalize, normalize

__all__ = ["DatasetSpec", "get_spec", "known_datasets", "SPLITS", "ImageSplit", "load_split", "ensure_dataset",
           "normalize", "denormalize", "Episode", "EpisodeSampler"]
