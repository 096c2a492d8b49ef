"""`max-deeplab <verb>` / `python -m max_deeplab <verb>`.

Each verb lives in its own module under `max_deeplab.cli` exposing `main(argv)`, and is
imported only when asked for: verbs that build no model (e.g. `pq`, `synthetic`) must not
pay for importing TensorFlow.

As a program (`console_main`), before the verb imports TensorFlow: TensorFlow's C++ log
lines (start-up notices, "failed call to cuInit" on machines without a GPU) are hidden
unless the verb is given --verbose or TF_CPP_MIN_LOG_LEVEL is set; stdout is line-buffered
so progress lines show as they are printed, also through a pipe.
"""
from __future__ import annotations

import atexit
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
    "overlay": ("max_deeplab.cli.overlay",
                "draw COCO panoptic ground truth (and predictions beside it) over the photos"),
    "import-checkpoint": ("max_deeplab.cli.import_checkpoint",
                          "import a published deeplab2 MaX-DeepLab checkpoint"),
    "pretrain": ("max_deeplab.cli.pretrain", "ImageNet (TFDS) pretraining of the backbone"),
    "analyze": ("max_deeplab.cli.analyze",
                "the paper's analysis pictures: mask slots, D = 3 features, M2P attention"),
}


def _usage() -> str:
    lines = ["usage: max-deeplab <verb> [flags]   (max-deeplab <verb> --help for flags)",
             "       max-deeplab --version", "", "verbs:"]
    width = max(len(v) for v in VERBS)
    for verb, (_, text) in sorted(VERBS.items()):
        lines.append(f"  {verb.ljust(width)}  {text}")
    return "\n".join(lines)


def _run(argv: list[str]):
    """Runs the verb named by argv[1]; returns (exit code, the verb's module or None)."""
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage())
        return (0 if len(argv) >= 2 else 2), None
    if argv[1] == "--version":
        from max_deeplab import __version__

        print(f"max-deeplab {__version__}")
        return 0, None
    verb = argv[1]
    if verb not in VERBS:
        print(f"max-deeplab: unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2, None
    module = importlib.import_module(VERBS[verb][0])
    # The verb sees argv[0] as "max-deeplab <verb>" so absl/argparse usage lines read right.
    return int(module.main([f"max-deeplab {verb}", *argv[2:]]) or 0), module


def _verbose_requested(verb_args: list[str]) -> bool:
    """Whether the verb's arguments turn --verbose on (the last spelling wins, as for flags).
    Read before the verb parses its flags: TensorFlow's C++ log level is fixed when
    TensorFlow is imported."""
    verbose = False
    for arg in verb_args:
        if arg in ("--verbose", "--verbose=true", "--verbose=1"):
            verbose = True
        elif arg in ("--noverbose", "--verbose=false", "--verbose=0"):
            verbose = False
    return verbose


def main(argv: list[str] | None = None) -> int:
    """Runs a verb (argv defaults to sys.argv) and returns its exit code."""
    return _run(list(sys.argv if argv is None else argv))[0]


def _teardown_has_work() -> bool:
    """Whether skipping the interpreter's teardown would lose something: atexit callbacks
    (e.g. coverage), or a profiler / tracer that reports at exit."""
    ncallbacks = getattr(atexit, "_ncallbacks", None)
    return (ncallbacks is None or ncallbacks() > 0 or sys.getprofile() is not None
            or sys.gettrace() is not None)


def console_main() -> None:
    """The program (`max-deeplab` console script, `python -m max_deeplab`): exits with the
    verb's code.

    A verb whose module sets `EXIT_WITHOUT_TEARDOWN = True` ends the process right after its
    output is flushed, skipping the interpreter's teardown (module and object finalisation,
    ~30 ms with numpy loaded, ~6% of `pq`'s benchmarked run) unless something registered work
    for it. A verb may set it only if it holds nothing that needs finalising: files closed,
    child processes reaped.
    """
    if not _verbose_requested(sys.argv[2:]):
        # 3: errors too; a failure that matters reaches the verb as an exception.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    code, module = _run(list(sys.argv))
    if getattr(module, "EXIT_WITHOUT_TEARDOWN", False) and not _teardown_has_work():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console_main()
