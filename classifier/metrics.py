"""Accuracy, macro-F1, per-class precision/recall, confusion matrix, and what routing would do."""
from __future__ import annotations

import numpy as np

GENERAL = "general"


def routing(y_true: list[str], y_pred: list[str], conf: np.ndarray, threshold: float) -> dict:
    """Where requests would go at `threshold`.

    - routed: a specialist task predicted with confidence >= threshold (goes to that task's adapter)
    - misroute: routed, but the true task differs (a confidently wrong specialist: the harmful error)
    - fallback: sent to the base model (abstained, or `general` predicted)
    - missed: fallback although the true task had a specialist (harmless, only a lost opportunity)
    """
    n = len(y_true)
    conf = np.asarray(conf, dtype=float)
    routed = np.array([p != GENERAL for p in y_pred]) & (conf >= threshold)
    wrong = np.array([p != t for p, t in zip(y_pred, y_true)])
    true_spec = np.array([t != GENERAL for t in y_true])
    misroute = int((routed & wrong).sum())
    return {
        "threshold": float(threshold), "n": n,
        "routed_to_specialist": int(routed.sum()), "fallback_to_base": int(n - routed.sum()),
        "misroutes": misroute,
        "misroute_rate": misroute / n if n else 0.0,
        "fallback_rate": float(n - routed.sum()) / n if n else 0.0,
        "routed_precision": float((routed & ~wrong).sum() / routed.sum()) if routed.sum() else 1.0,
        "missed_specialist": int((~routed & true_spec).sum()),
        "abstained": int((conf < threshold).sum()),
    }


def evaluate(y_true: list[str], y_pred: list[str], conf, tasks: list[str], threshold: float) -> dict:
    # lazy: scikit-learn costs ~1.5 s to import; only fitting and scoring need it
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    labels = list(tasks)
    present = [t for t in labels if t in set(y_true)]
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "n": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        # over the tasks present in the evaluation data (absent ones would count as 0)
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "per_class": {t: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, t in enumerate(labels)},
        "labels": labels,
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "routing": routing(y_true, y_pred, conf, threshold),
    }


def choose_threshold(y_true: list[str], y_pred: list[str], conf, *, max_misroute: float,
                     floor: float = 0.0) -> float:
    """Smallest threshold (most requests to specialists) whose misroute rate is <= max_misroute."""
    for t in np.round(np.arange(floor, 1.0, 0.01), 2):
        if routing(y_true, y_pred, conf, float(t))["misroute_rate"] <= max_misroute:
            return float(t)
    return 0.99


def format_report(m: dict, title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"examples: {m['n']}   accuracy: {m['accuracy']:.3f}   macro-F1: {m['macro_f1']:.3f}")
    lines.append(f"{'task':<15}{'precision':>10}{'recall':>8}{'f1':>7}{'support':>9}")
    for t, c in m["per_class"].items():
        lines.append(f"{t:<15}{c['precision']:>10.3f}{c['recall']:>8.3f}{c['f1']:>7.3f}{c['support']:>9d}")
    labels = m["labels"]
    short = [t[:6] for t in labels]
    lines.append("confusion (rows: true, cols: predicted)")
    lines.append(" " * 15 + "".join(f"{s:>8}" for s in short))
    for t, row in zip(labels, m["confusion"]):
        lines.append(f"{t:<15}" + "".join(f"{v:>8d}" for v in row))
    r = m["routing"]
    lines.append(f"routing at threshold {r['threshold']:.2f}: {r['routed_to_specialist']} to a specialist, "
                 f"{r['fallback_to_base']} to base ({r['abstained']} abstained)")
    lines.append(f"misroute rate (confident wrong specialist): {r['misroute_rate']:.3f} ({r['misroutes']})   "
                 f"fallback-to-base rate: {r['fallback_rate']:.3f}   precision of routed: {r['routed_precision']:.3f}")
    return "\n".join(lines)
