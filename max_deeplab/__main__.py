"""`max-deeplab <verb>` / `python -m max_deeplab <verb>`.

Each verb lives in its own module under `max_deeplab.cli` exposing `main(argv)`, and is
imported only when asked for: verbs that build no model (e.g. `pq`, `synthetic`) must not
pay for importing TensorFlow.
"""
from __future__ import annotations

import importlib
import os
import sys

# verb -> (module, one-line help). Only verbs that exist are listed.
VERBS: dict[str, tuple[str, str]] = {
    "summary": ("max_deeplab.cli.summary", "parameter counts per part and FLOPs of a config"),
    "pq": ("max_deeplab.cli.pq", "panoptic quality of COCO-format predictions (no TensorFlow)"),
    "synthetic": ("max_deeplab.cli.synthetic", "write a synthetic COCO-panoptic-format data set"),
    "convert": ("max_deeplab.cli.convert", "COCO panoptic -> TFRecord shards + metadata"),
    "train": ("max_deeplab.cli.train", "train / evaluate (any tf.distribute strategy, orbit)"),
    "evaluate": ("max_deeplab.cli.evaluate", "PQ/SQ/RQ of the latest checkpoint in --model_dir"),
    "export": ("max_deeplab.cli.export", "checkpoint -> self-contained SavedModel (image in)"),
    "predict": ("max_deeplab.cli.predict", "run a SavedModel: overlays + COCO panoptic results"),
    "import-checkpoint": ("max_deeplab.cli.import_checkpoint",
                          "import a published deeplab2 MaX-DeepLab checkpoint"),
    "pretrain": ("max_deeplab.cli.pretrain", "ImageNet (TFDS) pretraining of the backbone"),
}


def _usage() -> str:
    lines = ["usage: max-deeplab <verb> [flags]   (max-deeplab <verb> --help for flags)", "",
             "verbs:"]
    width = max(len(v) for v in VERBS)
    for verb, (_, text) in sorted(VERBS.items()):
        lines.append(f"  {verb.ljust(width)}  {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Runs a verb. `argv=None` means "this is the process's program" (console script,
    `python -m max_deeplab`): then a verb whose module sets `EXIT_WITHOUT_TEARDOWN = True`
    ends the process right after its output is flushed, skipping the interpreter's teardown
    (module and object finalisation, ~30 ms with numpy loaded, ~6% of `pq`'s benchmarked run).
    A verb may set it only if it holds nothing that needs finalising at exit: files closed,
    child processes reaped, no atexit work."""
    program = argv is None
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if len(argv) >= 2 else 2
    verb = argv[1]
    if verb not in VERBS:
        print(f"max-deeplab: unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(VERBS[verb][0])
    # The verb sees argv[0] as "max-deeplab <verb>" so absl/argparse usage lines read right.
    code = int(module.main([f"max-deeplab {verb}", *argv[2:]]) or 0)
    if program and getattr(module, "EXIT_WITHOUT_TEARDOWN", False):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
