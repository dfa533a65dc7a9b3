"""Reading videos (issue 24): videos that PyAV writes here, whose frames show when they are (a moving square)
and which scene they belong to (solid backgrounds that change at known times), read back in every container
and codec this PyAV wheel writes; frames at intervals and at cuts, by decoding in order and by seeking;
rotation, aspect, capture times, timestamps; and hostile files (truncated, mutated, random, huge sizes), which
give a BadSample with a reason in bounded time and memory."""
import io
import itertools
import math
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import video_files as vf
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fuzz_files import mutate, mutations

from clipforge.data import (
    BadSample,
    VideoInfo,
    format_timestamp,
    is_video_name,
    parse_timestamp,
    video_capture_time,
    video_frame,
    video_frames,
    video_info,
)
from clipforge.data import video as video_module

pytest.importorskip("av")

# 7 s at 10 fps: cuts at 2.3 s (frame 23) and 4.1 s (frame 41)
SEGMENTS = [(2.3, vf.RED), (1.8, vf.YELLOW), (2.9, vf.BLUE)]
CUTS = [2.3, 4.1]
CODECS = [(".mp4", "libx264"), (".mp4", "mpeg4"), (".m4v", "libx264"), (".mov", "libx264"), (".mkv", "libx264"),
          (".mkv", "mpeg4"), (".webm", "libvpx-vp9"), (".webm", "libvpx")]
CREATED = "2024-05-06T07:08:09.250000Z"


def colour_at(t: float) -> tuple:
    for seconds, colour in SEGMENTS:
        if t < seconds - 1e-9:
            return colour
        t -= seconds
    return SEGMENTS[-1][1]


def close(a, b, tolerance=12) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b))


def frames_of(data, *args, **kwargs):
    return list(video_frames(data, *args, name=kwargs.pop("name", "v.mp4"), **kwargs))


@pytest.fixture(scope="module")
def videos():
    return {(suffix, codec): vf.video(SEGMENTS, suffix, codec=codec, metadata={"creation_time": CREATED})
            for suffix, codec in CODECS}


@pytest.mark.parametrize("suffix, codec", CODECS)
def test_every_container_and_codec_reads_back(videos, suffix, codec, tmp_path):
    path = tmp_path / f"v{suffix}"
    path.write_bytes(videos[suffix, codec])
    info = video_info(path)
    assert (info.width, info.height, info.orientation, info.rotation) == (vf.WIDTH, vf.HEIGHT, 1, 0)
    assert info.duration == pytest.approx(7.0, abs=0.11) and info.fps == pytest.approx(10)
    assert info.codec == {"libx264": "h264", "mpeg4": "mpeg4", "libvpx-vp9": "vp9", "libvpx": "vp8"}[codec]
    assert info.created == datetime(2024, 5, 6, 7, 8, 9, 250000 if suffix in (".mkv", ".webm") else 0,
                                    tzinfo=timezone.utc)  # MP4's mvhd keeps whole seconds
    frames = list(video_frames(path, every_s=1.0, scenes=False))
    assert [f.time for f in frames] == [float(i) for i in range(7)]
    assert {f.kind for f in frames} == {"interval"}
    for f in frames:
        assert f.image.mode == "RGB" and f.image.size == (vf.WIDTH, vf.HEIGHT)
        assert vf.frame_index(f.image) == pytest.approx(f.time * 10, abs=0.25)  # the frame shown at that time
        assert close(vf.background(f.image), colour_at(f.time))


@pytest.mark.parametrize("suffix, codec", CODECS)
def test_scene_cuts_are_found_at_their_frame(videos, suffix, codec):
    frames = frames_of(videos[suffix, codec], every_s=None, scenes=True)
    assert [(f.time, f.kind) for f in frames] == [(0.0, "interval"), (2.3, "scene"), (4.1, "scene")]
    for f in frames:
        assert vf.frame_index(f.image) == pytest.approx(f.time * 10, abs=0.25)
        assert close(vf.background(f.image), colour_at(f.time))  # the new scene's first frame


