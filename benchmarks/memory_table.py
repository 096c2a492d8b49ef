"""Device memory of the XLA-compiled training step, from XLA's own buffer assignment.

The step is the one `max-deeplab train --jit_compile` runs (paper §4, docs/design.md §7): the
`Trainer`'s per-replica step — forward, `MaXDeepLabLoss` with the pure-TF Hungarian matcher,
gradients, RAdam + Lookahead update — built from the library's own `build_model`,
`MaXDeepLabLoss`, `build_optimizer` and `Trainer`, compiled with `jit_compile=True` for the
CPU. Nothing is run: the program is only compiled
(`experimental_get_compiler_ir(...)(stage="optimized_hlo")`) for a batch of zeros of the
config's crop, with XLA asked to dump its buffer assignment (`XLA_FLAGS=--xla_dump_to=DIR
--xla_dump_hlo_as_text`); the child process is stopped once that is written (the CPU code
generation after it changes no buffer). Only the model's weights and the optimiser's state
are real tensors (the compiled program's resource parameters: about 16 bytes per weight,
6.7 GiB for MaX-DeepLab-L).

XLA's CPU buffer assignment is one allocation per parameter (weights, optimiser state, the
batch), one per output not aliased to a parameter, the constants, and one pre-allocated
block for all temporaries sized by XLA's heap simulation of the scheduled program (its peak).
The total is therefore the peak memory of one step as XLA plans it for the CPU. A TPU or GPU
plans differently (layouts padded to tiles, other fusions and schedules): see docs/memory.md.

Each case (config x per-replica batch x dtype) compiles in its own process, one at a time:
XLA_FLAGS must be set before TensorFlow initialises XLA, and the peak RSS is the case's own.

Usage:
  .venv/bin/python benchmarks/memory_table.py                 # all 24 cases (~50 min here)
  .venv/bin/python benchmarks/memory_table.py --configs max_deeplab_s_coco_641.gin \\
      --batches 1 --dtypes float32                            # one case
  .venv/bin/python benchmarks/memory_table.py --json results.jsonl   # also one JSON line/case
  .venv/bin/python benchmarks/memory_table.py --markdown results.jsonl  # docs/memory.md tables
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
GIB = 1024 ** 3

PAPER_CONFIGS = ("max_deeplab_s_coco_641.gin", "max_deeplab_s_coco_1025.gin",
                 "max_deeplab_l_coco_1025.gin")
SHORT_NAMES = {"max_deeplab_s_coco_641.gin": "S 641", "max_deeplab_s_coco_1025.gin": "S 1025",
               "max_deeplab_l_coco_1025.gin": "L 1025"}
DTYPES = ("float32", "bfloat16")
# Device memories the tables compare against (GiB): a TPU v3 core, a TPU v4 chip, GPUs.
DEVICE_GIB = (16, 32, 40, 80)

_TOTAL = re.compile(r"^Total bytes used: (\d+)", re.MULTILINE)
_ALLOCATION = re.compile(r"^allocation (\d+): size (\d+), (.*)$")
_VALUE = re.compile(r"^ value: <\d+ (\S+) @[^>]*> \(size=(\d+),offset=\d+\): (\S+)")
_FROM = re.compile(r"^ from instruction: %?(\S+) = .*?op_name=\"([^\"]*)\"")


def xla_dump_flags(dump_dir: str) -> str:
    """The XLA_FLAGS value that makes XLA write its buffer assignment into `dump_dir`."""
    return f"--xla_dump_to={dump_dir} --xla_dump_hlo_as_text"


@dataclasses.dataclass
class MemoryReport:
    """One compiled program's buffer assignment (XLA's `*memory-usage-report.txt` and
    `*buffer-assignment.txt`), in bytes.

    `total_bytes`: XLA's "Total bytes used" (every allocation). `by_kind`: the same split
    into ``parameter`` (inputs, resource variables; an updated variable aliases its
    parameter), ``temp`` (the pre-allocated block of all temporaries, as large as their
    simulated peak), ``output`` (outputs not aliased to a parameter), ``constant`` and
    ``thread_local``. `largest_temporaries`: the largest values placed in the temporary
    block as (bytes, HLO value, shape, TensorFlow op name), largest first.
    """

    module: str
    total_bytes: int
    by_kind: dict[str, int]
    largest_temporaries: list[tuple[int, str, str, str]]


def _allocation_kind(description: str) -> str:
    if "parameter " in description:
        return "parameter"
    if "preallocated-temp" in description:
        return "temp"
    if "thread-local" in description:
        return "thread_local"
    if "constant" in description:
        return "constant"
    if "output shape" in description or "maybe-live-out" in description:
        return "output"
    return "temp"


def read_memory_report(dump_dir: str, module_contains: str = "",
                       top: int = 10) -> MemoryReport:
    """The buffer assignment of the program XLA compiled into `dump_dir`.

    With several programs there, the largest whose file name contains `module_contains`.
    Raises FileNotFoundError if there is none.
    """
    reports = [name for name in os.listdir(dump_dir)
               if name.endswith("memory-usage-report.txt") and module_contains in name]
    if not reports:
        raise FileNotFoundError(f"no *memory-usage-report.txt matching {module_contains!r} "
                                f"in {dump_dir}")
    totals = {}
    for name in reports:
        with open(os.path.join(dump_dir, name), encoding="utf-8") as f:
            found = _TOTAL.search(f.read(4096))
        if found is None:
            raise ValueError(f"{name}: no 'Total bytes used' line")
        totals[name] = int(found.group(1))
    report = max(totals, key=totals.get)
    module = report[:-len("-memory-usage-report.txt")]
    by_kind = dict.fromkeys(("parameter", "temp", "output", "constant", "thread_local"), 0)
    temporaries: dict[str, tuple[int, str]] = {}
    op_names: dict[str, str] = {}
    kind = None
    with open(os.path.join(dump_dir, module + "-buffer-assignment.txt"),
              encoding="utf-8") as f:
        for line in f:
            match = _ALLOCATION.match(line)
            if match:
                kind = _allocation_kind(match.group(3))
                by_kind[kind] += int(match.group(2))
                continue
            match = _VALUE.match(line)
            if match:
                if kind == "temp":
                    size = int(match.group(2))
                    if size > temporaries.get(match.group(1), (-1,))[0]:
                        temporaries[match.group(1)] = (size, match.group(3))
                continue
            kind = None if not line.startswith(" ") else kind
            match = _FROM.match(line)
            if match:
                op_names[match.group(1)] = match.group(2)
    largest = sorted(temporaries.items(), key=lambda item: -item[1][0])[:top]
    return MemoryReport(
        module=module, total_bytes=totals[report], by_kind=by_kind,
        largest_temporaries=[(size, name, shape, op_names.get(name, ""))
                             for name, (size, shape) in largest])


def compute_dtypes(hlo_path: str) -> dict[str, int]:
    """How many convolutions and dots of an HLO text dump compute in each element type, as
    ``{"convolution f32": n, "dot bf16": m, ...}``. Comparing the program before and after
    optimisation shows what XLA CPU did with bfloat16 (it may run a bfloat16 convolution in
    float32 between converts)."""
    counts: dict[str, int] = {}
    pattern = re.compile(r"= (\w+)\[[^\]]*\]\S* (convolution|dot)\(")
    with open(hlo_path, encoding="utf-8") as f:
        for line in f:
            match = pattern.search(line)
            if match:
                key = f"{match.group(2)} {match.group(1)}"
                counts[key] = counts.get(key, 0) + 1
    return counts


CHILD = r"""
import json, os, resource, sys, time
config, batch, dtype, dump_dir = sys.argv[1:5]
batch = int(batch)
os.environ["XLA_FLAGS"] = sys.argv[5]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf
import tf_keras as tfk
from max_deeplab.data.pipeline import build_dataset
from max_deeplab.gin_config import parse_config
from max_deeplab.losses import MaXDeepLabLoss
from max_deeplab.model import build_model
from max_deeplab.training import build_optimizer
from max_deeplab.training.experiment import experiment_options
from max_deeplab.training.run_directory import configured_value
from max_deeplab.training.trainer import Trainer

