"""Reading videos (MP4, MOV, Matroska, WebM) for search: which frames stand for a video, decoded upright as RGB
images with their timestamps, and what the container says about it (duration, size, rotation, creation time).

PyAV (the ``video`` extra) is imported only when a video is met; without it a video is a ``BadSample``
(``missing_extra``). Every failure is a ``BadSample`` with a reason code of ``clipforge.data.samples.REASONS``,
and decoding is bounded per file: frames yielded, pixels per frame, decoding work for scene detection and a
wall-clock budget.

Frames are found in one of two ways, by what is asked:

- **In order**: every frame is decoded, and a frame is kept when the next interval time comes or a cut is seen
  (the mean absolute difference of consecutive frames' 32x32 grayscale thumbnails, read from the luma plane
  without any conversion, jumps over a threshold). Scene detection, on videos up to ``FULL_SCAN_PIXELS`` of
  decoding work.
- **Seeking**: each time wanted is reached by seeking to the keyframe before it and decoding forward (on a
  phone video, with a keyframe every second, at most a second of video per frame kept); when keyframes are
  further apart than the interval, decoding simply goes on. Interval frames alone, and longer videos, whose
  cuts are looked for between consecutive keyframes only, decoded alone in one cheap pass: encoders place
  keyframes at cuts, so edited videos keep their cuts, to a keyframe.
"""
from __future__ import annotations

import io
import itertools
import math
import os
import re
import struct
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import IO, NamedTuple

import numpy as np
from PIL import Image

from clipforge.data.exif import CaptureTime, exif_block, mtime_capture, upright
from clipforge.data.images import DEFAULT_MAX_PIXELS, VIDEO_EXTENSIONS, MissingImage, is_video_name  # noqa: F401
from clipforge.data.samples import BadSample

EXTRA = "pip install 'clipforge[video]'"
# A frame every 5 s: a phone clip (typically 10 s to 1 min) gets 2 to 12 frames, enough to find any of its
# moments by content, and an hour 720 (500 with scenes, max_frames widening the interval); shorter scenes
# are what scene detection adds.
DEFAULT_EVERY_S = 5.0
DEFAULT_MAX_FRAMES = 1000
DEFAULT_TIMEOUT_S = 300.0
# A cut: the mean absolute difference (0-255) of consecutive frames' 32x32 luma thumbnails above this, and at
# least SCENE_JUMP times the median of the few differences before it. Measured on 1080p crops of photos: a
# pan of 16 pixels a frame differs by at most 11, a cut between two of 21 different photos by more than 20
# for 98.6 % of pairs (median 63); fast camera motion, which can exceed 20 too, changes every frame alike
# and so is no jump.
SCENE_THRESHOLD = 20.0
SCENE_JUMP = 2.0
_RECENT = 5  # differences before a frame whose median a cut must jump over
# Cuts closer than this to the previous cut, or to an interval frame that follows, are not kept: flicker and
# flashes would otherwise give a frame each.
MIN_SCENE_GAP_S = 1.0
# Decoding every frame costs in proportion to pixels times frames: up to this (about 5 minutes of 1080p at
# 30 fps, 1 1/4 minutes of 4K; some 40 s of decoding on one core) scenes are found frame by frame, beyond it
# between keyframes.
FULL_SCAN_PIXELS = 2e10
# The demuxers a video may be read with: MP4/MOV and Matroska/WebM, whatever the file's name says. Others
# (playlists such as HLS, concat lists) could make FFmpeg open further files or URLs.
_DEMUXERS = "mov,matroska"
_MAX_DECODE_ERRORS = 25  # packets that fail to decode before a video counts as corrupt
_GRID = 32  # thumbnail side for scene detection
_LUMA_FIRST = {"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "yuv440p", "yuvj440p",
               "yuv411p", "yuv410p", "nv12", "nv21", "nv16", "nv24", "gray", "yuva420p", "yuva422p", "yuva444p"}
