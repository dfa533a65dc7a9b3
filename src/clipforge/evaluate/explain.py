"""How CLIP scores images against texts, shown step by step: cosine similarities, temperature-scaled logits,
softmax over the texts and the chosen text, printed and plotted as in OpenAI's CLIP notebook figure.

Plotting needs matplotlib (the ``plot`` extra), imported only inside ``plot_report``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from clipforge.encode import encode_images, encode_texts

EXPLANATION = """\
How CLIP picks a text for an image:
 1. The image and text encoders turn each image and each text into a vector in one shared space; both are
    divided by their length (L2-normalised), so the dot product of an image vector and a text vector is the
    cosine of the angle between them: 1 for the same direction, 0 for unrelated.
 2. Multiplying the matrix of normalised image vectors by the transposed matrix of normalised text vectors
    gives the cosine of every image-text pair at once (the first table).
 3. The cosines are multiplied by the learned temperature exp(logit_scale) = {scale:.1f}, which stretches
    small gaps: cosines 0.25 and 0.30 become logits {low:.1f} and {high:.1f} (the second table).
 4. For each image, a softmax over the candidate texts turns its logits into probabilities summing to 1
    (the third table); the chosen text is the most probable one.
The answer is a piece of text only because the candidates are the texts you supplied: CLIP ranks them,
it does not write words of its own."""


@dataclass
class SimilarityReport:
    """Image-text scores: ``cosine`` is (N_images, N_texts); logits, probabilities and choices derive from it."""

    images: list[str]
    texts: list[str]
    cosine: torch.Tensor
    logit_scale: float

    @property
    def logits(self) -> torch.Tensor:
        """exp(logit_scale) * cosine, (N_images, N_texts)."""
        return self.logit_scale * self.cosine

    @property
    def probabilities(self) -> torch.Tensor:
        """Softmax of each image's logits over the texts, (N_images, N_texts)."""
        return self.logits.softmax(dim=-1)

    @property
    def chosen(self) -> list[int]:
        """For each image, the index of its most probable text."""
        return self.cosine.argmax(dim=-1).tolist()


def similarity_report(model, images: torch.Tensor, texts: Sequence[str],
                      image_names: Sequence[str] | None = None) -> SimilarityReport:
    """Score preprocessed ``images`` (N, 3, H, W) against ``texts`` with ``model``."""
    texts = list(texts)
    if not texts or any(not t.strip() for t in texts):
        raise ValueError("explain needs one or more non-empty texts")
    image_features, text_features = encode_images(model, images), encode_texts(model, texts)
    names = list(image_names) if image_names is not None else [f"image {i}" for i in range(len(images))]
    cosine = (image_features @ text_features.t()).cpu()  # (N_images, N_texts)
    return SimilarityReport(names, texts, cosine, float(model.logit_scale.detach().float().exp()))


def explanation(report: SimilarityReport) -> str:
    """The plain-language account of the computation, with this model's temperature."""
    scale = report.logit_scale
    return EXPLANATION.format(scale=scale, low=0.25 * scale, high=0.30 * scale)


def _table(title: str, matrix: torch.Tensor, rows: list[str], columns: list[str], fmt: str) -> str:
    width = max(len(c) for c in columns + ["0.0000"]) + 2
    label_width = max(len(r) for r in rows) + 2
    lines = [title, " " * label_width + "".join(c[:width - 2].rjust(width) for c in columns)]
    for name, values in zip(rows, matrix.tolist()):
        lines.append(name.ljust(label_width) + "".join(format(v, fmt).rjust(width) for v in values))
    return "\n".join(lines)


def format_report(report: SimilarityReport) -> str:
    """The three matrices (texts as rows, images as columns) and each image's chosen text, as text."""
    columns = [Path(name).name for name in report.images]
    parts = [
        _table("cosine similarity (normalised image . normalised text)", report.cosine.t(), report.texts, columns,
               ".4f"),
        _table(f"logits = {report.logit_scale:.1f} x cosine", report.logits.t(), report.texts, columns, ".2f"),
        _table("softmax over the texts (each column sums to 1)", report.probabilities.t(), report.texts, columns,
               ".4f"),
        "chosen text:\n" + "\n".join(f"  {c}: {report.texts[i]!r} (p = {report.probabilities[j, i]:.4f})"
                                     for j, (c, i) in enumerate(zip(columns, report.chosen))),
    ]
    return "\n\n".join(parts)


def _heatmap(ax, matrix, report: SimilarityReport, thumbnails, title: str, fmt: str, cmap: str, show_texts: bool,
             outline_chosen: bool) -> object:
    n_texts, n_images = matrix.shape
    image = ax.imshow(matrix, cmap=cmap, aspect="auto", extent=(-0.5, n_images - 0.5, n_texts - 0.5, -0.5))
    for i, thumb in enumerate(thumbnails):  # thumbnails above the columns, as in OpenAI's notebook figure
        ax.imshow(thumb, extent=(i - 0.45, i + 0.45, -0.6, -1.5), aspect="auto")
    middle = (matrix.max() + matrix.min()) / 2
    for t in range(n_texts):
        for i in range(n_images):
            ax.text(i, t, format(matrix[t, i], fmt), ha="center", va="center", fontsize=9,
                    color="white" if matrix[t, i] < middle else "black")
    if outline_chosen:
        from matplotlib.patches import Rectangle
        for i, t in enumerate(report.chosen):
            ax.add_patch(Rectangle((i - 0.5, t - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
    ax.set_xlim(-0.5, n_images - 0.5)
    ax.set_ylim(n_texts - 0.5, -1.6)
    ax.set_yticks(range(n_texts), report.texts if show_texts else [""] * n_texts, fontsize=10)
    ax.set_xticks(range(n_images), [Path(n).name for n in report.images], rotation=30, ha="right", fontsize=9)
    ax.set_title(title, fontsize=11)
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    return image


def plot_report(report: SimilarityReport, thumbnails: Sequence, output: str | Path) -> Path:
    """Save a PNG: the cosine heatmap and the softmax heatmap (chosen text outlined), texts on the y axis and
    image thumbnails along the top, every cell's value printed. ``thumbnails`` are PIL images, one per image."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise RuntimeError("plotting needs matplotlib: pip install 'clipforge[plot]'") from e
    n_images, n_texts = report.cosine.shape
    text_width = max(len(t) for t in report.texts) * 0.085  # inches of y-axis labels
    cell = 0.9  # inches per heatmap cell, so cells and thumbnails stay about square
    fig = Figure(figsize=(text_width + 2 * cell * n_images + 2.2, cell * (n_texts + 1.1) + 1.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    _heatmap(left, report.cosine.t().numpy(), report, thumbnails, "cosine similarity", ".3f", "viridis", True, False)
    probs = report.probabilities.t().numpy()
    image = _heatmap(right, probs, report, thumbnails, f"softmax over texts of {report.logit_scale:.1f} x cosine",
                     ".2f", "magma", False, True)
    fig.colorbar(image, ax=right, fraction=0.05, label="probability (chosen text outlined)")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    return output
