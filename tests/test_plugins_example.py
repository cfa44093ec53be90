"""The plugin example in docs/examples runs, through the real plugin loader."""

from __future__ import annotations

import shutil
from pathlib import Path

from outboundd.delivery.hmail import HMail
from outboundd.hooks import MX, HookRunner, ResultCode, load_plugins

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "smarthost_route.py"


async def test_documented_example_plugin(tmp_path: Path) -> None:
    plugins_dir = tmp_path / "plugins"
    plugins_dir.mkdir()
    shutil.copy(EXAMPLE, plugins_dir / "smarthost_route.py")
    runner = HookRunner(load_plugins(["smarthost_route"], plugins_dir))
    hmail = HMail("Q1", "partner.example", "a@x.test", ["b@partner.example"], 0)

    routed = await runner.run("get_mx", hmail, "partner.example")
    assert routed.plugin == "smarthost_route"
    assert routed.result is not None and routed.result.code is ResultCode.OK
    assert routed.result.value == MX("127.0.0.1", port=2526, priority=10)
    assert (await runner.run("get_mx", hmail, "other.example")).result is None

    grey = await runner.run("deferred", hmail, {"delay": 64, "err": "451 4.7.1 Greylisted"})
    assert grey.result is not None and grey.result.delay_seconds == 300
    assert (await runner.run("deferred", hmail, {"delay": 64, "err": "451 busy"})).result is None

    await runner.run("delivered", hmail, {"host": "mx.partner.example"})
    assert hmail.notes["delivered_via"] == ["mx.partner.example"]
