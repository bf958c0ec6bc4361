"""``apla-ui [--workspace DIR] [--host 127.0.0.1] [--port N] [--auth USER:PASSWORD]``: the
Gradio app, on the loopback interface unless told otherwise, never through a public share
link. Listening anywhere else needs ``--auth``: the page starts training jobs and writes
files, so it is not left open to a network."""

from __future__ import annotations

import ipaddress
import os
import signal
import threading
from pathlib import Path

import click

from apla_rt.errors import AplaError, reported_to_user

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_auth(auth: str | None, host: str) -> tuple[str, str] | None:
    """``USER:PASSWORD`` -> (user, password); refuses a non-loopback ``host`` without it."""
    if auth is None:
        if not is_loopback(host):
            raise AplaError(f"--host {host} would open the page beyond this machine: give "
                            "--auth USER:PASSWORD too (or keep --host 127.0.0.1)")
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise AplaError("--auth must be USER:PASSWORD, both non-empty")
    return user, password


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--workspace", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="Folder of runs/, engines/, videos/ and jobs/ (created if missing).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on; anything but loopback needs --auth.")
@click.option("--port", type=click.IntRange(1, 65535), default=7860, show_default=True)
@click.option("--auth", metavar="USER:PASSWORD", help="Require this login (needed with a non-loopback --host).")
@click.option("--max-upload-mb", type=click.FloatRange(0, min_open=True), default=200.0, show_default=True,
              help="Largest training clip the page takes.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="CPU threads for generating (default: ONNX Runtime's choice).")
@click.option("--quiet", is_flag=True, help="No startup lines.")
def main(workspace: Path, host: str, port: int, auth: str | None, max_upload_mb: float,
         threads: int | None, quiet: bool) -> None:
    """The one-shot loop in a browser: upload a clip, train, export, generate, compare."""
    with reported_to_user("apla-ui stopped; running jobs go on and the next apla-ui takes them up"):
        login = parse_auth(auth, host)
        serve(workspace, host, port, login, int(max_upload_mb * 2**20), threads, quiet)


def serve(workspace: Path, host: str, port: int, login: tuple[str, str] | None, max_upload: int,
          threads: int | None, quiet: bool) -> None:
    # Hub ids are resolved in the local cache only (as `apla-train` does with HF_HUB_OFFLINE=1):
    # a form in a page never starts a multi-GB download. The job processes inherit it.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio  # noqa: F401
    except ImportError as err:
        raise AplaError('apla-ui needs Gradio: pip install -e ".[ui]"') from err
    from .app import App, build, launch_options
    from .generate import Pipelines
    from .jobs import JobQueue
    from .workspace import Workspace

    ws = Workspace(workspace)
    ws.lock()
    queue = JobQueue(ws)
    queue.start()
    pipes = Pipelines(ws, threads)
    app = App(ws, queue, pipes, max_upload)
    app.warm_up()
    demo = build(app)
    demo.queue(default_concurrency_limit=4)
    allowed = [str(ws.root)] + [str(p.parent) for p in ws.examples()[:1]]
    try:
        demo.launch(server_name=host, server_port=port, share=False, auth=login, inbrowser=False,
                    prevent_thread_lock=True, quiet=True, show_error=False, ssr_mode=False,
                    allowed_paths=allowed, max_file_size=max(4 * max_upload, max_upload + 2**26),
                    footer_links=[], **launch_options())
    except OSError as err:
        raise AplaError(f"cannot listen on {host}:{port}: {err}") from err
    if not quiet:
        click.echo(f"apla-ui: workspace {ws.root}")
        click.echo(f"apla-ui: http://{host}:{port} (Ctrl-C stops; running jobs go on)", err=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        queue.stop()
        demo.close()
        pipes.close()


if __name__ == "__main__":
    main()
