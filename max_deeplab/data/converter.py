"""COCO panoptic (JSON + PNGs + images) -> sharded TFRecords + metadata, atomically.

Worker processes (spawned, so they never inherit TensorFlow's threads) read, decode and
validate every image with numpy/Pillow (`coco_format.convert_image`); this process turns
the results into `tf.train.Example`s and writes them, in image-id order, to hidden
temporary files (``DIR/.NAME-NNNNN-of-KKKKK.tfrecord.tmp-<pid>``, see
`atomic_files.temporary_path`), which no shard glob matches. Only when every image has been
converted are the shards renamed to their final names and ``PREFIX-metadata.json`` written
(SIGINT and SIGTERM wait for those few renames); on any error, Ctrl-C or SIGTERM every
temporary file is removed, so no partial shard is ever left behind. A run killed outright
(SIGKILL, power loss) cannot clean up: the next run into the same prefix removes what it
left, and refuses to start while a live process still writes there.
"""
from __future__ import annotations

import glob
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from max_deeplab.atomic_files import (
    process_is_running,
    temporary_owner,
    temporary_path,
    write_json_atomic,
)
from max_deeplab.cpu_cores import default_num_workers
from max_deeplab.data import coco_format, schema
from max_deeplab.data import metadata as metadata_lib
from max_deeplab.file_system import (
    create_missing_dirs,
    directory_problem,
    remove_empty_dirs,
)
from max_deeplab.interruption import signal_name, signals_held
from max_deeplab.panoptic_labels import LABEL_DIVISOR

_WORKER_STATE: dict[str, Any] = {}


def _init_worker(contiguous: dict[int, int], isthing: dict[int, bool], label_divisor: int,
                 in_pool: bool = False) -> None:
    if in_pool:
        # Ctrl-C reaches the whole process group: the parent cleans up and stops the pool;
        # workers dying of KeyboardInterrupt would each print a traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER_STATE.update(contiguous=contiguous, isthing=isthing, label_divisor=label_divisor)


def _convert_job(job: coco_format.ImageJob) -> dict[str, Any]:
    return coco_format.convert_image(job, _WORKER_STATE["contiguous"], _WORKER_STATE["isthing"],
                                     _WORKER_STATE["label_divisor"])


def check_output_prefix(output_prefix: str) -> None:
    """Raises ValueError unless `output_prefix` is a file-name prefix (a directory path with
    a name after it; a directory alone would give shards named ``DIR/-00000-of-00008``) in a
    directory that exists or can be created and is writable."""
    if os.path.basename(output_prefix) in ("", ".", ".."):
        raise ValueError(
            f"--output {output_prefix!r} names a directory, but --output is a file-name "
            f"prefix: e.g. --output {os.path.join(output_prefix, 'train')} "
            f"writes {metadata_lib.shard_path(os.path.join(output_prefix, 'train'), 0, 8)} ... "
            f"and {metadata_lib.metadata_path(os.path.join(output_prefix, 'train'))}")
    problem = directory_problem(os.path.dirname(os.path.abspath(output_prefix)))
    if problem:
        raise ValueError(f"--output {output_prefix}: {problem}")


def _temporaries_of(output_prefix: str) -> list[str]:
    """Temporary shard files of conversions into `output_prefix`, hidden or (as written by
    earlier versions) not."""
    directory, name = os.path.split(os.path.abspath(output_prefix))
    found = []
    for hidden in (True, False):
        pattern = glob.escape(("." if hidden else "") + name) + "-?????-of-?????.tfrecord.tmp-*"
        found += glob.glob(os.path.join(glob.escape(directory), pattern))
    return sorted(path for path in found if temporary_owner(path) is not None)


