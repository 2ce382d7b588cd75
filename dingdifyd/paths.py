"""Where things are: an instance's status socket (for the daemon that serves it and for `dingdifyd status` that
asks), its state directory by default, and the addresses an endpoint may listen on.

Under systemd the unit's `RuntimeDirectory=dingdifyd/%i` is `/run/dingdifyd/NAME/` (systemd passes it as
`$RUNTIME_DIRECTORY`, owned by the service account, group `dingdifyd`, removed when the instance stops), and
the socket is `status.sock` in it. Run by hand, it is `$XDG_RUNTIME_DIR/dingdifyd/NAME.status.sock`. The config
key `status_socket` overrides both (`off`: none). NAME is the config file's name without `.yaml`, as for
`dingdifyd@NAME` and /etc/dingdifyd/NAME.yaml.
"""

from __future__ import annotations

import contextlib
import os
import pwd
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RUNTIME_ROOT = "/run/dingdifyd"
CONFIG_DIR = "/etc/dingdifyd"
SOCKET_NAME = "status.sock"
OFF = "off"


def instance_name(config_path: str | os.PathLike[str]) -> str:
    name = Path(config_path).name
    for suffix in (".yaml", ".yml"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def served_status_socket(config_path: str, configured: str | None, environ: Mapping[str, str]) -> str | None:
    """The path the daemon binds, or None for no status socket."""
    if configured == OFF:
        return None
    if configured:
        return configured
    runtime_directory = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime_directory:
        return os.path.join(runtime_directory, SOCKET_NAME)
    if environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(environ["XDG_RUNTIME_DIR"], "dingdifyd", f"{instance_name(config_path)}.{SOCKET_NAME}")
    return None


def status_socket_candidates(
    config_path: str, configured: str | None, environ: Mapping[str, str], runtime_root: str = RUNTIME_ROOT
) -> list[str]:
    """Where `dingdifyd status` looks for an instance's socket, in order."""
    if configured == OFF:
        return []
    if configured:
        return [configured]
    name = instance_name(config_path)
    candidates = [os.path.join(runtime_root, name, SOCKET_NAME)]
    if environ.get("XDG_RUNTIME_DIR"):
        candidates.append(os.path.join(environ["XDG_RUNTIME_DIR"], "dingdifyd", f"{name}.{SOCKET_NAME}"))
    return candidates


def default_state_dir(environ: Mapping[str, str]) -> str:
    """`state_dir` when the file does not say: systemd's StateDirectory=, else the XDG state directory, else the
    account's own. Never a shared place such as /tmp. Raises ValueError when nothing says where."""
    if environ.get("STATE_DIRECTORY"):
        # systemd may pass several, colon-separated; the first is ours.
        return environ["STATE_DIRECTORY"].split(":")[0]
    if environ.get("XDG_STATE_HOME"):
        return os.path.join(environ["XDG_STATE_HOME"], "dingdifyd")
    # without HOME, the account's own home directory
    home = environ.get("HOME") or _account_home()
    if not home:
        raise ValueError("not set, and neither STATE_DIRECTORY, XDG_STATE_HOME nor HOME says where")
    return os.path.join(home, ".local/state", "dingdifyd")


def _account_home() -> str:
    with contextlib.suppress(KeyError):
        return pwd.getpwuid(os.geteuid()).pw_dir
    return ""


def parse_listen(value: str) -> tuple[str, Any]:
    """`HOST:PORT`, `[IPV6]:PORT` or `unix:/PATH` -> ("tcp", (host, port)) | ("unix", path). Raises ValueError."""
    text = value.strip()
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path.startswith("/"):
            raise ValueError("unix: needs an absolute path")
        return "unix", path
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError("expected HOST:PORT (e.g. 127.0.0.1:9464) or unix:/PATH")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{port_text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is not between 1 and 65535")
    return "tcp", (host, port)
