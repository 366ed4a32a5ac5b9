"""Where gearproxy keeps its state, decided once per process."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir(environ: dict[str, str] | None = None, *, uid: int | None = None) -> Path:
    """The state directory.

    `$GEARPROXY_STATE_DIR` when set; `/var/lib/gearproxy` for root; otherwise
    `$XDG_STATE_HOME/gearproxy` (default `~/.local/state/gearproxy`), so a
    rootless user's state never needs privileges.
    """
    env = os.environ if environ is None else environ
    explicit = env.get("GEARPROXY_STATE_DIR")
    if explicit:
        return Path(explicit)
    if (os.geteuid() if uid is None else uid) == 0:
        return Path("/var/lib/gearproxy")
    xdg = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME", str(Path.home()))) / ".local/state")
    return Path(xdg) / "gearproxy"
