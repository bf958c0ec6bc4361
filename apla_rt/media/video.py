"""Video IO: read frames from a video file, a GIF or a folder of images; write mp4/gif.

Frames are uint8 arrays of shape (f, h, w, 3), RGB. Reading samples frames
``start, start + stride, ...`` and decodes no further than the last frame it needs;
frames can be centre-cropped to a square and resized. Writing is atomic
(``apla_rt.folder.atomic.write_file``): no half-written file ever sits at the final path.
"""

from __future__ import annotations

import io
import math
import os
import re
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import av
import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

from ..folder.atomic import write_file
from ..errors import InputError, VideoError

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".m4v", ".avi")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
WRITE_SUFFIXES = (".mp4", ".gif")


class _Damaged:
    """Sentinel a frame source yields when decoding fails part-way through an input."""


_Frames = Iterator[Callable[[], np.ndarray] | _Damaged]  # one loader per frame


# --- reading ---------------------------------------------------------------------------

def read_video(path: str | os.PathLike, start: int = 0, stride: int = 1,
               n_frames: int | None = None, size: int | None = None) -> np.ndarray:
    """Frames ``start, start + stride, ...`` of a video, GIF or image folder.

    Takes ``n_frames`` frames (None: every available one), centre-crops each to a square
    and resizes it to ``size`` x ``size`` with bicubic filtering (None: no crop, no
    resize). Returns uint8 (f, h, w, 3). Raises ``VideoError`` for a missing, empty,
    undecodable or too short input and ``InputError`` for invalid arguments.
    """
    _check_int("start", start, minimum=0)
    _check_int("stride", stride, minimum=1)
    if n_frames is not None:
        _check_int("n_frames", n_frames, minimum=1)
    if size is not None:
        _check_int("size", size, minimum=1)
    path = _existing(path)

    if path.is_dir():
        kind, source = "folder", _folder_frames(path)
    elif path.suffix.lower() == ".gif":
        kind, source = "GIF", _gif_frames(path)
    else:
        kind, source = "video", _av_frames(path)
    frames, total, damaged = _pick(source, start, stride, n_frames)

    if total == 0 and not damaged:
        raise VideoError(f"{path}: the {kind} has no frames; give a video with frames in it")
    needed = start + (n_frames - 1) * stride + 1 if n_frames is not None else start + 1
    if damaged and (n_frames is None or len(frames) < n_frames):
        got = f"only {total} frames could be decoded" if total else "no frame could be decoded"
        raise VideoError(
            f"{path}: the {kind} is damaged or truncated ({got}); re-encode or re-download it")
    if total < needed:
        if n_frames is None:
            ask = f"start={start} needs at least {needed}"
        else:
            ask = f"start={start}, stride={stride}, n_frames={n_frames} need {needed}"
        raise VideoError(
            f"{path} has {total} frames but {ask}; lower start, stride or n_frames")
    return _stack([_crop_resize(f, size) for f in frames], path)


def video_fps(path: str | os.PathLike) -> float | None:
    """Frame rate of a video or GIF; None for an image folder or when it is not recorded."""
    path = _existing(path)
    if path.is_dir():
        return None
    if path.suffix.lower() == ".gif":
        with _open_gif(path) as im:
            duration = im.info.get("duration") or 0
        return 1000.0 / duration if duration > 0 else None
    with _open_av(path) as container:
        stream = _video_stream(container, path)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        return float(rate) if rate else None


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise VideoError(f"{path} does not exist; check the path to the video")
    if path.is_file() and path.stat().st_size == 0:
        raise VideoError(f"{path} is empty; give a video file with frames in it")
    return path


def _pick(items: _Frames, start: int, stride: int,
          n_frames: int | None) -> tuple[list[np.ndarray], int, bool]:
    """Load the sampled items; stop once ``n_frames`` are taken.

    ``items`` yields one loader per frame and may end with ``_Damaged`` in place of a
    loader. Returns (frames, frames seen, whether the input was found damaged).
    """
    frames: list[np.ndarray] = []
    seen = 0
    iterator = iter(items)
    try:
        for item in iterator:
            if isinstance(item, _Damaged):
                return frames, seen, True
            index, seen = seen, seen + 1
            if index >= start and (index - start) % stride == 0:
                frames.append(item())
                if n_frames is not None and len(frames) == n_frames:
                    break
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()  # stops decoding and closes the file now, not at garbage collection
    return frames, seen, False


