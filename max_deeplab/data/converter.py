"""COCO panoptic (JSON + PNGs + images) -> sharded TFRecords + metadata, atomically.

Worker processes (spawned, so they never inherit TensorFlow's threads) read, decode and
validate every image with numpy/Pillow (`coco_format.convert_image`); this process turns
the results into `tf.train.Example`s and writes them, in image-id order, to
``PREFIX-NNNNN-of-KKKKK.tfrecord.tmp-<pid>``. Only when every image has been converted are
the shards renamed to their final names and ``PREFIX-metadata.json`` written; on any error
every temporary file is removed, so no partial shard is ever left behind.
"""
from __future__ import annotations

import glob
import multiprocessing
import os
import time
from collections.abc import Callable
from typing import Any

from max_deeplab.atomic_files import write_json_atomic
from max_deeplab.data import coco_format, schema
from max_deeplab.data import metadata as metadata_lib
from max_deeplab.file_system import create_missing_dirs, remove_empty_dirs

_WORKER_STATE: dict[str, Any] = {}


def _init_worker(contiguous: dict[int, int], isthing: dict[int, bool], label_divisor: int
                 ) -> None:
    _WORKER_STATE.update(contiguous=contiguous, isthing=isthing, label_divisor=label_divisor)


def _convert_job(job: coco_format.ImageJob) -> dict[str, Any]:
    return coco_format.convert_image(job, _WORKER_STATE["contiguous"], _WORKER_STATE["isthing"],
                                     _WORKER_STATE["label_divisor"])


def default_num_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def check_output_prefix(output_prefix: str) -> None:
    """Raises ValueError unless `output_prefix` is a file-name prefix (a directory path with
    a name after it); a directory alone would give shards named ``DIR/-00000-of-00008``."""
    if os.path.basename(output_prefix) in ("", ".", ".."):
        raise ValueError(
            f"--output {output_prefix!r} names a directory, but --output is a file-name "
            f"prefix: e.g. --output {os.path.join(output_prefix, 'train')} "
            f"writes {metadata_lib.shard_path(os.path.join(output_prefix, 'train'), 0, 8)} ... "
            f"and {metadata_lib.metadata_path(os.path.join(output_prefix, 'train'))}")


def convert(annotations: str, images_dir: str, panoptic_dir: str, output_prefix: str,
            num_shards: int = 8, num_workers: int | None = None,
            label_divisor: int = schema.DEFAULT_LABEL_DIVISOR,
            log: Callable[[str], None] = print, progress_every_s: float = 5.0
            ) -> dict[str, Any]:
    """Converts a COCO panoptic data set; returns the metadata written beside the shards.

    Args:
      annotations: the COCO panoptic JSON (e.g. ``annotations/panoptic_val2017.json``).
      images_dir: directory of the images named by ``images[].file_name``.
      panoptic_dir: directory of the PNGs named by ``annotations[].file_name``.
      output_prefix: shards go to ``PREFIX-NNNNN-of-KKKKK.tfrecord``, metadata to
        ``PREFIX-metadata.json``.
      num_shards: K (clamped to the number of images).
      num_workers: decoding processes; 1 converts in this process.
      label_divisor: panoptic = class * label_divisor + instance.

    Raises:
      coco_format.ConversionError: bad input, naming the file and segment; nothing is left.
    """
    check_output_prefix(output_prefix)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    import tensorflow as tf

    from max_deeplab.data.tfrecord import make_example

    dataset = coco_format.load_coco_panoptic(annotations, images_dir, panoptic_dir)
    jobs = dataset.jobs
    if not jobs:
        raise coco_format.ConversionError(f"annotation file {annotations} has no annotations")
    num_images = len(jobs)
    num_shards = min(num_shards, num_images)
    num_workers = default_num_workers() if num_workers is None else max(1, num_workers)
    num_workers = min(num_workers, num_images)
    created_dirs = create_missing_dirs(os.path.dirname(os.path.abspath(output_prefix)))

    finals = [metadata_lib.shard_path(output_prefix, k, num_shards) for k in range(num_shards)]
    temps = [f"{path}.tmp-{os.getpid()}" for path in finals]
    log(f"converting {num_images} images from {annotations} into {num_shards} shards "
        f"({output_prefix}-*) with {num_workers} worker process(es)")
    pool = None
    writer = None
    start = last_report = time.perf_counter()
    max_segments = 0
    try:
        if num_workers > 1:
            pool = multiprocessing.get_context("spawn").Pool(
                num_workers, initializer=_init_worker,
                initargs=(dataset.contiguous, dataset.isthing, label_divisor))
            results = pool.imap(_convert_job, jobs, chunksize=4)
        else:
            _init_worker(dataset.contiguous, dataset.isthing, label_divisor)
            results = map(_convert_job, jobs)
        current_shard = -1
        for index, fields in enumerate(results):
            shard = index * num_shards // num_images
            if shard != current_shard:
                if writer is not None:
                    writer.close()
                writer = tf.io.TFRecordWriter(temps[shard])
                current_shard = shard
            writer.write(make_example(fields).SerializeToString())
            max_segments = max(max_segments, sum(1 for c in fields[schema.SEGMENTS_IS_CROWD]
                                                 if not c))
            now = time.perf_counter()
            if now - last_report >= progress_every_s or index + 1 == num_images:
                last_report = now
                rate = (index + 1) / max(now - start, 1e-9)
                eta = (num_images - index - 1) / rate
                log(f"  {index + 1}/{num_images} images  {rate:.1f} images/s  ETA {eta:.0f} s")
        writer.close()
        writer = None
        for temp, final in zip(temps, finals, strict=True):
            os.replace(temp, final)
    except BaseException:
        if writer is not None:
            writer.close()
        for temp in temps:
            if os.path.exists(temp):
                os.remove(temp)
        remove_empty_dirs(created_dirs)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()

    metadata = metadata_lib.build_metadata(
        dataset.categories, label_divisor,
        num_examples=num_images, num_shards=num_shards,
        shard_pattern=os.path.basename(metadata_lib.shard_pattern(output_prefix, num_shards)),
        max_segments_per_image=max_segments,
        source={"annotations": os.path.abspath(annotations),
                "images": os.path.abspath(images_dir),
                "panoptic": os.path.abspath(panoptic_dir)})
    write_json_atomic(metadata_lib.metadata_path(output_prefix), metadata)
    stale = sorted(set(glob.glob(f"{glob.escape(output_prefix)}-?????-of-?????.tfrecord"))
                   - set(finals))
    if stale:
        log(f"warning: {len(stale)} older shard(s) with another shard count share the prefix "
            f"(e.g. {stale[0]}); use the pattern {metadata['shard_pattern']} to read this set")
    log(f"wrote {num_images} images to {num_shards} shards and "
        f"{metadata_lib.metadata_path(output_prefix)} in {time.perf_counter() - start:.1f} s")
    return metadata