def test_intervals_and_scenes_together(videos):
    data = videos[".mp4", "libx264"]
    # the default: a frame every 5 s and the cuts, less the one at 4.1 s that the 5 s frame follows within 1 s
    assert [(f.time, f.kind) for f in frames_of(data)] == [(0.0, "interval"), (2.3, "scene"), (5.0, "interval")]
    kept = frames_of(data, min_scene_gap_s=0.5)
    assert [(f.time, f.kind) for f in kept] == [(0.0, "interval"), (2.3, "scene"), (4.1, "scene"), (5.0, "interval")]
    assert [f.time for f in frames_of(data, every_s=None, scenes=False)] == [0.0]  # neither: the first frame


def test_motion_is_not_a_cut_and_flicker_gives_few_frames():
    steady = vf.video([(6.0, vf.GREEN)])  # the square moves all along
    assert [f.kind for f in frames_of(steady, every_s=None)] == ["interval"]
    flicker = vf.video([(0.1, c) for c in (vf.RED, vf.YELLOW) * 50])  # 10 s, a different colour every frame
    frames = frames_of(flicker, every_s=None, min_scene_gap_s=1.0)
    assert len(frames) <= 3  # flicker is no jump over what came before; the gap would cap it at 10 anyway
    strobe = vf.video([(0.3, c) for c in (vf.RED, vf.BLUE, vf.YELLOW, vf.GREEN) * 5])  # a cut every 3 frames
    times = [f.time for f in frames_of(strobe, every_s=None)]
    assert len(times) >= 4 and all(b - a >= 1.0 for a, b in itertools.pairwise(times[1:]))


def _decoded_frames(monkeypatch) -> list:
    """Counts the frames decoded (every decoded frame gets its time read once)."""
    seen = []
    original = video_module._Video._time

    def counting(self, frame, previous):
        seen.append(frame.pts)
        return original(self, frame, previous)

    monkeypatch.setattr(video_module._Video, "_time", counting)
    return seen


@pytest.mark.parametrize("gop", [10, 400])
def test_seeking_gives_what_decoding_in_order_gives(gop, monkeypatch):
    data = vf.video([(10.0, vf.RED), (10.0, vf.BLUE)], gop=gop, options={"sc_threshold": "0"})  # 200 frames
    decoded = _decoded_frames(monkeypatch)
    in_order = frames_of(data, every_s=5.0, scenes=True, scene_threshold=math.inf)  # sequential, no cuts
    assert len(decoded) == 200
    decoded.clear()
    sought = frames_of(data, every_s=5.0, scenes=False)
    assert [f.time for f in sought] == [f.time for f in in_order] == [0.0, 5.0, 10.0, 15.0]
    for a, b in zip(sought, in_order):
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    if gop == 10:  # keyframes every second: each 5 s frame is one seek and at most a second of decoding away
        assert len(decoded) <= 4 * 10 + 1
    else:  # one keyframe only: seeking would go back to it each time, so decoding simply goes on
        assert len(decoded) <= 151 + 10


def test_long_videos_find_cuts_between_keyframes(videos, monkeypatch):
    data = videos[".mp4", "libx264"]  # x264 puts keyframes at cuts, as encoders do
    decoded = _decoded_frames(monkeypatch)
    frames = frames_of(data, every_s=None, full_scan_pixels=0)  # as if the video were too long to decode whole
    assert [(f.time, f.kind) for f in frames] == [(0.0, "interval"), (2.3, "scene"), (4.1, "scene")]
    assert len(decoded) < 20  # 3 keyframes, then a seek to each frame kept
    for f in frames:
        assert close(vf.background(f.image), colour_at(f.time))
    assert [f.time for f in frames_of(data, full_scan_pixels=0)] == [0.0, 2.3, 5.0]


def test_a_long_shot_is_no_cut_even_between_keyframes():
    pan = vf.panning_video(20.0)  # a texture panning 24 pixels a frame, keyframes every second as a phone puts them
    assert [f.kind for f in frames_of(pan, every_s=None)] == ["interval"]
    # between keyframes a second apart everything differs, but alike: only the second keyframe, before the
    # rhythm is known, may count as a cut
    assert len(frames_of(pan, every_s=None, full_scan_pixels=0)) <= 2


