"""Benchmark: `max-deeplab pq` versus the COCO reference evaluator, as whole processes.

Generates ~120 COCO-sized (480x640) ground-truth / prediction pairs with 10-30 segments each
(stuff, things, some crowd and void) into a temporary directory, then times from the command
line, each as a fresh Python process:

- ours: `python -m max_deeplab pq ...` (default workers = usable cores);
- reference: panopticapi `pq_compute` (panopticapi-lite), run via `python -c` in its own
  environment, `.venv-reference` (it pins numpy<2; `bash scripts/ensure_reference_venv.sh`
  makes it, scripts/test.sh too), once as installed (one worker per core) and once forced
  onto one core, the docs/design.md §8 anchor (8.9 s measured on one core for this workload).

The commands run in rounds (each round: ours with all workers, ours with one, the reference
with all cores, the reference on one core), so that every ratio compares runs made within
seconds of each other on this shared machine, whose speed drifts over minutes; each ratio is
the median of its per-round ratios. Prints the median times, the ratios, each round's host
steal share (`host_steal`: on a shared VM, rounds with high steal time the neighbours, and
they slow our two-core run more than the one-core reference), and checks that
PQ/SQ/RQ (All, Things, Stuff, per class) agree to 1e-9. Goal: >= 10x faster than the
reference on one core.

    .venv/bin/python benchmarks/bench_pq.py [--num_images 120] [--rounds 3]
        [--reference_python .venv-reference/bin/python]
"""
from __future__ import annotations

import argparse
import compileall
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from host_steal import cpu_times, describe, steal_share  # noqa: E402

_REFERENCE = """
import json, sys, multiprocessing
if sys.argv[6] == "1":
    multiprocessing.cpu_count = lambda: 1  # the reference sizes its pool by cpu_count()
from panopticapi.evaluation import pq_compute
r = pq_compute(sys.argv[1], sys.argv[2], gt_folder=sys.argv[3], pred_folder=sys.argv[4])
json.dump(r, open(sys.argv[5], "w"))
"""


def _run(cmd: list[str]) -> tuple[float, float]:
    """Wall time and CPU time (user + sys of the process and its workers) of one run.

    CPU time is printed too because on a shared machine wall time also measures the
    neighbours' load; the goal itself is about wall time on an otherwise idle machine.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def _rounds(cmds: dict[str, list[str]], rounds: int
            ) -> tuple[dict[str, list[tuple[float, float]]], list[float | None]]:
    """Runs every command once per round, in a rotated order; (wall, cpu) per run, and the
    host's steal share of each round (`host_steal`)."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in cmds}
    steal: list[float | None] = []
    names = list(cmds)
    for r in range(rounds):
        before = cpu_times()
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            runs[name].append(_run(cmds[name]))
        steal.append(steal_share(before, cpu_times()))
    return runs, steal


def _ratios(runs: dict[str, list[tuple[float, float]]], num: str, den: str,
            field: int = 0) -> list[float]:
    """Per-round ratio num / den of wall (field 0) or CPU (field 1) times."""
    return [a[field] / b[field] for a, b in zip(runs[num], runs[den])]


