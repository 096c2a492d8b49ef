"""Data-set metadata beside the TFRecord shards (``PREFIX-metadata.json``).

Training, evaluation, export and prediction read the class list, which classes are things,
the contiguous-index mapping and the label divisor from here, so a custom COCO-format data
set needs no code edit. No TensorFlow is imported by this module for local paths.

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
      "shard_bytes": {"PREFIX-00000-of-00008.tfrecord": 2097152, ...},  # each shard's size
      "max_segments_per_image": 67                 # a lower bound for K_max
    }

`list_shards` is the one place that turns a ``--train_data`` / ``--eval_data`` glob into
shard files (skipping the metadata and temporary files), and `check_shards` compares their
sizes with ``shard_bytes`` so that a truncated copy is named before training starts.

Paths may be local or TensorFlow file-system URLs (``gs://bucket/coco/train-*``: the data of
a Cloud TPU job lives in a bucket). `file_exists`, `read_text` and `glob_files` use `os` and
`glob` for local paths and `tf.io.gfile` for URLs, importing TensorFlow only then, so verbs
that must stay light (`synthetic`, `convert`) can import this module.
"""
from __future__ import annotations

import glob
import json
import re
from typing import Any

from max_deeplab.atomic_files import is_temporary
from max_deeplab.data.schema import FORMAT_VERSION
from max_deeplab.file_system import file_exists, file_size, glob_files, read_text
from max_deeplab.panoptic_labels import IGNORE_PANOPTIC, LABEL_DIVISOR

METADATA_SUFFIX = "-metadata.json"
_SHARD_RE = re.compile(r"^(?P<prefix>.*)-(\d{5})-of-(\d{5})\.tfrecord$")


class MetadataError(ValueError):
    """The metadata file is missing or malformed (the message names the path)."""


class ShardError(ValueError):
    """A shard glob that matches no shard, or a shard that is not the file `convert` wrote
    (the message names it)."""


def categories_problem(categories: Any) -> str | None:
    """Why `categories` is not a COCO panoptic category list, or None if it is one.

    Every category needs a unique integer ``id`` and ``isthing`` (1 for a thing class, 0 for
    stuff). The COCO panoptic format requires ``isthing``; taking a missing one as stuff
    would silently train and export a thing class without instances. The caller adds the
    file name.
    """
    if not isinstance(categories, list) or not categories:
        return "'categories' must be a non-empty list of {id, name, isthing} objects"
    seen: set[int] = set()
    for position, category in enumerate(categories):
        if not isinstance(category, dict):
            return (f"categories[{position}] must be an object with id, name and isthing, "
                    f"got {category!r}")
        category_id = category.get("id")
        if isinstance(category_id, bool) or not isinstance(category_id, int):
            return f"categories[{position}] has no integer 'id': {category!r}"
        if category_id in seen:
            return f"category id {category_id} is listed twice in 'categories'"
        seen.add(category_id)
        if "isthing" not in category:
            return (f"category id {category_id} has no 'isthing' (the COCO panoptic format "
                    "requires it: 1 for a thing class, 0 for stuff)")
        if category["isthing"] not in (0, 1):  # also accepts true / false
            return (f"category id {category_id} has 'isthing' {category['isthing']!r}; "
                    "expected 1 (thing) or 0 (stuff)")
    return None


def shard_path(prefix: str, index: int, num_shards: int) -> str:
    """``PREFIX-00003-of-00008.tfrecord``."""
    return f"{prefix}-{index:05d}-of-{num_shards:05d}.tfrecord"


def shard_pattern(prefix: str, num_shards: int) -> str:
    """The glob matching every shard of a conversion with `num_shards` shards."""
    return f"{prefix}-?????-of-{num_shards:05d}.tfrecord"


def metadata_path(prefix: str) -> str:
    return prefix + METADATA_SUFFIX


def list_shards(file_pattern: str) -> list[str]:
    """The shard files of comma-separated globs, each glob's sorted.

    Skipped: the metadata JSON that `convert` writes beside the shards (so ``PREFIX-*``
    globs work) and temporary files (`atomic_files.is_temporary`: what a `convert` killed
    mid-run leaves behind is half a shard). Raises ShardError naming a glob that matches no
    shard; OSError when a URL's file system cannot be listed.
    """
    files = []
    for pattern in file_pattern.split(","):
        pattern = pattern.strip()
        matched = [f for f in glob_files(pattern)
                   if not f.endswith(METADATA_SUFFIX) and not is_temporary(f)]
        if not matched:
            raise ShardError(f"no TFRecord shards match {pattern!r}")
        files.extend(matched)
    return files