parse_config([config], [])
crop = tuple(int(v) for v in configured_value("build_dataset", build_dataset, "crop_size"))
k_max = int(configured_value("build_dataset", build_dataset, "k_max"))
options = experiment_options()
if dtype == "bfloat16":
    # What `run_experiment` does for `--mixed_precision bfloat16`.
    tfk.mixed_precision.set_global_policy("mixed_bfloat16")
strategy = tf.distribute.get_strategy()  # one replica: the per-replica step
model = build_model()
optimizer = build_optimizer(int(options["total_steps"]), model)
global_step = tf.Variable(0, dtype=tf.int64, trainable=False)
global_batch = batch  # each replica's loss is its share of the global mean: same program
trainer = Trainer(strategy, model, MaXDeepLabLoss(), optimizer, None, global_step,
                  global_batch, int(options["total_steps"]), jit_compile=True, seed=0,
                  print_fn=lambda line: None)
height, width = crop
specs = {
    "image": tf.TensorSpec([batch, height, width, 3], tf.float32),
    "segment_ids": tf.TensorSpec([batch, height, width], tf.int32),
    "segment_classes": tf.TensorSpec([batch, k_max], tf.int32),
    "segment_valid": tf.TensorSpec([batch, k_max], tf.bool),
    "segment_is_thing": tf.TensorSpec([batch, k_max], tf.bool),
    "semantic": tf.TensorSpec([batch, height, width], tf.int32),
}
def nbytes(variables):
    return sum(v.shape.num_elements() * v.dtype.size for v in variables)
