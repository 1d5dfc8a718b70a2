"""Labelled figures for the export screen: dataset images as matplotlib renders them.

Built by code with the real matplotlib (Agg backend) from the synthetic demo cohort: a
dataset's CT slices and chest X-rays drawn the ways a notebook draws them (axes with ticks
and a colour bar, ``axis("off")``, ``bbox_inches="tight"`` as the inline backend saves, a
title, contour and mask overlays, subplot grids, an inset over a plot, montages of slices
tiled edge to edge, any size, dpi, colour map and window). The leaky cases draw the
dataset's own images (``rule="dataset-image"``, verdict ``block``); the clean cases draw
another cohort's patients the same ways, and ordinary plots (line plots, ROC curves,
histograms, heatmaps, confusion matrices, bars, scatter plots), verdict ``pass``.

``build_figure_cases(dataset_root, other_cohort_root, work)`` keeps its signature for the
evaluation script; ``seed`` picks the variants (which images, sizes, colour maps, windows).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np

from .screen_corpus import Case

RULE = "dataset-image"

#: Colour maps whose luminance rises (or falls) with the value (the grey pixels keep the
#: order of the values, which is what the fingerprints compare), and a rainbow and two
#: diverging maps, whose luminance does not (the screen maps their colours back).
CMAPS = ("gray", "bone", "viridis", "magma", "gray_r", "cividis", "inferno", "pink", "jet",
         "RdBu_r", "coolwarm")
STYLES = ("axes", "colourbar", "tight-off", "inline", "contour", "mask", "grid", "inset",
          "montage", "flush-grid", "beside-plot", "stretched", "dark", "notebook")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _modality(ds) -> np.ndarray:
    values = ds.pixel_array.astype(np.float64)
    if "RescaleSlope" in ds:
        values = values * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        values = values.max() - values
    return values


def load_images(root: Path, ct_step: int = 3) -> list[tuple[str, np.ndarray]]:
    """(kind, values) of a cohort's CT slices (every ``ct_step``-th, body slices) and X-rays;
    ``root`` is a cohort folder or an ingested dataset's folder."""
    import pydicom

    out = []
    for series in sorted({p.parent for p in root.glob("**/CT/*.dcm")}):
        files = sorted(series.glob("*.dcm"))
        for p in files[len(files) // 8: len(files) - len(files) // 8: ct_step]:
            out.append(("CT", _modality(pydicom.dcmread(p))))
    out += [("CXR", _modality(pydicom.dcmread(p))) for p in sorted(root.glob("**/CXR/*.dcm"))]
    return out


def _window(kind: str, values: np.ndarray, rng) -> tuple[str, float | None, float | None]:
    if kind == "CT":
        name = rng.choice(["lung", "soft", "bone", "full", "auto"])
        lo, hi = {"lung": (-1350, 150), "soft": (-160, 240), "bone": (-500, 1300),
                  "full": (-1000, 400), "auto": (None, None)}[name]
        return name, lo, hi
    p1, p99 = np.percentile(values, [1, 99])
    name = rng.choice(["auto", "percentile", "narrow"])
    if name == "percentile":
        return name, p1, p99
    if name == "narrow":
        return name, p1 + 0.1 * (p99 - p1), p99 - 0.1 * (p99 - p1)
    return name, None, None


def _save(fig, rng, *, tight: bool | None = None, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    if tight is None:
        tight = bool(rng.random() < 0.5)
    fig.savefig(buf, format=fmt, bbox_inches="tight" if tight else None)
    _plt().close(fig)
    return buf.getvalue()


def _figsize(rng, cols: int = 1, rows: int = 1) -> tuple[float, float]:
    side = float(rng.uniform(2.6, 5.0))
    return (side * cols * float(rng.uniform(1.0, 1.3)), side * rows)


def _show(ax, values, cmap, lo, hi, **kw):
    return ax.imshow(values, cmap=cmap, vmin=lo, vmax=hi, **kw)


def draw(style: str, picks: list[tuple[str, np.ndarray]], rng) -> tuple[bytes, str]:
    """A figure of ``picks`` (the first image, or several for grids and montages) drawn in
    ``style``; PNG bytes (JPEG for some) and a description."""
    plt = _plt()
    kind, values = picks[0]
    cmap = str(rng.choice(CMAPS))
    wname, lo, hi = _window(kind, values, rng)
    dpi = int(rng.choice([60, 72, 80, 100, 120, 150]))
    what = f"{style}, {kind}, {cmap}, {wname} window, dpi {dpi}"
    if style in ("axes", "colourbar", "contour", "mask", "stretched", "dark"):
        context = plt.style.context("dark_background") if style == "dark" else \
            plt.style.context("default")
        with context:
            fig, ax = plt.subplots(figsize=_figsize(rng), dpi=dpi)
            image = _show(ax, values, cmap, lo, hi,
                          aspect="auto" if style == "stretched" else "equal",
                          origin=str(rng.choice(["upper", "lower"])))
            if style in ("colourbar", "dark") or rng.random() < 0.3:
                fig.colorbar(image, ax=ax, fraction=float(rng.uniform(0.03, 0.08)))
            if style == "contour":
                level = float(np.percentile(values, rng.uniform(40, 80)))
                ax.contour(values, levels=[level], colors=str(rng.choice(["r", "y", "c"])),
                           linewidths=float(rng.uniform(0.5, 1.5)),
                           origin=image.origin)
            if style == "mask":
                mask = values > np.percentile(values, rng.uniform(85, 97))
                ax.imshow(np.ma.masked_where(~mask, mask), cmap="autumn",
                          alpha=float(rng.uniform(0.25, 0.5)), vmin=0, vmax=1,
                          origin=image.origin)
            ax.set_title(str(rng.choice(["slice", "axial CT", "chest X-ray", "case 3"])))
            ax.set_xlabel("x (px)")
            data = _save(fig, rng)
    elif style in ("tight-off", "inline"):
        fig, ax = plt.subplots(figsize=_figsize(rng), dpi=72 if style == "inline" else dpi)
        _show(ax, values, cmap, lo, hi)
        if style == "tight-off":
            ax.axis("off")
            if rng.random() < 0.5:
                ax.set_title("slice")
        data = _save(fig, rng, tight=True)
    elif style in ("grid", "flush-grid"):
        rows, cols = {2: (1, 2), 3: (1, 3), 4: (2, 2), 6: (2, 3)}[len(picks)]
        fig, axes = plt.subplots(rows, cols, figsize=_figsize(rng, cols, rows), dpi=dpi,
                                 squeeze=False)
        off = style == "flush-grid" or rng.random() < 0.5
        for ax, (k, v) in zip(axes.ravel(), picks):
            _, a, b = _window(k, v, rng)
            _show(ax, v, cmap, a, b)
            if off:
                ax.axis("off")
            elif rng.random() < 0.5:
                ax.set_title(k)
        if style == "flush-grid":
            fig.subplots_adjust(0, 0, 1, 1, wspace=0, hspace=0)
        data = _save(fig, rng, tight=style == "flush-grid" or None)
    elif style == "montage":
        n = len(picks)
        rows, cols = {2: (1, 2), 3: (1, 3), 4: (2, 2), 6: (2, 3)}[n]
        if rng.random() < 0.3:
            rows, cols = cols, rows
        same = [v for k, v in picks if v.shape == values.shape][:rows * cols]
        while len(same) < rows * cols:
            same.append(same[-1][::-1])
        tiles = [np.clip(v, lo, hi) if lo is not None else v for v in same]
        grid = np.vstack([np.hstack(tiles[r * cols:(r + 1) * cols]) for r in range(rows)])
        fig, ax = plt.subplots(figsize=_figsize(rng, cols, rows), dpi=dpi)
        _show(ax, grid, cmap, None, None)
        if rng.random() < 0.6:
            ax.axis("off")
        data = _save(fig, rng)
        what = f"montage {rows}x{cols}, {kind}, {cmap}, {wname} window, dpi {dpi}"
    elif style == "inset":
        fig, ax = plt.subplots(figsize=_figsize(rng), dpi=dpi)
        x = np.linspace(0, 1, 200)
        ax.plot(x, np.sqrt(x) + rng.normal(0, 0.02, x.size))
        ax.plot([0, 1], [0, 1], "--")
        ax.set_xlabel("false positive rate")
        inset = ax.inset_axes([float(rng.uniform(0.45, 0.6)), 0.08, 0.4, 0.4])
        _show(inset, values, cmap, lo, hi)
        inset.set_xticks([])
        inset.set_yticks([])
        data = _save(fig, rng)
    elif style == "beside-plot":
        fig, (a1, a2) = plt.subplots(1, 2, figsize=_figsize(rng, 2), dpi=dpi)
        _show(a1, values, cmap, lo, hi)
        a2.hist(values.ravel(), bins=60)
        a2.set_title("histogram")
        data = _save(fig, rng, fmt=str(rng.choice(["png", "jpeg"])))
    elif style == "notebook":
        fig, ax = plt.subplots(figsize=_figsize(rng), dpi=72)
        _show(ax, values, cmap, lo, hi)
        png = _save(fig, rng, tight=True)
        nb = {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [{
            "cell_type": "code", "execution_count": 1, "id": "c1", "metadata": {},
            "source": "plt.imshow(ds.pixel_array, cmap='gray')", "outputs": [{
                "output_type": "display_data", "metadata": {},
                "data": {"image/png": base64.b64encode(png).decode(),
                         "text/plain": "<Figure size 432x288 with 1 Axes>"}}]}]}
        return json.dumps(nb).encode(), what + ", in a notebook"
    else:
        raise ValueError(style)
    return data, what


def ordinary_figure(i: int, rng) -> tuple[bytes, str]:
    """Plots a study shows that are not images of anyone."""
    plt = _plt()
    kinds = ("line", "roc", "histogram", "heatmap", "confusion", "bars", "scatter",
             "correlation", "hexbin", "training", "boxplot", "smooth-field")
    kind = kinds[i % len(kinds)]
    fig, ax = plt.subplots(figsize=_figsize(rng), dpi=int(rng.choice([72, 100, 120])))
    if kind == "line":
        ax.plot(np.cumsum(rng.normal(size=(300, 3)), axis=0))
    elif kind == "roc":
        x = np.sort(rng.uniform(size=50))
        ax.plot(np.r_[0, x, 1], np.r_[0, np.sqrt(x), 1])
        ax.plot([0, 1], [0, 1], "--")
        ax.set_title(f"AUC {rng.uniform(0.7, 0.95):.2f}")
    elif kind == "histogram":
        ax.hist(rng.normal(size=3000), bins=int(rng.integers(10, 80)))
    elif kind == "heatmap":
        fig.colorbar(ax.imshow(rng.normal(size=tuple(rng.integers(8, 60, 2))),
                               cmap=str(rng.choice(CMAPS))), ax=ax)
    elif kind == "confusion":
        m = rng.integers(0, 200, (3, 3))
        ax.imshow(m, cmap="Blues")
        for (r, c), v in np.ndenumerate(m):
            ax.text(c, r, str(v), ha="center", va="center")
    elif kind == "bars":
        ax.bar(range(6), rng.integers(10, 200, 6))
    elif kind == "scatter":
        n = int(rng.integers(100, 5000))
        ax.scatter(rng.normal(size=n), rng.normal(size=n), s=4, alpha=0.5)
    elif kind == "correlation":
        d = rng.normal(size=(200, int(rng.integers(5, 25))))
        fig.colorbar(ax.imshow(np.corrcoef(d.T), cmap="coolwarm", vmin=-1, vmax=1), ax=ax)
    elif kind == "hexbin":
        ax.hexbin(rng.normal(size=5000), rng.normal(size=5000), gridsize=30)
    elif kind == "training":
        e = np.arange(1, 51)
        ax.plot(e, 1 / e + rng.normal(0, 0.01, e.size), label="train")
        ax.plot(e, 1.2 / e + 0.1, label="val")
        ax.legend()
        ax.grid(True)
    elif kind == "boxplot":
        ax.boxplot([rng.normal(m, 1, 100) for m in range(4)])
    else:  # a smooth random field, drawn interpolated (a saliency map, a density)
        field = rng.normal(size=(24, 24))
        ax.imshow(field, interpolation="bicubic", cmap=str(rng.choice(CMAPS)))
    ax.set_xlabel("x")
    return _save(fig, rng), kind


def build_figure_cases(dataset_root: Path, other_cohort_root: Path, work: Path, *,
                       seed: int = 0, per_style: int = 12, ordinary: int = 60) -> list[Case]:
    """Leaky figures of ``dataset_root``'s images (``per_style`` for each style), the same
    figures of ``other_cohort_root``'s patients (clean), and ``ordinary`` plots (clean).
    ``work`` is not written to (every case is bytes)."""
    rng = np.random.default_rng(seed)
    ours = load_images(Path(dataset_root))
    theirs = load_images(Path(other_cohort_root))
    cases: list[Case] = []
    for source, pool, verdict, rule in (("dataset", ours, "block", RULE),
                                        ("other cohort", theirs, "pass", None)):
        cts = [p for p in pool if p[0] == "CT"]
        for style in STYLES:
            for n in range(per_style):
                count = 1
                if style in ("grid", "flush-grid", "montage"):
                    count = int(rng.choice([2, 3, 4, 6]))
                use_cxr = style not in ("montage",) and rng.random() < 0.25
                first = [p for p in pool if p[0] == "CXR"] if use_cxr else cts
                picks = [first[int(rng.integers(len(first)))]]
                picks += [pool[int(rng.integers(len(pool)))] if style != "montage" else
                          cts[int(rng.integers(len(cts)))] for _ in range(count - 1)]
                data, what = draw(style, picks, rng)
                ext = "ipynb" if style == "notebook" else (
                    "jpg" if data[:2] == b"\xff\xd8" else "png")
                cases.append(Case(f"figure-{style}-{n}.{ext}", data, verdict, rule,
                                  label=f"{source}: {what}"))
    for i in range(ordinary):
        data, what = ordinary_figure(i, rng)
        cases.append(Case(f"plot-{what}-{i}.png", data, "pass", None, label=f"plot: {what}"))
    return cases
