"""One error hierarchy, one subclass per boundary.

Every error a user can cause or meet carries a one-line message that names
the field or object at fault and, where it can, what to do.  The CLI maps
them to exit codes in one place (`gearproxy.cli`): 2 for usage and
descriptor errors, 1 for everything that fails at run time.
"""

from __future__ import annotations


class GearproxyError(Exception):
    """Base of every error gearproxy raises on purpose."""

    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(GearproxyError):
    """A command-line option is malformed (exit 2)."""

    exit_code = 2


class DescriptorError(GearproxyError):
    """The deployment descriptor is unreadable or invalid (exit 2).

    `path` is the JSON path of the offending value (`containers[1].image`),
    empty when the whole file is at fault.
    """

    exit_code = 2

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.detail = message


class StoreError(GearproxyError):
    """The state store cannot be opened, migrated or written."""


class PortConflictError(StoreError):
    """A host port is held by another deployment or bound by a foreign process."""

    def __init__(self, host: str, port: int, owner: str | None) -> None:
        where = f"deployment {owner!r}" if owner else "another process"
        super().__init__(f"host port {port} on {host} is already held by {where}")
        self.host = host
        self.port = port
        self.owner = owner


class EngineError(GearproxyError):
    """The Docker engine refused, failed or did not answer."""


class LinkError(GearproxyError):
    """A link proxy cannot listen, join a namespace or reach its targets."""


class DaemonError(GearproxyError):
    """The orchestrator daemon does not answer or reported a failure."""