def test_max_frames_spreads_interval_frames_over_the_whole_video():
    data = vf.video([(10.0, vf.RED), (10.0, vf.BLUE)], gop=10)
    assert [f.time for f in frames_of(data, every_s=1.0, scenes=False, max_frames=4)] == [0.0, 5.0, 10.0, 15.0]
    frames = frames_of(data, every_s=1.0, max_frames=6)  # half for intervals, the rest for the cut at 10 s
    # (the interval frames at 6 2/3 s and 13 1/3 s are the frames within half a frame of those times)
    assert [(f.time, f.kind) for f in frames] == [(0.0, "interval"), (6.7, "interval"), (10.0, "scene"),
                                                  (13.3, "interval")]
    assert len(frames_of(data, every_s=0.1, scenes=False, max_frames=1)) == 1


# (PyAV's set_display_rotation: counter-clockwise degrees, then mirrors), all 16 combinations
@pytest.mark.parametrize("degrees", [0, 90, 180, -90])
@pytest.mark.parametrize("hflip, vflip", [(False, False), (True, False), (False, True), (True, True)])
def test_rotation_and_mirrors_are_applied(degrees, hflip, vflip):
    data = vf.video([(0.3, vf.BLUE)], rotation=degrees, hflip=hflip, vflip=vflip)
    expected = np.rot90(vf.frame_array(0, vf.BLUE), degrees // 90)
    expected = expected[:, ::-1] if hflip else expected
    expected = expected[::-1] if vflip else expected
    info = video_info(data)
    assert (info.height, info.width) == expected.shape[:2]
    image = frames_of(data)[0].image
    assert np.abs(np.asarray(image).astype(int) - expected).mean() < 6
    assert video_frame(data, 0.0).size == image.size
    if not hflip and not vflip:
        assert info.rotation == (-degrees) % 360  # clockwise, as shown


def test_aspect_ratio_and_draft_size():
    wide = vf.video([(0.3, vf.RED)], aspect=Fraction(2, 1))  # anamorphic: pixels twice as wide as high
    assert video_info(wide).width == 2 * vf.WIDTH
    assert frames_of(wide)[0].image.size == (2 * vf.WIDTH, vf.HEIGHT)
    plain = vf.video([(0.3, vf.RED)])
    small = frames_of(plain, draft_size=48)[0].image
    assert small.size == (80, 48) and close(vf.background(small), vf.RED)
    assert frames_of(plain, draft_size=500)[0].image.size == (vf.WIDTH, vf.HEIGHT)  # never enlarged


def test_the_frame_at_a_time(videos):
    data = videos[".mkv", "libx264"]
    assert vf.frame_index(video_frame(data, 3.57)) == pytest.approx(36, abs=0.25)  # the first at or after
    assert vf.frame_index(video_frame(data, 3.52)) == pytest.approx(35, abs=0.25)  # to half a frame
    assert vf.frame_index(video_frame(data, 60.0)) == pytest.approx(69, abs=0.25)  # past the end: the last
    kept = {f.time: f.image for f in frames_of(data, every_s=1.0)}
    assert np.array_equal(np.asarray(video_frame(data, 3.0)), np.asarray(kept[3.0]))
    small = video_frame(data, 3.0, draft_size=48)
    assert small.size == (80, 48)
    with pytest.raises(ValueError, match="seconds"):
        video_frame(data, -1)


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".webm"])
def test_a_sound_track_changes_nothing(videos, suffix):
    codec = vf.CODECS[suffix]
    with_sound = vf.video(SEGMENTS, suffix, audio=7.5, metadata={"creation_time": CREATED})  # sound runs longer
    assert video_info(with_sound).duration == pytest.approx(7.0, abs=0.11)
    for every_s, scenes in ((1.0, False), (5.0, True)):
        plain = frames_of(videos[suffix, codec], every_s, scenes)
        sound = frames_of(with_sound, every_s, scenes)
        assert [(f.time, f.kind) for f in sound] == [(f.time, f.kind) for f in plain]


def test_unknown_length_still_reads():
    data = vf.video(SEGMENTS, ".webm", container_options={"live": "1"})  # no duration, as a browser records
    assert video_info(data).duration is None
    assert [(f.time, f.kind) for f in frames_of(data)] == [(0.0, "interval"), (2.3, "scene"), (5.0, "interval")]