def _compare(ours: dict, ref: dict) -> float:
    worst = 0.0
    for group in ("All", "Things", "Stuff"):
        assert ours[group]["n"] == ref[group]["n"], (group, ours[group], ref[group])
        for k in ("pq", "sq", "rq"):
            worst = max(worst, abs(ours[group][k] - ref[group][k]))
    for cid, r in ref["per_class"].items():
        for k in ("pq", "sq", "rq"):
            worst = max(worst, abs(ours["per_class"][str(cid)][k] - r[k]))
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_images", type=int, default=120)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip_one_core", action="store_true",
                        help="skip the (slow) single-core reference run")
    parser.add_argument("--reference_python",
                        default=os.environ.get("MAX_DEEPLAB_REFERENCE_PYTHON")
                        or os.path.join(REPO, ".venv-reference", "bin", "python"),
                        help="interpreter of the environment with panopticapi-lite")
    args = parser.parse_args()
    if not os.access(args.reference_python, os.X_OK):
        sys.exit(f"no reference evaluator environment at {args.reference_python}: create it "
                 "with `bash scripts/ensure_reference_venv.sh`, or "
                 "pass --reference_python")

    sys.path.insert(0, os.path.join(REPO, "tests"))
    from random_pq_cases import default_categories, random_pair_set

    # Byte-compile the package first, as `pip install` does for an installed package (the
    # reference's panopticapi has its .pyc files): with PYTHONDONTWRITEBYTECODE set, an
    # editable checkout would otherwise recompile its modules in every timed process.
    compileall.compile_dir(os.path.join(REPO, "max_deeplab"), quiet=1)
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        # 20 thing and 12 stuff categories; ~10-30 segments per image incl. stuff bands.
        paths = random_pair_set(tmp, args.num_images, args.height, args.width, seed=0,
                                categories=default_categories(20, 12), num_things=(6, 24))
        with open(paths["gt_json"]) as f:
            gt = json.load(f)
        segs = [len(a["segments_info"]) for a in gt["annotations"]]
        crowd = sum(s["iscrowd"] for a in gt["annotations"] for s in a["segments_info"])
        print(f"generated {args.num_images} pairs of {args.height}x{args.width} in "
              f"{time.perf_counter() - t0:.1f} s: GT segments/image min {min(segs)} "
              f"mean {statistics.mean(segs):.1f} max {max(segs)}, {crowd} crowd segments")

        ours_json = os.path.join(tmp, "ours.json")
        ours_cmd = [py, "-m", "max_deeplab", "pq", "--gt_json", paths["gt_json"],
                    "--gt_dir", paths["gt_dir"], "--pred_json", paths["pred_json"],
                    "--pred_dir", paths["pred_dir"], "--output", ours_json]

        def ref_cmd(out: str, one_core: bool) -> list[str]:
            return [args.reference_python, "-c", _REFERENCE, paths["gt_json"], paths["pred_json"],
                    paths["gt_dir"], paths["pred_dir"], out, "1" if one_core else "0"]

        ref_json = os.path.join(tmp, "ref.json")
        cmds = {"ours": ours_cmd, "ours1": ours_cmd + ["--num_workers", "1"],
                "ref": ref_cmd(ref_json, False)}
        if not args.skip_one_core:
            cmds["ref1"] = ref_cmd(os.path.join(tmp, "ref1.json"), True)
        runs, steal = _rounds(cmds, args.rounds)

        with open(ours_json) as f:
            ours = json.load(f)
        with open(ref_json) as f:
            ref = json.load(f)
        worst = _compare(ours, ref)

    from max_deeplab.evaluation.png_overlap import fast_path_available

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print("ours: " + ("C extension path (libdeflate + C row loop)" if fast_path_available() else
                      "numpy path (the C extension is not compiled: see README)"))
    print(f"cores available: {cores}; load average {os.getloadavg()[0]:.1f} (wall times are "
          f"only meaningful near 0); {args.rounds} rounds, medians")
    print(f"{'':42s} {'wall':>7s} {'cpu':>7s}")
    labels = {"ours": f"ours      (max-deeplab pq, {cores} workers)",
              "ours1": "ours      (max-deeplab pq, 1 worker)",
              "ref": f"reference (panopticapi, {cores} processes)",
              "ref1": "reference (panopticapi, 1 core)"}
    for name, times in runs.items():
        wall = statistics.median(t[0] for t in times)
        cpu = statistics.median(t[1] for t in times)
        print(f"{labels[name]:42s} {wall:6.2f}s {cpu:6.2f}s")
    base = "ref1" if "ref1" in runs else "ref"
    base_name = "reference on one core" if base == "ref1" else "reference, all cores"
    speed_up = _ratios(runs, base, "ours")
    per_round = ", ".join(f"{r:.1f}" for r in speed_up)
    print(f"wall speed-up, ours ({cores} workers) vs {base_name}: "
          f"{statistics.median(speed_up):5.1f}x (rounds: {per_round}; goal >= 10x; "
          "docs/design.md §8 anchor: reference 8.9 s on one core)")
    steal_line = describe(steal)
    if steal_line:
        print(steal_line)
    print(f"wall speed-up, ours vs reference on the same cores: "
          f"{statistics.median(_ratios(runs, 'ref', 'ours')):5.1f}x")
    print(f"CPU-time ratio, reference / ours (1 worker each):  "
          f"{statistics.median(_ratios(runs, base, 'ours1', field=1)):5.1f}x")
    print(f"PQ ours {ours['All']['pq']:.6f} reference {ref['All']['pq']:.6f}; "
          f"max |difference| over All/Things/Stuff/per-class pq,sq,rq: {worst:.2e}")
    if worst > 1e-9:
        print("MISMATCH against the reference evaluator")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
