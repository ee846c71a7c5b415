"""Classification metrics, confusion-matrix plot and the report written next to a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .model import AudioClassifier


@torch.no_grad()
def predict(
    model: AudioClassifier, waveforms: np.ndarray, batch_size: int = 16, device: str = "cpu"
) -> np.ndarray:
    """Logits (N, classes) for full-length clips, in eval mode."""
    model.eval()
    out = []
    for i in range(0, len(waveforms), batch_size):
        x = torch.from_numpy(waveforms[i : i + batch_size]).to(device)
        out.append(model(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.cnn.cfg.n_classes), np.float32)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, macro-F1 over the classes present in y_true, per-class P/R/F1, confusion."""
    n = len(labels)
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros(n), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(n), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(n), where=denom > 0)
    present = support > 0
    per_class = [
        {
            "label": labels[i],
            "precision": round(float(precision[i]), 4),
            "recall": round(float(recall[i]), 4),
            "f1": round(float(f1[i]), 4),
            "support": int(support[i]),
        }
        for i in range(n)
        if present[i]
    ]
    return {
        "n": int(len(y_true)),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": per_class,
        "confusion": cm.tolist(),
    }


def plot_confusion(cm: np.ndarray, labels: list[str], path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = (cm.sum(axis=1) + cm.sum(axis=0)) > 0
    cm, names = cm[present][:, present], [lab for lab, p in zip(labels, present, strict=True) if p]
    size = max(6, 0.22 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def confusion_markdown(cm: np.ndarray, labels: list[str]) -> str:
    """The confusion matrix as a markdown table (rows: true class, columns: predicted)."""
    head = "| true \\ predicted | " + " | ".join(labels) + " |"
    rows = [
        f"| {lab} | " + " | ".join(str(int(v)) for v in row) + " |"
        for lab, row in zip(labels, cm, strict=True)
    ]
    return "\n".join([head, "|---" * (len(labels) + 1) + "|", *rows])


def write_report(
    out_dir: str | Path, name: str, metrics: dict, labels: list[str], context: dict
) -> dict:
    """`<name>.json`, `<name>.md` and `<name>_confusion.png` in out_dir; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        k: out_dir / f"{name}{s}"
        for k, s in (("json", ".json"), ("md", ".md"), ("png", "_confusion.png"))
    }
    paths["json"].write_text(json.dumps({**context, **metrics}, indent=2))
    plot_confusion(
        np.array(metrics["confusion"]),
        labels,
        paths["png"],
        f"{name}: acc {metrics['accuracy']:.3f}, n={metrics['n']}",
    )
    lines = [
        f"# {name}",
        "",
        *(f"- {k}: {v}" for k, v in context.items()),
        f"- clips: {metrics['n']}",
        f"- accuracy: {metrics['accuracy']:.4f}",
        f"- macro-F1: {metrics['macro_f1']:.4f}",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['label']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | "
        f"{r['support']} |"
        for r in metrics["per_class"]
    ]
    lines += ["", f"![confusion matrix]({paths['png'].name})", ""]
    if len(labels) <= 20:  # a table stays readable up to about this many classes
        cm = np.array(metrics["confusion"])
        lines += [
            "Confusion (rows: true, columns: predicted):",
            "",
            confusion_markdown(cm, labels),
            "",
        ]
    paths["md"].write_text("\n".join(lines))
    return {k: str(v) for k, v in paths.items()}