def check_shards(file_pattern: str, metadata: dict[str, Any] | None = None) -> list[str]:
    """`list_shards`, each shard checked against the size `convert` recorded for it in the
    metadata (``shard_bytes``; metadata written before sizes were recorded, and shards it
    does not list, are not checked). Cheap: one stat per shard.

    Raises:
      ShardError: naming the first shard whose size differs (a copy cut short, or a shard of
        another conversion under the same name) and both sizes.
    """
    shards = list_shards(file_pattern)
    if metadata is None:
        metadata = load_metadata(file_pattern)
    expected = metadata.get("shard_bytes")
    if not isinstance(expected, dict):
        return shards
    for shard in shards:
        size = expected.get(shard.rsplit("/", 1)[-1])
        if not isinstance(size, int):
            continue
        actual = file_size(shard)
        if actual != size:
            what = "truncated (a copy or download cut short?)" if actual < size else \
                "longer than written (another data set's shard under this name?)"
            raise ShardError(
                f"TFRecord shard {shard} is {actual} bytes but `max-deeplab convert` wrote "
                f"{size} bytes (recorded in {metadata.get('path', 'its metadata')}): it is "
                f"{what}. Copy it again or rerun `max-deeplab convert`.")
    return shards


def build_metadata(categories: list[dict[str, Any]],
                   label_divisor: int = LABEL_DIVISOR,
                   **extra: Any) -> dict[str, Any]:
    """Metadata for COCO `categories`; the contiguous index is the rank of the category id.

    COCO lists its 133 panoptic categories by increasing id (things 1..90 first, stuff
    92..200 after), so sorting by id keeps COCO's order and TFDS's `ClassLabel` order.
    """
    problem = categories_problem(categories)
    if problem:
        raise ValueError(problem)
    ordered = sorted(categories, key=lambda c: c["id"])
    cats = []
    for index, c in enumerate(ordered):
        color = c.get("color")
        cats.append({
            "id": int(c["id"]),
            "name": str(c.get("name", c["id"])),
            "isthing": int(c["isthing"]),
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
    try:
        if first.endswith(".json"):
            if not file_exists(first):
                raise MetadataError(f"metadata file {first} does not exist")
            return first
        candidates = []
        match = _SHARD_RE.match(first)
        if match:
            candidates.append(metadata_path(match.group("prefix")))
        if not glob.has_magic(first):
            candidates.append(metadata_path(first))
        for shard in glob_files(first):
            match = _SHARD_RE.match(shard)
            if match:
                candidates.append(metadata_path(match.group("prefix")))
                break
        for candidate in candidates:
            if file_exists(candidate):
                return candidate
    except OSError as e:  # a URL whose file system refused (permissions, network)
        raise MetadataError(f"cannot look for the data-set metadata of {path_or_glob!r}: "
                            f"{e}") from e
    tried = ", ".join(dict.fromkeys(candidates)) or "none (no shard named PREFIX-NNNNN-of-NNNNN" \
        ".tfrecord matches)"
    raise MetadataError(f"no data-set metadata found for {path_or_glob!r}; looked for: {tried}. "
                        "It is written by `max-deeplab convert` beside the shards.")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def load_categories_file(path: str) -> dict[str, Any]:
    """Reads a JSON object with a valid COCO ``categories`` list: a data set's metadata file
    or a COCO panoptic annotation file (both are accepted by `export --metadata`).

    Raises:
      MetadataError: naming `path` and what is wrong (unreadable, not JSON, not an object,
        a category without ``isthing``, a ``label_divisor`` that is not a positive integer).
    """
    try:
        data = json.loads(read_text(path))
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8 text
        raise MetadataError(f"cannot read metadata file {path}: {e}") from e
    if not isinstance(data, dict):
        raise MetadataError(
            f"metadata file {path} holds a JSON {type(data).__name__}; expected an object with "
            "a 'categories' list (PREFIX-metadata.json from `max-deeplab convert`, or a COCO "
            "panoptic annotation file)")
    problem = categories_problem(data.get("categories"))
    if problem:
        raise MetadataError(f"metadata file {path}: {problem}")
    if "label_divisor" in data and not _positive_int(data["label_divisor"]):
        raise MetadataError(f"metadata file {path}: 'label_divisor' must be a positive "
                            f"integer, got {data['label_divisor']!r}")
    return data


def load_metadata(path_or_glob: str) -> dict[str, Any]:
    """Loads and checks the metadata of a converted data set (see `find_metadata`)."""
    path = find_metadata(path_or_glob)
    metadata = load_categories_file(path)
    for key in ("num_classes", "label_divisor", "thing_classes"):
        if key not in metadata:
            raise MetadataError(f"metadata file {path} has no field {key!r}")
    if metadata["num_classes"] != len(metadata["categories"]):
        raise MetadataError(f"metadata file {path}: num_classes={metadata['num_classes']!r} "
                            f"but {len(metadata['categories'])} categories")
    things = metadata["thing_classes"]
    if not isinstance(things, list) or not all(
            isinstance(i, int) and 0 <= i < len(metadata["categories"]) for i in things):
        raise MetadataError(f"metadata file {path}: 'thing_classes' must be a list of "
                            f"contiguous class indices 0..{len(metadata['categories']) - 1}")
    metadata["path"] = path
    return metadata


def is_thing_table(metadata: dict[str, Any]) -> list[bool]:
    """[num_classes] booleans: whether each contiguous class is a thing."""
    things = set(metadata["thing_classes"])
    return [i in things for i in range(metadata["num_classes"])]
