"""Training helpers: splits, seeds, device/AMP, metrics against independent computations,
and the saved-model format."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch

from medzone_kernel import training as T

# --- splits ---------------------------------------------------------------------------------


def _items(n_patients=40, seed=0):
    rng = np.random.default_rng(seed)
    patients, labels = [], []
    for p in range(n_patients):
        k = int(rng.integers(1, 5))           # 1..4 images per patient
        patients += [f"P{p:03d}"] * k
        labels += [int(p % 3 == 0)] * k       # one label per patient, ~1/3 positive
    return patients, labels


def test_patient_split_keeps_patients_whole_and_is_deterministic():
    patients, _ = _items()
    train, val = T.patient_split(patients, val_fraction=0.25, seed=7)
    assert set(train).isdisjoint(val)
    assert set(train) | set(val) == set(patients)
    assert len(val) == 10 and len(train) == 30
    assert (train, val) == T.patient_split(patients, val_fraction=0.25, seed=7)
    shuffled = patients[:]
    random.Random(1).shuffle(shuffled)
    assert (train, val) == T.patient_split(shuffled, val_fraction=0.25, seed=7)
    assert T.patient_split(patients, seed=8) != (train, val)
    tr_idx, va_idx = T.split_indices(patients, val_fraction=0.25, seed=7)
    assert sorted(tr_idx + va_idx) == list(range(len(patients)))
    assert {patients[i] for i in va_idx} == set(val)
    assert {patients[i] for i in tr_idx} == set(train)


def test_patient_split_stratifies():
    patients, labels = _items(60)
    label_of = dict(zip(patients, labels))
    splits = set()
    for seed in range(5):
        train, val = T.patient_split(patients, val_fraction=0.25, seed=seed, stratify=labels)
        assert set(train).isdisjoint(val)
        pos_val = sum(label_of[p] for p in val)
        pos_all = sum(label_of[p] for p in set(patients))
        assert len(val) == 15
        assert abs(pos_val - 15 * pos_all / 60) <= 1      # the label's share is kept
        splits.add(tuple(val))
    assert len(splits) > 1                                 # the seed shuffles within labels
    with pytest.raises(ValueError):
        T.patient_split(["a", "a"])
    with pytest.raises(ValueError):
        T.patient_split(patients, val_fraction=1.5)


# --- environment ----------------------------------------------------------------------------


def test_seed_everything_reproduces():
    T.seed_everything(123)
    a = (random.random(), np.random.rand(), torch.rand(3))
    T.seed_everything(123)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_device_autocast_progress(capsys):
    assert T.choose_device("cpu").type == "cpu"
    assert "cpu" in capsys.readouterr().out
    auto = T.choose_device()
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.warns(UserWarning):
            assert T.choose_device("cuda").type == "cpu"
        with T.autocast(torch.device("cpu")):
            assert not torch.is_autocast_enabled()
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
        assert not T.grad_scaler("cpu").is_enabled()
    else:  # pragma: no cover - GPU machines
        with T.autocast(auto):
            assert (torch.ones(2, 2, device=auto) @ torch.ones(2, 2, device=auto)).dtype \
                == torch.float16
    with pytest.raises(ValueError):
        T.choose_device("tpu")
    assert list(T.progress(range(5), disable=True)) == list(range(5))


# --- metrics --------------------------------------------------------------------------------


def _auc_pairs(y, s):
    """Brute force: share of (positive, negative) pairs ranked right, ties one half."""
    pos = [b for a, b in zip(y, s) if a]
    neg = [b for a, b in zip(y, s) if not a]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_roc_auc_hand_and_brute_force():
    assert T.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert T.roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert T.roc_auc([1, 1, 0], [0.9, 0.8, 0.1]) == 1.0
    rng = np.random.default_rng(3)
    from monai.metrics import compute_roc_auc

    for _ in range(20):
        y = rng.integers(0, 2, 60)
        y[:2] = [0, 1]
        s = np.round(rng.random(60) + 0.3 * y, 1)          # rounding makes ties
        want = _auc_pairs(y, s)
        assert T.roc_auc(y, s) == pytest.approx(want, abs=1e-12)
        assert T.roc_auc(y, s) == pytest.approx(
            compute_roc_auc(torch.tensor(s), torch.tensor(y)), abs=1e-9)
    with pytest.raises(ValueError):
        T.roc_auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        T.roc_auc([0, 2], [0.1, 0.2])


def test_roc_auc_ovr_matches_per_class_mean():
    rng = np.random.default_rng(5)
    classes = ["normal", "nodule", "effusion"]
    y = rng.choice(classes, 90)
    probs = rng.dirichlet([1, 1, 1], 90)
    want = np.mean([_auc_pairs(y == c, probs[:, n]) for n, c in enumerate(classes)])
    assert T.roc_auc_ovr(y, probs, classes) == pytest.approx(want, abs=1e-12)
    from monai.metrics import compute_roc_auc

    onehot = torch.tensor(np.stack([y == c for c in classes], 1).astype(np.float32))
    assert T.roc_auc_ovr(y, probs, classes) == pytest.approx(
        compute_roc_auc(torch.tensor(probs), onehot, average="macro"), abs=1e-9)
    with pytest.raises(ValueError):
        T.roc_auc_ovr(y, probs[:, :2], classes)


def test_dice_hand_and_monai():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, :3] = True            # 3 voxels
    b[0, 1:] = True            # 3 voxels, 2 shared
    assert T.dice(a, b) == pytest.approx(4 / 6)
    assert T.dice(a, np.zeros_like(a)) == 0.0
    assert T.dice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    from monai.metrics import compute_dice

    rng = np.random.default_rng(1)
    p = rng.random((16, 16, 8)) > 0.6
    t = rng.random((16, 16, 8)) > 0.5
    monai = compute_dice(torch.tensor(p[None, None]).float(), torch.tensor(t[None, None]).float(),
                         include_background=True)
    assert T.dice(p, t) == pytest.approx(float(monai), abs=1e-6)
    with pytest.raises(ValueError):
        T.dice(p, t[:2])


def test_froc_hand_case():
    # scan s1: nodule at origin r=3; candidates: hit (0.9), second hit (0.8, ignored),
    # false positive (0.7). scan s2: nodule r=2.5; candidate within it at 0.6; FP at 0.95.
    cands = {"s1": [((1, 0, 0), 0.9), ((0, 2, 0), 0.8), ((50, 0, 0), 0.7)],
             "s2": [((10, 10, 12), 0.6), ((0, 0, 0), 0.95)],
             "s3": []}
    nodules = {"s1": [((0, 0, 0), 3.0)], "s2": [((10, 10, 10), 2.5)], "s3": []}
    fps = (0.25, 0.5, 0.7, 1, 2)
    r = T.froc_sensitivity(cands, nodules, fps_per_scan=fps)
    # thresholds by score: 0.95 FP(1/3) · 0.9 TP (1/2) · 0.8 nothing (second hit on a found
    # nodule) · 0.7 FP(2/3) · 0.6 TP (1)
    assert r["n_scans"] == 3 and r["n_nodules"] == 2 and r["n_candidates"] == 5
    assert r["sensitivity"] == {0.25: 0.0, 0.5: 0.5, 0.7: 1.0, 1: 1.0, 2: 1.0}
    assert r["cpm"] == pytest.approx(3.5 / 5)
    # the same as records (DataFrame-like input)
    recs = [{"scan": s, "x": c[0], "y": c[1], "z": c[2], "score": sc}
            for s, lst in cands.items() for c, sc in lst]
    nods = [{"scan": s, "centre": c, "diameter": 2 * rad} for s, lst in nodules.items()
            for c, rad in lst]
    assert T.froc_sensitivity(recs, nods, fps_per_scan=fps, n_scans=3)[
        "sensitivity"] == r["sensitivity"]


def _froc_brute(cands, nodules, n_scans, fps):
    """Independent: for every threshold, count found nodules and false positives directly."""
    thresholds = sorted({s for lst in cands.values() for _, s in lst}, reverse=True)
    n_nod = sum(len(v) for v in nodules.values())
    points = [(0.0, 0.0)]
    for t in thresholds:
        found, fp = 0, 0
        for scan, lst in cands.items():
            kept = [c for c, s in lst if s >= t]
            nods = nodules.get(scan, [])
            hit = [any(np.linalg.norm(np.subtract(c, n)) <= r for c in kept) for n, r in nods]
            found += sum(hit)
            fp += sum(1 for c in kept
                      if not any(np.linalg.norm(np.subtract(c, n)) <= r for n, r in nods))
        points.append((fp / n_scans, found / n_nod))
    return {f: max(s for x, s in points if x <= f) for f in fps}


def test_froc_matches_brute_force():
    rng = np.random.default_rng(11)
    fps = T.DEFAULT_FPS_PER_SCAN
    for _ in range(10):
        nodules, cands = {}, {}
        for s in range(6):
            centres = rng.uniform(0, 100, (int(rng.integers(0, 3)), 3))
            nodules[f"s{s}"] = [(c, float(rng.uniform(3, 8))) for c in centres]
            lst = []
            for c in centres:   # some near-hits, some misses
                if rng.random() < 0.7:
                    lst.append((c + rng.normal(0, 3, 3), float(rng.random())))
            for _ in range(int(rng.integers(0, 6))):
                lst.append((rng.uniform(0, 100, 3), float(rng.random())))
            cands[f"s{s}"] = lst
        if not any(nodules.values()):
            continue
        got = T.froc_sensitivity(cands, nodules, fps)
        assert got["sensitivity"] == pytest.approx(_froc_brute(cands, nodules, 6, fps))


def test_confusion_matrix():
    y_true = ["a", "b", "b", "c", "a", "a"]
    y_pred = ["a", "b", "a", "c", "c", "a"]
    cm = T.confusion_matrix(y_true, y_pred, ["a", "b", "c"])
    for t, p in itertools.product("abc", repeat=2):
        assert cm.loc[t, p] == sum(1 for x, y in zip(y_true, y_pred) if (x, y) == (t, p))
    assert cm.index.name == "true" and cm.columns.name == "predicted"
    with pytest.raises(ValueError):
        T.confusion_matrix(["a"], ["z"], ["a", "b"])
    safe = T.confusion_matrix([0] * 40 + [1] * 40, [0] * 35 + [1] * 5 + [1] * 38 + [0] * 2,
                              [0, 1], safe=True)
    numbers = [v for v in safe.to_numpy().ravel() if isinstance(v, int)]
    assert numbers and all(v >= 10 for v in numbers)
    assert safe.loc[0, 1] == "<10" and safe.loc[0, 0] == "suppressed"


# --- saved models ---------------------------------------------------------------------------


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)


class _Other(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)


def test_save_load_round_trip_and_tamper(tmp_path):
    torch.manual_seed(0)
    net = _Net()
    manifest = {"demo-cxr": "ab" * 32}
    path = T.save_model(net, tmp_path / "models" / "cxr.pt", template="cxr_classifier_training",
                        parameters={"epochs": 2, "lr": 1e-3}, dataset_manifest_sha256=manifest,
                        metrics={"auc": np.float64(0.81), "per_class": np.array([0.7, 0.9])})
    side = path.with_suffix(".json")
    meta = json.loads(side.read_text())
    assert meta["template"] == "cxr_classifier_training"
    assert meta["parameters"] == {"epochs": 2, "lr": 1e-3}
    assert meta["dataset_manifest_sha256"] == manifest
    assert meta["metrics"] == {"auc": 0.81, "per_class": [0.7, 0.9]}
    assert meta["architecture"].endswith("_Net") and meta["torch_version"] == torch.__version__
    assert meta["monai_version"] and meta["created"]
    import hashlib

    assert meta["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()

    fresh = _Net()
    assert not torch.equal(fresh.fc.weight, net.fc.weight)
    loaded, meta2 = T.load_model(path, fresh)
    assert loaded is fresh and meta2 == meta
    assert torch.equal(fresh.fc.weight, net.fc.weight) and torch.equal(fresh.fc.bias, net.fc.bias)

    with pytest.raises(ValueError):
        T.load_model(path, _Other())               # another architecture

    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(T.ModelIntegrityError):
        T.load_model(path, _Net())

    # weights swapped for another (valid) checkpoint: refused too
    torch.save(_Net().state_dict(), path)
    with pytest.raises(T.ModelIntegrityError):
        T.load_model(path, _Net())
    side.unlink()
    with pytest.raises(FileNotFoundError):
        T.load_model(path, _Net())


def test_train_epoch_is_the_templates_loop():
    """The shared epoch gives the very weights and losses of the loop it replaced."""
    def model_and_optimizer():
        T.seed_everything(3)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    x, y = torch.randn(10, 4, generator=torch.Generator().manual_seed(0)), torch.arange(10) % 2
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 10, 4)]
    loss_fn = torch.nn.CrossEntropyLoss()

    model, optimizer = model_and_optimizer()
    scaler = T.grad_scaler("cpu")
    model.train()
    by_hand = []
    for xb, yb in batches:
        optimizer.zero_grad(set_to_none=True)
        with T.autocast("cpu"):
            loss = loss_fn(model(xb).float(), yb)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        by_hand.append(float(loss))
    expected = [p.detach().clone() for p in model.parameters()]

    model, optimizer = model_and_optimizer()
    model.eval()
    losses, seen = T.train_epoch(model, iter(batches), loss_fn, optimizer, T.grad_scaler("cpu"),
                                 "cpu")
    assert model.training and seen == 10 and losses == by_hand
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), expected))