@pytest.mark.parametrize("metadata, options, expected", [
    ({"creation_time": "2024-05-06T07:08:09.000000Z"}, {}, datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)),
    # Apple's tag keeps the local time and offset of the same moment: preferred
    ({"creation_time": "2024-05-06T07:08:09Z", "com.apple.quicktime.creationdate": "2024-05-06T09:08:09+0200"},
     {"movflags": "use_metadata_tags"}, datetime(2024, 5, 6, 9, 8, 9, tzinfo=timezone(timedelta(hours=2)))),
    ({"creation_time": "1970-01-01T00:00:00.000000Z"}, {}, None),  # a clock never set
    ({}, {}, None),
])
def test_creation_time_is_the_capture_time(metadata, options, expected, tmp_path):
    path = tmp_path / "v.mov"
    path.write_bytes(vf.video([(0.3, vf.RED)], ".mov", metadata=metadata, container_options=options))
    os.utime(path, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    info = video_info(path)
    assert info.created == expected
    found = video_capture_time(path)
    if expected is None:
        assert found.source == "mtime" and found.when.timestamp() == 1_600_000_000
    else:
        assert found.source == "video" and found.when == expected and found.when.utcoffset() == expected.utcoffset()
    assert video_capture_time(info, 5).source == found.source  # from a VideoInfo, nothing is read again
    assert video_capture_time(b"not a video", 1_600_000_000_000_000_000).source == "mtime"
    assert video_capture_time(b"not a video") is None


@pytest.mark.parametrize("text, expected", [
    ("2024-05-06T07:08:09.123456Z", datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone.utc)),
    ("2024-05-06 07:08:09", datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)),
    ("2024-05-06T07:08:09-0530", datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone(-timedelta(hours=5, minutes=30)))),
    ("2024-05-06T07:08:09+01:00", datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone(timedelta(hours=1)))),
    ("1904-01-01T00:00:00Z", None), ("2024-13-06T07:08:09Z", None), ("2024-05-06T07:08:09+2500", None),
    ("yesterday", None), ("", None), (None, None),
])
def test_creation_time_texts(text, expected):
    assert video_module._parse_date(text) == expected


@pytest.mark.parametrize("seconds, text", [(0, "00:00"), (5.99, "00:05"), (65.5, "01:05"), (599, "09:59"),
                                           (3599.9, "59:59"), (3600, "1:00:00"), (3725, "1:02:05"),
                                           (36000, "10:00:00")])
def test_timestamps_format_and_parse(seconds, text):
    assert format_timestamp(seconds) == text
    assert parse_timestamp(text) == math.floor(seconds)


@given(st.floats(0, 1e6))
def test_parsing_a_formatted_timestamp_gives_its_whole_seconds(seconds):
    assert parse_timestamp(format_timestamp(seconds)) == math.floor(seconds)


def test_timestamp_forms_and_errors():
    assert parse_timestamp("75") == 75 and parse_timestamp(" 01:05.5 ") == 65.5 and parse_timestamp("1:02:05") == 3725
    for bad in ("", "abc", "-1", "1:60", "1:2:60", "1:60:00", "1:2:3:4", "01:", ":05", "1e3"):
        with pytest.raises(ValueError, match="not a time in a video"):
            parse_timestamp(bad)
    for bad in (-1, math.nan, math.inf):
        with pytest.raises(ValueError, match="timestamp"):
            format_timestamp(bad)


def test_names():
    assert all(is_video_name(f"clip{s}") for s in (".mp4", ".M4V", ".mov", ".MKV", ".webm"))
    assert not any(is_video_name(n) for n in ("clip.avi", "photo.jpg", ".clip.mp4", "._clip.mov"))


def test_bad_arguments():
    with pytest.raises(ValueError, match="every_s"):
        next(video_frames(b"x", every_s=0))
    with pytest.raises(ValueError, match="max_frames"):
        next(video_frames(b"x", max_frames=0))


