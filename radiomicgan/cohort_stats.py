"""The batch effect of a cohort before and after harmonization: per feature and ROI group, a Kruskal-Wallis test
of difference between batches (kernel groups, or the CSV's batch column), Benjamini-Hochberg corrected over all
tests, and the number of features that still differ, for the input, RadiomicGAN's result, feature-level ComBat on
the input (Orlhac et al.; neuroHarmonize's learn/apply API, learned on a training part of the cohort and applied
to the rest) and RadiomicGAN followed by ComBat. Where the cohort holds paired reconstructions of the same scans,
also the reproducible-feature counts (Lin's CCC > 0.85) as ``evaluate`` counts them.

ComBat is optional (``pip install radiomicgan[combat]``): without neuroHarmonize the ComBat rows say so.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np

TEST = "Kruskal-Wallis H test between batches, per feature and ROI group; Benjamini-Hochberg false discovery rate"
METHODS = ("input", "radiomicgan", "combat", "radiomicgan+combat")


def split_patients(scans: dict, train_fraction: float = 0.5, seed: int = 0) -> tuple[list, list]:
    """Training and test scans, split by patient (all scans of one patient on one side, so paired reconstructions
    stay together): a seeded permutation of the sorted patient ids, the first ``train_fraction`` to training."""
    patients = sorted({info["patient"] for info in scans.values()})
    order = np.random.default_rng(seed).permutation(len(patients))
    cut = int(round(train_fraction * len(patients)))
    cut = min(max(cut, 1), len(patients) - 1) if len(patients) > 1 else len(patients)
    train_patients = {patients[k] for k in order[:cut]}
    train = sorted(s for s, info in scans.items() if info["patient"] in train_patients)
    test = sorted(s for s, info in scans.items() if info["patient"] not in train_patients)
    return train, test


def kruskal_counts(values: np.ndarray, batches: np.ndarray, strata: np.ndarray, alpha: float = 0.05) -> dict:
    """Per stratum (ROI group) and feature column, Kruskal-Wallis between batches with at least 2 observations
    each; BH-corrected over every test made; the number of (feature, group) tests with q < alpha."""
    from scipy.stats import false_discovery_control, kruskal

    pvalues, labels = [], []
    for stratum in sorted(set(strata)):
        rows = strata == stratum
        groups = [b for b in sorted(set(batches[rows])) if np.sum(rows & (batches == b)) >= 2]
        if len(groups) < 2:
            continue
        for j in range(values.shape[1]):
            samples = [values[rows & (batches == b), j] for b in groups]
            if any(not np.all(np.isfinite(s)) for s in samples):
                continue
            pooled = np.concatenate(samples)
            if np.ptp(pooled) == 0:
                p = 1.0  # identical everywhere: no difference (Kruskal-Wallis is undefined)
            else:
                p = float(kruskal(*samples).pvalue)
            pvalues.append(p if np.isfinite(p) else 1.0)
            labels.append((stratum, j))
    if not pvalues:
        return {"tests": 0, "differ": None, "reason": "fewer than two batches with two observations in any ROI group"}
    q = false_discovery_control(np.asarray(pvalues), method="bh")
    differ = int(np.sum(q < alpha))
    features = len({j for (_, j), qq in zip(labels, q) if qq < alpha})
    return {"tests": len(pvalues), "differ": differ, "features_differing": features}


def combat_learn_apply(train: np.ndarray, train_batch, train_covariates, test: np.ndarray, test_batch, test_covariates):
    """ComBat learned on the training rows only (neuroHarmonize ``harmonizationLearn``), applied to the test rows
    (``harmonizationApply``). Returns (adjusted test rows, the learned model). Columns constant within a training
    batch cannot be adjusted (ComBat divides by their variance) and are returned as they were."""
    import pandas as pd
    from neuroHarmonize import harmonizationApply, harmonizationLearn

    train, test = np.asarray(train, float), np.asarray(test, float)
    usable = np.ones(train.shape[1], bool)
    for b in set(train_batch):
        rows = np.asarray(train_batch) == b
        usable &= np.nanstd(train[rows], axis=0) > 1e-9 * np.maximum(1.0, np.abs(np.nanmean(train[rows], axis=0)))
    usable &= np.all(np.isfinite(train), axis=0) & np.all(np.isfinite(test), axis=0)
    out = test.copy()
    if not usable.any():
        return out, {"adjusted": 0}

    def covars(batch, extra):
        frame = pd.DataFrame({"SITE": [str(b) for b in batch]})
        for name, column in (extra or {}).items():
            frame[name] = np.asarray(column, float)
        return frame

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = harmonizationLearn(train[:, usable], covars(train_batch, train_covariates))
        out[:, usable] = harmonizationApply(test[:, usable], covars(test_batch, test_covariates), model)
    model["adjusted"] = int(usable.sum())
    return out, model


def model_digest(model: dict) -> str:
    """A fingerprint of a learned ComBat model (its estimated parameters), to show what it was learned from."""
    keys = ("gamma_star", "delta_star", "B_hat", "var_pooled", "stand_mean")
    digest = hashlib.sha256()
    for key in keys:
        if key in model:
            digest.update(np.round(np.asarray(model[key], float), 9).tobytes())
    return digest.hexdigest()[:16]


def _matrix(rows: list[dict], image: str):
    """{(scan, roi): {feature: value}} for one image ('input' or 'result')."""
    table = defaultdict(dict)
    meta = {}
    for r in rows:
        if r["image"] != image:
            continue
        key = (r["scan"], r["roi"])
        try:
            table[key][r["feature"]] = float(r["value"])
        except (TypeError, ValueError):
            table[key][r["feature"]] = np.nan
        meta[key] = r
    return table, meta


def batch_effect(features: list[dict], train_fraction: float = 0.5, alpha: float = 0.05, seed: int = 0,
                 threshold: float = 0.85) -> dict:
    """The batch-effect counts per method (see the module's docstring) from the cohort's long features rows
    (scan, batch, patient_id, study_uid, roi, group, image, feature, value)."""
    inputs, meta = _matrix(features, "input")
    results, _ = _matrix(features, "result")
    keys = sorted(k for k in inputs if k in results)
    if not keys:
        return {"test": TEST, "reason": "no features"}
    names = sorted(set.intersection(*(set(inputs[k]) for k in keys)) & set.intersection(*(set(results[k]) for k in keys)))
    x_in = np.array([[inputs[k][n] for n in names] for k in keys])
    x_out = np.array([[results[k][n] for n in names] for k in keys])
    finite = np.all(np.isfinite(x_in), axis=0) & np.all(np.isfinite(x_out), axis=0)
    names = [n for n, ok in zip(names, finite) if ok]
    x_in, x_out = x_in[:, finite], x_out[:, finite]
    batches = np.array([str(meta[k]["batch"]) for k in keys])
    strata = np.array([str(meta[k]["group"]) for k in keys])
    scan_ids = np.array([k[0] for k in keys])
    scans = {k[0]: {"patient": meta[k].get("patient_id") or k[0], "batch": str(meta[k]["batch"])} for k in keys}
    train, test = split_patients(scans, train_fraction, seed)
    in_train = np.isin(scan_ids, train)
    in_test = ~in_train
    result = {
        "test": TEST, "alpha": alpha, "features": len(names), "observations": len(keys),
        "roi_groups": [str(g) for g in sorted(set(strata))],
        "batches": {str(b): int(np.sum(batches == b)) for b in sorted(set(batches))},
        "split": {"by": "patient", "train_fraction": train_fraction, "seed": seed, "train_scans": train, "test_scans": test},
        "all_scans": {"input": kruskal_counts(x_in, batches, strata, alpha),
                      "radiomicgan": kruskal_counts(x_out, batches, strata, alpha)},
    }
    values = {"input": x_in, "radiomicgan": x_out}
    combat = {"available": False}
    train_batches, test_batches = set(batches[in_train]), set(batches[in_test])
    try:
        import neuroHarmonize  # noqa: F401
    except ImportError:
        combat["reason"] = "neuroHarmonize is not installed (pip install radiomicgan[combat])"
    else:
        if not in_test.any() or not in_train.any():
            combat["reason"] = "the cohort is too small to split into training and test scans"
        elif len(train_batches) < 2:
            combat["reason"] = "fewer than two batches among the training scans"
        elif not test_batches <= train_batches:
            combat["reason"] = f"batch(es) {sorted(test_batches - train_batches)} of the test scans absent from training"
        else:
            # one ComBat per ROI group: a kernel moves lung texture otherwise than soft tissue's, which one batch
            # effect per feature over all groups cannot model
            combat = {"available": True, "library": _version("neuroHarmonize"), "learned_on": "training scans only",
                      "per": "ROI group", "unadjusted_groups": []}
            for method, base in (("combat", "input"), ("radiomicgan+combat", "radiomicgan")):
                adjusted = values[base].copy()
                digests, count = [], 0
                for group in sorted(set(strata)):
                    tr, te = in_train & (strata == group), in_test & (strata == group)
                    if len(set(batches[tr])) < 2 or not te.any() or not set(batches[te]) <= set(batches[tr]):
                        combat["unadjusted_groups"].append(str(group))
                        continue
                    adjusted[te], model = combat_learn_apply(values[base][tr], batches[tr], {}, values[base][te],
                                                             batches[te], {})
                    digests.append(model_digest(model))
                    count += model.get("adjusted", 0)
                values[method] = adjusted
                combat[method] = {"features_adjusted": count, "model": hashlib.sha256("".join(digests).encode()).hexdigest()[:16]}
            combat["unadjusted_groups"] = sorted(set(combat["unadjusted_groups"]))
    result["combat"] = combat
    result["test_scans"] = {m: kruskal_counts(values[m][in_test], batches[in_test], strata[in_test], alpha)
                            for m in METHODS if m in values}
    result["reproducible"] = _paired_ccc(keys, meta, values, in_test, strata, threshold)
    return result


def _paired_ccc(keys, meta, values, in_test, strata, threshold) -> dict | None:
    """Paired reconstructions: scans of one patient and study in two batches, ROIs of the same name. Each method's
    values of the non-reference scan against its values of the reference scan (the batch named after the model's
    target kernel when present, else the first batch in order); CCC per feature over the matched ROIs of the test
    scans, per ROI group, counted as ``evaluate`` does."""
    from .reproducibility import lins_ccc

    index = {k: i for i, k in enumerate(keys)}
    by_study = defaultdict(lambda: defaultdict(dict))
    for k in keys:
        m = meta[k]
        by_study[(m.get("patient_id", ""), m.get("study_uid", ""))][str(m["batch"])][k[1]] = index[k]
    reference = _reference_batch(meta)
    pairs = []  # (candidate row, reference row)
    for batches in by_study.values():
        if reference not in batches or len(batches) < 2:
            continue
        for batch, rois in batches.items():
            if batch == reference:
                continue
            for roi, row in rois.items():
                if roi in batches[reference]:
                    pairs.append((row, batches[reference][roi]))
    pairs = [(a, b) for a, b in pairs if in_test[a] and in_test[b]]
    if len(pairs) < 3:
        return None
    cand, ref = np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])
    out = {"reference_batch": reference, "threshold": threshold, "pairs": len(pairs), "by_group": {}, "counts": {}}
    groups = [g for g in sorted(set(strata[cand])) if np.sum(strata[cand] == g) >= 3]  # CCC needs 3 ROI pairs at least
    if not groups:
        return None
    for method, matrix in values.items():
        total = 0
        for group in groups:
            rows = strata[cand] == group
            ccc = lins_ccc(matrix[ref[rows]], matrix[cand[rows]])
            count = int(np.sum(np.isfinite(ccc) & (ccc > threshold)))
            out["by_group"].setdefault(str(group), {})[method] = count
            total += count
        out["counts"][method] = total
    out["groups"] = [str(g) for g in groups]
    return out


def _reference_batch(meta) -> str:
    batches = sorted({str(m["batch"]) for m in meta.values()})
    for m in meta.values():
        if m.get("reference"):
            return str(m["batch"])
    return batches[-1] if batches else ""


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return f"{name} {version(name)}"
    except Exception:  # noqa: BLE001
        return name


def format_batch_effect(stats: dict | None) -> str:
    """The batch-effect table as text (the command line prints it)."""
    if not stats or "test_scans" not in stats:
        return "batch effect: no features measured (give --rois)"
    lines = [f"Features differing between batches ({stats['test']}, q < {stats['alpha']}), "
             f"{stats['features']} features x {len(stats['roi_groups'])} ROI group(s):"]
    lines.append(f"{'method':<22}{'test scans':>14}{'all scans':>12}" + ("   reproducible (CCC > 0.85)" if stats.get("reproducible") else ""))
    for method in METHODS:
        t = stats["test_scans"].get(method)
        a = stats["all_scans"].get(method)
        if t is None and a is None:
            reason = stats["combat"].get("reason", "")
            lines.append(f"{method:<22}{'-':>14}{'-':>12}   {reason}")
            continue
        cell = lambda c: "-" if not c or c.get("differ") is None else f"{c['differ']}/{c['tests']}"  # noqa: E731
        rep = stats.get("reproducible") or {}
        lines.append(f"{method:<22}{cell(t):>14}{cell(a):>12}" + (f"   {rep['counts'].get(method, '-')}" if rep else ""))
    return "\n".join(lines)


__all__ = ["batch_effect", "combat_learn_apply", "kruskal_counts", "split_patients", "format_batch_effect", "model_digest",
           "METHODS", "TEST"]
