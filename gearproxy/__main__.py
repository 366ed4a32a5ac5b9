"""`python -m gearproxy` runs the CLI (the daemon spawns proxies this way)."""

from __future__ import annotations

from gearproxy.cli import main

if __name__ == "__main__":
    main()
