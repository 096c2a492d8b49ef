"""The tf.data input pipeline: decoded examples -> the targets contract (docs/design.md §4).

Training (paper §4, following Axial-DeepLab's COCO recipe): resize so the image fits the
crop (longer side = crop for a square crop), random scale in [min_scale, max_scale],
pad with void to at least the crop and take a random crop, random horizontal flip of image
and labels together. Evaluation: the same fit-resize without randomness, padded at the
bottom/right to the crop, keeping the original size and label so predictions can be mapped
back. Everything runs as TensorFlow ops on the host (no py_function).

Padding: image pixels take `pad_value` (127.5, which the model's ``x / 127.5 - 1``
normalisation maps to 0); label pixels take -1 (void).
"""
from __future__ import annotations

import random
import sys
from collections.abc import Sequence
from typing import Any

import gin
import tensorflow as tf

from max_deeplab.data import metadata as metadata_lib
from max_deeplab.data.tfrecord import decode_example
from max_deeplab.panoptic_labels import IGNORE_PANOPTIC

TARGET_KEYS = ("image", "segment_ids", "segment_classes", "segment_valid", "segment_is_thing",
               "semantic")


def fit_scale(height: tf.Tensor, width: tf.Tensor, crop_size: Sequence[int]) -> tf.Tensor:
    """The scale that makes an image fit the crop: min(crop_h / H, crop_w / W)."""
    return tf.minimum(crop_size[0] / tf.cast(height, tf.float32),
                      crop_size[1] / tf.cast(width, tf.float32))


