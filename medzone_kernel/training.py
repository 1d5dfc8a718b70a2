"""Training helpers: device, seeds, AMP, patient-level splits, progress bars, metrics and a
saved-model format with a metadata sidecar.

Metrics are plain numpy (no scikit-learn): ROC AUC is the Mann–Whitney statistic with ties
counted as one half, Dice is ``2|A∩B| / (|A| + |B|)``, and FROC follows the LUNA16
convention (a candidate hits a nodule when its centre lies within the nodule's radius; a
second hit on a found nodule is neither a true nor a false positive).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import random
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from .tables import DISCLOSURE_THRESHOLD, suppress_grid

MODEL_FORMAT = "medzone-model/1"
DEFAULT_FPS_PER_SCAN = (0.125, 0.25, 0.5, 1, 2, 4, 8)


# --- environment ----------------------------------------------------------------------------


def choose_device(prefer: str = "auto", *, verbose: bool = True) -> torch.device:
    """``auto``: CUDA if present, else CPU. ``cuda``/``cuda:N`` falls back to the CPU with a
    warning when no GPU is visible; ``cpu`` is always the CPU. Prints the choice."""
    prefer = (prefer or "auto").lower()
    if prefer == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif prefer.startswith("cuda"):
        if torch.cuda.is_available():
            device = torch.device(prefer)
        else:
            warnings.warn(f"{prefer} asked for but no CUDA device is visible; using the CPU",
                          stacklevel=2)
            device = torch.device("cpu")
    elif prefer == "cpu":
        device = torch.device("cpu")
    else:
        raise ValueError(f"prefer must be 'auto', 'cpu' or 'cuda[:N]', got {prefer!r}")
    if verbose:
        if device.type == "cuda":
            print(f"Using {device} ({torch.cuda.get_device_name(device)})")
        else:
            print(f"Using cpu ({torch.get_num_threads()} threads)")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices), and MONAI's determinism switch."""
    seed = int(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    try:
        from monai.utils import set_determinism
    except ImportError:  # pragma: no cover - MONAI is a dependency
        return
    set_determinism(seed=seed % 2**32)


def autocast(device):
    """Mixed precision (float16 autocast) on CUDA; a no-op context on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def grad_scaler(device) -> torch.amp.GradScaler:
    """A GradScaler enabled on CUDA (pairs with :func:`autocast`), disabled on the CPU."""
    device = torch.device(device)
    return torch.amp.GradScaler(device.type, enabled=device.type == "cuda")


def train_epoch(model: torch.nn.Module, batches: Iterable, loss_fn, optimizer, scaler,
                device) -> tuple[list[float], int]:
    """One pass of *model* over *batches* (``(inputs, targets)`` pairs on *device*), in mixed
    precision where the device has it (:func:`autocast`, *scaler* from :func:`grad_scaler`).
    Returns each batch's loss and how many samples were seen."""
    model.train()
    losses, seen = [], 0
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            loss = loss_fn(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(loss))
        seen += len(x)
    return losses, seen


def progress(iterable: Iterable, **kw):
    """A progress bar (``tqdm.auto``: a widget in notebooks, text elsewhere)."""
    from tqdm.auto import tqdm

    kw.setdefault("mininterval", 1.0)
    return tqdm(iterable, **kw)


# --- splits ---------------------------------------------------------------------------------


def patient_split(patients: Sequence, *, val_fraction: float = 0.25, seed: int = 0,
                  stratify: Sequence | None = None) -> tuple[list, list]:
    """Split *patients* into (train, validation) patient lists, by patient.

    *patients* may repeat (one entry per image/series): every item of a patient lands on the
    same side. *stratify* (parallel to *patients*) balances a label across the sides; a
    patient's label is its most frequent one. The result depends only on the set of patients,
    the labels, *val_fraction* and *seed* — not on the input order. Both lists are sorted.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    items = [p for p in patients]
    if stratify is not None and len(stratify) != len(items):
        raise ValueError(f"stratify has {len(stratify)} entries for {len(items)} patients")
    unique = sorted(set(items), key=lambda p: (str(type(p)), p))
    if len(unique) < 2:
        raise ValueError("need at least two patients to split")
    rng = np.random.default_rng(seed)
    n_val = min(len(unique) - 1, max(1, int(round(val_fraction * len(unique)))))
    if stratify is None:
        order = list(rng.permutation(len(unique)))
        val = {unique[i] for i in order[:n_val]}
    else:
        per_patient: dict = {}
        for p, lab in zip(items, stratify):
            per_patient.setdefault(p, Counter())[lab] += 1
        label_of = {p: sorted(c.items(), key=lambda kv: (-kv[1], str(kv[0])))[0][0]
                    for p, c in per_patient.items()}
        groups: dict = {}
        for p in unique:
            groups.setdefault(label_of[p], []).append(p)
        keys = sorted(groups, key=str)
        # largest-remainder apportionment of n_val across the labels
        exact = {k: n_val * len(groups[k]) / len(unique) for k in keys}
        take = {k: int(math.floor(exact[k])) for k in keys}
        for k in sorted(keys, key=lambda k: (-(exact[k] - take[k]), str(k)))[:n_val - sum(
                take.values())]:
            take[k] += 1
        val = set()
        for k in keys:
            members = groups[k]
            order = rng.permutation(len(members))
            val.update(members[i] for i in order[:take[k]])
    train = [p for p in unique if p not in val]
    return train, [p for p in unique if p in val]


def split_indices(patients: Sequence, **kw) -> tuple[list[int], list[int]]:
    """Like :func:`patient_split` but returns item indices into *patients* (train, val)."""
    _, val = patient_split(patients, **kw)
    val = set(val)
    train_idx = [i for i, p in enumerate(patients) if p not in val]
    return train_idx, [i for i, p in enumerate(patients) if p in val]


# --- metrics --------------------------------------------------------------------------------


def _binary(y_true) -> np.ndarray:
    y = np.asarray(y_true).ravel()
    if y.dtype == bool:
        return y
    values = set(np.unique(y).tolist())
    if not values <= {0, 1}:
        raise ValueError(f"binary labels must be 0/1 or bool, got values {sorted(values)[:5]}")
    return y.astype(bool)


def roc_auc(y_true, y_score) -> float:
    """Area under the ROC curve for binary labels (1 = positive); ties count one half.

    Raises ValueError when only one class is present (the AUC is undefined).
    """
    y = _binary(y_true)
    s = np.asarray(y_score, dtype=np.float64).ravel()
    if s.shape != y.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC needs both positive and negative examples")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    # average ranks (ties share the mean rank)
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    bounds = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.r_[0, bounds]
    ends = np.r_[bounds, s.size]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2.0  # mean of ranks a+1..b
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_auc_ovr(y_true, probs, classes: Sequence) -> float:
    """Macro one-vs-rest ROC AUC. ``probs[:, c]`` is the score of ``classes[c]``; classes
    without positives (or without negatives) in *y_true* are skipped with a warning."""
    y = np.asarray(y_true).ravel()
    p = np.asarray(probs, dtype=np.float64)
    classes = list(classes)
    if p.ndim != 2 or p.shape != (y.size, len(classes)):
        raise ValueError(f"probs must have shape ({y.size}, {len(classes)}), got {p.shape}")
    unknown = set(y.tolist()) - set(classes)
    if unknown:
        raise ValueError(f"labels not among the classes: {sorted(map(str, unknown))}")
    aucs = []
    for c, cls in enumerate(classes):
        pos = y == cls
        if pos.all() or not pos.any():
            warnings.warn(f"class {cls!r} has no positives or no negatives; skipped", stacklevel=2)
            continue
        aucs.append(roc_auc(pos, p[:, c]))
    if not aucs:
        raise ValueError("no class has both positives and negatives")
    return float(np.mean(aucs))


def dice(pred_mask, true_mask) -> float:
    """Dice overlap of two binary masks (non-zero = inside). Both empty → 1.0."""
    a = np.asarray(pred_mask) != 0
    b = np.asarray(true_mask) != 0
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return float(2.0 * np.logical_and(a, b).sum() / total)


def _records(obj, kind: str) -> list[tuple]:
    """Normalise candidates/nodules to [(scan, centre(3,), value)].

    Accepts ``{scan: [(centre_mm, value), …]}`` or an iterable of dicts / a DataFrame with
    ``scan`` and ``centre`` (or ``x``, ``y``, ``z``) and ``score`` (candidates) or ``radius``
    / ``diameter`` (nodules, in mm).
    """
    out = []
    if hasattr(obj, "to_dict") and not isinstance(obj, Mapping):
        obj = obj.to_dict("records")
    if isinstance(obj, Mapping):
        for scan, entries in obj.items():
            for entry in entries:
                centre, value = entry
                out.append((scan, np.asarray(centre, dtype=np.float64).reshape(3), float(value)))
        return out
    for rec in obj:
        scan = rec["scan"]
        if "centre" in rec or "center" in rec:
            centre = rec["centre"] if "centre" in rec else rec["center"]
        else:
            centre = (rec["x"], rec["y"], rec["z"])
        if kind == "candidate":
            value = rec["score"]
        elif "radius" in rec:
            value = rec["radius"]
        else:
            value = float(rec["diameter"]) / 2.0
        out.append((scan, np.asarray(centre, dtype=np.float64).reshape(3), float(value)))
    return out


def froc_sensitivity(pred_candidates, true_nodules,
                     fps_per_scan: Sequence[float] = DEFAULT_FPS_PER_SCAN, *,
                     n_scans: int | None = None) -> dict:
    """FROC-style detection sensitivity at given false positives per scan.

    *pred_candidates*: ``{scan: [(centre_mm, score), …]}`` (or records, see ``_records``);
    *true_nodules*: ``{scan: [(centre_mm, radius_mm), …]}``. A candidate hits a nodule of the
    same scan when its centre lies within the nodule's radius (inclusive); the first
    (highest-scoring) hit finds the nodule, later hits on it are ignored, a candidate that hits
    nothing is a false positive. *n_scans* defaults to the number of scans named by either
    argument (pass it when scans without candidates or nodules exist).

    Returns ``{"sensitivity": {fps: s, …}, "cpm": mean of those, "n_nodules",
    "n_scans", "n_candidates", "curve": {"fps_per_scan": […], "sensitivity": […]}}``.
    ``sensitivity[f]`` is the best sensitivity reachable with at most *f* false positives per
    scan by thresholding the score.
    """
    cands = _records(pred_candidates, "candidate")
    nods = _records(true_nodules, "nodule")
    scans = {c[0] for c in cands} | {n[0] for n in nods}
    if isinstance(pred_candidates, Mapping):
        scans |= set(pred_candidates)
    if isinstance(true_nodules, Mapping):
        scans |= set(true_nodules)
    if n_scans is None:
        n_scans = len(scans)
    if n_scans <= 0:
        raise ValueError("n_scans must be positive")
    by_scan: dict = {}
    for k, (scan, centre, radius) in enumerate(nods):
        by_scan.setdefault(scan, []).append((k, centre, radius))
    found = np.zeros(len(nods), dtype=bool)
    order = sorted(range(len(cands)), key=lambda i: -cands[i][2])
    # per candidate in score order: +1 TP, +1 FP or neither
    tp_step = np.zeros(len(cands), dtype=np.int64)
    fp_step = np.zeros(len(cands), dtype=np.int64)
    scores = np.array([cands[i][2] for i in order], dtype=np.float64)
    for pos, i in enumerate(order):
        scan, centre, _ = cands[i]
        hits = [(float(np.linalg.norm(centre - c)), k) for k, c, r in by_scan.get(scan, ())
                if np.linalg.norm(centre - c) <= r]
        new = sorted(h for h in hits if not found[h[1]])
        if new:
            found[new[0][1]] = True
            tp_step[pos] = 1
        elif not hits:
            fp_step[pos] = 1
    tp = np.cumsum(tp_step)
    fp = np.cumsum(fp_step)
    # operating points only at the end of each run of equal scores (a threshold keeps all ties)
    if scores.size:
        last = np.r_[np.flatnonzero(np.diff(scores) != 0), scores.size - 1]
        op_fp = np.r_[0.0, fp[last] / n_scans]
        op_sens = np.r_[0.0, tp[last] / len(nods)] if nods else np.zeros(last.size + 1)
    else:
        op_fp, op_sens = np.zeros(1), np.zeros(1)
    sens = {}
    for f in fps_per_scan:
        ok = op_fp <= f + 1e-12
        sens[f] = float(op_sens[ok].max()) if nods else float("nan")
    return {
        "sensitivity": sens,
        "cpm": float(np.mean(list(sens.values()))) if sens else float("nan"),
        "n_nodules": len(nods),
        "n_scans": int(n_scans),
        "n_candidates": len(cands),
        "curve": {"fps_per_scan": op_fp.tolist(), "sensitivity": op_sens.tolist()},
    }


def confusion_matrix(y_true, y_pred, classes: Sequence, *, safe: bool = False,
                     threshold: int | None = None):
    """Counts with true classes as rows and predicted classes as columns.

    ``safe=True`` returns the table with small counts suppressed as the export screen
    requires (:func:`medzone_kernel.tables.suppress_grid`), for outputs meant for export.
    """
    import pandas as pd

    classes = list(classes)
    yt, yp = list(np.asarray(y_true).ravel()), list(np.asarray(y_pred).ravel())
    if len(yt) != len(yp):
        raise ValueError(f"{len(yt)} labels but {len(yp)} predictions")
    unknown = (set(yt) | set(yp)) - set(classes)
    if unknown:
        raise ValueError(f"values not among the classes: {sorted(map(str, unknown))}")
    pos = {c: n for n, c in enumerate(classes)}
    grid = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for t, p in zip(yt, yp):
        grid[pos[t], pos[p]] += 1
    frame = pd.DataFrame(grid, index=pd.Index(classes, name="true"),
                         columns=pd.Index(classes, name="predicted"))
    if safe:
        return suppress_grid(frame, threshold=threshold or DISCLOSURE_THRESHOLD)
    return frame


# --- saved models ---------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _jsonable(obj):
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, (Path, torch.device)):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def _architecture(model: torch.nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def sidecar_path(path) -> Path:
    return Path(path).with_suffix(".json")


def save_model(model: torch.nn.Module, path, *, template: str, parameters: Mapping,
               dataset_manifest_sha256: Mapping[str, str], metrics: Mapping,
               extra: Mapping | None = None) -> Path:
    """Save ``model.state_dict()`` to *path* and a JSON sidecar next to it
    (``path.with_suffix(".json")``) with the architecture, template, parameters, the
    manifest hash of every dataset used, metrics, library versions, creation time and the
    weights file's sha256. Returns *path*."""
    path = Path(path)
    side = sidecar_path(path)
    if side == path:
        raise ValueError("the model file must not have a .json suffix")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, tmp)
    os.replace(tmp, path)
    try:
        import monai

        monai_version = monai.__version__
    except ImportError:  # pragma: no cover
        monai_version = None
    meta = {
        "format": MODEL_FORMAT,
        "weights_file": path.name,
        "weights_sha256": _sha256(path),
        "architecture": _architecture(model),
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
        "state_dict_keys": len(state),
        "template": template,
        "parameters": _jsonable(dict(parameters)),
        "dataset_manifest_sha256": _jsonable(dict(dataset_manifest_sha256)),
        "metrics": _jsonable(dict(metrics)),
        "extra": _jsonable(dict(extra or {})),
        "torch_version": torch.__version__,
        "monai_version": monai_version,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    tmp_side = side.with_name(side.name + ".tmp")
    tmp_side.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_side, side)
    return path


class ModelIntegrityError(ValueError):
    """The weights file does not match its sidecar (changed, truncated or swapped)."""


def load_model(path, model: torch.nn.Module, *, map_location="cpu",
               strict_architecture: bool = True) -> tuple[torch.nn.Module, dict]:
    """Load weights saved by :func:`save_model` into *model*, after checking the weights'
    sha256 against the sidecar (and that *model* has the recorded architecture).
    Returns ``(model, metadata)``."""
    path = Path(path)
    side = sidecar_path(path)
    if not side.exists():
        raise FileNotFoundError(f"no metadata sidecar {side.name} next to {path.name}")
    meta = json.loads(side.read_text())
    if meta.get("format") != MODEL_FORMAT:
        raise ValueError(f"{side.name} is not a {MODEL_FORMAT} sidecar")
    digest = _sha256(path)
    if digest != meta.get("weights_sha256"):
        raise ModelIntegrityError(
            f"{path.name} does not match the sha256 recorded in {side.name}; refusing to load")
    if strict_architecture and meta.get("architecture") != _architecture(model):
        raise ValueError(f"weights are for {meta.get('architecture')}, "
                         f"not {_architecture(model)}")
    state = torch.load(path, map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    return model, meta