_DATE = re.compile(r"(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(\.\d+)?\s*(Z|[+-]\d\d:?\d\d)?$")
# Container tags with the capture time, by preference: Apple's local time with its offset, then the
# container's own creation time (UTC: MP4's mvhd, Matroska's DateUTC).
_DATE_TAGS = ("com.apple.quicktime.creationdate", "creation_time")

VideoSource = str | os.PathLike | bytes | IO[bytes]


class VideoFrame(NamedTuple):
    """A frame that stands for a video at ``time`` seconds from its start: ``image`` is RGB and upright;
    ``kind`` is ``"interval"`` (the first frame, and one every ``every_s``) or ``"scene"`` (a cut)."""

    time: float
    image: Image.Image
    kind: str


@dataclass(frozen=True)
class VideoInfo:
    """What a video's container says: ``duration`` in seconds (None when it does not say: a WebM recorded
    by a browser), the size as shown (``width`` x ``height``, rotation applied), ``created`` (the capture
    time, timezone-aware; None without a plausible one), ``orientation`` (the display matrix as an EXIF
    orientation, 1 to 8, applied to every frame), the frame rate and the codec."""

    duration: float | None
    width: int
    height: int
    created: datetime | None
    orientation: int
    fps: float | None
    codec: str

    @property
    def rotation(self) -> int:
        """Degrees the stored picture is turned clockwise to be shown: 0, 90, 180 or 270 (after a mirror for
        orientations 2, 4, 5 and 7)."""
        return {1: 0, 2: 0, 3: 180, 4: 180, 5: 270, 6: 90, 7: 90, 8: 270}[self.orientation]


def video_info(source: VideoSource, name: str | None = None, max_pixels: int | None = None) -> VideoInfo:
    """Duration, displayed size, capture time and orientation of a video (a path, bytes or binary file); the
    first frame is decoded, so a video that opens but does not decode is refused here too.

    A ``BadSample`` naming the video for: ``missing_file`` (also a FileNotFoundError), ``unreadable_file``,
    ``empty_file``, ``unreadable_video`` (not MP4/MOV/Matroska/WebM, no video stream, corrupt),
    ``too_many_pixels`` (frames larger than ``max_pixels``, default PIL's limit) or ``missing_extra``."""
    with _Video.open(source, name, max_pixels, time.monotonic() + DEFAULT_TIMEOUT_S) as video:
        return video.info


def video_frames(source: VideoSource, every_s: float | None = DEFAULT_EVERY_S, scenes: bool = True, *,
                 max_frames: int = DEFAULT_MAX_FRAMES, draft_size: int | None = None, max_pixels: int | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, scene_threshold: float = SCENE_THRESHOLD,
                 min_scene_gap_s: float = MIN_SCENE_GAP_S, full_scan_pixels: float = FULL_SCAN_PIXELS,
                 threads: int = 1, name: str | None = None) -> Iterator[VideoFrame]:
    """The frames that stand for a video, in time order: ``VideoFrame(time, image, kind)``.

    ``source`` is a path, bytes or a binary file. Always the first frame; then the first frame at or after
    every multiple of ``every_s`` seconds (None: none), and, with ``scenes``, the first frame after each cut
    (see the module's description for how frames are found and decoded). Timestamps are seconds from the
    video's start, as a player counts them. Images are RGB, upright (the container's rotation and mirror
    applied) and at the displayed aspect ratio; ``draft_size`` converts them at reduced size, the shorter
    side ``draft_size`` pixels (never enlarged), which is much cheaper for large frames.

    Bounds: at most ``max_frames`` frames; when the duration is known, ``every_s`` is widened so that the
    interval frames of a long video take at most half of them (all of them without ``scenes``), spread over
    its whole length, and cuts the rest. Frames with more than ``max_pixels`` pixels (default PIL's limit)
    are refused before decoding. Decoding runs on ``threads`` threads (0: FFmpeg's choice) and stops after
    ``timeout_s`` seconds of wall-clock time.

    Every failure is a ``BadSample`` naming the video, raised when it is met: before any frame
    (``missing_file``, ``unreadable_file``, ``empty_file``, ``unreadable_video``, ``too_many_pixels``,
    ``missing_extra``) or after some (``unreadable_video`` for a video that turns out corrupt or truncated,
    ``video_timeout``). Frames yielded before it are valid: a caller may keep them, or skip the whole video.
    """
    if every_s is not None and not every_s > 0:
        raise ValueError(f"every_s must be a positive number of seconds or None, not {every_s!r}")
    if max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, not {max_frames!r}")
    deadline = time.monotonic() + timeout_s
    with _Video.open(source, name, max_pixels, deadline, threads) as video:
        step, scene_budget = _plan(video.info.duration, every_s, scenes, max_frames)
        choose = _Chooser(step, scenes, scene_threshold, min_scene_gap_s, scene_budget)
        if scenes and video.work() <= full_scan_pixels:
            frames = video.sequential(choose)
        else:
            cuts = video.keyframe_cuts(choose) if scenes else []
            frames = video.seeking(_merged(_grid(step, video.info.duration), cuts, min_scene_gap_s))
        count, last = 0, -math.inf
        for t, frame, kind in frames:
            if t <= last:
                continue  # a timestamp that goes back (corrupt): frames come in time order, once each
            yield VideoFrame(round(t, 6), video.image(frame, draft_size), kind)  # to the microsecond
            count, last = count + 1, t
            if count >= max_frames:
                return


