"""ImageNet input pipeline for pretraining the backbone (paper appendix A.6), through TFDS.

Reads the TFDS `imagenet2012` data set from a directory the user prepared beforehand
(`tfds build imagenet2012 --manual_dir ... --data_dir DIR`); nothing is downloaded at run
time (`download=False`). Images stay JPEG-encoded until the crop is known, so only the
cropped window is decoded (`decode_and_crop_jpeg`, the model garden's `preprocess_ops`):
- training: Inception-style random-resized crop (area 8 %..100 %, aspect ratio 3/4..4/3),
  resized to `image_size`, random horizontal flip;
- evaluation: the central square of 0.875 of the shorter side, resized to `image_size`
  (the usual 224 of 256).

Batches are `{"image": float32 [B, S, S, 3] in [0, 255], "label": int32 [B]}` (the model
normalises images itself, docs/design.md §3). Evaluation batches are padded to the full batch
size with label -1 so every step has static shapes (TPU) and no example is dropped; the
evaluator ignores labels < 0.
"""
from __future__ import annotations

import gin
import tensorflow as tf

DATASET_NAME = "imagenet2012"
PADDING_LABEL = -1


class ImageNetNotFoundError(FileNotFoundError):
    """The prepared TFDS `imagenet2012` data set is not in the given data directory."""


def _decode_train(image_bytes: tf.Tensor, image_size: int, seed: int | None) -> tf.Tensor:
    from official.vision.ops import preprocess_ops

    shape = tf.image.extract_jpeg_shape(image_bytes)
    crop = preprocess_ops.random_crop_image_v2(image_bytes, shape,
                                               seed=0 if seed is None else seed)
    image = tf.image.resize(crop, [image_size, image_size], method="bilinear")
    image = tf.image.random_flip_left_right(image, seed=seed)
    return tf.clip_by_value(image, 0.0, 255.0)


def _decode_eval(image_bytes: tf.Tensor, image_size: int,
                 center_crop_fraction: float) -> tf.Tensor:
    from official.vision.ops import preprocess_ops

    shape = tf.image.extract_jpeg_shape(image_bytes)
    crop = preprocess_ops.center_crop_image_v2(image_bytes, shape,
                                               center_crop_fraction=center_crop_fraction)
    image = tf.image.resize(crop, [image_size, image_size], method="bilinear")
    return tf.clip_by_value(image, 0.0, 255.0)


def preprocess_example(example: dict, is_training: bool, image_size: int = 224,
                       center_crop_fraction: float = 0.875,
                       seed: int | None = None) -> dict[str, tf.Tensor]:
    """One TFDS example (`image` as JPEG bytes, `label`) -> `{"image", "label"}`."""
    if is_training:
        image = _decode_train(example["image"], image_size, seed)
    else:
        image = _decode_eval(example["image"], image_size, center_crop_fraction)
    image.set_shape([image_size, image_size, 3])
    return {"image": image, "label": tf.cast(example["label"], tf.int32)}


def _pad_batch(batch: dict[str, tf.Tensor], batch_size: int) -> dict[str, tf.Tensor]:
    """Pads a (last, partial) batch to `batch_size` with zero images and label -1."""
    missing = batch_size - tf.shape(batch["label"])[0]
    image = tf.pad(batch["image"], [[0, missing], [0, 0], [0, 0], [0, 0]])
    label = tf.pad(batch["label"], [[0, missing]], constant_values=PADDING_LABEL)
    image.set_shape([batch_size, *batch["image"].shape[1:]])
    label.set_shape([batch_size])
    return {"image": image, "label": label}


@gin.configurable
def imagenet_dataset(split: str, batch_size: int, is_training: bool,
                     data_dir: str | None = None, image_size: int = 224,
                     center_crop_fraction: float = 0.875, shuffle_buffer_size: int = 10_000,
                     input_context: tf.distribute.InputContext | None = None,
                     seed: int | None = None, dataset_name: str = DATASET_NAME
                     ) -> tf.data.Dataset:
    """Batches of TFDS ImageNet for one replica (paper appendix A.6 pretraining).

    Args:
      split: a TFDS split ("train", "validation", or a slice like "train[:1%]").
      batch_size: the per-replica batch size.
      is_training: random-resized crop + flip, shuffled and repeated forever; otherwise
        centre crop, one pass in order, last batch padded (label -1).
      data_dir: the TFDS data directory holding the prepared `imagenet2012`.
      image_size: output side (224 in the usual ImageNet protocol).
      center_crop_fraction: evaluation crop side / shorter image side (224 / 256).
      shuffle_buffer_size: examples in the shuffle buffer (training).
      input_context: from `distribute_datasets_from_function`; shards files per input
        pipeline so workers read disjoint data.
      seed: makes the training augmentation and shuffling reproducible (tests).
      dataset_name: the TFDS builder name (`imagenet2012`, or a compatible subset such as
        `imagenet2012_subset`).
    """
    import tensorflow_datasets as tfds

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    read_config = tfds.ReadConfig(input_context=input_context, shuffle_seed=seed,
                                  try_autocache=False)
    try:
        dataset = tfds.load(dataset_name, split=split, data_dir=data_dir, download=False,
                            shuffle_files=is_training, read_config=read_config,
                            decoders={"image": tfds.decode.SkipDecoding()})
    except AssertionError as e:
        # TFDS signals "not prepared" with an AssertionError; say what the user must do.
        raise ImageNetNotFoundError(
            f"TFDS data set {dataset_name!r} (split {split!r}) is not prepared in data_dir="
            f"{data_dir!r}. Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
            f"yourself, then run `tfds build {dataset_name} --manual_dir <dir with the tars> "
            f"--data_dir <DIR>` and pass --data_dir <DIR>. ({e})") from e
    if is_training:
        dataset = dataset.shuffle(shuffle_buffer_size, seed=seed).repeat()
    dataset = dataset.map(
        lambda ex: preprocess_example(ex, is_training, image_size, center_crop_fraction, seed),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=seed is not None or not is_training)
    if is_training:
        dataset = dataset.batch(batch_size, drop_remainder=True)
    else:
        dataset = dataset.batch(batch_size).map(lambda b: _pad_batch(b, batch_size))
    return dataset.prefetch(tf.data.AUTOTUNE)
