"""Interactive viewers for CT volumes and X-rays (ipywidgets), usable headless too.

Every viewer works on plain numpy arrays, so it can be used on anything a notebook computes,
and has a headless side for scripts, tests and papermill runs:

* ``show_slice(...)`` / ``render()`` return an RGB ``uint8`` array,
* ``png()`` returns PNG bytes,
* ``figure()`` returns a matplotlib Figure (only if matplotlib is installed),
* displaying the viewer object in a notebook shows the widget where the front end can, and
  carries a PNG of the current view for front ends (and executed notebooks) that cannot.

**CT conventions.** A volume is indexed ``hu[i, j, k]`` in RAS orientation: ``i`` increases
towards the patient's Right, ``j`` towards Anterior, ``k`` towards Superior (what
:class:`medzone_kernel.imaging.CTVolume` holds; :func:`ct_viewer` reorients other grids
using the volume's affine). Slices are displayed in the **radiological convention**:

* axial: anterior at the top, the patient's right on the image's **left** (so the patient's
  left is on the image's right, as if looking up from the feet);
* coronal: superior at the top, the patient's right on the image's left;
* sagittal: superior at the top, anterior on the image's left.

Pixels are not square when the spacing differs between the two in-plane axes (coronal and
sagittal planes use the slice spacing along z): ``show_slice`` resamples rows by nearest
neighbour so that each displayed pixel is square, and ``native=True`` gives one pixel per
voxel instead (``slice_aspect`` says the row/column pixel size ratio).

Images leave the zone only through the export screen, which blocks copies of dataset
images (re-windowed, resized and colour-mapped ones too): views of a dataset are for looking
at inside the zone, not for results meant for export. No identifier (patient, series UID)
is drawn on or attached to any view.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np

PLANES = ("axial", "coronal", "sagittal")

#: Window (level, width) in HU; the same values as ``medzone_kernel.imaging.WINDOW_PRESETS``.
_DEFAULT_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    "bone": (400.0, 1800.0),
}

#: Overlay colours (RGB) for mask labels 1, 2, 3, … (cycled).
MASK_COLOURS: tuple[tuple[int, int, int], ...] = (
    (255, 40, 40), (40, 220, 40), (60, 120, 255), (255, 200, 0), (220, 60, 220), (0, 220, 220),
)


def window_presets() -> dict[str, tuple[float, float]]:
    """The window presets (level, width) in HU, from :mod:`medzone_kernel.imaging` if present."""
    try:
        from .imaging import WINDOW_PRESETS
    except Exception:  # imaging (or its optional deps) not importable here
        return dict(_DEFAULT_PRESETS)
    return {k: (float(v[0]), float(v[1])) for k, v in WINDOW_PRESETS.items()}


def window(hu, level: float, width: float) -> np.ndarray:
    """HU → 0..1 float32: ``(hu - (level - width/2)) / width`` clipped."""
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    out = (np.asarray(hu, dtype=np.float32) - np.float32(level - width / 2.0)) / np.float32(width)
    return np.clip(out, 0.0, 1.0, out=out)


def to_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of a ``uint8`` grey (H, W) or RGB (H, W, 3) array."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG")
    return buf.getvalue()


def _grey_to_rgb(grey01: np.ndarray) -> np.ndarray:
    g = np.rint(np.clip(grey01, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


def _overlay(rgb: np.ndarray, mask: np.ndarray, opacity: float) -> np.ndarray:
    """Blend label colours into *rgb* exactly on the voxels where *mask* is non-zero."""
    out = rgb.astype(np.float32)
    labels = np.asarray(mask)
    for value in np.unique(labels[labels != 0]):
        colour = np.asarray(MASK_COLOURS[(int(value) - 1) % len(MASK_COLOURS)], np.float32)
        sel = labels == value
        out[sel] = (1.0 - opacity) * out[sel] + opacity * colour
    return np.rint(out).astype(np.uint8)


def _square_rows(img: np.ndarray, aspect: float, max_rows: int = 4096) -> np.ndarray:
    """Repeat/drop rows (nearest neighbour) so a pixel of height ``aspect`` × width is square."""
    rows = img.shape[0]
    new_rows = int(min(max_rows, max(1, round(rows * aspect))))
    if new_rows == rows:
        return img
    src = np.minimum(((np.arange(new_rows) + 0.5) * rows / new_rows).astype(np.intp), rows - 1)
    return img[src]


def _mpl():
    try:
        import matplotlib.pyplot as plt  # picks a non-interactive backend when headless
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("figure() needs matplotlib; render() and png() work without it") from exc
    return plt


# --- CT -------------------------------------------------------------------------------------


class CTSliceViewer:
    """Axial/coronal/sagittal slices of a HU volume with window presets and a mask overlay.

    ``volume_hu`` is ``[i, j, k]`` in RAS (see the module docstring), ``spacing_mm`` the voxel
    size along i, j, k; ``mask`` (optional) an integer/boolean array of the same shape,
    non-zero voxels drawn in colour. ``preset`` is one of :func:`window_presets` or
    ``"custom"`` with ``level``/``width`` given.
    """

    def __init__(self, volume_hu, spacing_mm, *, mask=None, plane: str = "axial",
                 preset: str = "lung", level: float | None = None, width: float | None = None,
                 opacity: float = 0.4, show_mask: bool = True):
        hu = np.asarray(volume_hu)
        if hu.ndim != 3:
            raise ValueError(f"a CT volume must be 3-D [i, j, k], got shape {hu.shape}")
        spacing = tuple(float(s) for s in spacing_mm)
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"spacing_mm must be three positive numbers, got {spacing_mm!r}")
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != hu.shape:
                raise ValueError(f"mask shape {mask.shape} differs from the volume's {hu.shape}")
            if mask.dtype == bool:
                mask = mask.astype(np.uint8)
            elif np.issubdtype(mask.dtype, np.floating):
                # label maps stored as floats keep their labels; probabilities are cut at 0.5
                integral = np.array_equal(mask, np.round(mask)) and mask.min() >= 0
                mask = mask.astype(np.int64) if integral else (mask > 0.5).astype(np.uint8)
        self.hu = hu
        self.spacing_mm = spacing
        self.mask = mask
        self.presets = window_presets()
        self.opacity = float(opacity)
        self.show_mask = bool(show_mask)
        self.plane = self._check_plane(plane)
        if level is not None or width is not None:
            if level is None or width is None:
                raise ValueError("give both level and width for a custom window")
            preset = "custom"
        if preset != "custom" and preset not in self.presets:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(self.presets)} "
                             "or 'custom' with level/width")
        self.preset = preset
        self.level, self.width = ((float(level), float(width)) if preset == "custom"
                                  else self.presets[preset])
        self.index = self.n_slices(self.plane) // 2
        self._widget = None

    # geometry ------------------------------------------------------------------------------

    @staticmethod
    def _check_plane(plane: str) -> str:
        if plane not in PLANES:
            raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")
        return plane

    def n_slices(self, plane: str | None = None) -> int:
        """How many slices the volume has in *plane*."""
        axis = {"sagittal": 0, "coronal": 1, "axial": 2}[self._check_plane(plane or self.plane)]
        return int(self.hu.shape[axis])

    def slice_aspect(self, plane: str | None = None) -> float:
        """Height/width of one native pixel in *plane* (row spacing / column spacing)."""
        sx, sy, sz = self.spacing_mm
        return {"axial": sy / sx, "coronal": sz / sx, "sagittal": sz / sy}[
            self._check_plane(plane or self.plane)]

    def extract(self, array: np.ndarray, plane: str, index: int) -> np.ndarray:
        """One slice of *array* (same grid as the volume), oriented for display."""
        n = self.n_slices(plane)
        if not 0 <= index < n:
            raise IndexError(f"{plane} slice {index} out of range 0..{n - 1}")
        if plane == "axial":       # rows A→P, columns R→L
            return np.asarray(array[::-1, ::-1, index]).T
        if plane == "coronal":     # rows S→I, columns R→L
            return np.asarray(array[::-1, index, ::-1]).T
        return np.asarray(array[index, ::-1, ::-1]).T  # sagittal: rows S→I, columns A→P

    # rendering -----------------------------------------------------------------------------

    def set_window(self, preset: str | None = None, *, level: float | None = None,
                   width: float | None = None) -> None:
        """Choose a preset, or a custom level/width."""
        if preset is not None and preset != "custom":
            if preset not in self.presets:
                raise ValueError(f"unknown preset {preset!r}")
            self.preset = preset
            self.level, self.width = self.presets[preset]
        if level is not None or width is not None:
            self.preset = "custom"
            self.level = float(level if level is not None else self.level)
            self.width = float(width if width is not None else self.width)
            if self.width <= 0:
                raise ValueError("window width must be positive")

    def show_slice(self, plane: str | None = None, index: int | None = None, *,
                   native: bool = False, mask: bool | None = None) -> np.ndarray:
        """RGB ``uint8`` image of one slice, windowed, with the mask overlaid if enabled.

        Square pixels (rows resampled by nearest neighbour from the spacing) unless
        ``native=True`` (one pixel per voxel).
        """
        plane = self._check_plane(plane or self.plane)
        index = self.n_slices(plane) // 2 if index is None else int(index)
        rgb = _grey_to_rgb(window(self.extract(self.hu, plane, index), self.level, self.width))
        use_mask = self.show_mask if mask is None else mask
        if use_mask and self.mask is not None and self.opacity > 0:
            rgb = _overlay(rgb, self.extract(self.mask, plane, index), self.opacity)
        return rgb if native else _square_rows(rgb, self.slice_aspect(plane))

    def render(self) -> np.ndarray:
        """The current view (plane, slice, window, overlay) as an RGB array."""
        return self.show_slice(self.plane, self.index)

    def png(self) -> bytes:
        return to_png(self.render())

    def figure(self, planes: Sequence[str] = PLANES, indices: Mapping[str, int] | None = None):
        """A matplotlib Figure with one panel per plane (current window and overlay)."""
        plt = _mpl()
        fig, axes = plt.subplots(1, len(planes), figsize=(4 * len(planes), 4), squeeze=False)
        for ax, plane in zip(axes[0], planes):
            idx = (indices or {}).get(plane, self.index if plane == self.plane
                                      else self.n_slices(plane) // 2)
            ax.imshow(self.show_slice(plane, idx, native=True), aspect=self.slice_aspect(plane),
                      interpolation="nearest")
            ax.set_title(f"{plane} {idx}")
            ax.set_axis_off()
        fig.suptitle(f"window {self.preset} (L {self.level:g}, W {self.width:g})")
        fig.tight_layout()
        return fig

    # widget --------------------------------------------------------------------------------

    @property
    def widget(self):
        """The ipywidgets VBox (built on first use)."""
        if self._widget is None:
            self._build_widget()
        return self._widget

    def _build_widget(self) -> None:
        import ipywidgets as w

        self.plane_toggle = w.ToggleButtons(options=list(PLANES), value=self.plane,
                                            description="Plane")
        self.preset_dropdown = w.Dropdown(options=[*self.presets, "custom"], value=self.preset,
                                          description="Window")
        self.level_box = w.FloatText(value=self.level, description="Level",
                                     layout=w.Layout(width="160px"))
        self.width_box = w.BoundedFloatText(value=self.width, min=1.0, max=10000.0,
                                            description="Width", layout=w.Layout(width="160px"))
        self.slice_slider = w.IntSlider(value=self.index, min=0,
                                        max=self.n_slices() - 1, description="Slice",
                                        continuous_update=False)
        self.mask_checkbox = w.Checkbox(value=self.show_mask and self.mask is not None,
                                        description="Mask overlay",
                                        disabled=self.mask is None)
        self.opacity_slider = w.FloatSlider(value=self.opacity, min=0.0, max=1.0, step=0.05,
                                            description="Opacity", disabled=self.mask is None)
        self.image = w.Image(format="png", value=self.png())
        self._syncing = False

        def on_plane(change):
            self.plane = change["new"]
            n = self.n_slices()
            self._syncing = True
            self.slice_slider.max = n - 1
            self.slice_slider.value = n // 2
            self._syncing = False
            self.index = n // 2
            self._refresh()

        def on_preset(change):
            if change["new"] != "custom":
                self.set_window(change["new"])
                self._syncing = True
                self.level_box.value, self.width_box.value = self.level, self.width
                self._syncing = False
            self.preset = change["new"]
            self._refresh()

        def on_level_width(_change):
            if self._syncing:
                return
            self.set_window(level=self.level_box.value, width=self.width_box.value)
            self._syncing = True
            self.preset_dropdown.value = "custom"
            self._syncing = False
            self._refresh()

        def on_slice(change):
            if self._syncing:
                return
            self.index = int(change["new"])
            self._refresh()

        def on_mask(change):
            self.show_mask = bool(change["new"])
            self._refresh()

        def on_opacity(change):
            self.opacity = float(change["new"])
            self._refresh()

        self.plane_toggle.observe(on_plane, names="value")
        self.preset_dropdown.observe(on_preset, names="value")
        self.level_box.observe(on_level_width, names="value")
        self.width_box.observe(on_level_width, names="value")
        self.slice_slider.observe(on_slice, names="value")
        self.mask_checkbox.observe(on_mask, names="value")
        self.opacity_slider.observe(on_opacity, names="value")
        self._widget = w.VBox([
            self.plane_toggle,
            w.HBox([self.preset_dropdown, self.level_box, self.width_box]),
            self.slice_slider,
            w.HBox([self.mask_checkbox, self.opacity_slider]),
            self.image,
        ])

    def _refresh(self) -> None:
        if self._widget is not None:
            self.image.value = self.png()

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = {}
        try:
            bundle.update(self.widget._repr_mimebundle_() or {})
        except Exception:  # no ipywidgets: the PNG still shows
            pass
        bundle["image/png"] = self.png()
        bundle.setdefault("text/plain", repr(self))
        return bundle

    def __repr__(self) -> str:
        return (f"CTSliceViewer(shape={tuple(self.hu.shape)}, spacing_mm={self.spacing_mm}, "
                f"plane={self.plane!r}, index={self.index}, preset={self.preset!r})")


def _reorient_to_ras(volume, *arrays):
    """Arrays of a volume's grid turned to RAS (+spacing) using its ``affine_ras``, if needed."""
    affine = getattr(volume, "affine_ras", None)
    spacing = tuple(float(s) for s in volume.spacing_mm)
    if affine is None:
        return arrays, spacing
    import nibabel.orientations as nio

    ornt = nio.io_orientation(np.asarray(affine, dtype=float))
    target = nio.axcodes2ornt(("R", "A", "S"))
    transform = nio.ornt_transform(ornt, target)
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        return arrays, spacing
    out = tuple(None if a is None else nio.apply_orientation(np.asarray(a), transform)
                for a in arrays)
    new_spacing = [0.0, 0.0, 0.0]
    for src, (dst, _flip) in enumerate(transform):
        new_spacing[int(dst)] = spacing[src]
    return out, tuple(new_spacing)