def video_frame(source: VideoSource, seconds: float, draft_size: int | None = None, max_pixels: int | None = None,
                timeout_s: float = 30.0, name: str | None = None) -> Image.Image:
    """The frame at ``seconds`` (the first at or after it, to half a frame; the last frame when ``seconds`` is
    past the end), RGB and upright, as ``video_frames`` gives it: given a ``VideoFrame.time``, that frame (a
    result's thumbnail). ``BadSample`` as there."""
    if not seconds >= 0:
        raise ValueError(f"seconds must be a time from the start of the video (>= 0), not {seconds!r}")
    with _Video.open(source, name, max_pixels, time.monotonic() + timeout_s) as video:
        for _, frame, _ in video.seeking([seconds], last=True):
            return video.image(frame, draft_size)
        raise BadSample("unreadable_video", f"video {video.name} has no frame at {format_timestamp(seconds)} or "
                                            "before it (the file is truncated or corrupt)")


def video_capture_time(source: VideoInfo | VideoSource, mtime_ns: int | None = None) -> CaptureTime | None:
    """When a video was taken: the container's creation time (source ``"video"``), else the file's
    modification time ``mtime_ns`` (source ``"mtime"``; for a path it defaults to the file's). ``source`` is a
    ``VideoInfo`` (nothing is read again) or a video; one that cannot be read counts as having no creation
    time. None only when there is neither (bytes without ``mtime_ns``)."""
    if isinstance(source, VideoInfo):
        created = source.created
    else:
        try:
            created = video_info(source).created
        except BadSample:
            created = None
    if created is not None:
        return CaptureTime(created, "video")
    if mtime_ns is None and isinstance(source, (str, os.PathLike)):
        try:
            mtime_ns = os.stat(source).st_mtime_ns
        except OSError as e:
            raise MissingImage(f"video file {source} cannot be found or read: {e.strerror or e}") from None
    return mtime_capture(mtime_ns) if mtime_ns is not None else None


def format_timestamp(seconds: float) -> str:
    """``mm:ss`` (``h:mm:ss`` from an hour on) of a time in a video, rounded down to the second, as in
    ``path@01:05``: a player started there shows the frame within the second."""
    if not seconds >= 0 or math.isinf(seconds):
        raise ValueError(f"a timestamp is a finite number of seconds >= 0, not {seconds!r}")
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


_TIMESTAMP = re.compile(r"(?:(?:(\d+):)?(\d+):)?(\d+(?:\.\d*)?)")