def remove_stale_temporaries(output_prefix: str, log: Callable[[str], None] = print) -> None:
    """Removes the temporary shard files that a conversion into `output_prefix` killed
    outright (SIGKILL, power loss) left behind.

    Raises:
      coco_format.ConversionError: a process that is still running owns one: another
        `convert` is writing this prefix.
    """
    by_owner: dict[int, list[str]] = {}
    for path in _temporaries_of(output_prefix):
        by_owner.setdefault(temporary_owner(path), []).append(path)
    for pid, paths in sorted(by_owner.items()):
        if pid != os.getpid() and process_is_running(pid):
            raise coco_format.ConversionError(
                f"another process (process {pid}) is writing shards of {output_prefix}: "
                f"{paths[0]}. Wait for it to finish or stop it; if no `max-deeplab convert` "
                "is running, delete that file.")
        for path in paths:
            os.remove(path)
        log(f"removed {len(paths)} temporary file(s) of an interrupted convert "
            f"(process {pid}): {', '.join(os.path.basename(p) for p in paths)}")


def _write_temporaries(dataset: coco_format.CocoPanoptic, temps: list[str], num_workers: int,
                       label_divisor: int, log: Callable[[str], None],
                       progress_every_s: float) -> int:
    """Converts every image of `dataset` (in `num_workers` processes) and writes the Examples
    to the shard files `temps`, consecutive images per shard; returns the largest number of
    non-crowd segments in an image. Stops the workers before it returns or raises."""
    import tensorflow as tf

    from max_deeplab.data.tfrecord import make_example

    jobs = dataset.jobs
    num_images, num_shards = len(jobs), len(temps)
    pool = None
    writer = None
    start = last_report = time.perf_counter()
    max_segments = 0
    try:
        if num_workers > 1:
            pool = multiprocessing.get_context("spawn").Pool(
                num_workers, initializer=_init_worker,
                initargs=(dataset.contiguous, dataset.isthing, label_divisor, True))
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
    finally:
        if writer is not None:
            writer.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    return max_segments


def convert(annotations: str, images_dir: str, panoptic_dir: str, output_prefix: str,
            num_shards: int = 8, num_workers: int | None = None,
            label_divisor: int = LABEL_DIVISOR,
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
    remove_stale_temporaries(output_prefix, log)
    # TensorFlow (~5 s to import) is loaded before the conversion's clock starts.
    from max_deeplab.data import tfrecord  # noqa: F401

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
    temps = [temporary_path(path) for path in finals]
    log(f"converting {num_images} images from {annotations} into {num_shards} shards "
        f"({output_prefix}-*) with {num_workers} worker process(es)")
    start = time.perf_counter()
    committed = False
    try:
        max_segments = _write_temporaries(dataset, temps, num_workers, label_divisor, log,
                                          progress_every_s)
        metadata = metadata_lib.build_metadata(
            dataset.categories, label_divisor,
            num_examples=num_images, num_shards=num_shards,
            shard_pattern=os.path.basename(metadata_lib.shard_pattern(output_prefix,
                                                                      num_shards)),
            shard_bytes={os.path.basename(final): os.path.getsize(temp)
                         for temp, final in zip(temps, finals, strict=True)},
            max_segments_per_image=max_segments,
            source={"annotations": os.path.abspath(annotations),
                    "images": os.path.abspath(images_dir),
                    "panoptic": os.path.abspath(panoptic_dir)})
        # A signal now waits for the renames and the metadata (ms): the new data set goes in
        # whole, or not at all.
        with signals_held(deliver=False) as held:
            for temp, final in zip(temps, finals, strict=True):
                os.replace(temp, final)
            write_json_atomic(metadata_lib.metadata_path(output_prefix), metadata)
            committed = True
    finally:
        if not committed:
            for temp in temps:
                if os.path.exists(temp):
                    os.remove(temp)
            remove_empty_dirs(created_dirs)
    if held.first is not None:
        log(f"{signal_name(held.first)} arrived while the finished shards were renamed into "
            "place; the conversion is complete")
    stale = sorted(set(glob.glob(f"{glob.escape(output_prefix)}-?????-of-?????.tfrecord"))
                   - set(finals))
    if stale:
        log(f"warning: {len(stale)} older shard(s) with another shard count share the prefix "
            f"(e.g. {stale[0]}); use the pattern {metadata['shard_pattern']} to read this set")
    log(f"wrote {num_images} images to {num_shards} shards and "
        f"{metadata_lib.metadata_path(output_prefix)} in {time.perf_counter() - start:.1f} s")
    return metadata