def _open_av(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path), mode="r")
    except (av.error.FFmpegError, OSError, ValueError) as err:
        raise VideoError(
            f"{path} is not a readable video ({_reason(err)}); give an mp4/mov/webm/mkv "
            "file, a .gif or a folder of images") from err


def _video_stream(container: av.container.InputContainer, path: Path) -> av.VideoStream:
    if not container.streams.video:
        raise VideoError(f"{path} has no video stream; give a file with video in it")
    return container.streams.video[0]


def _av_frames(path: Path) -> _Frames:
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise VideoError(
            f"{path}: unsupported file type {path.suffix!r}; give one of "
            f"{', '.join(VIDEO_SUFFIXES)}, .gif or a folder of images")
    with _open_av(path) as container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"
        declared = stream.frames  # from the container's index; 0 when not recorded
        frames = container.decode(stream)
        decoded = 0
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                break
            except av.error.EOFError:
                break
            except (av.error.FFmpegError, OSError):
                yield _Damaged()
                return
            decoded += 1
            yield partial(frame.to_ndarray, format="rgb24")
        # A truncated file can end cleanly; its index still declares the full length.
        # Allow a little slack: an edit list may drop a frame or two at the start.
        if declared > 0 and decoded + 2 < declared:
            yield _Damaged()


