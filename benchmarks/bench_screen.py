"""Export screen throughput: MB/s of notebook JSON screened, against a naive baseline.

One executed-looking notebook of ``MEDZONE_BENCH_SCREEN_MB`` (default 50) MB is built in
memory: cells with figures (PNG plots of varying data, base64), pandas-style HTML and text
tables of counts, training logs and code. The demo cohort (7 patients) is ingested
de-identified into a temporary zone so the screen runs with a real screening index
(identifier hashes and image fingerprints). Both figures are the median of
``MEDZONE_BENCH_REPEATS`` runs in the same process:

* ``screen``: :func:`medzone_hub.screen.screen_bytes` with the dataset's index (every rule);
* ``naive``: one pass of one regular expression (RRN, phone and e-mail patterns combined)
  over the notebook's text, the way a grep-based screen would look — no JSON parsing, no
  images, no tables, no index.
"""

from __future__ import annotations

import base64
import io
import json
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

TARGET_MB = float(os.environ.get("MEDZONE_BENCH_SCREEN_MB", "50"))
REPEATS = int(os.environ.get("MEDZONE_BENCH_REPEATS", "3"))
NAIVE_RE = re.compile(r"\b(?:\d{6}-?[1-8]\d{6}|01[016789]-?\d{3,4}-?\d{4}|[\w.+-]{1,64}@[\w-]+\.[\w.]+)")


def _figures(n: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        if i % 3 == 0:
            x = np.sort(rng.random(50))
            ax.plot(x, np.sqrt(x) + rng.normal(0, .02, 50))
            ax.set_title(f"ROC fold {i}")
        elif i % 3 == 1:
            ax.hist(rng.normal(size=2000), bins=40)
        else:
            ax.imshow(rng.random((64, 64)), cmap="viridis")
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def _html_table(rng) -> str:
    rows = "".join(f"<tr><th>group {g}</th>" + "".join(f"<td>{v}</td>" for v in
                                                      rng.integers(20, 900, 6)) + "</tr>"
                   for g in range(12))
    head = "".join(f"<th>c{c}</th>" for c in range(6))
    return (f'<table border="1" class="dataframe"><thead><tr><th></th>{head}</tr></thead>'
            f"<tbody>{rows}</tbody></table>")


def build_notebook(target_mb: float = TARGET_MB) -> bytes:
    rng = np.random.default_rng(1)
    figures = _figures(24)
    cells = []
    size = 0
    i = 0
    while size < target_mb * 1024 * 1024:
        fig = figures[i % len(figures)]
        log = "".join(f"epoch {e} loss {rng.random():.4f} val_auc {rng.random():.3f}\n"
                      for e in range(20))
        cells.append({"cell_type": "code", "execution_count": i, "id": f"c{i}", "metadata": {},
                      "source": f"fig = plot_results(df, fold={i})\ndf.groupby('label').size()",
                      "outputs": [
                          {"output_type": "stream", "name": "stdout", "text": log},
                          {"output_type": "display_data", "metadata": {},
                           "data": {"image/png": fig, "text/plain": "<Figure size 600x400>"}},
                          {"output_type": "execute_result", "execution_count": i, "metadata": {},
                           "data": {"text/html": _html_table(rng),
                                    "text/plain": "\n".join(
                                        "group " + "  ".join(str(v) for v in rng.integers(20, 900, 6))
                                        for _ in range(12))}}]})
        size += len(fig) + len(log) + 2500
        i += 1
    return json.dumps({"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": cells},
                      indent=1).encode()


def _median(fn, repeats=REPEATS):
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def run() -> dict:
    from medzone_hub.config import MedZoneHome
    from medzone_hub.db import connect
    from medzone_hub.demodata import generate_cohort
    from medzone_hub.ingest import ingest_dataset
    from medzone_hub.screen import ScreenConfig, load_indexes, screen_bytes

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_cohort(tmp / "cohort", patients=7, seed=11, progress=False)
        home = MedZoneHome(tmp / "home").ensure()
        store = connect(home.db_url)
        ingest_dataset(home, store, "demo", tmp / "cohort", deidentify=True,
                       pseudonym_key=b"k" * 32, actor="bench", progress=False)
        store.engine.dispose()
        indexes = load_indexes(home, ["demo"])
        data = build_notebook()
        mb = len(data) / 1e6
        n_cells = data.count(b'"cell_type"')
        # The 16 MB file limit would (rightly) block the 50 MB notebook: lift it to time the rest.
        config = ScreenConfig(max_file_bytes=256 * 1024 * 1024)
        screen_s, verdict = _median(lambda: screen_bytes("bench.ipynb", data, indexes=indexes,
                                                         config=config))
        naive_s, hits = _median(lambda: sum(1 for _ in NAIVE_RE.finditer(data.decode("utf-8"))))
    result = {
        "notebook_mb": round(mb, 1), "cells": n_cells, "figures": n_cells,
        "screen_s": round(screen_s, 3), "screen_mb_s": round(mb / screen_s, 1),
        "screen_verdict": verdict.verdict,
        "screen_findings": [f"{f.rule}: {f.detail}" for f in verdict.findings][:5],
        "naive_regex_s": round(naive_s, 3), "naive_regex_mb_s": round(mb / naive_s, 1),
        "naive_hits": hits, "goal_mb_s": 100, "repeats": REPEATS,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}",
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    run()