def _audio_only() -> bytes:
    import av
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=8000)
        for i in range(5):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def _png() -> bytes:
    from PIL import Image
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize("make, reason, says", [
    (lambda p: None, "missing_file", "does not exist"),
    (lambda p: p.mkdir(), "missing_file", "is a directory"),
    (lambda p: p.write_bytes(b""), "empty_file", "empty"),
    (lambda p: p.write_bytes(np.random.default_rng(0).bytes(50_000)), "unreadable_video", "not an MP4"),
    (lambda p: p.write_bytes(b"#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n"), "unreadable_video", "not an MP4"),
    (lambda p: p.write_bytes(_png()), "unreadable_video", "not an MP4"),  # FFmpeg reads PNGs: not here
    (lambda p: p.write_bytes(_audio_only()), "unreadable_video", "no video stream"),
])
def test_bad_files_are_bad_samples_with_a_reason(make, reason, says, tmp_path):
    path = tmp_path / "bad.mp4"
    make(path)
    for read in (video_info, lambda p: list(video_frames(p)), lambda p: video_frame(p, 1.0)):
        with pytest.raises(BadSample, match=says) as bad:
            read(path)
        assert bad.value.reason == reason and str(path) in str(bad.value)
    if reason == "missing_file":
        assert isinstance(bad.value, FileNotFoundError)


def test_limits_on_pixels_and_time(videos, monkeypatch):
    data = videos[".mp4", "libx264"]
    with pytest.raises(BadSample, match="max_pixels=1000") as bad:
        video_info(data, max_pixels=1000)
    assert bad.value.reason == "too_many_pixels"
    with pytest.raises(BadSample) as bad:
        frames_of(data, timeout_s=0)
    assert bad.value.reason == "video_timeout"
    clock = iter(range(10**6))  # a clock that runs a second a call: the budget runs out part way
    monkeypatch.setattr(video_module.time, "monotonic", lambda: next(clock))
    kept = []
    with pytest.raises(BadSample, match="time budget at 0") as bad:
        kept.extend(video_frames(data, every_s=1.0, timeout_s=35))
    assert bad.value.reason == "video_timeout" and kept  # the frames before are valid
    assert [f.time for f in kept] == [float(i) for i in range(len(kept))]


def test_missing_pyav_names_the_extra(monkeypatch, videos):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(BadSample, match=r"pip install 'clipforge\[video\]'") as bad:
        video_info(videos[".mp4", "libx264"])
    assert bad.value.reason == "missing_extra"


@pytest.mark.parametrize("suffix, options", [(".mp4", {}), (".mp4", {"movflags": "faststart"}), (".mkv", {}),
                                             (".webm", {})])
@pytest.mark.parametrize("kept", [0.1, 0.5, 0.8])
def test_truncated_videos_end_in_a_bad_sample(suffix, options, kept):
    data = vf.video(SEGMENTS * 3, suffix, gop=10, container_options=options)  # 21 s
    cut = data[: int(len(data) * kept)]
    frames = []
    with pytest.raises(BadSample) as bad:
        frames.extend(video_frames(cut, every_s=1.0, name=f"cut{suffix}"))
    assert bad.value.reason == "unreadable_video" and f"cut{suffix}" in str(bad.value)
    for f in frames:  # what came before the cut is right
        assert vf.frame_index(f.image) == pytest.approx((f.time * 10) % vf._POSITIONS, abs=0.25)


# Fuzzing: mutated videos of every container give frames or a BadSample, in bounded time
FUZZ_VIDEOS = {suffix: vf.video([(0.6, vf.RED), (0.6, vf.BLUE)], suffix, gop=4)
               for suffix in (".mp4", ".mov", ".mkv", ".webm")}
FUZZ_VIDEOS[".mp4 faststart"] = vf.video([(0.6, vf.RED), (0.6, vf.BLUE)], ".mp4", gop=4,
                                         container_options={"movflags": "faststart"})
FUZZ_REASONS = ("unreadable_video", "too_many_pixels", "empty_file")


