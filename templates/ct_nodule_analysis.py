# %% [markdown]
# # CT lung nodule analysis
#
# Classical image analysis of every chest CT in a granted dataset, no training needed:
#
# 1. **lung segmentation** by Hounsfield-unit thresholding (air inside the body, the two
#    largest connected regions, holes filled so that nodules and vessels belong to the lung);
# 2. **nodule candidates**: connected regions denser than `candidate_threshold_hu` inside
#    the lungs, at least `min_diameter_mm` across;
# 3. **measurements against the ground truth** (`nodules.csv` centres and diameters, the
#    nodule masks): detection sensitivity, false positives per scan, diameter error, Dice;
# 4. a **cohort summary** with small counts suppressed.
#
# Outputs (in the run folder): `metrics.json`, `cohort_summary.csv`, `lung_volume_summary.csv`,
# `figures/*.png`.

# %% tags=["parameters"]
dataset = ""                    # granted dataset id; empty: the only one granted
max_patients = 0                # 0 means every CT series
lung_threshold_hu = -400.0      # lung parenchyma is darker than this
candidate_threshold_hu = -300.0  # nodule candidates are denser than this
min_diameter_mm = 6.0           # smallest candidate kept (equivalent-sphere diameter)
max_elongation = 3.0            # longest extent over diameter; vessels are long, nodules round
match_distance_mm = 10.0        # a candidate this close to a true centre detects it
figure_patients = 4             # how many scans the slice figure shows
small_count_threshold = 10      # cells below this are suppressed in the cohort table

# %%
import json
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from medzone_kernel.runs import start_run

out, figures, dataset, ds = start_run(dataset)
started = time.time()
print(ds)

from scipy import ndimage

from medzone_kernel.imaging import WINDOW_PRESETS, load_ct_volume, load_mask, window_hu
from medzone_kernel.tables import safe_counts, safe_summary

series = ds.series("CT")
if max_patients:
    series = series[:max_patients]
truth = ds.table("nodules") if "nodules" in ds.tables() else pd.DataFrame()
clinical = ds.table("clinical")
print(f"{len(series)} CT series, {len(truth)} annotated nodules")


# %% [markdown]
# ## Methods
#
# The lung mask is air (`HU < lung_threshold_hu`) not connected to the in-plane border of the
# scan (which is outside air), keeping the two largest regions, with enclosed cavities
# filled in 3-D and per axial slice. Candidates are voxels above `candidate_threshold_hu`
# inside the lung mask eroded by one voxel (so the chest wall does not count), grouped into
# 26-connected components; components longer than `max_elongation` times their diameter
# (vessels) are dropped.

# %%
def segment_lungs(hu, threshold):
    air = hu < threshold
    labels, n = ndimage.label(air)
    if n == 0:
        return np.zeros_like(air)
    sizes = ndimage.sum(air, labels, index=np.arange(1, n + 1))
    border = np.unique(np.concatenate([labels[[0, -1], :, :].ravel(), labels[:, [0, -1], :].ravel()]))
    sizes[border[border > 0] - 1] = 0  # outside air touches the in-plane border
    order = np.argsort(sizes)[::-1]
    keep = [order[0] + 1]
    if n > 1 and sizes[order[1]] > 0.1 * sizes[order[0]]:
        keep.append(order[1] + 1)
    lungs = np.isin(labels, keep) & (sizes[order[0]] > 0)
    lungs = ndimage.binary_fill_holes(lungs)
    for k in range(lungs.shape[2]):
        lungs[:, :, k] = ndimage.binary_fill_holes(lungs[:, :, k])
    return lungs


def find_candidates(vol, lungs, threshold, min_diameter, max_elongation):
    inner = ndimage.binary_erosion(lungs)
    dense = (vol.hu > threshold) & inner
    labels, n = ndimage.label(dense, structure=np.ones((3, 3, 3)))
    voxel_mm3 = float(np.prod(vol.spacing_mm))
    found, mask = [], np.zeros(dense.shape, bool)
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        region = labels[box] == index
        volume = region.sum() * voxel_mm3
        diameter = (6 * volume / np.pi) ** (1 / 3)
        extent = max((s.stop - s.start) * mm for s, mm in zip(box, vol.spacing_mm))
        if diameter < min_diameter or extent > max_elongation * diameter:
            continue
        ijk = np.array(ndimage.center_of_mass(region)) + [s.start for s in box]
        ras = vol.affine_ras @ np.r_[ijk, 1.0]
        found.append({"lps": np.array([-ras[0], -ras[1], ras[2]]), "diameter_mm": diameter,
                      "volume_mm3": volume, "mean_hu": float(vol.hu[box][region].mean())})
        mask[box] |= region
    return found, mask


def dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else float("nan")