def parse_timestamp(text: str) -> float:
    """Seconds from ``ss``, ``mm:ss`` or ``h:mm:ss`` (seconds may have a fraction: ``01:05.5``); the inverse of
    ``format_timestamp``. A ValueError saying the accepted forms for anything else."""
    match = _TIMESTAMP.fullmatch(text.strip())
    if match is None or (match[1] is not None and int(match[2]) >= 60) or \
            (match[2] is not None and float(match[3]) >= 60):
        raise ValueError(f"{text!r} is not a time in a video: write seconds (75), mm:ss (01:15) or h:mm:ss "
                         "(1:01:15), minutes and seconds under 60")
    hours, minutes = int(match[1] or 0), int(match[2] or 0)
    return hours * 3600 + minutes * 60 + float(match[3])


def _plan(duration: float | None, every_s: float | None, scenes: bool, max_frames: int) -> tuple[float | None, int]:
    """(the interval, widened so that a long video's interval frames fit their share of ``max_frames``, or None;
    how many cuts may be kept)."""
    if every_s is None:
        return None, max_frames - 1
    share = max(1, max_frames // 2) if scenes else max_frames
    if duration is None:  # the share cannot be planned: the cap on all frames alone bounds them
        return every_s, max_frames - share
    planned = math.floor(duration / every_s) + 1
    if planned > share:
        every_s, planned = duration / share, share  # share times, 0 to just before the end
    return every_s, max_frames - planned


def _grid(step: float | None, duration: float | None) -> Iterator[float]:
    """The interval times: 0, step, 2 step, ... (just 0 without a step), before the end when it is known."""
    yield 0.0
    if step is None:
        return
    i = 1
    while duration is None or i * step < duration:
        yield i * step
        i += 1


def _merged(grid: Iterable[float], cuts: list[float], gap: float) -> Iterator[tuple[float, str]]:
    """Interval times and cut times, in order, as (time, kind); a cut is left out when an interval time
    follows it within ``gap`` (that frame shows the new scene)."""
    cuts = list(cuts)
    for t in grid:
        while cuts and cuts[0] < t:
            cut = cuts.pop(0)
            if t - cut >= gap:
                yield cut, "scene"
        yield t, "interval"
    for cut in cuts:
        yield cut, "scene"


class _Chooser:
    """Decides, frame by frame in time order, which frames are kept: the first at or after each interval time,
    and the first after each cut."""

    def __init__(self, step: float | None, scenes: bool, threshold: float, gap: float, budget: int):
        self.step, self.scenes, self.threshold, self.gap, self.budget = step, scenes, threshold, gap, budget
        self.next_time = 0.0  # the next interval time; the first frame is always kept
        self.last_cut = -math.inf
        self.previous: np.ndarray | None = None
        self.recent: deque[float] = deque(maxlen=_RECENT)
        self.jump = True  # whether a cut must also jump over the recent differences

    def keep(self, t: float, thumb: np.ndarray | None, eps: float) -> str | None:
        """``"interval"``, ``"scene"`` or None for a frame at ``t`` with luma thumbnail ``thumb`` (None: not
        compared), the frames before it seen; ``eps`` is half a frame's duration."""
        previous, self.previous = self.previous, thumb
        cut = False
        if self.scenes and previous is not None and thumb is not None:
            difference = float(np.abs(thumb - previous).mean())
            # with nothing before it to jump over (the second frame), a difference is taken as motion
            usual = (float(np.median(self.recent)) if self.recent else math.inf) if self.jump else 0.0
            cut = difference > self.threshold and difference >= SCENE_JUMP * usual
            self.recent.append(difference)
        if t >= self.next_time - eps:
            self.next_time = math.inf if self.step is None else (math.floor((t + eps) / self.step) + 1) * self.step
            return "interval"
        if not cut or self.budget <= 0 or t - self.last_cut < self.gap or self.next_time - t < self.gap:
            return None  # no cut; or too close to the previous cut, or an interval frame shows the new scene soon
        self.last_cut, self.budget = t, self.budget - 1
        return "scene"


def _av(name: str):
    try:
        import av
    except ImportError:
        raise BadSample("missing_extra", f"cannot read video {name}: videos need PyAV, {EXTRA}") from None
    return av


def _errors(av) -> tuple:
    # What FFmpeg and PyAV raise on corrupt data, and what corrupt values make of arithmetic on them
    return (av.error.FFmpegError, OSError, ValueError, EOFError, IndexError, RuntimeError, OverflowError,
            ZeroDivisionError, MemoryError, struct.error)


class _Video:
    """An open video: its container, chosen stream, ``VideoInfo``, and the ways of decoding it."""

    @classmethod
    @contextmanager
    def open(cls, source: VideoSource, name: str | None, max_pixels: int | None, deadline: float, threads: int = 1):
        name = name or _name(source)
        av = _av(name)
        limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
        errors = _errors(av)
        with _binary(source, name) as f:
            try:
                # max_pixels also makes FFmpeg's decoders refuse larger frames, while it probes the streams too
                container = av.open(f, options={"max_pixels": str(min(limit, 2**31 - 1))},
                                    container_options={"format_whitelist": _DEMUXERS})
            except errors as e:
                raise BadSample("unreadable_video", f"cannot read video {name}: {_why(e)} (not an MP4, MOV, "
                                                    "Matroska or WebM video, or truncated or corrupt)") from None
            try:
                yield cls(av, container, name, limit, deadline, threads)
            except BadSample:
                raise
            except errors as e:
                raise BadSample("unreadable_video", f"cannot decode video {name}: {_why(e)} (the file is "
                                                    "truncated or corrupt)") from None
            finally:
                container.close()

    def __init__(self, av, container, name: str, limit: int, deadline: float, threads: int):
        self.av, self.container, self.name, self.limit, self.deadline = av, container, name, limit, deadline
        streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
        if not streams:
            raise BadSample("unreadable_video", f"video {name} has no video stream (audio only, or cover art only)")
        self.stream = stream = streams[0]
        context = stream.codec_context
        if context is None:
            raise BadSample("unreadable_video", f"video {name} is in a codec FFmpeg does not know (the file is "
                                                "corrupt, or made by a rare encoder)")
        self._check_size(int(context.width or 0), int(context.height or 0))
        context.thread_count = threads
        if threads != 1:
            context.thread_type = "AUTO"
        context.options = {"max_pixels": str(min(limit, 2**31 - 1))}  # the decoder refuses larger frames itself
        self.time_base = stream.time_base
        rate = stream.average_rate or stream.guessed_rate
        self.fps = float(rate) if rate and 0 < float(rate) < 10_000 else None
        self.frame_s = 1 / self.fps if self.fps else 0.04
        sar = stream.sample_aspect_ratio
        self.aspect = float(sar) if sar and 0.25 <= float(sar) <= 4 else 1.0
        self.start = float(stream.start_time * self.time_base) if stream.start_time is not None and \
            self.time_base else None
        self.duration = _duration(container, stream)
        # packets that failed to decode; the time of the last frame decoded, and of the last packet read
        self.errors, self.at, self.packet_at = 0, None, None
        frames = self._decoded()
        first = next(frames, None)  # the first frame: proof that the video decodes, and its display matrix
        if first is None:
            # FFmpeg leaves the size unknown when it is larger than max_pixels, too
            size = "" if context.width and context.height else f", or its frames have more than max_pixels={limit}"
            raise BadSample("unreadable_video", f"cannot decode video {name}: no frame decodes (the file is "
                                                f"truncated or corrupt{size})")
        self._frames = itertools.chain([first], frames)  # where decoding goes on from, until a seek
        self.orientation = _orientation(first)
        width, height = round(first.width * self.aspect), first.height
        if self.orientation in (5, 6, 7, 8):
            width, height = height, width
        self.info = VideoInfo(self.duration, width, height, _created(container, stream), self.orientation,
                              self.fps, context.name)

    def _check_size(self, width: int, height: int) -> None:
        if width * height > self.limit:
            raise BadSample("too_many_pixels", f"video {self.name} is {width}x{height} = {width * height} pixels a "
                                               f"frame, more than max_pixels={self.limit}; skip it or raise the limit")

    def work(self) -> float:
        """The work of decoding every frame, in pixels times frames; 0 when the length is unknown (scanning is
        then the only way to find cuts, bounded by the time budget)."""
        if self.duration is None or self.fps is None:
            return 0.0
        context = self.stream.codec_context
        return float(context.width * context.height) * self.duration * self.fps

    def _time(self, frame, previous: float | None) -> float:
        """Seconds from the start; a frame without a timestamp follows the previous one by a frame."""
        if frame.pts is None or not self.time_base:
            t = 0.0 if previous is None else previous + self.frame_s
        else:
            t = float(frame.pts * self.time_base)
            if self.start is None:
                self.start = t
            t = max(0.0, t - self.start)
        self.at = t
        return t

    def _decoded(self) -> Iterator:
        """Decoded frames from the demuxer's position, within the time budget, a corrupt packet skipped: a
        ``BadSample`` once the budget or ``_MAX_DECODE_ERRORS`` runs out."""
        for packet in self.container.demux(self.stream):
            if packet.pts is not None and self.time_base:
                self.packet_at = float(packet.pts * self.time_base) - (self.start or 0.0)
            if time.monotonic() > self.deadline:
                where = "" if self.at is None else f" at {format_timestamp(self.at)}"
                raise BadSample("video_timeout", f"reading video {self.name} ran out of its time budget{where} "
                                                 "(timeout_s)")
            try:
                frames = packet.decode()
            except self.av.error.FFmpegError as e:
                self.errors += 1
                if self.errors > _MAX_DECODE_ERRORS:
                    raise BadSample("unreadable_video", f"cannot decode video {self.name}: {_why(e)}, in more "
                                                        f"than {_MAX_DECODE_ERRORS} packets (the file is corrupt)"
                                    ) from None
                continue
            for frame in frames:
                self._check_size(frame.width, frame.height)
                yield frame

    def _seek(self, t: float) -> None:
        """To the keyframe at or before ``t``; decoding goes on from there."""
        self.container.seek(max(0, round(((self.start or 0.0) + t) / self.time_base)), stream=self.stream)
        self.stream.codec_context.flush_buffers()
        self._frames = None

    def _continued(self) -> Iterator:
        frames, self._frames = self._frames, None
        return frames if frames is not None else self._decoded()

    def _check_complete(self, last: float | None) -> None:
        """A ``BadSample`` when the frames end well before the length the container declares."""
        if self.duration is None:
            return
        if last is None or last < self.duration - max(1.0, 0.05 * self.duration) - self.frame_s:
            end = "no frame" if last is None else f"its frames end at {format_timestamp(last)}"
            raise BadSample("unreadable_video", f"video {self.name} is truncated or corrupt: {end} of the "
                                                f"{format_timestamp(self.duration)} it declares")

    def sequential(self, choose: _Chooser) -> Iterator[tuple[float, object, str]]:
        """Every frame decoded in order; (time, frame, kind) of those ``choose`` keeps."""
        t = None
        for frame in self._continued():
            t = self._time(frame, t)
            kind = choose.keep(t, _thumbnail(frame), self.frame_s / 2)
            if kind is not None:
                yield t, frame, kind
        self._check_complete(t)

    def keyframe_cuts(self, choose: _Chooser) -> list[float]:
        """Times of the keyframes that start a scene, by ``choose``'s threshold, gap and budget, found by decoding
        the keyframes alone; then back to the start.

        Keyframes come at a regular rhythm (a phone's, every second or two) or where the encoder saw a cut
        (x264, libvpx and the like put one at each). A keyframe off the rhythm is taken as the encoder's cut,
        and needs only the threshold; one on it shows the same scene a second or more later as often as not
        (a pan, a walk), so it must also jump over the differences before it, like a cut between frames."""
        choose.step, choose.next_time = None, math.inf  # interval times are merged in later (_merged)
        cuts, t, key, gap = [], None, None, None
        context = self.stream.codec_context
        context.skip_frame = "NONKEY"
        try:
            for frame in self._continued():
                t = self._time(frame, t)
                if not frame.key_frame:
                    continue  # decoded before keyframes alone were asked for
                previous_gap, gap, key = gap, None if key is None else t - key, t
                choose.jump = previous_gap is not None and gap is not None and abs(gap - previous_gap) <= self.frame_s
                if choose.keep(t, _thumbnail(frame), self.frame_s / 2) == "scene":
                    cuts.append(t)
        finally:
            context.skip_frame = "DEFAULT"
        self._check_complete(self.packet_at)  # the last keyframe may be long before the end; the last packet not
        self._seek(0.0)
        return cuts

    def seeking(self, targets: Iterable, last: bool = False) -> Iterator[tuple[float, object, str]]:
        """For each target time, or (time, kind), in order: (time, frame, kind) of the first frame at or after
        it, reached by seeking to the keyframe before it when that skips decoding, else by decoding on. With
        ``last``, a target past the end gives the last frame, not a truncation error."""
        frames, position, found, found_last = self._continued(), None, None, None
        seek_helps = True  # until a seek lands at or before where decoding already was: keyframes are sparse
        eps = self.frame_s / 2
        for target in targets:
            target, kind = target if isinstance(target, tuple) else (target, "interval")
            if found is not None and found[0] >= target - eps:
                continue  # the frame kept for an earlier target is this one's too
            before = None
            if seek_helps and position is not None and target - position > 2 * self.frame_s:
                self._seek(target)
                frames, before, position = self._continued(), position, None
            found = None
            for frame in frames:
                t = self._time(frame, position)
                if before is not None:
                    seek_helps, before = t > before, None
                position = t
                if t >= target - eps:
                    found = (t, frame)
                    break
                if last:
                    found_last = (t, frame)
            if found is None:
                if last and found_last is not None:
                    yield found_last[0], found_last[1], kind
                    return
                self._check_complete(position)
                return
            yield found[0], found[1], kind

    def image(self, frame, draft_size: int | None) -> Image.Image:
        """The frame as an upright RGB image at its display aspect, scaled down to ``draft_size``."""
        width, height = max(1, round(frame.width * self.aspect)), frame.height
        if draft_size is not None and min(width, height) > draft_size:
            scale = draft_size / min(width, height)
            width, height = max(1, round(width * scale)), max(1, round(height * scale))
        # to_ndarray and fromarray: several times faster than PyAV's to_image for large frames
        img = Image.fromarray(frame.to_ndarray(width=width, height=height, format="rgb24", interpolation="AREA"))
        if self.orientation != 1:
            img.info["exif"] = exif_block(self.orientation, {})
            img = upright(img)  # the one place orientation is applied, for photos and videos alike
            img.info.pop("exif", None)
        return img


def _name(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    return str(getattr(source, "name", "<file object>"))


@contextmanager
def _binary(source: VideoSource, name: str):
    """A binary file of the video: opened here for a path (closed after), as given otherwise."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise BadSample("empty_file", f"cannot read video {name}: it is empty (0 bytes)")
        yield io.BytesIO(source)
        return
    if not isinstance(source, (str, os.PathLike)):
        yield source
        return
    try:
        f = open(source, "rb")  # noqa: SIM115 (closed below, after the errors of opening are told apart)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        kind = "is a directory, not a video file" if os.path.isdir(source) else "does not exist (not found)"
        raise MissingImage(f"video file {name} {kind}") from None
    except OSError as e:
        raise BadSample("unreadable_file", f"cannot open video {name}: {e.strerror or e}") from None
    with f:
        if os.fstat(f.fileno()).st_size == 0:
            raise BadSample("empty_file", f"cannot read video {name}: the file is empty (0 bytes)")
        yield f


def _why(error: BaseException) -> str:
    """FFmpeg's message, without PyAV's errno and file name."""
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


_TRACK_DURATION = re.compile(r"(\d+):(\d\d):(\d\d(?:\.\d+)?)")


def _duration(container, stream) -> float | None:
    """The video's length in seconds: the stream's, else its Matroska DURATION tag, else the container's (which
    counts the sound too); None when none says."""
    candidates = []
    if stream.duration is not None and stream.time_base:
        candidates.append(float(stream.duration * stream.time_base))
    match = _TRACK_DURATION.fullmatch(str(stream.metadata.get("DURATION", "")).strip())
    if match is not None:
        candidates.append(int(match[1]) * 3600 + int(match[2]) * 60 + float(match[3]))
    if container.duration is not None:
        candidates.append(container.duration / 1_000_000)
    for value in candidates:
        if math.isfinite(value) and 0 < value < 1e7:  # more than 100 days is a broken header
            return value
    return None


def _orientation(frame) -> int:
    """The frame's display matrix (FFmpeg's side data) as the EXIF orientation that shows it upright, by the
    rule of FFmpeg's own autorotation (fftools: the rotation rounded to a right angle, then the flips); 1 when
    there is none or it is not a right angle."""
    for data in frame.side_data:
        if data.type.name != "DISPLAYMATRIX":
            continue
        raw = bytes(data)
        if len(raw) != 36:
            return 1
        m = struct.unpack("=9i", raw)
        a, b, c, d = (v / 65536 for v in (m[0], m[1], m[3], m[4]))
        sx, sy = math.hypot(a, c), math.hypot(b, d)
        if sx == 0 or sy == 0:
            return 1
        theta = -round(-math.degrees(math.atan2(b / sy, a / sx)))  # clockwise degrees to turn it upright
        theta -= 360 * math.floor(theta / 360 + 0.9 / 360)
        if abs(theta - 90) < 1:
            return 5 if m[3] > 0 else 6
        if abs(theta - 180) < 1:
            return {(True, True): 3, (True, False): 2, (False, True): 4, (False, False): 1}[(m[0] < 0, m[4] < 0)]
        if abs(theta - 270) < 1:
            return 7 if m[3] < 0 else 8
        if abs(theta) < 1 or abs(theta - 360) < 1:
            return 4 if m[4] < 0 else 1
        return 1
    return 1


def _created(container, stream) -> datetime | None:
    """The capture time the container records, timezone-aware (UTC unless it gives an offset); None when it
    records none, or one before 1971 or from 2100 on (a camera whose clock was never set)."""
    for tag in _DATE_TAGS:
        for metadata in (container.metadata, stream.metadata):
            when = _parse_date(metadata.get(tag))
            if when is not None:
                return when
    return None


def _parse_date(text) -> datetime | None:
    match = _DATE.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        return None
    try:
        when = datetime(*map(int, match.groups()[:6]))
    except ValueError:
        return None
    if match[7]:
        when = when.replace(microsecond=int(match[7][1:7].ljust(6, "0")))
    zone = match[8]
    if zone in (None, "Z"):
        when = when.replace(tzinfo=timezone.utc)
    else:
        hours, minutes = int(zone[1:3]), int(zone[-2:])
        if hours > 23 or minutes > 59:
            return None
        delta = timedelta(hours=hours, minutes=minutes)
        when = when.replace(tzinfo=timezone(-delta if zone[0] == "-" else delta))
    return when if 1971 <= when.year < 2100 else None


def _thumbnail(frame) -> np.ndarray:
    """A 32x32 float32 grayscale thumbnail: block means of the luma plane, sampled every few pixels, when the
    frame has an 8-bit one (no conversion: a fraction of a millisecond for 1080p), else scaled by FFmpeg."""
    if frame.format.name in _LUMA_FIRST and frame.width >= 2 * _GRID and frame.height >= 2 * _GRID:
        plane = frame.planes[0]
        luma = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, :plane.width]
        step = max(1, min(plane.width, plane.height) // (4 * _GRID))  # still >= 4x4 samples a block
        luma = luma[::step, ::step]
        bh, bw = luma.shape[0] // _GRID, luma.shape[1] // _GRID
        blocks = luma[:bh * _GRID, :bw * _GRID].reshape(_GRID, bh, _GRID, bw)
        return blocks.mean(axis=(1, 3), dtype=np.float32)
    return frame.to_ndarray(width=_GRID, height=_GRID, format="gray", interpolation="AREA").astype(np.float32)
