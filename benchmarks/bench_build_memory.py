"""Peak memory and time of `avg-export build` at the real widths, N decoder layers.

    python benchmarks/bench_build_memory.py                        # N = 1 2 4 8, fp16 and int4
    python benchmarks/bench_build_memory.py --layers 32 --precisions fp16   # the real 7B (about
                                                                   # 15 GB of disk for the checkpoint, as much for the build)

Checkpoints come from `python -m avg_edge.model.tiny --preset 7b --layers N` (kept in
--work and reused).  Each build runs as its own `avg-export build` process with the
default validation; the peak is the largest sum of the resident memory of the build and
its child processes, sampled every 50 ms, beside the per-phase peaks the build prints.
The target: peak <= 1.3 x the fp16 weight bytes + 2 GiB.  Prints a markdown table and
the least-squares line peak = a + b * N over the runs.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

GIB = 1024**3


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def run_sampled(cmd: list[str], log: Path) -> tuple[int, float, int]:
    """(exit code, seconds, peak tree RSS) of `cmd`, its output written to `log`."""
    peak = 0
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, tree_rss(proc.pid))
                time.sleep(0.05)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        code = proc.wait()
        stop.set()
        t.join()
    return code, time.perf_counter() - t0, peak


def fp16_weight_bytes(ckpt: Path) -> int:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    return int(index["metadata"]["total_size"])          # bf16 shards: the same bytes as fp16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--precisions", nargs="+", default=["fp16", "int4"])
    ap.add_argument("--work", type=Path, default=Path("builds/bench-memory"))
    ap.add_argument("--eval-samples", type=int, default=1, help="int4: drift-report samples (each answers 32 tokens)")
    ap.add_argument("--keep", action="store_true", help="keep the build folders")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    print("| N | precision | fp16 weights | bound (1.3 x + 2 GiB) | peak RSS (build + children) | within | time | "
          "largest phase |", flush=True)
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for n in args.layers:
        ckpt = args.work / f"ckpt-7b-{n}"
        if not (ckpt / "config.json").is_file():
            subprocess.run([sys.executable, "-m", "avg_edge.model.tiny", "--preset", "7b", "--layers", str(n), str(ckpt)],
                           check=True, stdout=subprocess.DEVNULL)
        weights = fp16_weight_bytes(ckpt)
        bound = 1.3 * weights + 2 * GIB
        for precision in args.precisions:
            out = args.work / f"build-{n}-{precision}"
            log = args.work / f"build-{n}-{precision}.log"
            cmd = [sys.executable, "-c", "from avg_edge.cli import export_main; export_main()", "build", "-m", str(ckpt),
                   "-o", str(out), "--precision", precision, "--force", "--backend", "ort"]
            if precision in ("int8", "int4"):
                cmd += ["--eval-samples", str(args.eval_samples)]
            code, seconds, peak = run_sampled(cmd, log)
            if code != 0:
                print(f"| {n} | {precision} | build failed (exit {code}), see {log} |", flush=True)
                continue
            phases = [(m.group(1), float(m.group(2)), float(m.group(3))) for m in re.finditer(
                r"^\s*\[\d+/\d+\] (.+?) \((\d+\.\d) s, peak RSS(?: so far)? (\d+\.\d\d) GiB\)$", log.read_text(), re.M)]
            top = max(phases, key=lambda p: p[2]) if phases else ("?", 0.0, 0.0)
            rows.append((n, precision, weights, peak, seconds))
            print(f"| {n} | {precision} | {weights / GIB:.2f} GiB | {bound / GIB:.2f} GiB | {peak / GIB:.2f} GiB | "
                  f"{'yes' if peak <= bound else 'NO'} | {seconds / 60:.1f} min | {top[0][:48]} ({top[2]:.2f} GiB) |",
                  flush=True)
            if not args.keep:
                subprocess.run(["rm", "-rf", str(out)], check=True)
    for precision in args.precisions:
        pts = [(n, peak / GIB) for n, p, _, peak, _ in rows if p == precision]
        if len(pts) >= 2:
            mx = sum(x for x, _ in pts) / len(pts)
            my = sum(y for _, y in pts) / len(pts)
            b = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
            print(f"{precision}: peak RSS = {my - b * mx:.2f} + {b:.3f} * N GiB (least squares over N = "
                  f"{', '.join(str(x) for x, _ in pts)}); at N = 32: {my - b * mx + 32 * b:.1f} GiB")


if __name__ == "__main__":
    main()