def ct_viewer(volume, mask=None, **kw) -> CTSliceViewer:
    """A :class:`CTSliceViewer` for a ``CTVolume`` (anything with ``.hu`` and ``.spacing_mm``;
    ``.affine_ras`` if present is used to put the grid in RAS). *mask* is on the volume's
    grid (e.g. ``imaging.load_mask``)."""
    (hu, m), spacing = _reorient_to_ras(volume, volume.hu, mask)
    return CTSliceViewer(hu, spacing, mask=m, **kw)


# --- X-ray ----------------------------------------------------------------------------------


class XRayGallery:
    """A grid of X-ray thumbnails with their labels and a label filter.

    ``images``: 2-D arrays (0..1 with bones bright, as ``XRayImage.pixels``; other ranges are
    min-max scaled per image); ``labels``: one string per image. ``spacings`` (optional):
    (row, column) pixel spacing per image, used to keep the aspect right.
    """

    ALL = "(all)"

    def __init__(self, images: Sequence, labels: Sequence, *, columns: int = 4,
                 thumb_px: int = 160, spacings: Sequence | None = None):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if columns < 1:
            raise ValueError("columns must be at least 1")
        self.images = [np.asarray(im) for im in images]
        for n, im in enumerate(self.images):
            if im.ndim != 2:
                raise ValueError(f"image {n} is not 2-D (shape {im.shape})")
        self.labels = [str(lab) for lab in labels]
        self.columns = int(columns)
        self.thumb_px = int(thumb_px)
        self.spacings = list(spacings) if spacings is not None else [None] * len(self.images)
        self.label_filter = self.ALL
        self._thumbs: dict[int, np.ndarray] = {}
        self._widget = None

    def label_options(self) -> list[str]:
        return [self.ALL, *sorted(set(self.labels))]

    def visible(self, label: str | None = None) -> list[int]:
        """Indices of the images shown under *label* (default: the current filter)."""
        label = self.label_filter if label is None else label
        if label != self.ALL and label not in self.labels:
            raise ValueError(f"no image is labelled {label!r}")
        return [i for i, lab in enumerate(self.labels) if label == self.ALL or lab == label]

    def set_filter(self, label: str) -> None:
        self.visible(label)
        self.label_filter = label
        if self._widget is not None:
            if self.filter_dropdown.value != label:
                self.filter_dropdown.value = label  # the observer rebuilds the grid
            else:
                self._rebuild_grid()

    def thumbnail(self, i: int) -> np.ndarray:
        """A ``uint8`` grey thumbnail (longest side ``thumb_px``, aspect from spacing)."""
        if i not in self._thumbs:
            from PIL import Image

            im = self.images[i].astype(np.float32)
            lo, hi = float(np.nanmin(im)), float(np.nanmax(im))
            if lo < 0.0 or hi > 1.0:
                im = (im - lo) / (hi - lo) if hi > lo else np.zeros_like(im)
            grey = np.rint(np.clip(np.nan_to_num(im), 0, 1) * 255).astype(np.uint8)
            h_mm, w_mm = float(im.shape[0]), float(im.shape[1])
            sp = self.spacings[i]
            if sp is not None:
                h_mm, w_mm = h_mm * float(sp[0]), w_mm * float(sp[1])
            scale = self.thumb_px / max(h_mm, w_mm)
            size = (max(1, round(w_mm * scale)), max(1, round(h_mm * scale)))
            self._thumbs[i] = np.asarray(Image.fromarray(grey).resize(size, Image.BILINEAR))
        return self._thumbs[i]

    def render(self, label: str | None = None) -> np.ndarray:
        """A contact sheet (RGB ``uint8``) of the visible thumbnails, ``columns`` per row."""
        idx = self.visible(label)
        t = self.thumb_px
        pad = 4
        rows = max(1, -(-len(idx) // self.columns))
        cols = min(self.columns, max(1, len(idx)))
        sheet = np.zeros((rows * (t + pad) + pad, cols * (t + pad) + pad, 3), np.uint8)
        for n, i in enumerate(idx):
            th = self.thumbnail(i)
            r0 = pad + (n // self.columns) * (t + pad) + (t - th.shape[0]) // 2
            c0 = pad + (n % self.columns) * (t + pad) + (t - th.shape[1]) // 2
            sheet[r0:r0 + th.shape[0], c0:c0 + th.shape[1]] = th[..., None]
        return sheet

    def png(self) -> bytes:
        return to_png(self.render())

    def figure(self, label: str | None = None):
        """A matplotlib Figure: the visible images in a grid, each titled with its label."""
        plt = _mpl()
        idx = self.visible(label)
        rows = max(1, -(-len(idx) // self.columns))
        fig, axes = plt.subplots(rows, self.columns, figsize=(3 * self.columns, 3 * rows),
                                 squeeze=False)
        for ax in axes.flat:
            ax.set_axis_off()
        for ax, i in zip(axes.flat, idx):
            ax.imshow(self.thumbnail(i), cmap="gray", vmin=0, vmax=255)
            ax.set_title(self.labels[i])
        fig.tight_layout()
        return fig

    @property
    def widget(self):
        if self._widget is None:
            import ipywidgets as w

            self.filter_dropdown = w.Dropdown(options=self.label_options(),
                                              value=self.label_filter, description="Label")
            self.grid = w.GridBox(layout=w.Layout(
                grid_template_columns=f"repeat({self.columns}, {self.thumb_px + 8}px)"))
            self.filter_dropdown.observe(self._on_filter, names="value")
            self._widget = w.VBox([self.filter_dropdown, self.grid])
            self._rebuild_grid()
        return self._widget

    def _on_filter(self, change) -> None:
        self.label_filter = change["new"]
        self._rebuild_grid()

    def _rebuild_grid(self) -> None:
        import ipywidgets as w

        cells = []
        for i in self.visible():
            cells.append(w.VBox([w.Image(value=to_png(self.thumbnail(i)), format="png"),
                                 w.Label(self.labels[i])]))
        self.grid.children = tuple(cells)

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = {}
        try:
            bundle.update(self.widget._repr_mimebundle_() or {})
        except Exception:
            pass
        bundle["image/png"] = self.png()
        bundle.setdefault("text/plain", repr(self))
        return bundle

    def __repr__(self) -> str:
        return f"XRayGallery({len(self.images)} images, labels={self.label_options()[1:]})"


def xray_gallery(xrays: Sequence, labels, **kw) -> XRayGallery:
    """A gallery of ``XRayImage`` objects (anything with ``.pixels``; ``.pixel_spacing_mm``
    used when present). *labels*: a list (one per X-ray), a mapping from patient to label,
    or a callable taking the X-ray."""
    xrays = list(xrays)
    if callable(labels):
        labs = [labels(x) for x in xrays]
    elif isinstance(labels, Mapping):
        labs = [labels[x.patient] for x in xrays]
    elif hasattr(labels, "to_dict") and not _positional(labels, len(xrays)):
        mapping = labels.to_dict()          # a pandas Series indexed by patient
        labs = [mapping[x.patient] for x in xrays]
    else:
        labs = list(labels)
    spacings = [getattr(x, "pixel_spacing_mm", None) for x in xrays]
    return XRayGallery([x.pixels for x in xrays], labs, spacings=spacings, **kw)


def _positional(series, n: int) -> bool:
    """A pandas Series with a default RangeIndex of length n is a list, not a mapping."""
    idx = getattr(series, "index", None)
    return idx is not None and len(series) == n and list(idx) == list(range(n))