def scaled_size(height: tf.Tensor, width: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
    """int32 [2]: round([H, W] * scale), at least 1."""
    size = tf.cast(tf.stack([height, width]), tf.float32) * scale
    return tf.maximum(tf.cast(tf.round(size), tf.int32), 1)


def fit_size(height: tf.Tensor, width: tf.Tensor, target: Sequence[int]) -> tf.Tensor:
    """int32 [2]: the aspect-preserving resize of an H x W image that fits `target` (H, W):
    its longer side (relative to the target's) takes the target's length. The one rule by
    which evaluation (`preprocess_eval`, before padding at the bottom/right) and the
    SavedModel (`max_deeplab.inference.export`) bring an image to the model's input size;
    training scales it further at random (`preprocess_train`)."""
    return scaled_size(height, width, fit_scale(height, width, target))


def _axis_sampling(in_size: tf.Tensor, scaled: tf.Tensor, out_size: int, offset: tf.Tensor):
    """Where each output index samples along one axis of an image resized to `scaled`.

    Output index ``o`` is pixel ``i = o + offset`` of the resized image (``i`` outside
    ``[0, scaled)`` is padding). Half-pixel centres as in `tf.image.resize`: bilinear reads
    source ``c = (i + 0.5) * in / scaled - 0.5`` clamped to the image, nearest reads
    ``min(floor((i + 0.5) * in / scaled), in - 1)``.

    Returns:
      (low, high, weight of high, nearest, inside) per output index.
    """
    ratio = tf.cast(in_size, tf.float32) / tf.cast(scaled, tf.float32)
    i = tf.range(out_size) + offset
    centre = (tf.cast(i, tf.float32) + 0.5) * ratio
    last = in_size - 1
    c = tf.clip_by_value(centre - 0.5, 0.0, tf.cast(last, tf.float32))
    low = tf.cast(tf.floor(c), tf.int32)
    high = tf.minimum(low + 1, last)
    weight = c - tf.cast(low, tf.float32)
    nearest = tf.clip_by_value(tf.cast(tf.floor(centre), tf.int32), 0, last)
    inside = (i >= 0) & (i < scaled)
    return low, high, weight, nearest, inside


def resize_window(image: tf.Tensor, panoptic: tf.Tensor, size: tf.Tensor,
                  out_size: Sequence[int], offset: tf.Tensor, pad_value: float = 127.5
                  ) -> tuple[tf.Tensor, tf.Tensor]:
    """An `out_size` window at `offset` (row, col; may be negative) of the image resized to
    `size`, padded with `pad_value` / void outside it.

    Equal to bilinear (image) and nearest (label) `tf.image.resize` to `size` followed by
    padding and cropping, but only the window's pixels are computed: separable gathers
    instead of resizing the whole image (up to 2.25x the crop at scale 1.5).
    """
    shape = tf.shape(panoptic)
    r_low, r_high, r_w, r_near, r_in = _axis_sampling(shape[0], size[0], out_size[0], offset[0])
    c_low, c_high, c_w, c_near, c_in = _axis_sampling(shape[1], size[1], out_size[1], offset[1])
    image = tf.cast(image, tf.float32)
    rows = (tf.gather(image, r_low) * (1.0 - r_w[:, None, None])
            + tf.gather(image, r_high) * r_w[:, None, None])
    image = (tf.gather(rows, c_low, axis=1) * (1.0 - c_w[None, :, None])
             + tf.gather(rows, c_high, axis=1) * c_w[None, :, None])
    label = tf.gather(tf.gather(panoptic, r_near), c_near, axis=1)
    inside = r_in[:, None] & c_in[None, :]
    image = tf.where(inside[..., None], image, pad_value)
    label = tf.where(inside, label, IGNORE_PANOPTIC)
    return image, label


def random_scalar(seed: tf.Tensor | None, draw: int, minval=0.0, maxval=1.0,
                  dtype: tf.DType = tf.float32) -> tf.Tensor:
    """A uniform scalar in [minval, maxval): draw number `draw` of an example whose
    augmentation seed is `seed` (int64 [2]; stateless, so the same whatever the order in
    which parallel map calls run), or from TF's stateful generator when `seed` is None."""
    if seed is None:
        return tf.random.uniform([], minval, maxval, dtype=dtype)
    return tf.random.stateless_uniform(
        [], tf.random.experimental.stateless_fold_in(seed, draw), minval, maxval, dtype=dtype)


def random_window_offset(size: tf.Tensor, crop_size: Sequence[int],
                         seed: tf.Tensor | None = None) -> tf.Tensor:
    """Random crop of the resized image; sides shorter than the crop sit at a random place.

    Same distribution as padding to ``max(size, crop)`` at a random offset and then taking
    a random crop: returns the resized-image index of the window's first row / column.
    `seed`: as for `random_scalar` (draws 1-4).
    """
    crop = tf.constant(crop_size, tf.int32)
    padded = tf.maximum(size, crop)
    before = tf.stack([random_scalar(seed, 1 + a, 0, padded[a] - size[a] + 1, tf.int32)
                       for a in range(2)])
    start = tf.stack([random_scalar(seed, 3 + a, 0, padded[a] - crop[a] + 1, tf.int32)
                      for a in range(2)])
    return start - before


def flip_left_right(image: tf.Tensor, panoptic: tf.Tensor, flip: tf.Tensor
                    ) -> tuple[tf.Tensor, tf.Tensor]:
    """Mirrors image [H, W, C] and label [H, W] together when `flip` is true."""
    image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
    panoptic = tf.cond(flip, lambda: tf.reverse(panoptic, [1]), lambda: panoptic)
    return image, panoptic


def panoptic_to_targets(panoptic: tf.Tensor, k_max: int, is_thing: Sequence[bool] | tf.Tensor,
                        label_divisor: int, image_id: tf.Tensor | None = None
                        ) -> dict[str, tf.Tensor]:
    """The per-image targets of docs/design.md §4 from a panoptic label map [H, W].

    Segments are the distinct non-negative panoptic values, ordered by decreasing area (ties
    by value). With more than `k_max` segments the largest `k_max` are kept and a warning
    naming the image id is printed; the pixels of dropped segments become -1 in
    ``segment_ids`` (they keep their class in ``semantic``).

    Returns:
      ``segment_ids`` int32 [H, W], ``segment_classes`` int32 [k_max], ``segment_valid``,
      ``segment_is_thing`` bool [k_max], ``semantic`` int32 [H, W] and ``num_segments`` (the
      count before truncation).
    """
    panoptic = tf.cast(panoptic, tf.int32)
    flat = tf.reshape(panoptic, [-1])
    # Histogram over value + 1 (bin 0 = void): areas and the sorted distinct values in one
    # pass, much cheaper than tf.unique on a 641x641 map.
    num_bins = tf.maximum(tf.reduce_max(flat), -1) + 2
    shifted = tf.maximum(flat, -1) + 1
    histogram = tf.math.bincount(shifted, minlength=num_bins, maxlength=num_bins)[1:]
    values = tf.cast(tf.reshape(tf.where(histogram > 0), [-1]), tf.int32)  # ascending
    areas = tf.gather(histogram, values)
    by_area = tf.argsort(-areas, stable=True)  # ties keep ascending value order
    num_segments = tf.size(values)
    kept = tf.gather(values, by_area)[:k_max]
    num_kept = tf.size(kept)

    def warn() -> tf.Tensor:
        tf.print("WARNING: max_deeplab.data: image", image_id if image_id is not None else "?",
                 "has", num_segments, "segments, more than k_max =", k_max,
                 "; keeping the largest", k_max, output_stream=sys.stderr)
        return tf.constant(True)

    warned = tf.cond(num_segments > k_max, warn, lambda: tf.constant(False))
    with tf.control_dependencies([warned]):
        kept = tf.identity(kept)

    # value + 1 -> rank among the kept segments, -1 for void and dropped segments.
    table = tf.tensor_scatter_nd_update(tf.fill([num_bins], -1), kept[:, None] + 1,
                                        tf.range(num_kept))
    segment_ids = tf.reshape(tf.gather(table, shifted), tf.shape(panoptic))

    pad = k_max - num_kept
    classes = tf.pad(kept // label_divisor, [[0, pad]])
    valid = tf.range(k_max) < num_kept
    thing_table = tf.constant(is_thing, tf.bool) if not isinstance(is_thing, tf.Tensor) \
        else is_thing
    is_thing_k = tf.gather(thing_table, classes) & valid
    semantic = tf.where(panoptic >= 0, panoptic // label_divisor, -1)
    return {
        "segment_ids": segment_ids,
        "segment_classes": tf.ensure_shape(classes, [k_max]),
        "segment_valid": tf.ensure_shape(valid, [k_max]),
        "segment_is_thing": tf.ensure_shape(is_thing_k, [k_max]),
        "semantic": semantic,
        "num_segments": num_segments,
    }


def preprocess_train(example: dict[str, tf.Tensor], crop_size: Sequence[int], min_scale: float,
                     max_scale: float, k_max: int, is_thing: Sequence[bool], label_divisor: int,
                     pad_value: float = 127.5, flip_probability: float = 0.5,
                     seed: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
    """Random fit-resize-scale, pad/crop and flip of one decoded example -> targets.

    `seed`: the example's augmentation seed (int64 [2]): the augmentation is a function of
    it alone. None: TF's stateful random ops."""
    panoptic = example["panoptic"]
    shape = tf.shape(panoptic)
    scale = fit_scale(shape[0], shape[1], crop_size) * random_scalar(
        seed, 0, min_scale, max_scale)
    size = scaled_size(shape[0], shape[1], scale)
    offset = random_window_offset(size, crop_size, seed)
    image, panoptic = resize_window(example["image"], panoptic, size, crop_size, offset,
                                    pad_value)
    flip = random_scalar(seed, 5) < flip_probability
    image, panoptic = flip_left_right(image, panoptic, flip)
    image = tf.ensure_shape(image, [crop_size[0], crop_size[1], 3])
    panoptic = tf.ensure_shape(panoptic, list(crop_size))
    targets = panoptic_to_targets(panoptic, k_max, is_thing, label_divisor, example["image_id"])
    targets.pop("num_segments")
    return {"image": image, **targets}


def preprocess_eval(example: dict[str, tf.Tensor], crop_size: Sequence[int], k_max: int,
                    is_thing: Sequence[bool], label_divisor: int, pad_value: float = 127.5
                    ) -> dict[str, tf.Tensor]:
    """Deterministic fit-resize and bottom/right padding to the crop.

    Adds to the targets: ``panoptic`` (the label at model resolution, -1 padded),
    ``original_panoptic`` (the label at the original size), ``image_id``,
    ``original_size`` [2] and ``resized_size`` [2] int32: a prediction at model resolution
    is cropped to ``[:resized_size[0], :resized_size[1]]`` then resized to ``original_size``.
    """
    original = example["panoptic"]
    shape = tf.shape(original)
    resized_size = fit_size(shape[0], shape[1], crop_size)
    image, panoptic = resize_window(example["image"], original, resized_size, crop_size,
                                    tf.zeros([2], tf.int32), pad_value)
    image = tf.ensure_shape(image, [crop_size[0], crop_size[1], 3])
    panoptic = tf.ensure_shape(panoptic, list(crop_size))
    targets = panoptic_to_targets(panoptic, k_max, is_thing, label_divisor, example["image_id"])
    targets.pop("num_segments")
    return {"image": image, **targets, "panoptic": panoptic, "original_panoptic": original,
            "image_id": example["image_id"], "original_size": shape[:2],
            "resized_size": resized_size[:2]}


@gin.configurable
def build_dataset(file_pattern: str,
                  is_training: bool,
                  global_batch_size: int,
                  crop_size: Sequence[int] = (641, 641),
                  min_scale: float = 0.5,
                  max_scale: float = 1.5,
                  k_max: int = 128,
                  input_context: tf.distribute.InputContext | None = None,
                  metadata: dict[str, Any] | None = None,
                  pad_value: float = 127.5,
                  flip_probability: float = 0.5,
                  shuffle_buffer_size: int = 256,
                  cycle_length: int = 8,
                  eval_label_size: Sequence[int] | None = None,
                  drop_remainder: bool | None = None,
                  repeat: bool | None = None,
                  tfds_data_dir: str | None = None,
                  seed: int | None = None) -> tf.data.Dataset:
    """Batches of the docs/design.md §4 targets from TFRecord shards of `max-deeplab convert`.

    Args:
      file_pattern: shard glob(s), comma-separated; or ``tfds:<name>:<split>`` (e.g.
        ``tfds:coco/2017_panoptic:train``) to read a prepared TFDS data set instead.
      is_training: random augmentation, shuffling and repetition (paper §4) vs. the
        deterministic evaluation transform.
      global_batch_size: split over replicas with `input_context`.
      crop_size: model input (H, W); 641 x 641 for MaX-DeepLab-S (paper §4).
      min_scale, max_scale: random scale range on top of the fit-to-crop resize; the paper
        inherits Axial-DeepLab's COCO recipe, whose range is [0.5, 1.5].
      k_max: segments per image kept (docs/design.md §4); must cover the data set's largest count.
      input_context: from `strategy.distribute_datasets_from_function`; shards the files (or
        the records, when there are fewer files than input pipelines) per input pipeline.
      metadata: data-set metadata; default `load_metadata(file_pattern)`.
      pad_value: image value of padded pixels (label padding is always void).
      eval_label_size: fixed (H, W) to pad ``original_panoptic`` to in evaluation (needed
        for fixed-shape TPU batches); default pads to the largest image in each batch.
      drop_remainder, repeat: default True for training, False for evaluation.
      tfds_data_dir: TFDS ``data_dir`` for ``tfds:`` sources.
      seed: makes training data reproducible: the file and record shuffles are seeded,
        records are read and mapped in a fixed order, and each example's augmentation is
        drawn from (seed, input pipeline, its position in the stream). None: unseeded (and
        the parallel reads may reorder records, which is a little faster).

    Returns:
      A dataset of dicts: ``image`` float32 [B, H, W, 3] in [0, 255], ``segment_ids`` int32
      [B, H, W], ``segment_classes`` int32 [B, K], ``segment_valid`` / ``segment_is_thing``
      bool [B, K], ``semantic`` int32 [B, H, W]; evaluation adds the keys of
      `preprocess_eval`.
    """
    crop_size = tuple(int(v) for v in crop_size)
    if not 0 < min_scale <= max_scale:
        raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
    batch_size = global_batch_size
    if input_context is not None:
        batch_size = input_context.get_per_replica_batch_size(global_batch_size)
    drop_remainder = is_training if drop_remainder is None else drop_remainder
    repeat = is_training if repeat is None else repeat
    num_pipelines = input_context.num_input_pipelines if input_context is not None else 1
    pipeline_id = input_context.input_pipeline_id if input_context is not None else 0
    # Reads in a fixed order where the order matters: evaluation, and seeded training.
    ordered = not is_training or seed is not None
    shuffle_seed = None if seed is None else int(seed) * 1009 + pipeline_id

    if file_pattern.startswith("tfds:"):
        from max_deeplab.data.tfds_source import load_tfds_panoptic

        parts = file_pattern.split(":")
        if len(parts) != 3:
            raise ValueError(f"TFDS source must read 'tfds:<name>:<split>', got {file_pattern!r}")
        decoded, tfds_metadata = load_tfds_panoptic(parts[1], parts[2], data_dir=tfds_data_dir,
                                                    shuffle_files=is_training,
                                                    shuffle_seed=shuffle_seed)
        metadata = metadata or tfds_metadata
        if num_pipelines > 1:
            decoded = decoded.shard(num_pipelines, pipeline_id)
    else:
        files = metadata_lib.list_shards(file_pattern)
        metadata = metadata or metadata_lib.load_metadata(file_pattern)
        dataset = tf.data.Dataset.from_tensor_slices(files)
        shard_records = num_pipelines > 1 and len(files) < num_pipelines
        if num_pipelines > 1 and not shard_records:
            dataset = dataset.shard(num_pipelines, pipeline_id)
        if is_training:
            dataset = dataset.shuffle(len(files), seed=shuffle_seed,
                                      reshuffle_each_iteration=True)
        dataset = dataset.interleave(
            tf.data.TFRecordDataset, cycle_length=min(cycle_length, len(files)),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=ordered)
        if shard_records:
            dataset = dataset.shard(num_pipelines, pipeline_id)
        decoded = dataset.map(decode_example, num_parallel_calls=tf.data.AUTOTUNE,
                              deterministic=ordered)

    is_thing = metadata_lib.is_thing_table(metadata)
    label_divisor = int(metadata["label_divisor"])
    if is_training:
        if shuffle_buffer_size > 1:
            decoded = decoded.shuffle(shuffle_buffer_size, seed=shuffle_seed)
        if repeat:
            decoded = decoded.repeat()
        # Each example's augmentation seed: (run seed and pipeline, position in the stream).
        stream_seed = (random.SystemRandom().getrandbits(31) if seed is None
                       else int(seed)) * 1009 + pipeline_id

        def transform(position, example):
            return preprocess_train(example, crop_size, min_scale, max_scale, k_max, is_thing,
                                    label_divisor, pad_value, flip_probability,
                                    seed=tf.stack([tf.constant(stream_seed, tf.int64),
                                                   position]))

        dataset = decoded.enumerate().map(transform, num_parallel_calls=tf.data.AUTOTUNE,
                                          deterministic=ordered)
        dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    else:
        if repeat:
            decoded = decoded.repeat()

        def transform(example):
            out = preprocess_eval(example, crop_size, k_max, is_thing, label_divisor, pad_value)
            if eval_label_size is not None:
                shape = tf.shape(out["original_panoptic"])
                check = tf.debugging.assert_less_equal(
                    shape, tf.constant(eval_label_size, tf.int32),
                    message=f"an image is larger than eval_label_size={tuple(eval_label_size)}")
                with tf.control_dependencies([check]):
                    out["original_panoptic"] = tf.identity(out["original_panoptic"])
            return out

        dataset = decoded.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
        label_shape = list(eval_label_size) if eval_label_size is not None else [None, None]
        padded_shapes = {key: spec.shape for key, spec in dataset.element_spec.items()}
        padded_shapes["original_panoptic"] = tf.TensorShape(label_shape)
        padding_values = {key: tf.zeros([], spec.dtype)
                          for key, spec in dataset.element_spec.items()}
        padding_values["original_panoptic"] = tf.constant(IGNORE_PANOPTIC, tf.int32)
        dataset = dataset.padded_batch(batch_size, padded_shapes=padded_shapes,
                                       padding_values=padding_values,
                                       drop_remainder=drop_remainder)
    return dataset.prefetch(tf.data.AUTOTUNE)
