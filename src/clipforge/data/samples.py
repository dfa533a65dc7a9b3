"""Bad samples: the reason codes every reader uses, caption checks, and the skip counter that stops a run
once most of a source is bad. Image decoding, with the same reason codes, is in ``.images``, videos in
``.video``."""
from __future__ import annotations

from collections import Counter

REASONS = {
    "missing_file": "the image or video file does not exist",
    "unreadable_file": "the image or video file cannot be opened (permissions, or not a regular file)",
    "empty_file": "the image or video file, or tar member, has zero bytes",
    "unreadable_image": "the image cannot be decoded (corrupt, truncated or not an image)",
    "unreadable_video": "the video cannot be read (not MP4, MOV, Matroska or WebM, no video stream, corrupt or "
                        "truncated)",
    "video_timeout": "reading the video ran past its time budget",
    "too_many_pixels": "the image, or a video's frame, has more pixels than max_pixels",
    "missing_extra": "the file needs an optional package that is not installed (HEIC/HEIF and camera RAW: "
                     "pip install 'clipforge[photos]'; videos: pip install 'clipforge[video]')",
    "missing_image": "a tar sample has no image member (jpg, png, webp, ...)",
    "missing_caption": "no caption (no .txt file, no tar member, or a short CSV row)",
    "empty_caption": "the caption is empty or only whitespace",
    "caption_not_utf8": "the caption is not valid UTF-8",
    "unreadable_shard": "a tar shard could not be opened or read to its end",
}


class BadSample(ValueError):
    """One sample or image cannot be used; ``reason`` is a key of ``REASONS``, the message names it."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class DataSourceError(ValueError):
    """A source is mostly bad (or unusable); the message names it and gives the counts by reason."""


class SkipCounter:
    """Samples seen and skipped, per source and reason; ``check`` raises once a source is mostly bad.

    A source is mostly bad when more than ``max_bad_fraction`` of at least ``min_seen`` samples seen
    from it were skipped.
    """

    def __init__(self, max_bad_fraction: float = 0.5, min_seen: int = 20):
        self.max_bad_fraction, self.min_seen = max_bad_fraction, min_seen
        self.seen: Counter = Counter()
        self.skipped: dict[str, Counter] = {}
        self.examples: dict[str, str] = {}  # reason -> the first bad sample met for it

    def record(self, source: str, reason: str | None = None, count: int = 1, detail: str | None = None) -> None:
        """Count ``count`` samples seen from ``source``; skipped for ``reason`` unless it is None.

        ``detail`` (the bad sample's message) is kept as the example of ``reason`` if it is the first."""
        self.seen[source] += count
        if reason is not None:
            self.skipped.setdefault(source, Counter())[reason] += count
            self.examples.setdefault(reason, detail or f"a sample of {source}")

    def to_dict(self) -> dict:
        """Plain nested dicts, cheap to send from a worker process: {"seen", "skipped", "examples"}."""
        return {"seen": dict(self.seen), "skipped": {s: dict(c) for s, c in self.skipped.items()},
                "examples": dict(self.examples)}

    def merge(self, counts: dict) -> None:
        """Add counts produced by ``to_dict`` (e.g. from a worker)."""
        self.seen.update(counts["seen"])
        for source, reasons in counts["skipped"].items():
            self.skipped.setdefault(source, Counter()).update(reasons)
        for reason, detail in counts.get("examples", {}).items():
            self.examples.setdefault(reason, detail)

    def take(self) -> dict:
        """``to_dict``, then reset to zero."""
        counts = self.to_dict()
        self.seen, self.skipped, self.examples = Counter(), {}, {}
        return counts

    def by_reason(self) -> dict[str, int]:
        """Skipped samples by reason, summed over sources."""
        total = Counter()
        for reasons in self.skipped.values():
            total.update(reasons)
        return dict(sorted(total.items()))

    def check(self) -> None:
        """Raise ``DataSourceError`` if any source is mostly bad."""
        for source, reasons in self.skipped.items():
            seen, bad = self.seen[source], sum(reasons.values())
            if seen >= self.min_seen and bad > self.max_bad_fraction * seen:
                detail = ", ".join(f"{r}: {n}" for r, n in reasons.most_common())
                raise DataSourceError(
                    f"data source {source!r} is mostly bad: {bad} of {seen} samples seen were skipped ({detail}). "
                    "Check that the paths, columns and files are right, or fix the data, or drop this source.")


def check_caption(text: str | None, name: str) -> str:
    """The stripped caption; raises ``BadSample`` if missing, empty or not UTF-8 (lone surrogates
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
    """Decode caption bytes (UTF-8); raises ``BadSample`` if missing, empty or not UTF-8."""
    if data is None:
        return check_caption(None, name)
    return check_caption(data.decode("utf-8", errors="surrogateescape"), name)
