"""`max-deeplab pq`: panoptic quality of COCO-panoptic predictions (COCO evaluator semantics).

    max-deeplab pq --gt_json panoptic_val.json --gt_dir panoptic_val/ \\
        --pred_json predictions.json --pred_dir predictions/ [--output metrics.json]

Prints the All / Things / Stuff table (PQ, SQ, RQ in %, N = categories counted) and writes
{"All": {"pq","sq","rq","n"}, "Things": ..., "Stuff": ..., "per_class": {id: {"pq","sq","rq"}}}
(fractions, not %) to --output. IoU > 0.5 matching, void and crowd handling and per-category
averaging follow the COCO reference evaluator (panopticapi pq_compute) exactly.
Neither TensorFlow nor numpy is imported by this verb (on COCO-style 8-bit PNGs).

Exit codes: 0 metrics computed; 1 bad input (named in the message) or nothing to evaluate
(no image, or no category with a segment); 2 bad flags, or an --output that cannot be
written (checked before evaluating).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time

# See max_deeplab.__main__.console_main: this verb writes its metrics atomically and reaps its
# workers before returning, so the interpreter's teardown can be skipped when it is the program.
EXIT_WITHOUT_TEARDOWN = True


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


_BOOLEAN_VALUES = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _boolean(text: str) -> bool:
    try:
        return _BOOLEAN_VALUES[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}") from None


def _parser(prog: str) -> argparse.ArgumentParser:
    """This verb's flags, with argparse rather than absl.flags like the other verbs: importing
    absl.flags costs ~25 ms, ~5% of the whole benchmarked run (`benchmarks/bench_pq.py`).
    Spelled as for the other verbs: --flag value, --flag=value, --per_class[=true|false],
    --noper_class, --help / --helpshort; absl's single-dash (-flag) and --flagfile forms are
    not accepted, and a value starting with "-" needs the --flag=value form."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False)
    parser.add_argument("--helpshort", action="help", help="Same as --help.")
    parser.add_argument("--gt_json", help="Ground-truth COCO panoptic JSON (with 'categories').")
    parser.add_argument("--gt_dir", help="Directory of ground-truth panoptic PNGs.")
    parser.add_argument("--pred_json", help="Prediction COCO panoptic JSON.")
    parser.add_argument("--pred_dir", help="Directory of prediction panoptic PNGs.")
    parser.add_argument("--output", help="Optional path of the metrics JSON to write.")
    parser.add_argument("--num_workers", type=_positive_int, default=None,
                        help="Worker processes (default: the usable CPU cores; 1 = evaluate "
                        "in this process).")
    parser.add_argument("--per_class", type=_boolean, nargs="?", const=True, default=False,
                        metavar="true|false",
                        help="Also print the per-class PQ / SQ / RQ table.")
    parser.add_argument("--noper_class", dest="per_class", action="store_false",
                        help="Same as --per_class=false.")
    parser.add_argument("--verbose", type=_boolean, nargs="?", const=True, default=False,
                        metavar="true|false",
                        help="Accepted as by every verb; pq has no TensorFlow logs to show.")
    return parser


# glibc mallopt parameters and their defaults.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD = -1, -3, 128 << 10


@contextlib.contextmanager
def _freed_memory_kept():
    """While active, glibc keeps freed memory for reuse instead of handing it to the kernel.

    Every image pair allocates and frees ~2 MB (the inflated rows of its two PNGs; more on
    the numpy path). With glibc's defaults blocks that large are mmap-ed or trimmed on free,
    so each image touches fresh pages again: ~54k page faults for 120 COCO-sized pairs, which
    made a one-worker run 0.37-0.44 s instead of 0.22-0.25 s. Serving blocks < 32 MiB from
    the heap and keeping up to 256 MiB of it free cuts that to ~2.8k. The settings are
    process-wide, so on exit both thresholds go back to glibc's default values (for callers
    of `main` in a longer-lived process). glibc has no call to re-enable its dynamic mmap
    threshold (which raises the threshold as large blocks are freed), so such a caller keeps
    the fixed 128 KiB threshold: larger blocks are mmap-ed, which costs speed, not memory.
    A no-op off glibc.
    """
    mallopt = None
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):  # not glibc
            mallopt = None
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum
        mallopt(_M_TRIM_THRESHOLD, 256 << 20)
    try:
        yield
    finally:
        if mallopt is not None:
            mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
            mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)


def main(argv: list[str]) -> int:
    parser = _parser(argv[0])
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit as e:  # --help (0) or a usage error (2, message already printed)
        return int(e.code or 0)
    missing = [n for n in ("gt_json", "gt_dir", "pred_json", "pred_dir")
               if not getattr(args, n)]
    if missing:
        print(f"{argv[0]}: missing required flag(s): "
              + ", ".join(f"--{n}" for n in missing), file=sys.stderr)
        return 2
    from max_deeplab.atomic_files import write_json_atomic
    from max_deeplab.file_system import output_file_problem

    problem = args.output and output_file_problem(args.output)
    if problem:
        print(f"{argv[0]}: error: --output {args.output}: {problem}", file=sys.stderr)
        return 2
    from max_deeplab.evaluation.coco_panoptic import (
        PanopticEvalError,
        build_jobs,
        compute_stats,
    )
    from max_deeplab.evaluation.pq_core import format_table

    start = time.perf_counter()
    try:
        with _freed_memory_kept():
            jobs, category_ids, is_thing, names = build_jobs(
                args.gt_json, args.gt_dir, args.pred_json, args.pred_dir)
            if not jobs:
                raise PanopticEvalError(f"nothing to evaluate: the ground-truth JSON "
                                        f"{args.gt_json} has no annotations")
            result = compute_stats(jobs, category_ids, is_thing, args.num_workers).summarize()
            if result["All"]["n"] == 0:
                raise PanopticEvalError(
                    f"no category has a segment in the {len(jobs)} image(s) of {args.gt_json} "
                    "or their predictions (crowd segments do not count): nothing was evaluated")
    except PanopticEvalError as e:
        print(f"{argv[0]}: error: {e}", file=sys.stderr)
        return 1
    print(format_table(result, names if args.per_class else None))
    print(f"{len(jobs)} images evaluated in {time.perf_counter() - start:.2f} s")
    if args.output:
        try:
            write_json_atomic(args.output, result)
        except OSError as e:
            print(f"{argv[0]}: error: cannot write --output {args.output}: {e}", file=sys.stderr)
            return 1
        print(f"metrics written to {args.output}")
    return 0
