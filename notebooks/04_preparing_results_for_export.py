# %% [markdown]
# # 4. Preparing results for export
#
# Nothing leaves the zone unreviewed. When you ask for an export, your files are copied to a
# quarantine and **screened** — for identifiers (pseudonyms, UIDs, dates, free text), copies of
# the images, embedded DICOM/arrays/pickles, model weights, and **small counts** — then two
# reviewers decide. Results built the right way pass with nothing to fix:
#
# * **aggregate tables** with small counts suppressed: `safe_counts`, `safe_summary`;
# * **figures** of aggregates (curves, histograms) rather than patient images;
# * **metrics** as JSON; no per-patient rows, no patient IDs anywhere.

# %% tags=["parameters"]
dataset = ""         # a dataset id; empty: the first dataset granted to you
threshold = 10       # the zone's small-count threshold

# %%
from medzone_kernel.datasets import granted_datasets, open_dataset

print("granted to me:", granted_datasets())
if not dataset:
    dataset = granted_datasets()[0]
ds = open_dataset(dataset)
ds

# %%
import json
import os
from pathlib import Path

import matplotlib.pyplot as plt

from medzone_kernel.tables import disclosure_report, safe_counts, safe_summary

out = Path(os.environ.get("MEDZONE_RUN_DIR", ".")) / "export"
out.mkdir(parents=True, exist_ok=True)
clinical = ds.table("clinical")

# %% [markdown]
# ## Counts
#
# A plain `value_counts()` shows every count, including the 1s and 2s that can single a
# person out. `safe_counts` hides cells below the threshold (and enough others that they
# cannot be worked out from the totals), and rounds the rest.

# %%
raw = clinical.groupby(["sex", "cxr_label"]).size()
print("raw (stays in the zone):", raw.to_dict())
table = safe_counts(clinical, by=["sex", "cxr_label"], threshold=threshold)
table

# %%
for line in disclosure_report(table):
    print("-", line)
table.to_csv(out / "label_by_sex.csv")

# %% [markdown]
# ## Summaries of a measurement

# %%
ages = safe_summary(clinical, "age", by="sex", threshold=threshold)
ages.to_csv(out / "age_by_sex.csv")
ages

# %% [markdown]
# ## Figures and metrics
#
# A histogram of a whole cohort is fine; an image of one patient's scan is not (the screen
# recognises dataset images, also resized or cropped). Metrics go in a small JSON file.

# %%
fig, ax = plt.subplots(figsize=(5, 3))
ax.hist(clinical["age"], bins=range(20, 95, 10))
ax.set_xlabel("age (years)"); ax.set_ylabel("patients")
fig.tight_layout()
fig.savefig(out / "age_histogram.png", dpi=90)
(out / "metrics.json").write_text(json.dumps({"patients": "suppressed" if len(clinical) < threshold
                                              else int(round(len(clinical), -1))}))
sorted(p.name for p in out.iterdir())

# %% [markdown]
# ## Asking for the export
#
# From a terminal in the zone (or the portal's *Export* page), name the files and say why:
#
# ```
# medzone export request --user <you> export/label_by_sex.csv export/age_by_sex.csv \
#     export/age_histogram.png export/metrics.json --reason "cohort description for the paper"
# ```
#
# `medzone export screen <files>` shows what the screen will say before you ask.
