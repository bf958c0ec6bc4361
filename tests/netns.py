"""A network namespace of its own for the tests that start Ray (loopback is all it has).

Ray's processes listen on all interfaces and reach each other over the machine's network
address even when told 127.0.0.1. Inside a fresh network namespace (``unshare --net``, then
``ip link set lo up``) loopback is the only interface, so every connection stays on 127.0.0.1.
Creating one needs root (as CI runs); where the machine does not allow it, ``isolated``
returns the command unchanged and ``netns_status`` says why.

``unshare`` and ``sh -c 'exec ...'`` replace themselves with the command, so the pid of the
started process is the command's own: a test still stops what it started by its id.
"""

from __future__ import annotations

import functools
import shutil
import subprocess


@functools.lru_cache(maxsize=None)
def netns_status() -> tuple[bool, str]:
    """(whether a network namespace of its own can be made here, why or why not)."""
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare is None or ip is None:
        return False, "unshare or ip (util-linux, iproute2) is not installed"
    try:
        probe = subprocess.run([unshare, "--net", "--", ip, "link", "set", "lo", "up"],
                               capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return False, f"unshare --net failed: {err}"
    if probe.returncode != 0:
        return False, "unshare --net failed: " + probe.stderr.decode(errors="replace").strip()[:200]
    return True, "a network namespace of its own (loopback only)"


def isolated(cmd: list[str]) -> list[str]:
    """``cmd`` made to run in a network namespace of its own, where the machine allows it."""
    if not netns_status()[0]:
        return list(cmd)
    ip = shutil.which("ip")
    return ["unshare", "--net", "--", "sh", "-c", f'"{ip}" link set lo up && exec "$@"', "sh", *cmd]
