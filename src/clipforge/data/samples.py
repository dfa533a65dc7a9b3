"""Bad-sample handling shared by all sources: decoding with reasons for failure, and the skip counter
that stops a run once most of a source is bad."""
from __future__ import annotations

import io
import warnings
from collections import Counter

from PIL import Image

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit
REASONS = {
    "missing_file": "the image file does not exist",
    "empty_file": "the image file or tar member has zero bytes",
    "unreadable_image": "the image cannot be decoded (corrupt, truncated or not an image)",
    "too_many_pixels": "the image has more pixels than max_pixels",
    "missing_image": "a tar sample has no jpg/jpeg/png/webp member",
    "missing_caption": "no caption (no .txt file, no tar member, or a short CSV row)",
    "empty_caption": "the caption is empty or only whitespace",
    "caption_not_utf8": "the caption is not valid UTF-8",
    "unreadable_shard": "a tar shard could not be opened or read to its end",
}


class BadSample(Exception):
    """One sample cannot be used; ``reason`` is a key of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class DataSourceError(ValueError):
    """A source is mostly bad (or unusable); the message names it and gives the counts by reason."""


class SkipCounter:
    """Samples seen and skipped, per source and reason; :meth:`check` raises once a source is mostly bad.

    A source is mostly bad when more than ``max_bad_fraction`` of at least ``min_seen`` samples seen
    from it were skipped.
    """

    def __init__(self, max_bad_fraction: float = 0.5, min_seen: int = 20):
        self.max_bad_fraction, self.min_seen = max_bad_fraction, min_seen
        self.seen: Counter = Counter()
        self.skipped: dict[str, Counter] = {}

    def record(self, source: str, reason: str | None = None, count: int = 1) -> None:
        """Count ``count`` samples seen from ``source``; skipped for ``reason`` unless it is None."""
        self.seen[source] += count
        if reason is not None:
            self.skipped.setdefault(source, Counter())[reason] += count

    def to_dict(self) -> dict:
        """Plain nested dicts, cheap to send from a worker process: {"seen": ..., "skipped": ...}."""
        return {"seen": dict(self.seen), "skipped": {s: dict(c) for s, c in self.skipped.items()}}

    def merge(self, counts: dict) -> None:
        """Add counts produced by :meth:`to_dict` (e.g. from a worker)."""
        self.seen.update(counts["seen"])
        for source, reasons in counts["skipped"].items():
            self.skipped.setdefault(source, Counter()).update(reasons)

    def take(self) -> dict:
        """:meth:`to_dict`, then reset to zero."""
        counts = self.to_dict()
        self.seen, self.skipped = Counter(), {}
        return counts

    def by_reason(self) -> dict[str, int]:
        """Skipped samples by reason, summed over sources."""
        total = Counter()
        for reasons in self.skipped.values():
            total.update(reasons)
        return dict(sorted(total.items()))

    def check(self) -> None:
        """Raise :class:`DataSourceError` if any source is mostly bad."""
        for source, reasons in self.skipped.items():
            seen, bad = self.seen[source], sum(reasons.values())
            if seen >= self.min_seen and bad > self.max_bad_fraction * seen:
                detail = ", ".join(f"{r}: {n}" for r, n in reasons.most_common())
                raise DataSourceError(
                    f"data source {source!r} is mostly bad: {bad} of {seen} samples seen were skipped ({detail}). "
                    "Check that the paths, columns and files are right, or fix the data, or drop this source.")


def decode_image(data: bytes, name: str, max_pixels: int | None = None) -> Image.Image:
    """Decode encoded image bytes to an RGB ``PIL.Image``; raises :class:`BadSample` naming ``name``."""
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    if len(data) == 0:
        raise BadSample("empty_file", f"{name} has zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > limit:
                raise BadSample("too_many_pixels", f"{name} is {width}x{height}, above max_pixels={limit}")
            image.load()
            return image.convert("RGB")
    except Image.DecompressionBombError as error:
        raise BadSample("too_many_pixels", f"{name}: {error}") from None
    except BadSample:
        raise
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, struct.error, ...) on bad data
        raise BadSample("unreadable_image", f"{name}: {type(error).__name__}: {error}") from None


def load_image_file(path: str, max_pixels: int | None = None) -> Image.Image:
    """Read and decode an image file; raises :class:`BadSample` (missing_file, empty_file, ...)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise BadSample("missing_file", f"{path} does not exist") from None
    except OSError as error:
        raise BadSample("unreadable_image", f"{path}: {error}") from None
    return decode_image(data, path, max_pixels)


def check_caption(text: str | None, name: str) -> str:
    """The stripped caption; raises :class:`BadSample` if missing, empty or not UTF-8 (lone surrogates
    from reading with ``errors="surrogateescape"``)."""
    if text is None:
        raise BadSample("missing_caption", f"{name} has no caption")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadSample("caption_not_utf8", f"the caption of {name} is not valid UTF-8") from None
    text = text.lstrip("\ufeff").strip()
    if not text:
        raise BadSample("empty_caption", f"{name} has an empty caption")
    return text


def decode_caption(data: bytes | None, name: str) -> str:
    """Decode caption bytes (UTF-8); raises :class:`BadSample` if missing, empty or not UTF-8."""
    if data is None:
        return check_caption(None, name)
    return check_caption(data.decode("utf-8", errors="surrogateescape"), name)
