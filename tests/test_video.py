"""Video IO on the real clips: sampling, crop/resize, gif/folder/mp4 round trips, errors.

The clips are ``shared/data``'s, else the repository's ``examples/man-skiing.mp4`` (conftest's
``clip_path``) in both roles: as itself, and, remuxed with its index first, in car-turn's.
Tests of a clip's exact frames go by what the file holds (``Clip``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import EXAMPLE, SHARED_DATA, clip_path
from PIL import Image

from apla_rt.media import video
from apla_rt.errors import InputError, OutputExistsError, VideoError
from apla_rt.media.video import read_video, video_fps, write_video

SKIING = "man-skiing.mp4"  # 91 frames, 718x718, 29.97 fps, AAC audio
CAR = "car-turn.mp4"       # 80 frames, 480x480, 10 fps, no audio, index (moov) first


@dataclass(frozen=True)
class Clip:
    """A test clip and what it holds."""

    path: Path
    frames: int
    side: int  # px, square
    fps: float


FACTS = {  # file -> (frames, side, fps)
    SHARED_DATA / SKIING: (91, 718, 30000 / 1001),
    SHARED_DATA / CAR: (80, 480, 10.0),
    EXAMPLE: (48, 128, 30000 / 1001),  # the first 48 frames of man-skiing, 128 px, no audio
}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def bicubic(frame: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(frame).resize((size, size), Image.Resampling.BICUBIC))


def index_first(src: Path, dst: Path) -> Path:
    """``src`` remuxed (same packets, so the same frames) with its index before the media."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    return dst


def index_comes_first(path: Path) -> bool:
    data = path.read_bytes()
    return data.find(b"moov") < data.find(b"mdat")


def decoded_by_pyav(path: Path) -> np.ndarray:
    """Every frame, decoded by PyAV directly: a reference independent of ``read_video``."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def skiing_clip() -> Clip:
    path = clip_path(SKIING)
    return Clip(path, *FACTS[path])


@pytest.fixture(scope="module")
def car_clip(tmp_path_factory) -> Clip:
    """car-turn.mp4, else the example clip remuxed with its index first, as car-turn has it."""
    path = clip_path(CAR)
    facts = FACTS[path]
    if path == EXAMPLE:
        path = index_first(path, tmp_path_factory.mktemp("car") / "example-index-first.mp4")
    return Clip(path, *facts)


@pytest.fixture(scope="module")
def skiing(skiing_clip) -> np.ndarray:
    return read_video(skiing_clip.path)


@pytest.fixture(scope="module")
def car(car_clip) -> np.ndarray:
    return read_video(car_clip.path)


@pytest.fixture(scope="module")
def skiing_by_pyav(skiing_clip) -> np.ndarray:
    return decoded_by_pyav(skiing_clip.path)


@pytest.fixture(scope="module")
def small(car) -> np.ndarray:
    """16 frames of car-turn at 64x64: the round-trip payload."""
    return np.stack([bicubic(f, 64) for f in car[:32:2]])


# --- reading ---------------------------------------------------------------------------

def test_full_decode(skiing, car, skiing_clip, car_clip, skiing_by_pyav):
    for clip, frames in ((skiing_clip, skiing), (car_clip, car)):
        assert frames.shape == (clip.frames, clip.side, clip.side, 3) and frames.dtype == np.uint8
        assert video_fps(clip.path) == pytest.approx(clip.fps)
    np.testing.assert_array_equal(skiing, skiing_by_pyav)
    np.testing.assert_array_equal(car, decoded_by_pyav(car_clip.path))


# (start, stride, n_frames) for a clip of n frames; on the full man-skiing (91) these are
# (0, 1, 8), (0, 2, 24), (5, 3, 10), (90, 1, 1), (0, 7, None), (60, 10, None), (0, 45, 3)
PICKS = {
    "first 8": lambda n: (0, 1, 8),
    "every 2nd": lambda n: (0, 2, 24),
    "from 5 every 3rd": lambda n: (5, 3, 10),
    "the last": lambda n: (n - 1, 1, 1),
    "every 7th to the end": lambda n: (0, 7, None),
    "late start to the end": lambda n: (2 * n // 3, 10, None),
    "three far apart": lambda n: (0, (n - 1) // 2, 3),
}


@pytest.mark.parametrize("pick", PICKS.values(), ids=PICKS.keys())
def test_stride_sampling_picks_the_right_frames(skiing_clip, skiing_by_pyav, pick):
    start, stride, n_frames = pick(skiing_clip.frames)
    got = read_video(skiing_clip.path, start=start, stride=stride, n_frames=n_frames)
    want = skiing_by_pyav[start::stride][:n_frames]
    assert len(want) == (n_frames or len(want)) and len(want) >= 1
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_resize_is_bicubic_of_the_sampled_frames(car, car_clip):
    got = read_video(car_clip.path, start=1, stride=4, n_frames=6, size=64)
    assert got.shape == (6, 64, 64, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.stack([bicubic(f, 64) for f in car[1::4][:6]]))
    same = read_video(car_clip.path, n_frames=2, size=car_clip.side)
    np.testing.assert_array_equal(same, car[:2])


def audio_first(src: Path, dst: Path) -> None:
    """``src``'s video behind an audio stream: its own audio track, remuxed, or (the example
    clip has none) a second of encoded silence."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        own = inp.streams.audio[:1]
        audio = out.add_stream_from_template(own[0]) if own else out.add_stream("aac", rate=48000, layout="mono")
        vid = out.add_stream_from_template(inp.streams.video[0])
        if not own:
            for i in range(48):
                silence = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
                silence.sample_rate, silence.pts = 48000, i * 1024
                for packet in audio.encode(silence):
                    out.mux(packet)
            for packet in audio.encode(None):
                out.mux(packet)
        streams = {inp.streams.video[0].index: vid, **{a.index: audio for a in own}}
        for packet in inp.demux([inp.streams.video[0], *own]):
            if packet.dts is None:
                continue
            packet.stream = streams[packet.stream.index]
            out.mux(packet)


