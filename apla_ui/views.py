"""How the page shows jobs, models and results: plain functions from records to HTML,
Markdown and table rows (no Gradio here)."""

from __future__ import annotations

import html
from datetime import datetime
from typing import Any

from .jobs import ACTIVE, RUNNING, Job


def error(message: str) -> str:
    return f"**Error:** {message}"


def progress_html(progress: dict[str, Any] | None, waiting: list[Job]) -> str:
    """The Train tab's panel: the running (else latest) job and the queue behind it."""
    if progress is None:
        body = "<p>No job yet: start a training above.</p>"
    else:
        bar = ""
        if progress["total"]:
            done = progress["total"] if progress["state"] in ("exporting", "done") else progress["step"]
            bar = f'<progress value="{done}" max="{progress["total"]}"></progress> '
        body = (f'<p><b>Job {progress["id"]} &middot; {html.escape(progress["name"])}</b> '
                f'<span class="job-state">[{progress["state"]}]</span></p>'
                f'<p>{bar}<span class="job-line">{html.escape(progress["line"])}</span></p>')
    if waiting:
        names = ", ".join(f"{j.id} ({html.escape(j.name)})" for j in waiting)
        body += f"<p>Waiting in the queue: {names}</p>"
    return f'<div class="apla-progress">{body}</div>'


JOB_COLUMNS = ["job", "kind", "name", "state", "progress", "created", "folders"]


def job_rows(jobs: list[Job], progress: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    for job in reversed(jobs):
        p = progress.get(job.id)
        line = p["line"] if p else job.message
        folders = " -> ".join(f for f in (job.run, job.engine) if f)
        rows.append([job.id, job.kind, job.name, job.state, line, _when(job.created), folders])
    return rows


def _when(t: float | None) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else ""


def job_choices(jobs: list[Job]) -> list[tuple[str, str]]:
    return [(f"{j.id} {j.name} ({j.kind})", j.id) for j in reversed(jobs)]


def showing(jobs: list[Job]) -> Job | None:
    """The job the Train tab follows: the running one, else the newest."""
    running = [j for j in jobs if j.state in RUNNING]
    return running[0] if running else (jobs[-1] if jobs else None)


def waiting(jobs: list[Job]) -> list[Job]:
    return sorted((j for j in jobs if j.state == "queued"), key=lambda j: (j.queued_at, j.id))


def is_active(job: Job) -> bool:
    return job.state in ACTIVE


def model_info(summary: dict[str, Any], name: str) -> str:
    """What ``apla-rt info`` says about an engine folder, as Markdown."""
    frames = summary.get("frames") or {}
    size = summary.get("image_size")
    rows = [
        ("training prompt", summary.get("prompt")),
        ("frames", f"{frames.get('opt')} (takes {frames.get('min')}-{frames.get('max')})"),
        ("image size", f"{size} x {size} px" if size else None),
        ("fps", summary.get("fps")),
        ("start latent", "the inverted training clip " + str(summary.get("start_latent"))
         + f" at t={summary.get('start_timestep')}" if summary.get("start_latent") else "none (noise)"),
        ("defaults", f"{summary.get('scheduler')}, {summary.get('steps')} steps, guidance {summary.get('guidance')}"),
        ("VGT", ("on" if summary.get("vgt") else "off")
         + (" (reads the source latent)" if summary.get("vgt_reads_source") else "")),
        ("backend", summary.get("backend")),
        ("precision", summary.get("precision")),
        ("videos per batch", summary.get("max_batch")),
        ("networks", ", ".join(summary.get("networks") or {})),
    ]
    lines = [f"**engines/{html.escape(name)}**", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {html.escape(str(v))} |" for k, v in rows if v is not None]
    return "\n".join(lines)


def settings_line(record: dict[str, Any]) -> str:
    """A generation's sampling settings in one line."""
    s = record.get("settings") or {}
    v = (record.get("videos") or [{}])[0]
    parts = [f"{v.get('scheduler', s.get('scheduler'))}", f"{v.get('steps', s.get('steps'))} steps",
             f"guidance {v.get('guidance', s.get('guidance'))}"]
    if s.get("guidance_interval"):
        parts.append("guided in {}:{}".format(*s["guidance_interval"]))
    if (s.get("cache_interval") or 1) > 1:
        parts.append(f"cache interval {s['cache_interval']} ({s.get('cache_schedule')})")
    if s.get("from_noise"):
        parts.append("from noise")
    if s.get("negative_prompt"):
        parts.append(f"negative: {s['negative_prompt']!r}")
    opened = record.get("open") or {}
    if not opened.get("use_vgt", True):
        parts.append("no VGT")
    parts.append(f"{record.get('backend')}, {record.get('precision')}")
    return ", ".join(str(p) for p in parts)


def result_header(record: dict[str, Any]) -> str:
    n = len(record.get("videos") or [])
    return (f"**{html.escape(record.get('id', ''))}** ({record.get('created', '')}): {n} video"
            f"{'s' if n != 1 else ''} in {record.get('seconds', 0):.1f} s; "
            f"{html.escape(settings_line(record))}")


def video_caption(video: dict[str, Any]) -> str:
    return (f"{html.escape(video.get('prompt', ''))} (seed {video.get('seed')}): "
            f"{video.get('frames')} frames, {video.get('width')}x{video.get('height')}, "
            f"{video.get('duration_s')} s")
