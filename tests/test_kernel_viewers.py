"""CT slice viewer and X-ray gallery: geometry, orientation, windowing, overlay, widgets."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from medzone_kernel import viewers as V

SHAPE = (20, 30, 10)           # i (towards Right), j (Anterior), k (Superior)
SPACING = (1.0, 0.5, 2.0)      # mm along i, j, k


def _volume() -> np.ndarray:
    hu = np.full(SHAPE, -1000.0, np.float32)
    hu[4:16, 5:25, 2:8] = 40.0
    return hu


def _mask() -> np.ndarray:
    m = np.zeros(SHAPE, np.uint8)
    m[6:9, 10:13, 3:6] = 1
    m[12, 20, 4] = 2
    return m


def _coloured(rgb: np.ndarray) -> np.ndarray:
    # grey pixels have R == G == B; an overlay colour breaks that
    return (rgb[..., 0] != rgb[..., 1]) | (rgb[..., 1] != rgb[..., 2])


@pytest.mark.parametrize("plane,native,square,aspect", [
    ("axial", (30, 20), (15, 20), 0.5),      # rows j (0.5 mm), columns i (1 mm)
    ("coronal", (10, 20), (20, 20), 2.0),    # rows k (2 mm), columns i (1 mm)
    ("sagittal", (10, 30), (40, 30), 4.0),   # rows k (2 mm), columns j (0.5 mm)
])
def test_slice_shape_and_aspect(plane, native, square, aspect):
    v = V.CTSliceViewer(_volume(), SPACING)
    assert v.slice_aspect(plane) == pytest.approx(aspect)
    assert v.show_slice(plane, 0, native=True).shape == (*native, 3)
    out = v.show_slice(plane, 0)
    assert out.shape == (*square, 3) and out.dtype == np.uint8
    # square pixels: physical height/width of the image equals the volume's extent
    assert out.shape[0] / out.shape[1] == pytest.approx(native[0] * aspect / native[1])


def test_radiological_orientation():
    hu = np.full(SHAPE, -1000.0, np.float32)
    hu[-1, -1, -1] = 1000.0   # patient's right, anterior, superior corner
    hu[0, -1, -1] = 500.0     # patient's left, anterior, superior
    v = V.CTSliceViewer(hu, SPACING, preset="bone")
    ax = v.extract(hu, "axial", SHAPE[2] - 1)
    assert ax[0, 0] == 1000.0          # anterior at the top, patient's right on image left
    assert ax[0, -1] == 500.0          # patient's left on the image's right
    cor = v.extract(hu, "coronal", SHAPE[1] - 1)
    assert cor[0, 0] == 1000.0 and cor[0, -1] == 500.0   # superior at the top
    sag = v.extract(hu, "sagittal", SHAPE[0] - 1)
    assert sag[0, 0] == 1000.0         # superior at the top, anterior on the left


def test_presets_change_windowing():
    hu = np.zeros(SHAPE, np.float32)
    values = [-900.0, -600.0, 40.0, 700.0, 1000.0]
    for n, val in enumerate(values):
        hu[:, :, n] = val
    v = V.CTSliceViewer(hu, SPACING, preset="lung")
    lung = [int(v.show_slice("axial", n, native=True)[0, 0, 0]) for n in range(5)]
    v.set_window("bone")
    bone = [int(v.show_slice("axial", n, native=True)[0, 0, 0]) for n in range(5)]
    expect = lambda val, lev, wid: int(np.rint(np.clip((val - lev + wid / 2) / wid, 0, 1) * 255))
    assert lung == [expect(x, -600, 1500) for x in values]
    assert bone == [expect(x, 400, 1800) for x in values]
    assert lung[0] < lung[1] and bone[0] == bone[1] == 0       # lung tissue: only lung shows it
    assert bone[3] < bone[4] and lung[3] == lung[4] == 255     # dense bone: only bone shows it
    v.set_window(level=0, width=100)
    assert v.preset == "custom" and int(v.show_slice("axial", 2, native=True)[0, 0, 0]) == expect(
        40, 0, 100)


@pytest.mark.parametrize("plane", V.PLANES)
def test_mask_overlay_colours_exactly_the_mask(plane):
    mask = _mask()
    v = V.CTSliceViewer(_volume(), SPACING, mask=mask, opacity=0.5)
    plain = V.CTSliceViewer(_volume(), SPACING)
    for index in range(v.n_slices(plane)):
        rgb = v.show_slice(plane, index, native=True)
        want = v.extract(mask, plane, index) != 0
        assert np.array_equal(_coloured(rgb), want)
        base = plain.show_slice(plane, index, native=True)
        assert np.array_equal(rgb[~want], base[~want])
        # resampled view: colour exactly on the nearest-neighbour resampled mask
        sq = v.show_slice(plane, index)
        want_sq = V._square_rows(want, v.slice_aspect(plane))
        assert np.array_equal(_coloured(sq), want_sq)
    v.show_mask = False
    assert not _coloured(v.show_slice(plane, None)).any()


def test_widget_controls_update_the_image():
    v = V.CTSliceViewer(_volume(), SPACING, mask=_mask(), preset="lung")
    box = v.widget
    assert box.children[-1] is v.image
    png = lambda: bytes(v.image.value)
    decoded = lambda: np.asarray(Image.open(io.BytesIO(png())))
    assert np.array_equal(decoded(), v.render())

    before = png()
    v.slice_slider.value = 0            # outside the body: all air
    assert png() != before and v.index == 0
    assert np.array_equal(decoded(), v.show_slice("axial", 0))

    v.slice_slider.value = 4
    lung = png()
    v.preset_dropdown.value = "mediastinum"
    assert png() != lung and (v.level, v.width) == (40.0, 400.0)
    assert (v.level_box.value, v.width_box.value) == (40.0, 400.0)

    v.level_box.value = -100.0
    assert v.preset_dropdown.value == "custom" and v.level == -100.0

    with_mask = png()
    v.mask_checkbox.value = False
    assert png() != with_mask and not _coloured(decoded()).any()
    v.mask_checkbox.value = True
    v.opacity_slider.value = 1.0
    assert png() != with_mask

    v.plane_toggle.value = "sagittal"
    assert v.slice_slider.max == SHAPE[0] - 1 and v.index == SHAPE[0] // 2
    assert decoded().shape == v.show_slice("sagittal", SHAPE[0] // 2).shape


def test_headless_outputs():
    v = V.CTSliceViewer(_volume(), SPACING, mask=_mask())
    bundle = v._repr_mimebundle_()
    assert bundle["image/png"].startswith(b"\x89PNG")
    assert "application/vnd.jupyter.widget-view+json" in bundle
    with pytest.raises(ValueError):
        V.CTSliceViewer(_volume(), SPACING, preset="brain")
    with pytest.raises(ValueError):
        V.CTSliceViewer(_volume(), SPACING, mask=np.zeros((2, 2, 2)))
    with pytest.raises(IndexError):
        v.show_slice("axial", SHAPE[2])


def test_figure_with_matplotlib():
    pytest.importorskip("matplotlib")
    fig = V.CTSliceViewer(_volume(), SPACING).figure()
    assert len(fig.axes) == 3


def test_ct_viewer_reorients_to_ras():
    hu = _volume()
    hu[-1, 0, 0] = 999.0
    # the same grid stored with i towards Left and j towards Posterior (LPS-like axes)
    lps = hu[::-1, ::-1, :].copy()
    affine = np.diag([-1.0, -0.5, 2.0, 1.0])
    vol = SimpleNamespace(hu=lps, spacing_mm=SPACING, affine_ras=affine, series_uid="x",
                          patient="p")
    v = V.ct_viewer(vol, mask=lps > 0)
    assert np.array_equal(v.hu, hu) and v.spacing_mm == SPACING
    assert np.array_equal(v.mask, (hu > 0).astype(np.uint8))
    ras = SimpleNamespace(hu=hu, spacing_mm=SPACING, affine_ras=np.diag([1.0, 0.5, 2.0, 1.0]))
    assert np.array_equal(V.ct_viewer(ras).hu, hu)


def _xrays():
    rng = np.random.default_rng(0)
    images = [rng.random((40 + 5 * n, 50)).astype(np.float32) for n in range(7)]
    labels = ["normal", "nodule", "normal", "effusion", "normal", "nodule", "normal"]
    return images, labels


def test_gallery_filters_by_label():
    images, labels = _xrays()
    g = V.XRayGallery(images, labels, columns=3, thumb_px=32)
    box = g.widget
    assert g.filter_dropdown.options == ("(all)", "effusion", "nodule", "normal")
    assert len(g.grid.children) == 7
    g.filter_dropdown.value = "nodule"
    assert len(g.grid.children) == 2
    assert [c.children[1].value for c in g.grid.children] == ["nodule", "nodule"]
    assert g.visible() == [1, 5]
    g.set_filter("normal")
    assert g.filter_dropdown.value == "normal" and len(g.grid.children) == 4
    # contact sheet: 4 images in 3 columns → 2 rows
    sheet = g.render()
    assert sheet.shape == (2 * 36 + 4, 3 * 36 + 4, 3)
    assert g.render("effusion").shape == (36 + 4, 36 + 4, 3)
    with pytest.raises(ValueError):
        g.set_filter("pneumothorax")
    assert box is g.widget
    assert g._repr_mimebundle_()["image/png"].startswith(b"\x89PNG")


def test_gallery_thumbnails_keep_aspect_and_brightness():
    img = np.zeros((100, 50), np.float32)
    img[:, 25:] = 1.0                     # right half bright (bone)
    g = V.XRayGallery([img, img * 4000], ["a", "b"], thumb_px=40, spacings=[(1, 1), (0.5, 1)])
    t0, t1 = g.thumbnail(0), g.thumbnail(1)
    assert t0.shape == (40, 20)           # 100×50 px at 1×1 mm
    assert t1.shape == (40, 40)           # 100×50 px at 0.5×1 mm = 50×50 mm
    assert t0[:, -1].min() > 200 and t0[:, 0].max() < 50
    assert t1[:, -1].min() > 200          # other ranges are scaled to 0..1


def test_xray_gallery_from_objects():
    images, labels = _xrays()
    xrays = [SimpleNamespace(pixels=im, pixel_spacing_mm=(0.2, 0.2), patient=f"p{n}",
                             series_uid=f"u{n}", photometric="MONOCHROME2")
             for n, im in enumerate(images)]
    g = V.xray_gallery(xrays, labels)
    assert g.labels == labels
    g2 = V.xray_gallery(xrays, {f"p{n}": lab for n, lab in enumerate(labels)})
    assert g2.labels == labels
    g3 = V.xray_gallery(xrays, lambda x: x.patient)
    assert g3.visible("p3") == [3]


def test_float_masks():
    prob = np.zeros(SHAPE, np.float32)
    prob[6:9, 10:13, 3:6] = 0.8
    prob[0, 0, 0] = 0.3                   # below 0.5: not drawn
    v = V.CTSliceViewer(_volume(), SPACING, mask=prob, opacity=1.0)
    assert np.array_equal(v.mask != 0, prob > 0.5)
    labels = _mask().astype(np.float64)
    assert np.array_equal(V.CTSliceViewer(_volume(), SPACING, mask=labels).mask, _mask())


def test_xray_gallery_labels_from_a_series():
    pd = pytest.importorskip("pandas")
    images, labels = _xrays()
    xrays = [SimpleNamespace(pixels=im, patient=f"p{n}") for n, im in enumerate(images)]
    by_patient = pd.Series({f"p{n}": lab for n, lab in enumerate(labels)})
    assert V.xray_gallery(xrays, by_patient).labels == labels
    assert V.xray_gallery(xrays, pd.Series(labels)).labels == labels   # positional