optimizers = [optimizer] + [getattr(optimizer, "inner_optimizer", optimizer)]
slots = {id(v): v for opt in optimizers for v in opt.variables}
weights = {id(v): v for v in model.variables}
state = [v for key, v in slots.items() if key not in weights]
# The sizes first (flushed): the parent may stop this process once XLA has written the
# buffer assignment, before the CPU code generation that follows it.
print(json.dumps({
    "crop": list(crop), "k_max": k_max,
    "parameters": int(sum(v.shape.num_elements() for v in model.trainable_variables)),
    "weight_bytes": nbytes(model.variables),
    "optimizer_state_bytes": nbytes(state),
    "batch_bytes": sum(s.shape.num_elements() * s.dtype.size for s in specs.values()),
    "compile_start": time.time(),
}), flush=True)
# Zeros (at most ~0.2 GB here): the compiler IR API takes TensorSpecs only as top-level
# arguments, and the step takes one dict. Nothing is executed.
batch_zeros = {key: tf.zeros(spec.shape, spec.dtype) for key, spec in specs.items()}
trainer._replica_step_fn.experimental_get_compiler_ir(batch_zeros)(stage="optimized_hlo")
print(json.dumps({"compile_end": time.time(),
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}),
      flush=True)
"""


def _buffer_assignment_written(dump_dir: str) -> bool:
    # XLA writes the optimised HLO, the buffer assignment and the memory-usage report, then
    # (written once the report is closed) the module's debug options and the files of the
    # CPU code generation.
    names = os.listdir(dump_dir)
    reports = [n for n in names if n.endswith("memory-usage-report.txt") and "replica_step" in n]
    if not reports:
        return False
    written = os.stat(os.path.join(dump_dir, reports[0])).st_mtime_ns
    return any(os.stat(os.path.join(dump_dir, n)).st_mtime_ns > written
               for n in names if n != reports[0])


def _peak_rss_gib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return None


def run_case(config: str, batch: int, dtype: str, dump_root: str, keep_dump: bool = False,
             timeout: float | None = None, full_compile: bool = False) -> dict:
    """Compiles one case in a child process and returns its measurements (raises on failure).

    The child is stopped as soon as XLA has written the buffer assignment (the CPU code
    generation after it changes no buffer), unless `full_compile`.
    """
    dump_dir = tempfile.mkdtemp(prefix=f"{os.path.splitext(config)[0]}_b{batch}_{dtype}_",
                                dir=dump_root)
    out_path, err_path = (os.path.join(dump_root, os.path.basename(dump_dir) + suffix)
                          for suffix in (".out", ".err"))
    start = time.perf_counter()
    try:
        with open(out_path, "w") as out, open(err_path, "w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-c", CHILD, config, str(batch), dtype, dump_dir,
                 xla_dump_flags(dump_dir)], stdout=out, stderr=err)
            stopped = False
            try:
                while proc.poll() is None:
                    if timeout is not None and time.perf_counter() - start > timeout:
                        raise subprocess.TimeoutExpired(proc.args, timeout)
                    if not full_compile and _buffer_assignment_written(dump_dir):
                        stopped = True
                        break
                    time.sleep(1.0)
                finished = time.time()
                wall = time.perf_counter() - start
                peak_rss = _peak_rss_gib(proc.pid)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        with open(out_path) as f:
            lines = [json.loads(line) for line in f if line.startswith("{")]
        if not stopped and proc.returncode != 0 or not lines:
            with open(err_path) as f:
                raise RuntimeError(f"child failed (exit {proc.returncode}):\n{f.read()[-3000:]}")
        result = {key: value for line in lines for key, value in line.items()}
        result["compile_seconds"] = result.pop("compile_end", finished) - result["compile_start"]
        if stopped:
            result["peak_rss_gib"] = peak_rss
        report = read_memory_report(dump_dir, module_contains="replica_step")
        before = report.module.replace("cpu_after_optimizations", "before_optimizations")
        result.update(config=config, batch=batch, dtype=dtype, wall_seconds=wall,
                      stopped_after_buffer_assignment=stopped,
                      module=report.module, total_bytes=report.total_bytes,
                      by_kind=report.by_kind, largest_temporaries=report.largest_temporaries,
                      compute_dtypes=compute_dtypes(os.path.join(dump_dir,
                                                                 report.module + ".txt")),
                      compute_dtypes_before=compute_dtypes(os.path.join(dump_dir,
                                                                        before + ".txt")))
        return result
    finally:
        if not keep_dump:
            shutil.rmtree(dump_dir, ignore_errors=True)
            for path in (out_path, err_path):
                if os.path.exists(path):
                    os.remove(path)


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def markdown_tables(results: list[dict]) -> str:
    """docs/memory.md's tables from `--json` lines (the last line of each case counts):
    total bytes per case; per config and precision, the largest measured per-replica batch
    whose total is within each of `DEVICE_GIB` (and the share of it that total takes); the
    training state per config; each case's times."""
    cases: dict[tuple[str, int, str], dict] = {}
    for r in results:
        cases[(r["config"], r["batch"], r["dtype"])] = r
    order = {name: i for i, name in enumerate(PAPER_CONFIGS)}
    configs = sorted(dict.fromkeys(r["config"] for r in results),
                     key=lambda c: order.get(c, len(order)))
    batches = sorted({r["batch"] for r in results})

    def cell(config: str, batch: int, dtype: str, key: str = "total_bytes") -> str:
        r = cases.get((config, batch, dtype))
        if r is None:
            return "—"
        if "error" in r:
            return "failed"
        return f"{r[key] / GIB:.2f}" if key.endswith("bytes") else f"{r[key]:.0f}"

    lines = ["| model | crop | batch per replica | float32 GiB | bfloat16 (mixed) GiB |",
             "|---|---|---|---|---|"]
    for config in configs:
        crop = next((r["crop"][0] for r in results if r["config"] == config and "crop" in r),
                    "?")
        for batch in batches:
            if not any((config, batch, d) in cases for d in DTYPES):
                continue
            lines.append(f"| {SHORT_NAMES.get(config, config)} | {crop} | {batch} | "
                         f"{cell(config, batch, 'float32')} | "
                         f"{cell(config, batch, 'bfloat16')} |")
    lines += ["", "| model | precision | " + " | ".join(f"{c} GiB" for c in DEVICE_GIB) + " |",
              "|---|---|" + "---|" * len(DEVICE_GIB)]
    for config in configs:
        for dtype in DTYPES:
            measured = sorted((b, r["total_bytes"] / GIB) for (c, b, d), r in cases.items()
                              if c == config and d == dtype and "total_bytes" in r)
            if not measured:
                continue
            cells = []
            for capacity in DEVICE_GIB:
                fitting = [(b, total) for b, total in measured if total <= capacity]
                cells.append(f"{fitting[-1][0]} ({fitting[-1][1] / capacity:.0%})" if fitting
                             else f"none of {', '.join(str(b) for b, _ in measured)}")
            lines.append(f"| {SHORT_NAMES.get(config, config)} | {dtype} | "
                         + " | ".join(cells) + " |")
    lines += ["", "| model | trainable parameters | weights GiB | optimiser state GiB |",
              "|---|---|---|---|"]
    for config in configs:
        r = next((r for r in results if r["config"] == config and "parameters" in r), None)
        if r is not None:
            lines.append(f"| {SHORT_NAMES.get(config, config)} | {r['parameters']:,} | "
                         f"{r['weight_bytes'] / GIB:.2f} | "
                         f"{r['optimizer_state_bytes'] / GIB:.2f} |")
    lines += ["", "| model | batch | dtype | to buffer assignment s | case wall s | "
              "peak RSS GiB |", "|---|---|---|---|---|---|"]
    for (config, batch, dtype), r in sorted(
            cases.items(), key=lambda item: (configs.index(item[0][0]),
                                             DTYPES.index(item[0][2]), item[0][1])):
        if "error" in r:
            continue
        lines.append(f"| {SHORT_NAMES.get(config, config)} | {batch} | {dtype} | "
                     f"{r['compile_seconds']:.0f} | {r['wall_seconds']:.0f} | "
                     f"{r['peak_rss_gib']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(PAPER_CONFIGS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8],
                        help="per-replica batch sizes")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--dump_root", default=None,
                        help="where the XLA dumps go (default: a temporary directory)")
    parser.add_argument("--keep_dumps", action="store_true")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds a case may compile before it is given up")
    parser.add_argument("--full_compile", action="store_true",
                        help="let XLA finish the CPU code generation (slower; the buffer "
                             "assignment is the same)")
    parser.add_argument("--top", type=int, default=3,
                        help="largest temporaries printed per case")
    parser.add_argument("--json", default=None, help="append one JSON line per case here")
    parser.add_argument("--markdown", default=None, metavar="JSONL",
                        help="print docs/memory.md's tables from a --json file and exit")
    args = parser.parse_args()
    if args.markdown:
        with open(args.markdown, encoding="utf-8") as f:
            print(markdown_tables([json.loads(line) for line in f if line.strip()]))
        return
    dump_root = args.dump_root or tempfile.mkdtemp(prefix="max_deeplab_memory_")
    os.makedirs(dump_root, exist_ok=True)

    print("XLA CPU buffer assignment of the jit-compiled training step (forward, loss with the "
          "pure-TF matcher, gradients, RAdam + Lookahead); GiB = 2^30 bytes")
    header = (f"{'config':<8} {'crop':>5} {'batch':>5} {'dtype':>8} {'total':>7} {'temp':>7} "
              f"{'params':>7} {'output':>6} {'weights':>7} {'opt st':>7} {'compile s':>9} "
              f"{'wall s':>7} {'RSS':>5}  conv/dot dtypes")
    print(header, flush=True)
    for config in args.configs:
        for dtype in args.dtypes:
            for batch in args.batches:
                name = SHORT_NAMES.get(config, os.path.splitext(config)[0])
                try:
                    r = run_case(config, batch, dtype, dump_root, args.keep_dumps,
                                 args.timeout, args.full_compile)
                except (RuntimeError, subprocess.TimeoutExpired, FileNotFoundError,
                        ValueError) as e:
                    print(f"{name:<8} {'':>5} {batch:>5} {dtype:>8} failed: {e}", flush=True)
                    if args.json:
                        with open(args.json, "a", encoding="utf-8") as f:
                            f.write(json.dumps({"config": config, "batch": batch,
                                                "dtype": dtype, "error": str(e)[-2000:]})
                                    + "\n")
                    continue
                kinds = r["by_kind"]
                convs = " ".join(f"{k.replace('convolution', 'conv')}:{v}"
                                 for k, v in sorted(r["compute_dtypes"].items()))
                convs_before = " ".join(f"{k.replace('convolution', 'conv')}:{v}" for k, v
                                        in sorted(r["compute_dtypes_before"].items()))
                print(f"{name:<8} {r['crop'][0]:>5} {batch:>5} {dtype:>8} "
                      f"{_gib(r['total_bytes']):>7} {_gib(kinds['temp']):>7} "
                      f"{_gib(kinds['parameter']):>7} {_gib(kinds['output']):>6} "
                      f"{_gib(r['weight_bytes']):>7} {_gib(r['optimizer_state_bytes']):>7} "
                      f"{r['compile_seconds']:>9.0f} {r['wall_seconds']:>7.0f} "
                      f"{r['peak_rss_gib'] or float('nan'):>5.1f}  {convs}", flush=True)
                for size, value, shape, op in r["largest_temporaries"][:args.top]:
                    print(f"    temporary {size / 2 ** 20:8.1f} MiB {shape} {op or value}")
                print(f"    parameters {r['parameters']:,}; conv/dot dtypes before XLA's "
                      f"optimisation: {convs_before}", flush=True)
                if args.json:
                    with open(args.json, "a", encoding="utf-8") as f:
                        f.write(json.dumps(r) + "\n")
    if not args.dump_root:
        shutil.rmtree(dump_root, ignore_errors=True)


if __name__ == "__main__":
    main()
