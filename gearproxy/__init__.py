"""gearproxy: geard-style deploys whose container links are userspace TCP proxies."""

from __future__ import annotations

__version__ = "0.1.0"
