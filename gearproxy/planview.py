"""How a plan is shown to people: geard's progress lines and one JSON document.

Kept apart from `plan.py`, which decides; this module only renders.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, Final

from gearproxy.plan import Action, Plan, display_host

ACTION_WORDS: Final[Mapping[Action, str]] = {
    "create": "will be created",
    "keep": "is unchanged",
    "recreate": "will be recreated",
    "remove": "will be removed",
}


def describe(plan: Plan) -> list[str]:
    """The plan in lines a geard user recognises, for `deploy --dry-run`.

    Per instance in start order its port mappings and what happens to its
    container; then the links, once per source container (its instances all
    see the same addresses); then the removals.
    """
    lines: list[str] = []
    for i in plan.instances:
        lines.extend(f"{i.host} PortMapping: {m.internal} -> {m.external}" for m in i.ports)
        suffix = ", its host ports change" if i.ports_changed else ""
        lines.append(f"{i.host} Container {i.id} {ACTION_WORDS[i.action]}{suffix}")
    seen: set[str] = set()
    for i in plan.instances:
        if i.container in seen:
            continue
        seen.add(i.container)
        lines.extend(
            f"linking {i.container}: {e.listen_host}:{e.listen_port} -> "
            f"{display_host(e.target_host)}:{e.target_host_port}"
            for e in i.links
        )
    lines.extend(f"{c.host} Container {c.id} {ACTION_WORDS['remove']}" for c in plan.remove)
    return lines


def to_json(plan: Plan) -> dict[str, Any]:
    """The plan as one JSON-able document (`deploy --dry-run --json`): the desired
    instances with their action, host ports and link endpoints, then the removals."""
    keys = ("id", "container", "index", "host", "image", "action", "ports_changed", "config_hash")
    return {
        "name": plan.name,
        "empty": plan.is_empty,
        "instances": [
            {k: getattr(i, k) for k in keys}
            | {"ports": [asdict(m) for m in i.ports], "links": [asdict(e) for e in i.links]}
            for i in plan.instances
        ],
        "remove": [
            {"id": c.id, "container": c.container, "host": c.host, "action": "remove"}
            | {"ports": [asdict(m) for m in c.ports]}
            for c in plan.remove
        ],
        "create": list(plan.create),
        "keep": list(plan.keep),
        "recreate": list(plan.recreate),
    }