# %%
per_scan, matches, shown = [], [], []
for ref in series:
    vol = load_ct_volume(ref)
    lungs = segment_lungs(vol.hu, lung_threshold_hu)
    candidates, cand_mask = find_candidates(vol, lungs, candidate_threshold_hu, min_diameter_mm,
                                            max_elongation)
    gt = truth[truth["series_uid"] == ref.series_uid] if len(truth) else truth
    mask_path = ds.mask_path(ref.patient)
    gt_mask = load_mask(mask_path, like=vol) > 0 if mask_path is not None else None
    used = set()
    for _, row in gt.iterrows():
        centre = row[["center_x_mm", "center_y_mm", "center_z_mm"]].to_numpy(float)
        best, best_d = None, np.inf
        for c, cand in enumerate(candidates):
            d = float(np.linalg.norm(cand["lps"] - centre))
            if c not in used and d < best_d:
                best, best_d = c, d
        hit = best is not None and best_d <= match_distance_mm
        if hit:
            used.add(best)
        matches.append({"true_diameter_mm": float(row["diameter_mm"]), "detected": hit,
                        "measured_diameter_mm": candidates[best]["diameter_mm"] if hit else np.nan,
                        "distance_mm": best_d if hit else np.nan})
    per_scan.append({
        "patient": ref.patient, "true_nodules": len(gt), "candidates": len(candidates),
        "true_positives": len(used), "false_positives": len(candidates) - len(used),
        "lung_volume_ml": float(lungs.sum() * np.prod(vol.spacing_mm) / 1000),
        "dice": dice(cand_mask, gt_mask) if gt_mask is not None and gt_mask.any() else np.nan,
    })
    if len(gt) and len(shown) < figure_patients:
        k = vol.voxel_of_lps(gt.iloc[0][["center_x_mm", "center_y_mm", "center_z_mm"]].to_numpy(float))[2]
        shown.append((vol.axial(k), np.asarray(lungs[::-1, ::-1, k]).T,
                      np.asarray(cand_mask[::-1, ::-1, k]).T,
                      None if gt_mask is None else np.asarray(gt_mask[::-1, ::-1, k]).T))
scans = pd.DataFrame(per_scan)
nodules = pd.DataFrame(matches, columns=["true_diameter_mm", "detected", "measured_diameter_mm",
                                         "distance_mm"])
print(f"{len(scans)} scans analysed in {time.time() - started:.1f} s")

# %% [markdown]
# ## Results

# %%
n_true = int(scans["true_nodules"].sum())
detected = int(nodules["detected"].sum()) if len(nodules) else 0
found = nodules[nodules["detected"]]
metrics = {
    "template": "ct_nodule_analysis",
    "dataset": dataset,
    "dataset_manifest_sha256": ds.manifest_sha256,
    "scans": int(len(scans)),
    "true_nodules": n_true,
    "sensitivity": detected / n_true if n_true else None,
    "false_positives_per_scan": float(scans["false_positives"].mean()) if len(scans) else None,
    "diameter_error_mm_mean_abs": float((found["measured_diameter_mm"] - found["true_diameter_mm"]).abs().mean()) if len(found) else None,
    "diameter_bias_mm": float((found["measured_diameter_mm"] - found["true_diameter_mm"]).mean()) if len(found) else None,
    "dice_mean": float(scans["dice"].mean()) if scans["dice"].notna().any() else None,
    "lung_volume_ml_mean": float(scans["lung_volume_ml"].mean()) if len(scans) else None,
    "parameters": {"lung_threshold_hu": lung_threshold_hu, "candidate_threshold_hu": candidate_threshold_hu,
                   "min_diameter_mm": min_diameter_mm, "max_elongation": max_elongation,
                   "match_distance_mm": match_distance_mm},
    "seconds": round(time.time() - started, 1),
}
(out / "metrics.json").write_text(json.dumps(metrics, indent=1))
{k: v for k, v in metrics.items() if k != "parameters"}

# %%
if shown:
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 4.2), squeeze=False)
    level, width = WINDOW_PRESETS["lung"]
    for ax, (image, lung, cand, gt) in zip(axes[0], shown):
        ax.imshow(window_hu(image, level, width), cmap="gray")
        ax.contour(lung, levels=[0.5], colors="lime", linewidths=0.6)
        if cand.any():
            ax.contour(cand, levels=[0.5], colors="red", linewidths=1.0)
        if gt is not None and gt.any():
            ax.contour(gt, levels=[0.5], colors="yellow", linewidths=1.0, linestyles="dashed")
        ax.set_axis_off()
    fig.suptitle("lung mask (green), candidates (red), ground truth (yellow dashed)")
    fig.tight_layout()
    fig.savefig(figures / "nodule_slices.png", dpi=100)
    plt.show()

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
if len(found):
    top = max(found["true_diameter_mm"].max(), found["measured_diameter_mm"].max()) * 1.1
    axes[0].scatter(found["true_diameter_mm"], found["measured_diameter_mm"])
    axes[0].plot([0, top], [0, top], "k--", linewidth=0.8)
axes[0].set_xlabel("true diameter (mm)")
axes[0].set_ylabel("measured diameter (mm)")
axes[0].set_title("detected nodules")
axes[1].hist(scans["lung_volume_ml"] / 1000, bins=10)
axes[1].set_xlabel("lung volume (L)")
axes[1].set_ylabel("scans")
axes[1].set_title("lung volumes")
fig.tight_layout()
fig.savefig(figures / "measurements.png", dpi=100)
plt.show()

# %% [markdown]
# ## Cohort summary
#
# Scans grouped by smoking status and whether the analysis found a candidate, with counts
# below `small_count_threshold` suppressed by the zone's disclosure rule: this table can leave
# the zone as it is.

# %%
cohort = scans.merge(clinical, left_on="patient", right_on="patient_id", how="left")
cohort["any_candidate"] = np.where(cohort["candidates"] > 0, "yes", "no")
by = [c for c in ("smoking", "any_candidate") if c in cohort.columns]
summary = safe_counts(cohort, by=by, threshold=small_count_threshold)
summary.to_csv(out / "cohort_summary.csv")
volumes = safe_summary(cohort, "lung_volume_ml", by="sex", threshold=small_count_threshold)
volumes.to_csv(out / "lung_volume_summary.csv")
display(summary, volumes)
