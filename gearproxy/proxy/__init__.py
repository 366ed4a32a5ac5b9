"""The link proxy: one uvloop process forwarding TCP from listeners to a target pool.

It knows nothing of Docker: listeners (on the host or inside other network
namespaces), a target pool, a control socket and counters.  `server.run` is
the entry point; `command.proxy_command` is `gearproxy proxy`.
"""

from __future__ import annotations
