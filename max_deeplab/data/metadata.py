"""Data-set metadata beside the TFRecord shards (``PREFIX-metadata.json``).

Training, evaluation, export and prediction read the class list, which classes are things,
the contiguous-index mapping and the label divisor from here, so a custom COCO-format data
set needs no code edit. No TensorFlow is imported by this module.

Metadata JSON (written by `max-deeplab convert`)::

    {
      "format": "max_deeplab.panoptic_tfrecord.v1",
      "categories": [{"id": 1, "name": "person", "isthing": 1, "color": [220, 20, 60],
                      "contiguous_id": 0}, ...],   # sorted by COCO id = contiguous order
      "num_classes": 133,
      "label_divisor": 256,
      "ignore_label": -1,                          # void and crowd pixels
      "thing_classes": [0, 1, ...],                # contiguous ids of thing classes
      "category_ids": [1, 2, ...],                 # contiguous index -> COCO category id
      "num_examples": 5000, "num_shards": 8,
      "shard_pattern": "PREFIX-?????-of-00008.tfrecord",
      "max_segments_per_image": 67                 # a lower bound for K_max
    }
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Any

from max_deeplab.data.schema import DEFAULT_LABEL_DIVISOR, FORMAT_VERSION, IGNORE_PANOPTIC

METADATA_SUFFIX = "-metadata.json"
_SHARD_RE = re.compile(r"^(?P<prefix>.*)-(\d{5})-of-(\d{5})\.tfrecord$")


class MetadataError(ValueError):
    """The metadata file is missing or malformed (the message names the path)."""


def shard_path(prefix: str, index: int, num_shards: int) -> str:
    """``PREFIX-00003-of-00008.tfrecord``."""
    return f"{prefix}-{index:05d}-of-{num_shards:05d}.tfrecord"


def shard_pattern(prefix: str, num_shards: int) -> str:
    """The glob matching every shard of a conversion with `num_shards` shards."""
    return f"{prefix}-?????-of-{num_shards:05d}.tfrecord"


def metadata_path(prefix: str) -> str:
    return prefix + METADATA_SUFFIX


def build_metadata(categories: list[dict[str, Any]],
                   label_divisor: int = DEFAULT_LABEL_DIVISOR,
                   **extra: Any) -> dict[str, Any]:
    """Metadata for COCO `categories`; the contiguous index is the rank of the category id.

    COCO lists its 133 panoptic categories by increasing id (things 1..90 first, stuff
    92..200 after), so sorting by id keeps COCO's order and TFDS's `ClassLabel` order.
    """
    ordered = sorted(categories, key=lambda c: int(c["id"]))
    cats = []
    for index, c in enumerate(ordered):
        color = c.get("color")
        cats.append({
            "id": int(c["id"]),
            "name": str(c.get("name", c["id"])),
            "isthing": int(bool(c.get("isthing", 0))),
            "color": [int(v) for v in color] if color is not None else None,
            "contiguous_id": index,
        })
    metadata = {
        "format": FORMAT_VERSION,
        "categories": cats,
        "num_classes": len(cats),
        "label_divisor": int(label_divisor),
        "ignore_label": IGNORE_PANOPTIC,
        "thing_classes": [c["contiguous_id"] for c in cats if c["isthing"]],
        "category_ids": [c["id"] for c in cats],
    }
    metadata.update(extra)
    return metadata


def find_metadata(path_or_glob: str) -> str:
    """The metadata file of a data set given as a shard glob, one shard, a prefix or the JSON.

    ``/d/train-*.tfrecord``, ``/d/train-00000-of-00008.tfrecord`` and ``/d/train`` all give
    ``/d/train-metadata.json``; a comma-separated list of globs uses its first entry.
    """
    first = path_or_glob.split(",")[0].strip()
    if first.endswith(".json"):
        if not os.path.isfile(first):
            raise MetadataError(f"metadata file {first} does not exist")
        return first
    candidates = []
    match = _SHARD_RE.match(first)
    if match:
        candidates.append(metadata_path(match.group("prefix")))
    if not glob.has_magic(first):
        candidates.append(metadata_path(first))
    for shard in sorted(glob.glob(first)):
        match = _SHARD_RE.match(shard)
        if match:
            candidates.append(metadata_path(match.group("prefix")))
            break
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    tried = ", ".join(dict.fromkeys(candidates)) or "none (no shard named PREFIX-NNNNN-of-NNNNN" \
        ".tfrecord matches)"
    raise MetadataError(f"no data-set metadata found for {path_or_glob!r}; looked for: {tried}. "
                        "It is written by `max-deeplab convert` beside the shards.")


def load_metadata(path_or_glob: str) -> dict[str, Any]:
    """Loads and checks the metadata of a converted data set (see `find_metadata`)."""
    path = find_metadata(path_or_glob)
    try:
        with open(path) as f:
            metadata = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise MetadataError(f"cannot read metadata file {path}: {e}") from e
    for key in ("categories", "num_classes", "label_divisor", "thing_classes"):
        if key not in metadata:
            raise MetadataError(f"metadata file {path} has no field {key!r}")
    if len(metadata["categories"]) != metadata["num_classes"]:
        raise MetadataError(f"metadata file {path}: num_classes={metadata['num_classes']} but "
                            f"{len(metadata['categories'])} categories")
    metadata["path"] = path
    return metadata


def is_thing_table(metadata: dict[str, Any]) -> list[bool]:
    """[num_classes] booleans: whether each contiguous class is a thing."""
    things = set(metadata["thing_classes"])
    return [i in things for i in range(metadata["num_classes"])]