def _read_all(data: bytes, name: str):
    start = time.perf_counter()
    try:
        frames = list(video_frames(data, every_s=0.5, name=name))
        assert frames and all(f.image.mode == "RGB" and f.image.width * f.image.height <= 89_478_485 for f in frames)
        assert [f.time for f in frames] == sorted({f.time for f in frames})
    except BadSample as bad:
        assert bad.reason in FUZZ_REASONS and name in str(bad)
    try:
        video_info(data, name=name)
    except BadSample as bad:
        assert bad.reason in FUZZ_REASONS
    assert time.perf_counter() - start < 5


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(which=st.sampled_from(sorted(FUZZ_VIDEOS)), edits=mutations)
def test_mutated_videos_raise_only_bad_sample(which, edits):
    _read_all(mutate(FUZZ_VIDEOS[which], edits), "m" + which.split()[0])


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(head=st.sampled_from([b"", b"\0\0\0\x20ftypisom", b"\x1aE\xdf\xa3", b"\0\0\0\x08moov"]),
       tail=st.binary(max_size=2000))
def test_random_bytes_with_a_video_name_are_bad_samples(head, tail):
    _read_all(head + tail, "random.mp4")


def _with_ebml_size(data: bytes, old: tuple[int, int], new: tuple[int, int]) -> bytes:
    """A Matroska file with its PixelWidth and PixelHeight (2-byte values) changed."""
    out = bytearray(data)
    for element, was, value in ((0xB0, old[0], new[0]), (0xBA, old[1], new[1])):
        at = out.index(bytes([element, 0x82]) + was.to_bytes(2, "big"))
        out[at + 2: at + 4] = value.to_bytes(2, "big")
    return bytes(out)


def _with_sample_entry_size(data: bytes, width: int, height: int) -> bytes:
    """An MP4 whose avc1 sample entry claims another size (the SPS inside keeps the real one)."""
    at = data.index(b"avc1") + 4 + 24
    return data[:at] + width.to_bytes(2, "big") + height.to_bytes(2, "big") + data[at + 4:]


@pytest.mark.parametrize("width, height", [(65535, 65535), (12000, 12000), (9000, 9000), (320, 60000)])
def test_headers_claiming_huge_frames_are_refused_at_once(width, height):
    raw = vf.video([(0.3, vf.RED)], ".mkv", codec="rawvideo", size=(320, 256))  # the size is the container's
    h264 = vf.video([(0.3, vf.RED)], ".mkv", size=(320, 256))
    mp4 = vf.video([(0.3, vf.RED)], ".mp4")
    for name, data in (("huge-raw.mkv", _with_ebml_size(raw, (320, 256), (width, height))),
                       ("huge-h264.mkv", _with_ebml_size(h264, (320, 256), (width, height))),
                       ("huge.mp4", _with_sample_entry_size(mp4, width, height))):
        start = time.perf_counter()
        try:
            frames = list(video_frames(data, name=name))
            assert frames[0].image.size in ((320, 256), (vf.WIDTH, vf.HEIGHT))  # the codec's own size wins
        except BadSample as bad:
            assert bad.reason in ("too_many_pixels", "unreadable_video") and name in str(bad)
        assert time.perf_counter() - start < 2


_MEMORY_PROBE = r"""
import random, resource, sys
sys.path.insert(0, sys.argv[1])
import test_video as t
from clipforge.data import BadSample, video_frames, video_info
rng = random.Random(7)
def edits():
    return [(rng.choice(["flip", "header", "cut"]), rng.random(), rng.randrange(1, 256))
            for _ in range(rng.randrange(1, 6))]
for data in t.FUZZ_VIDEOS.values():  # warm up every demuxer and decoder once
    list(video_frames(data))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for i in range(400):
    which = rng.choice(sorted(t.FUZZ_VIDEOS))
    data = t.mutate(t.FUZZ_VIDEOS[which], edits())
    try:
        list(video_frames(data, every_s=0.5, name="m.mp4"))
    except BadSample:
        pass
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.slow
def test_memory_and_time_stay_bounded_over_many_mutated_videos():
    """A child process reads 400 mutated MP4/MOV/MKV/WebM files within the timeout (no hang), its peak RSS
    growing by at most 200 MiB."""
    done = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(Path(__file__).parent)],
                          check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) < 200, done.stdout


def test_video_info_is_a_plain_record():
    info = VideoInfo(1.0, 2, 3, None, 6, 25.0, "h264")
    assert info.rotation == 90 and info.width == 2
