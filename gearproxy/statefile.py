"""The geard state file: the resolved deployment, written so it can be read back as input.

geard saved a deployment after each run as the descriptor plus the instances
it made (`Containers`, `IdPrefix`, `Instances`).  gearproxy writes the same
shape, so a geard user recognises it and either tool's file can be deployed
again with `gearproxy deploy`: `spec.parse` accepts it, and the planner reuses
the recorded instance ids, hosts and host ports (`External`) when it finds no
current state, so a saved deployment comes back on the same ports.

Each instance: `{Id, Image, From, On, Ports: [{Internal, External, Target}]}`.
`On` is the placement host (`local`).  `Target` is where the port is
reachable from outside the container: `{Host, Port}` = the instance's host as
link lines write it (`localhost`) and its host port, i.e. the address a link
proxy or a browser uses.  geard recorded there the loopback address that
linked containers used (`127.0.0.1:27017`); in gearproxy that address is
chosen per consuming container and can differ between consumers, so it lives
in the plan's link endpoints (`gearproxy deploy --dry-run --json`), not here.
The planner reads only `Internal` and `External` back.

`write` replaces the file atomically (a temporary file in the same directory,
fsync, rename), so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from gearproxy import spec
from gearproxy.errors import StoreError
from gearproxy.plan import Plan, display_host
from gearproxy.spec import Deployment


def render(plan: Plan, deployment: Deployment) -> dict[str, Any]:
    """The state-file document for `plan` (the desired state it reaches) of `deployment`.

    Instances are listed in descriptor order, then by instance number, as
    geard wrote them.
    """
    order = {c.name: i for i, c in enumerate(deployment.containers)}
    instances = sorted(plan.instances, key=lambda i: (order.get(i.container, len(order)), i.index))
    return {
        "Containers": spec.to_json(deployment)["Containers"],
        "IdPrefix": deployment.id_prefix,
        "Instances": [
            {
                "Id": i.id,
                "Image": i.image,
                "From": i.container,
                "On": i.host,
                "Ports": [
                    {
                        "Internal": m.internal,
                        "External": m.external,
                        "Target": {"Host": display_host(i.host), "Port": m.external},
                    }
                    for m in i.ports
                ],
            }
            for i in instances
        ],
    }


def write(path: str | os.PathLike[str], plan: Plan, deployment: Deployment) -> Path:
    """Write the state file for `plan` to `path` atomically; returns the path written."""
    target = Path(path)
    text = json.dumps(render(plan, deployment), indent=2) + "\n"
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; a state file is not secret
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise StoreError(f"cannot write state file {target}: {exc.strerror or exc}") from exc
    return target
