"""Run every benchmark and write ``benchmarks/results/<name>.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from . import (bench_index, bench_ingest, bench_login, bench_queue, bench_screen,
               bench_screen_text, bench_slurm, bench_spawn, bench_volume, eval_screen)

BENCHMARKS = {
    "ingest": bench_ingest.run,
    "index": bench_index.run,  # screening one figure against 1k, 10k, 100k images
    "login": bench_login.run,
    "screen": bench_screen.run,
    "screen_text": bench_screen_text.run,  # text rules against a naive regex
    "eval_screen": eval_screen.run,  # recall and false positives, calibration vs evaluation
    "spawn": bench_spawn.run,
    "volume": bench_volume.run,
    "queue": bench_queue.run,  # the run queue: overhead and round-robin throughput
    "slurm": bench_slurm.run,  # submission → first cell, Slurm against local
}


def main(argv: list[str]) -> int:
    names = argv or list(BENCHMARKS)
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    for name in names:
        if name not in BENCHMARKS:
            print(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
            return 2
        result = BENCHMARKS[name]()
        (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out_dir / f'{name}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
