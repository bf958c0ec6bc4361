"""``apla-eval VIDEO``: every available measure of a generated video, as a table and JSON.

    apla-eval out.mp4 --prompt "a jeep car is moving on the snow" \
        --source ../shared/data/car-turn.mp4 --clip models/clip-vit-large-patch14 --json eval.json

Without ``--clip`` the frames are embedded with the offline EfficientNet-Lite0 stand-in
(labelled as such, no CLIP score). User errors print ``error: <message>`` and exit 2.
"""

from __future__ import annotations

from pathlib import Path

import click

from apla_rt.folder.atomic import check_writable, write_text
from apla_rt.errors import AplaError, InputError, VideoError
from apla_rt.media.video import read_video

from .report import evaluate


def _load_embedder(clip: Path | None):
    """The CLIP embedder for ``--clip`` (errors are the user's), else the offline one."""
    from . import embedders

    if clip is not None:
        return embedders.ClipEmbedder(clip), None
    try:
        return embedders.OfflineEmbedder(), None
    except AplaError as err:
        return None, f"offline embedder unavailable ({err})"


def _read_source(path: Path, frames, start: int, stride: int):
    f, h, w, _ = frames.shape
    source = read_video(path, start=start, stride=stride, n_frames=f, size=h if h == w else None)
    if source.shape != frames.shape:
        raise InputError(f"source {path} gives frames of {source.shape[2]}x{source.shape[1]}, the video "
                         f"{w}x{h}; a non-square video needs a source of the same size")
    how = f"source read as {f} frames from frame {start}, stride {stride}"
    return source, how + (f", centre-cropped and resized to {w}x{h}" if h == w else "")


def run(video: Path, prompt: str | None, source: Path | None, source_start: int,
        source_stride: int, clip: Path | None, json_path: Path | None, force: bool) -> str:
    if json_path is not None:
        check_writable(json_path, force)
    frames = read_video(video)
    if len(frames) < 2:
        raise VideoError(f"{video} has {len(frames)} frame; evaluation needs at least 2")
    src, src_note = (None, "") if source is None else _read_source(source, frames, source_start, source_stride)
    embedder, embedder_error = _load_embedder(clip)
    report = evaluate(frames, embedder=embedder, embedder_error=embedder_error, prompt=prompt,
                      source=src, source_note=src_note)
    report.video["path"] = str(video)
    if source is not None:
        report.video["source"] = {"path": str(source), "start": source_start, "stride": source_stride,
                                  "sampling": src_note}
    if prompt:
        report.video["prompt"] = prompt
    if json_path is not None:
        write_text(json_path, report.to_json(), force=force)
    return report.table()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("video", type=click.Path(path_type=Path))
@click.option("--prompt", help="Prompt of the video, for the CLIP score.")
@click.option("--source", type=click.Path(path_type=Path),
              help="Source clip for PSNR/SSIM/LPIPS; read with the video's frame count and size.")
@click.option("--source-start", type=click.IntRange(min=0), default=0, show_default=True,
              help="First source frame (as sampled for training).")
@click.option("--source-stride", type=click.IntRange(min=1), default=1, show_default=True,
              help="Source frame stride (Tune-A-Video samples with stride 2).")
@click.option("--clip", "clip", type=click.Path(path_type=Path),
              help="Local CLIP folder (save_pretrained layout). Default: offline EfficientNet-Lite0, NOT CLIP.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the report as JSON.")
@click.option("--force", is_flag=True, help="Overwrite an existing --json file.")
@click.pass_context
def main(ctx: click.Context, video: Path, prompt: str | None, source: Path | None, source_start: int,
         source_stride: int, clip: Path | None, json_path: Path | None, force: bool) -> None:
    """Measure a generated VIDEO: frame consistency, CLIP score, warp error, motion, PSNR/SSIM."""
    try:
        table = run(video, prompt, source, source_start, source_stride, clip, json_path, force)
    except AplaError as err:
        click.echo(f"error: {err}", err=True)
        ctx.exit(err.exit_code)
    click.echo(table)
    if json_path is not None:
        click.echo(f"wrote {json_path}")
