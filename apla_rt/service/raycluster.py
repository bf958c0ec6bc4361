"""Connecting ``apla-rt`` to Ray: join a running cluster or start a local instance, and leave it.

One entry point, ``connect(address)``, used by ``apla-rt serve`` (and any other command that
runs on Ray):

* **Where**: ``address`` (``--address HOST:PORT`` or ``auto``), else ``RAY_ADDRESS``, else a
  local instance that this process starts and later stops (``RayConnection.started``).
* **Token authentication**, as Ray documents it: a cluster started by ``ray start --head``
  requires a token when one exists on the head (``~/.ray/auth_token``) or ``RAY_AUTH_MODE=token``
  is set there, but a client sends its token only with ``RAY_AUTH_MODE=token``. So when joining,
  if ``RAY_AUTH_MODE`` is unset and a token is available here (``RAY_AUTH_TOKEN``, the file
  ``RAY_AUTH_TOKEN_PATH`` names, or ``~/.ray/auth_token``), token mode is turned on for this
  process; ``RAY_AUTH_MODE=disabled`` set by the user is respected. A missing or refused token
  is one ``AplaError`` line naming the variable to set.
* **Loopback**: a local instance gets node address 127.0.0.1, no dashboard, and Ray's default
  token authentication (on unless the user set ``RAY_AUTH_MODE=disabled``). Ray's own
  processes still listen on all interfaces: docs/serving.md says how to firewall them.

Leaving: ``disconnect``; for a local instance at the end of a long-running command,
``stop_local`` bounds every step and ends Ray's processes that are left by pid (also when a
signal to the whole process group has already ended some of them).

Ray (and psutil) are imported only inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from ..errors import AplaError

AUTH_MODE, AUTH_TOKEN, AUTH_TOKEN_PATH = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
LOCAL_NODE_IP = "127.0.0.1"
_REFUSED = ("authentication token is missing or incorrect", "invalidauthtoken",
            "token is invalid or incorrect", "unauthenticated")


@dataclass(frozen=True)
class RayConnection:
    """The Ray instance this process is connected to."""

    address: str | None  # the cluster joined (as given); None for a local instance
    started: bool  # this process started the instance, so it stops it (``disconnect``)
    token_source: str | None  # where the token sent comes from (a variable or a file), if any


def resolve_address(address: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """``address``, else ``RAY_ADDRESS``, else None (a local instance). Blank means unset."""
    env = os.environ if environ is None else environ
    chosen = (address or "").strip() or (env.get("RAY_ADDRESS") or "").strip()
    if not chosen:
        return None
    if chosen != "auto" and not chosen.startswith("ray://"):
        host, sep, port = chosen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise AplaError(f"the Ray address must be HOST:PORT or auto, got {chosen!r}")
    return chosen


def token_source(environ: Mapping[str, str] | None = None) -> str | None:
    """Which of Ray's token sources holds a token here, in Ray's order of precedence:
    ``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` names, ``~/.ray/auth_token``."""
    env = os.environ if environ is None else environ
    if (env.get(AUTH_TOKEN) or "").strip():
        return AUTH_TOKEN
    named = env.get(AUTH_TOKEN_PATH)
    if named:
        path = Path(named).expanduser()
        return f"{AUTH_TOKEN_PATH}={path}" if _has_text(path) else None
    default = Path(env.get("HOME") or Path.home()) / ".ray" / "auth_token"
    return "~/.ray/auth_token" if _has_text(default) else None


def _has_text(path: Path) -> bool:
    try:
        return bool(path.read_text().strip())
    except OSError:
        return False


def _auth_help(address: str, source: str | None) -> str:
    fix = (f"set {AUTH_TOKEN} (or {AUTH_TOKEN_PATH}, or ~/.ray/auth_token) to the cluster's token "
           f"(`ray get-auth-token` on the head) and {AUTH_MODE}=token")
    if source is None:
        return f"the Ray cluster at {address} requires an authentication token and none was found; {fix}"
    return f"the Ray cluster at {address} refused the authentication token from {source}; {fix}"


def _is_auth_error(err: BaseException) -> bool:
    try:
        from ray.exceptions import AuthenticationError
    except ImportError:  # a Ray before token authentication (2.52)
        AuthenticationError = ()  # type: ignore[assignment,misc]
    if isinstance(err, AuthenticationError):
        return True
    text = str(err).lower()
    return any(marker in text for marker in _REFUSED)


def connect(address: str | None = None, *, num_cpus: int | None = None,
            logging_level: int = logging.WARNING) -> RayConnection:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), or start a local instance.

    Raises ``AplaError`` (one line) when the address is malformed, the cluster cannot be
    reached, or it refuses this process's token (naming the variable to set). ``num_cpus``
    applies to a local instance only."""
    import ray

    target = resolve_address(address)
    if target is None:
        ray.init(address="local", _node_ip_address=LOCAL_NODE_IP, include_dashboard=False,
                 num_cpus=num_cpus, logging_level=logging_level, log_to_driver=False)
        return RayConnection(None, True, token_source())
    mode = os.environ.get(AUTH_MODE)
    source = token_source() if (mode or "token").lower() == "token" else None
    if mode is None and source is not None:
        os.environ[AUTH_MODE] = "token"  # Ray sends a token only in token mode
        _refresh_ray_config()
    with _captured_stderr() as said:
        try:
            ray.init(address=target, logging_level=logging_level, log_to_driver=False)
            failure: Exception | None = None
        except Exception as err:  # Ray raises ConnectionError, RuntimeError or its own types
            failure = err
        logged = said()
    if failure is not None:
        if ray.is_initialized():
            ray.shutdown()
        if _is_auth_error(failure) or any(marker in logged.lower() for marker in _REFUSED):
            raise AplaError(_auth_help(target, source)) from None
        first = " ".join(str(failure).split())[:300]
        raise AplaError(f"cannot join the Ray cluster at {target} ({type(failure).__name__}: {first}); "
                        "start it (ray start --head) or leave out --address and RAY_ADDRESS "
                        "for a local instance") from None
    return RayConnection(target, False, source)


@contextlib.contextmanager
def _captured_stderr() -> Iterator[Callable[[], str]]:
    """Ray's C++ core logs every failed attempt to reach the cluster on file descriptor 2;
    hold those lines while joining (a failure becomes one line of ours) and give their text."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield lambda: (held.seek(0), held.read().decode(errors="replace"))[1]
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _refresh_ray_config() -> None:
    """Make an already-imported Ray re-read ``RAY_AUTH_MODE`` (its config is cached)."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]
    except ImportError:  # an older Ray without token authentication
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def disconnect(connection: RayConnection) -> None:
    """Leave the cluster; a local instance this process started is stopped with it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


# --------------------------------------------------------------------------- stopping


STOP_SECONDS = 12.0  # the most a stop takes before what is left of a local instance is killed


def stop_local(connection: RayConnection, watched: list[Any], stop_apps: Callable[[], Any],
               deadline: float, log: Callable[[str], None]) -> None:
    """Stop what runs on the local instance this process started (``stop_apps``, e.g. Serve's
    shutdown), then the instance, each step bounded by the monotonic ``deadline``, and end by pid
    whatever of its processes is left.

    A signal to the whole process group (systemd's default) also reaches Ray's own processes:
    once the raylet is gone Ray's calls wait on it forever. So when one of ``watched`` (this
    process's descendants while it ran, ``descendants``) has ended, or a step does not finish in
    time, the steps are skipped or abandoned, the processes left are ended and this process exits
    at once (Ray's exit hook would wait on the raylet too)."""
    time.sleep(0.5)  # a signal to the whole group has ended some of Ray's processes by now
    family = descendants()
    clean = (_all_running(watched) and bounded(stop_apps, deadline - 6.0)
             and bounded(lambda: disconnect(connection), deadline - 4.0))
    _end(family + descendants())
    if not clean:
        exit_now(log)


def exit_now(log: Callable[[str], None]) -> None:
    """Exit this process at once (no exit hooks: Ray's would wait on a raylet already gone)."""
    log("stopped (Ray's processes were already ending)")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def bounded(step: Callable[[], Any], until: float) -> bool:
    """Run ``step`` on a daemon thread; whether it finished before the monotonic ``until``."""
    done = threading.Event()

    def run() -> None:
        try:
            step()
        except Exception:  # a cluster half gone: the rest of the stop still runs
            pass
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    return done.wait(max(0.0, until - time.monotonic()))


def descendants() -> list[Any]:
    """This process's descendants (psutil processes: on a local instance, Ray's); [] without
    psutil."""
    try:
        import psutil
    except ImportError:
        return []
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _all_running(processes: list[Any]) -> bool:
    """Whether every one of ``processes`` is still running (none ended, none a zombie)."""
    try:
        import psutil
    except ImportError:
        return True
    try:
        return all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes)
    except psutil.Error:
        return False


def _end(processes: list[Any], grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds, to those of ``processes`` still running."""
    if not processes:
        return
    import psutil

    for p in processes:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace)
