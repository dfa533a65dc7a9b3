"""Videos that the tests make with PyAV, with content that tells what and when each frame is: the background
is one solid colour per segment (cuts at known times), a white block marks the top-left corner (orientation),
and a black square moves along the bottom, ``STEP`` pixels a frame (which frame it is)."""
import os
import tempfile
from fractions import Fraction

import numpy as np

# Background colours whose luma differs from each other's by 35 or more, so that every change is a cut
RED, YELLOW, BLUE, GREEN = (220, 20, 20), (230, 230, 40), (20, 20, 220), (20, 200, 20)
WIDTH, HEIGHT = 160, 96
STEP, SQUARE = 2, 8  # the square moves STEP pixels a frame, wrapping after _POSITIONS frames
_POSITIONS = (WIDTH - 16) // STEP
# container format and the codecs this PyAV wheel writes into it, by file suffix
FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm"}
CODECS = {".mp4": "libx264", ".m4v": "libx264", ".mov": "libx264", ".mkv": "libx264", ".webm": "libvpx-vp9"}


def frame_array(i: int, colour, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """Frame ``i``: ``colour`` background, white top-left block, black square at ``square_x(i)``."""
    a = np.empty((height, width, 3), np.uint8)
    a[:] = colour
    a[: height // 6, : width // 6] = 255
    x = square_x(i)
    a[height - 2 * SQUARE: height - SQUARE, x: x + SQUARE] = 0
    return a


def square_x(i: int) -> int:
    return 4 + STEP * (i % _POSITIONS)


def frame_index(img) -> float:
    """Which frame an upright RGB image of ``frame_array`` shows, from where its black square is."""
    a = np.asarray(img.convert("RGB")).astype(int)
    band = a[a.shape[0] - 2 * SQUARE: a.shape[0] - SQUARE]
    dark = band.max(axis=2) < 70
    xs = np.nonzero(dark.any(axis=0))[0]
    return (xs.mean() - (SQUARE - 1) / 2 - 4) / STEP


def background(img) -> tuple:
    """The background colour of an image of ``frame_array``: the median of its middle."""
    a = np.asarray(img.convert("RGB"))
    h, w = a.shape[:2]
    return tuple(int(v) for v in np.median(a[h // 3: 2 * h // 3, w // 3: 2 * w // 3].reshape(-1, 3), axis=0))


def video(segments, suffix: str = ".mp4", fps: int = 10, codec: str | None = None, gop: int | None = None,
          rotation: int | None = None, hflip: bool = False, vflip: bool = False, metadata: dict | None = None,
          container_options: dict | None = None, size: tuple[int, int] = (WIDTH, HEIGHT),
          aspect: Fraction | None = None, options: dict | None = None, audio: float = 0.0) -> bytes:
    """A video of ``segments`` [(seconds, colour), ...] in turn, at ``fps``, as the container ``suffix`` names,
    encoded by ``codec`` (default: ``CODECS``) with keyframes every ``gop`` frames (default: the codec's),
    a display matrix (PyAV's ``set_display_rotation``: counter-clockwise degrees, then mirrors), container
    ``metadata``, a sample ``aspect`` ratio, and ``audio`` seconds of silence in an AAC stream beside it."""
    with tempfile.TemporaryDirectory() as folder:  # a file: MP4's faststart rewrites it
        path = os.path.join(folder, "video" + suffix)
        _write(path, segments, suffix, fps, codec, gop, rotation, hflip, vflip, metadata, container_options, size,
               aspect, options, audio)
        with open(path, "rb") as f:
            return f.read()


def _write(path, segments, suffix, fps, codec, gop, rotation, hflip, vflip, metadata, container_options, size,
           aspect, options, audio) -> None:
    import av  # here: a test module imports this one before it skips when PyAV is missing
    with av.open(path, "w", format=FORMATS[suffix], container_options=container_options or {}) as container:
        container.metadata.update(metadata or {})
        codec = codec or CODECS[suffix]
        # one encoder thread: several, on a busy machine, make libvpx 10 to 50 times slower
        stream = container.add_stream(codec, rate=fps, options={"threads": "1", **({"g": str(gop)} if gop else {}),
                                                                **(options or {})})
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        if aspect is not None:
            stream.codec_context.sample_aspect_ratio = aspect
        if rotation is not None or hflip or vflip:
            stream.set_display_rotation(rotation or 0, hflip=hflip, vflip=vflip)
        if audio:
            sound = container.add_stream("aac" if suffix != ".webm" else "libopus", rate=48000)
            samples = 960
            for k in range(round(audio * 48000 / samples)):
                chunk = av.AudioFrame.from_ndarray(np.zeros((1, samples), np.float32), format="fltp", layout="mono")
                chunk.sample_rate, chunk.pts = 48000, k * samples
                for packet in sound.encode(chunk):
                    container.mux(packet)
            for packet in sound.encode():
                container.mux(packet)
        i = 0
        for seconds, colour in segments:
            for _ in range(round(seconds * fps)):
                frame = av.VideoFrame.from_ndarray(frame_array(i, colour, *size), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
                i += 1
        for packet in stream.encode():
            container.mux(packet)


def panning_video(seconds: float, fps: int = 10, gop: int = 10, speed: int = 24) -> bytes:
    """An H.264 MP4 of a random texture panning ``speed`` pixels a frame, keyframes every ``gop`` frames and
    nowhere else (as a phone encodes): one long shot, whose keyframes a second apart differ a lot."""
    import av
    texture = np.random.default_rng(0).integers(0, 256, (HEIGHT // 8, 64, 3), np.uint8).repeat(8, 0).repeat(8, 1)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "pan.mp4")
        with av.open(path, "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps, options={"threads": "1", "g": str(gop),
                                                                        "sc_threshold": "0"})
            stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
            for i in range(round(seconds * fps)):
                shifted = np.roll(texture, -speed * i, axis=1)[:, :WIDTH]
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(shifted), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        with open(path, "rb") as f:
            return f.read()
