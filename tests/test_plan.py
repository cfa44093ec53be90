"""The process plan: which processes ``outboundd`` runs and what each does.

Pure: a configuration and the command line in, a :class:`ProcessPlan` out.
The processes themselves are exercised end to end in
``test_daemon_lifecycle.py`` and ``test_e2e_delivery.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from outboundd.config import Config, load_config
from outboundd.daemon import ROLES
from outboundd.plan import ProcessPlan, Role, plan_processes


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Config:
    directory = tmp_path_factory.mktemp("plan") / "config"
    directory.mkdir()
    (directory / "outbound.ini").write_text("[main]\nqueue_dir=spool-here\n")
    return load_config(directory)


def configured(base: Config, *, nodes: int, delivery_processes: int) -> Config:
    return base.model_copy(
        update={
            "smtp": base.smtp.model_copy(update={"nodes": nodes}),
            "outbound": base.outbound.model_copy(update={"delivery_processes": delivery_processes}),
        }
    )


def test_one_process_accepts_and_delivers(base: Config) -> None:
    plan = plan_processes(configured(base, nodes=1, delivery_processes=0))
    assert plan == ProcessPlan(
        role=Role.ALL,
        is_child=False,
        smtp_nodes=0,
        delivery_processes=0,
        queue=base.config_dir.parent / "spool-here",
    )
    assert plan.listens and plan.delivers
    assert plan.recovers_files and plan.follows_outbound_ini and plan.announces_ready
    assert not plan.nodes_report_mail
    assert plan.processes == 1


def test_delivery_processes_take_delivery_from_the_listener(base: Config) -> None:
    """The default (delivery_processes=1): the first process only accepts."""
    plan = plan_processes(configured(base, nodes=1, delivery_processes=3))
    assert plan.role is Role.SUBMISSION
    assert plan.listens and not plan.delivers
    assert (plan.smtp_nodes, plan.delivery_processes, plan.processes) == (0, 3, 4)
    # It does not deliver, yet follows outbound.ini for the children it restarts.
    assert plan.follows_outbound_ini
    assert plan.announces_ready


@pytest.mark.parametrize(
    ("delivery_processes", "node_role", "report"),
    [(0, Role.ALL, False), (2, Role.SUBMISSION, True)],
)
def test_smtp_nodes_share_the_first_process_role(
    base: Config, delivery_processes: int, node_role: Role, report: bool
) -> None:
    """nodes=4: three more SMTP processes; they deliver their own mail unless
    delivery processes do, and then they must report it to wake those."""
    plan = plan_processes(configured(base, nodes=4, delivery_processes=delivery_processes))
    assert plan.smtp_nodes == 3
    assert plan.node_role is node_role
    assert plan.nodes_report_mail is report
    assert plan.processes == 4 + delivery_processes


@pytest.mark.parametrize("requested", [Role.ALL, Role.SUBMISSION])
def test_an_smtp_node_starts_nothing(base: Config, requested: Role) -> None:
    config = configured(base, nodes=4, delivery_processes=2)
    plan = plan_processes(config, requested, is_node=True)
    assert plan.is_child and plan.listens
    assert plan.role is Role.SUBMISSION  # delivery processes deliver its mail
    assert (plan.smtp_nodes, plan.delivery_processes, plan.processes) == (0, 0, 1)
    assert not plan.recovers_files  # the first process may be mid-accept
    assert not plan.follows_outbound_ini  # it neither delivers nor restarts children
    assert not plan.announces_ready


def test_a_delivering_smtp_node(base: Config) -> None:
    plan = plan_processes(configured(base, nodes=2, delivery_processes=0), is_node=True)
    assert plan.role is Role.ALL and plan.is_child
    assert plan.delivers and plan.follows_outbound_ini
    assert plan.smtp_nodes == 0


def test_a_delivery_process(base: Config) -> None:
    config = configured(base, nodes=4, delivery_processes=2)
    plan = plan_processes(config, Role.DELIVERY)
    assert plan.is_child and plan.delivers and not plan.listens
    assert (plan.smtp_nodes, plan.delivery_processes) == (0, 0)
    assert not plan.recovers_files and not plan.announces_ready
    assert plan.follows_outbound_ini


def test_an_explicit_submission_role_without_delivery_processes(base: Config) -> None:
    """``--role submission`` with delivery_processes=0 accepts only: nobody here delivers."""
    plan = plan_processes(configured(base, nodes=2, delivery_processes=0), Role.SUBMISSION)
    assert not plan.delivers
    assert (plan.smtp_nodes, plan.delivery_processes) == (1, 0)
    assert plan.nodes_report_mail


def test_the_command_line_roles_are_the_plan_roles() -> None:
    assert ROLES == ("all", "submission", "delivery")
    assert [Role(name) for name in ROLES] == list(Role)


def test_the_queue_follows_outbound_ini(base: Config, tmp_path: Path) -> None:
    elsewhere = base.model_copy(
        update={"outbound": base.outbound.model_copy(update={"queue_dir": tmp_path})}
    )
    assert plan_processes(elsewhere).queue == tmp_path
    url = "postgresql://outboundd@db.example/outboundd"
    shared = base.model_copy(
        update={"outbound": base.outbound.model_copy(update={"queue_url": url})}
    )
    # Every process of every host opens the same queue; the plan only carries it.
    assert plan_processes(shared).queue == url
    assert plan_processes(shared, Role.DELIVERY).queue == url
