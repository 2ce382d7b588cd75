"""Where an instance's status socket is, for the daemon that serves it and for `dingdifyd status` that asks.

Under systemd the unit's `RuntimeDirectory=dingdifyd/%i` is `/run/dingdifyd/NAME/` (systemd passes it as
`$RUNTIME_DIRECTORY`, owned by the service account, group `dingdifyd`, removed when the instance stops), and
the socket is `status.sock` in it. Run by hand, it is `$XDG_RUNTIME_DIR/dingdifyd/NAME.status.sock`. The config
key `status_socket` overrides both (`off`: none). NAME is the config file's name without `.yaml`, as for
`dingdifyd@NAME` and /etc/dingdifyd/NAME.yaml.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

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
