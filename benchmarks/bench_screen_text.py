"""Speed of the bytes-written-as-text rule (``medzone_hub.screen.textbytes``) against one
naive regular-expression pass over the same text, both in MB/s, in the same process.

The text is what a notebook's text outputs hold (``MEDZONE_BENCH_TEXT_MB``, default 16 MB):
training logs, progress bars, pandas-style tables and ``describe()`` output, model
summaries, tracebacks, git hashes, UUIDs, checksums, code, and arrays of metrics printed
whole — plus, in a second text, the same with a base64 blob, a hex dump and a printed pixel
array every 64 kB (what the rule decodes). Timed:

* ``text_bytes``: the rule over the whole text in one call, and over 2 kB pieces (one call
  per output, as a notebook is screened);
* ``naive``: one pass of one regular expression (RRN, phone and e-mail patterns combined),
  the same as ``bench_screen``'s baseline.

No index is loaded: numeric dumps are parsed but not looked up (image lookups are the
fingerprints' cost, measured by ``bench_screen``).
"""

from __future__ import annotations

import base64
import os
import platform
import re
import statistics
import time

import numpy as np

TARGET_MB = float(os.environ.get("MEDZONE_BENCH_TEXT_MB", "16"))
REPEATS = int(os.environ.get("MEDZONE_BENCH_REPEATS", "3"))
PIECE = 2048
NAIVE_RE = re.compile(r"\b(?:\d{6}-?[1-8]\d{6}|01[016789]-?\d{3,4}-?\d{4}|[\w.+-]{1,64}@[\w-]+\.[\w.]+)")


def _block(rng) -> str:
    """About 20 kB of clean notebook text."""
    parts = []
    epochs = int(rng.integers(20, 80))
    parts += [f"Epoch {i + 1}/{epochs} - loss: {rng.random():.4f} - val_auc: {rng.random():.4f} "
              f"- lr: {1e-3 * 0.97 ** i:.2e}\n" for i in range(epochs)]
    parts += [f"\repoch: {p:3d}%|{'█' * (p // 10)}{' ' * (10 - p // 10)}| {p}/100 "
              f"[00:{p // 10:02d}<00:10, {rng.random() * 20:.2f}it/s]" for p in range(0, 101, 5)]
    parts.append("\n")
    cols = ["age", "bmi", "hu_mean", "volume_ml", "auc"]
    parts.append("          " + "  ".join(f"{c:>10}" for c in cols) + "\n")
    for stat in ("count", "mean", "std", "min", "25%", "50%", "75%", "max"):
        parts.append(f"{stat:<10}" + "  ".join(f"{v:>10.4f}" for v in rng.normal(50, 10, 5))
                     + "\n")
    parts.append("Sequential(\n  (0): Conv2d(1, 16, kernel_size=(3, 3), stride=(1, 1))\n"
                 "  (1): ReLU()\n  (2): Linear(in_features=32, out_features=2, bias=True)\n)\n"
                 f"Total params: {int(rng.integers(1e4, 1e7)):,}\n")
    parts += [f"commit {rng.bytes(20).hex()}\n" for _ in range(3)]
    parts += [f"{rng.bytes(32).hex()}  results/fold{i}.csv\n" for i in range(3)]
    parts += [f"run {rng.bytes(16).hex()[:8]}-{rng.bytes(2).hex()}-4{rng.bytes(2).hex()[1:]}-"
              f"a{rng.bytes(2).hex()[1:]}-{rng.bytes(6).hex()} done\n"]
    parts.append('Traceback (most recent call last):\n  File "/home/analyst/.venv/lib/python3.11/'
                 'site-packages/torch/nn/modules/module.py", line 1553, in _call_impl\n'
                 "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
    parts.append("def train(model, loader, epochs=10):\n    for epoch in range(epochs):\n"
                 "        for x, y in loader:\n            loss = criterion(model(x), y)\n")
    with np.printoptions(threshold=100_000):
        parts.append(str(rng.random(int(rng.integers(50, 300))).round(4)) + "\n")
    parts.append(str(rng.integers(10, 300, (4, 4))) + "\n")
    return "".join(parts)


def _leaks(rng) -> str:
    blob = rng.bytes(3000)
    hexdump = "".join(f"{o:08x}  " + " ".join(f"{b:02x}" for b in blob[o:o + 16]) + "\n"
                      for o in range(0, 512, 16))
    pixels = rng.integers(-1000, 400, (32, 32)).tolist()
    return base64.encodebytes(blob).decode() + hexdump + str(pixels) + "\n"


def build_texts(target_mb: float = TARGET_MB) -> tuple[str, str]:
    rng = np.random.default_rng(0)
    blocks, size = [], 0
    while size < target_mb * 1e6:
        blocks.append(_block(rng))
        size += len(blocks[-1])
    clean = "".join(blocks)
    leaky, n = [], 0
    for b in blocks:
        leaky.append(b)
        n += len(b)
        if n >= 64_000:
            leaky.append(_leaks(rng))
            n = 0
    return clean, "".join(leaky)


def _median(fn) -> float:
    times = []
    for _ in range(REPEATS):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return statistics.median(times)


def bench_text_bytes() -> dict:
    from medzone_hub.screen.model import Collector, ScreenConfig
    from medzone_hub.screen.textbytes import TextBytes

    clean, leaky = build_texts()
    config = ScreenConfig()
    found = []

    def rule(text: str, pieces: bool) -> None:
        col = Collector(config, [])
        tb = TextBytes(col, lambda data, loc: True, lambda text, loc: None)
        if pieces:
            for i in range(0, len(text), PIECE):
                tb.scan(text[i:i + PIECE], "piece")
        else:
            tb.scan(text, "text")
        found.append(len(col.findings))

    def naive(text: str) -> None:
        found.append(sum(1 for _ in NAIVE_RE.finditer(text)))

    out = {"python": platform.python_version(), "machine": platform.machine(),
           "cpus": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2),
           "repeats": REPEATS, "measure": "CPU seconds (process_time), median"}
    for label, text in (("clean", clean), ("with_leaks", leaky)):
        mb = len(text.encode()) / 1e6
        naive_s = _median(lambda: naive(text))
        whole_s = _median(lambda: rule(text, False))
        findings = found[-1]
        pieces_s = _median(lambda: rule(text, True))
        out[label] = {"mb": round(mb, 2), "naive_regex_mb_s": round(mb / naive_s, 1),
                      "text_bytes_mb_s": round(mb / whole_s, 1),
                      "text_bytes_pieces_mb_s": round(mb / pieces_s, 1),
                      "text_bytes_to_naive": round(naive_s / whole_s, 2),
                      "text_bytes_pieces_to_naive": round(naive_s / pieces_s, 2),
                      "findings": findings}
    return out


def run() -> dict:
    result = bench_text_bytes()
    for label in ("clean", "with_leaks"):
        r = result[label]
        print(f"{label}: {r['mb']} MB  naive regex {r['naive_regex_mb_s']} MB/s  text bytes "
              f"{r['text_bytes_mb_s']} MB/s (x{r['text_bytes_to_naive']}), in {PIECE}-byte "
              f"pieces {r['text_bytes_pieces_mb_s']} MB/s (x{r['text_bytes_pieces_to_naive']})")
    return result


if __name__ == "__main__":
    run()