def test_video_stream_is_found_behind_an_audio_stream(skiing, skiing_clip, tmp_path):
    """Remux man-skiing with an audio track first; the video must still be read."""
    out_path = tmp_path / "audio-first.mkv"
    audio_first(skiing_clip.path, out_path)
    with av.open(str(out_path)) as check:
        assert check.streams[0].type == "audio"
    np.testing.assert_array_equal(read_video(out_path, stride=3, n_frames=5), skiing[::3][:5])
    assert video_fps(out_path) == pytest.approx(skiing_clip.fps)


def test_folder_is_sorted_naturally_and_cropped(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (12, 24, 40, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        suffix = ".png" if i % 2 else ".bmp"  # lossless formats so the check is exact
        Image.fromarray(frame).save(tmp_path / f"frame{i}{suffix}")
    (tmp_path / "notes.txt").write_text("not a frame")
    np.testing.assert_array_equal(read_video(tmp_path), frames)  # frame2 < frame10
    np.testing.assert_array_equal(read_video(tmp_path, start=2, stride=5), frames[2::5])
    cropped = read_video(tmp_path, n_frames=3, size=24)
    np.testing.assert_array_equal(cropped, frames[:3, :, 8:32])
    assert read_video(tmp_path, n_frames=3, size=12).shape == (3, 12, 12, 3)
    assert video_fps(tmp_path) is None


# --- round trips -----------------------------------------------------------------------

def test_gif_round_trip(small, tmp_path):
    path = write_video(tmp_path / "clip.gif", small, fps=8.0)
    back = read_video(path)
    assert back.shape == small.shape and back.dtype == np.uint8
    assert psnr(back, small) > 25
    assert video_fps(path) == pytest.approx(8.0, rel=0.1)  # GIF delays are in 10 ms units
    np.testing.assert_array_equal(read_video(path, start=1, stride=3), back[1::3])


def test_gif_keeps_identical_frames_and_decodes_in_ffmpeg(small, tmp_path):
    still = np.concatenate([small[:1]] * 3 + [small[1:3]] + [small[2:3]] * 2)  # repeats
    path = write_video(tmp_path / "still.gif", still, fps=5.0)
    back = read_video(path)
    assert back.shape == still.shape
    assert psnr(back, still) > 25
    with av.open(str(path)) as container:  # an independent decoder agrees
        ffmpeg = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    np.testing.assert_array_equal(ffmpeg, back)


def test_decoding_stops_at_the_last_needed_frame(skiing_clip, monkeypatch):
    seen = []
    original = video._av_frames

    def counting(path):
        for item in original(path):
            seen.append(item)
            yield item

    monkeypatch.setattr(video, "_av_frames", counting)
    read_video(skiing_clip.path, start=4, stride=3, n_frames=5)
    assert len(seen) == 4 + 3 * 4 + 1


def test_mp4_round_trip(small, tmp_path):
    path = write_video(tmp_path / "clip.mp4", small, fps=10.0)
    back = read_video(path)
    assert back.shape == small.shape
    assert psnr(back, small) > 30
    assert video_fps(path) == pytest.approx(10.0)


def test_mp4_odd_size_is_padded_to_even(small, tmp_path):
    odd = np.ascontiguousarray(small[:4, :63, :61])
    back = read_video(write_video(tmp_path / "odd.mp4", odd))
    assert back.shape == (4, 64, 62, 3)
    assert psnr(back[:, :63, :61], odd) > 30


def test_mp4_mpeg4_fallback(small, tmp_path, monkeypatch):
    monkeypatch.setattr(video, "_mp4_codec", lambda: "mpeg4")
    back = read_video(write_video(tmp_path / "fallback.mp4", small))
    assert psnr(back, small) > 30


# --- read errors -----------------------------------------------------------------------

def truncated(src: Path, dst: Path, n_bytes: int) -> Path:
    dst.write_bytes(src.read_bytes()[:n_bytes])
    return dst


def test_missing_and_empty(tmp_path):
    with pytest.raises(VideoError, match="does not exist"):
        read_video(tmp_path / "nope.mp4")
    with pytest.raises(VideoError, match="does not exist"):
        video_fps(tmp_path / "nope.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match="empty"):
        read_video(tmp_path / "empty.mp4")


@pytest.mark.parametrize("name", ["text.mp4", "text.gif", "text.mkv"])
def test_not_a_video(tmp_path, name):
    (tmp_path / name).write_text("this is not a video\n" * 20)
    with pytest.raises(VideoError, match="not a readable"):
        read_video(tmp_path / name)


def test_unsupported_extension(tmp_path):
    (tmp_path / "clip.txt").write_text("hello")
    with pytest.raises(VideoError, match="unsupported file type"):
        read_video(tmp_path / "clip.txt")


@pytest.mark.parametrize("clip", ["skiing_clip", "car_clip"])
def test_truncated_to_2kb(request, tmp_path, clip):
    src = request.getfixturevalue(clip).path
    path = truncated(src, tmp_path / src.name, 2048)
    with pytest.raises(VideoError):
        read_video(path, n_frames=8)


def test_truncated_to_half_moov_at_end(skiing_clip, tmp_path):
    """man-skiing keeps its index at the end: half the file is unreadable."""
    src = skiing_clip.path
    assert not index_comes_first(src)
    path = truncated(src, tmp_path / SKIING, src.stat().st_size // 2)
    with pytest.raises(VideoError):
        read_video(path, n_frames=8)


def test_truncated_to_half_moov_at_start(car, car_clip, tmp_path):
    """car-turn keeps its index first: half the file decodes its first frames."""
    src = car_clip.path
    assert index_comes_first(src)
    path = truncated(src, tmp_path / CAR, src.stat().st_size // 2)
    np.testing.assert_array_equal(read_video(path, n_frames=8), car[:8])  # enough frames
    with pytest.raises(VideoError, match="truncated"):
        read_video(path)  # "all frames" of a damaged file
    with pytest.raises(VideoError, match="truncated"):
        read_video(path, n_frames=car_clip.frames - 10)  # 70 of car-turn's 80


def test_folder_without_images(tmp_path):
    (tmp_path / "readme.txt").write_text("no frames here")
    with pytest.raises(VideoError, match="no images"):
        read_video(tmp_path)


def test_too_few_frames_says_how_many(skiing_clip, car_clip, tmp_path, small):
    n = skiing_clip.frames  # start n - 44, 24 frames 2 apart: frame n + 2 is the last needed
    with pytest.raises(VideoError, match=rf"has {n} frames .*n_frames=24 need {n + 3}"):
        read_video(skiing_clip.path, start=n - 44, stride=2, n_frames=24)
    with pytest.raises(VideoError, match=rf"has {car_clip.frames} frames .*start={car_clip.frames}"):
        read_video(car_clip.path, start=car_clip.frames)
    gif = write_video(tmp_path / "short.gif", small[:4])
    with pytest.raises(VideoError, match="has 4 frames"):
        read_video(gif, n_frames=5)


@pytest.mark.parametrize("kwargs", [
    {"start": -1}, {"stride": 0}, {"stride": -2}, {"n_frames": 0}, {"n_frames": -3},
    {"size": 0}, {"size": -64}, {"start": 1.5}, {"n_frames": True}, {"size": "64"},
])
def test_invalid_arguments(car_clip, kwargs):
    with pytest.raises(InputError) as info:
        read_video(car_clip.path, **kwargs)
    assert not isinstance(info.value, VideoError)


# --- write errors and atomicity --------------------------------------------------------

@pytest.mark.parametrize("frames, fps, name", [
    (np.zeros((2, 8, 8, 3), np.float32), 8.0, "a.mp4"),
    (np.zeros((8, 8, 3), np.uint8), 8.0, "a.mp4"),
    (np.zeros((2, 8, 8, 4), np.uint8), 8.0, "a.gif"),
    (np.zeros((0, 8, 8, 3), np.uint8), 8.0, "a.gif"),
    ([[0]], 8.0, "a.mp4"),
    (np.zeros((2, 8, 8, 3), np.uint8), 0.0, "a.mp4"),
    (np.zeros((2, 8, 8, 3), np.uint8), 8.0, "a.avi"),
    (np.zeros((2, 8, 8, 3), np.uint8), 8.0, "a"),
])
def test_write_rejects_bad_input(tmp_path, frames, fps, name):
    with pytest.raises(InputError):
        write_video(tmp_path / name, frames, fps=fps)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["clip.mp4", "clip.gif"])
def test_existing_output_needs_force(small, tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError):
        write_video(path, small)
    assert path.read_bytes() == b"keep me"
    write_video(path, small, force=True)
    assert read_video(path).shape == small.shape
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_failed_write_leaves_nothing_behind(small, tmp_path, monkeypatch):
    def broken(tmp: Path, frames: np.ndarray, fps: float) -> None:
        tmp.write_bytes(b"half a video")
        raise RuntimeError("encoder crashed")

    monkeypatch.setattr(video, "_write_mp4", broken)
    path = tmp_path / "clip.mp4"
    with pytest.raises(RuntimeError):
        write_video(path, small)
    assert list(tmp_path.iterdir()) == []
    path.write_bytes(b"old video")
    with pytest.raises(RuntimeError):
        write_video(path, small, force=True)
    assert path.read_bytes() == b"old video"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


@pytest.mark.parametrize("fmt", ["mp4", "gif"])
def test_video_bytes_decode_to_every_frame(fmt):
    """The server's in-memory encoder gives a file whose every frame decodes, for both formats."""
    import io

    import av

    from apla_rt.media.video import video_bytes

    frames = np.random.default_rng(0).integers(0, 256, (5, 32, 48, 3), dtype=np.uint8)
    data = video_bytes(frames, fmt, fps=8)
    with av.open(io.BytesIO(data)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 5 and decoded[0].shape == (32, 48, 3)