def _open_gif(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise VideoError(
            f"{path} is not a readable GIF ({_reason(err)}); give a valid .gif") from err


def _gif_frames(path: Path) -> _Frames:
    with _open_gif(path) as im:
        frames = ImageSequence.Iterator(im)
        while True:
            try:
                frame = next(frames)
                frame.load()
            except StopIteration:
                return
            except (OSError, ValueError, EOFError, IndexError):  # Pillow: IndexError on a cut-off file
                yield _Damaged()
                return
            yield partial(_rgb, frame)  # called before the next frame is decoded


def _rgb(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"))


def _natural_key(name: str) -> tuple:
    return tuple((0, int(p), p) if p.isdigit() else (1, 0, p.lower())
                 for p in re.split(r"(\d+)", name))


def _folder_frames(path: Path) -> _Frames:
    files = sorted((p for p in path.iterdir()
                    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                    and not p.name.startswith(".")),
                   key=lambda p: _natural_key(p.name))
    if not files:
        raise VideoError(
            f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
            "give a folder of frames or a video file")
    for file in files:
        yield partial(_load_image, file)


def _load_image(file: Path) -> np.ndarray:
    try:
        with Image.open(file) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise VideoError(
            f"{file} is not a readable image ({_reason(err)}); replace or remove it") from err


def _crop_resize(frame: np.ndarray, size: int | None) -> np.ndarray:
    """Centre-crop to a square, then bicubic resize to size x size (None: unchanged)."""
    if size is None:
        return frame
    h, w = frame.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = frame[top:top + side, left:left + side]
    if side == size:
        return np.ascontiguousarray(square)
    im = Image.fromarray(np.ascontiguousarray(square))
    return np.asarray(im.resize((size, size), Image.Resampling.BICUBIC))


def _stack(frames: list[np.ndarray], path: Path) -> np.ndarray:
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise VideoError(
            f"{path}: frames have different sizes {sorted(shapes)}; pass a size to resize them")
    return np.stack(frames).astype(np.uint8, copy=False)


def _reason(err: BaseException) -> str:
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return " ".join(str(text).split())


# --- comparing -------------------------------------------------------------------------

def frames_to_images(frames: np.ndarray) -> np.ndarray:
    """uint8 (f, h, w, 3) -> float32 (f, 3, h, w) in [-1, 1] (the VAE's range)."""
    return np.ascontiguousarray(frames.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(127.5) - 1


def images_to_frames(x: np.ndarray) -> np.ndarray:
    """float (f, 3, h, w) in [-1, 1] -> uint8 (f, h, w, 3)."""
    x = np.round((np.clip(x.astype(np.float32), -1, 1) + 1) * np.float32(127.5))
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB (peak 255) of frames ``a`` against ``b`` over the whole clip; ``inf`` when
    they are identical."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


# --- writing ---------------------------------------------------------------------------

def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 8.0,
                force: bool = False) -> Path:
    """Write uint8 (f, h, w, 3) frames to ``.mp4`` (H.264, yuv420p) or ``.gif``, atomically.

    Odd mp4 sizes are padded to even by repeating the last row/column. An existing
    ``path`` is only replaced with ``force``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WRITE_SUFFIXES:
        raise InputError(
            f"cannot write {path}: unknown extension {path.suffix!r}; use .mp4 or .gif")
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        kind = frames.dtype if isinstance(frames, np.ndarray) else type(frames).__name__
        raise InputError(f"frames must be a uint8 array, got {kind}; convert the frames to uint8 first")
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise InputError(
            f"frames must have shape (f, h, w, 3) with f, h, w > 0, got {frames.shape}")
    if (isinstance(fps, bool) or not isinstance(fps, (int, float))
            or not math.isfinite(fps) or fps <= 0):
        raise InputError(f"fps must be a positive number, got {fps!r}")
    writer = _write_mp4 if suffix == ".mp4" else _write_gif
    return write_file(path, lambda tmp: writer(tmp, frames, float(fps)), force=force)


def video_bytes(frames: np.ndarray, fmt: str = "mp4", fps: float = 8.0) -> bytes:
    """The bytes of an ``mp4`` or ``gif`` file of uint8 (f, h, w, 3) frames, made in memory
    by the writers ``write_video`` uses (nothing touches the disk)."""
    if fmt not in ("mp4", "gif"):
        raise InputError(f"unknown video format {fmt!r}; use mp4 or gif")
    sink = io.BytesIO()
    frames = np.ascontiguousarray(frames)
    (_write_mp4 if fmt == "mp4" else _write_gif)(sink, frames, float(fps))  # type: ignore[arg-type]
    return sink.getvalue()


def _mp4_codec() -> str:
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def _write_mp4(tmp: Path, frames: np.ndarray, fps: float) -> None:
    _f, h, w, _c = frames.shape
    pad = ((0, 0), (0, h % 2), (0, w % 2), (0, 0))
    if h % 2 or w % 2:
        frames = np.pad(frames, pad, mode="edge")
    codec = _mp4_codec()
    target = tmp if isinstance(tmp, io.BytesIO) else str(tmp)  # a path, or video_bytes's memory
    with av.open(target, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "17", "preset": "medium"}
        else:
            stream.bit_rate = max(2_000_000, 8 * frames.shape[1] * frames.shape[2])
            stream.codec_context.qmax = 4
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_gif(tmp: Path, frames: np.ndarray, fps: float) -> None:
    """An animated GIF with one frame per input frame, each with its own palette: FFmpeg's
    gif encoder fed by its palettegen/paletteuse filters (Pillow's and imageio's GIF writers
    merge identical consecutive frames)."""
    _f, h, w, _c = frames.shape
    rate = Fraction(fps).limit_denominator(1001)
    graph = av.filter.Graph()
    source = graph.add_buffer(width=w, height=h, format="rgb24", time_base=1 / rate)
    split, sink = graph.add("split"), graph.add("buffersink")
    palette, use = graph.add("palettegen", "stats_mode=single"), graph.add("paletteuse", "new=1")
    source.link_to(split)
    split.link_to(palette, 0, 0)
    split.link_to(use, 1, 0)
    palette.link_to(use, 0, 1)
    use.link_to(sink)
    graph.configure()
    target = tmp if isinstance(tmp, io.BytesIO) else str(tmp)  # a path, or video_bytes's memory
    with av.open(target, mode="w", format="gif") as container:
        stream = container.add_stream("gif", rate=rate)
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height, stream.pix_fmt = w, h, "pal8"

        def encode_ready() -> None:
            while True:
                try:
                    frame = sink.pull()
                except (av.BlockingIOError, av.EOFError):
                    return
                for packet in stream.encode(frame):
                    container.mux(packet)

        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts, frame.time_base = i, 1 / rate
            source.push(frame)
            encode_ready()
        source.push(None)
        encode_ready()
        for packet in stream.encode():
            container.mux(packet)
