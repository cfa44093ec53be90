"""Which processes ``outboundd`` runs, and what each does: a pure value.

``outboundd -c DIR`` may become several processes (see ``children.py``):
the first one binds the listeners; ``smtp.ini nodes`` = N adds N - 1 SMTP
nodes accepting on the same sockets; ``outbound.ini delivery_processes`` = M
adds M processes that only deliver, and then the SMTP processes only
accept.  Every branch on "am I the first process, a node or a delivery
process, do I listen, do I deliver" is decided here, once, from the
configuration and the command line, so ``daemon.serve`` only follows the
plan and the decisions are tested without starting a process.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from outboundd.config import Config


class Role(StrEnum):
    """What one process does (``outboundd --role``; ``all`` unless a child)."""

    ALL = "all"  # accepts SMTP and delivers
    SUBMISSION = "submission"  # accepts SMTP; delivery processes deliver its mail
    DELIVERY = "delivery"  # claims and delivers; no listener


@dataclass(frozen=True, slots=True)
class ProcessPlan:
    """This process's part, and the children it starts.

    ``role`` is the role in effect (``all`` asked for with delivery
    processes configured becomes ``submission``).  A child (a delivery
    process, or an SMTP node that inherited its sockets) starts no children
    and leaves the queue's file recovery to the first process.
    """

    role: Role
    is_child: bool
    #: SMTP node children this process starts (nodes - 1 for the first process).
    smtp_nodes: int
    #: Delivery children this process starts.
    delivery_processes: int
    #: Where the queue lives: ``queue_url``, else the ``queue_dir`` (what ``spool.open`` takes).
    queue: str | Path

    @property
    def listens(self) -> bool:
        return self.role in (Role.ALL, Role.SUBMISSION)

    @property
    def delivers(self) -> bool:
        return self.role in (Role.ALL, Role.DELIVERY)

    @property
    def recovers_files(self) -> bool:
        """Only the first process scans the body files (children may start mid-accept)."""
        return not self.is_child

    @property
    def follows_outbound_ini(self) -> bool:
        """Re-reads ``outbound.ini``: a deliverer uses it; the first process hands it to
        the children it (re)starts."""
        return self.delivers or not self.is_child

    @property
    def node_role(self) -> Role:
        """The role the SMTP nodes this process starts run with: its own."""
        return self.role

    @property
    def nodes_report_mail(self) -> bool:
        """Whether an SMTP node must report its new mail to this process (to wake the
        delivery processes); a node that delivers takes its own mail."""
        return self.smtp_nodes > 0 and self.node_role is Role.SUBMISSION

    @property
    def announces_ready(self) -> bool:
        """The first listening process logs the "ready" line operators wait for."""
        return self.listens and not self.is_child

    @property
    def processes(self) -> int:
        """This process and the children it starts."""
        return 1 + self.smtp_nodes + self.delivery_processes


def plan_processes(
    config: Config, requested: Role = Role.ALL, *, is_node: bool = False
) -> ProcessPlan:
    """The plan for a process started with ``--role requested``.

    ``is_node``: it inherited listening sockets (an SMTP node).  ``--role
    delivery`` is only ever given to a child.  Delivery processes are
    started by the first process when it does not deliver itself; SMTP
    nodes by the first process when it listens.
    """
    is_child = is_node or requested is Role.DELIVERY
    role = requested
    if role is Role.ALL and config.outbound.delivery_processes > 0:
        role = Role.SUBMISSION
    # Only the first process starts children (a delivery process is always a child).
    starts_children = not is_child
    return ProcessPlan(
        role=role,
        is_child=is_child,
        smtp_nodes=config.smtp.nodes - 1 if starts_children else 0,
        delivery_processes=(
            config.outbound.delivery_processes if starts_children and role is Role.SUBMISSION else 0
        ),
        queue=config.outbound.queue_location,
    )
