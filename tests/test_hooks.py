"""Plugin loading, result helpers and hook chains."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from outboundd.hooks import (
    HookFailure,
    HookResult,
    HookRunner,
    PluginLoadError,
    ResultCode,
    delay,
    deny,
    denysoft,
    load_plugins,
    ok,
)


def test_result_helpers() -> None:
    assert ok([1]).code is ResultCode.OK and ok([1]).value == [1]
    assert deny("no").message == "no"
    assert denysoft("later").message == "later"
    assert denysoft(30).delay_seconds == 30.0
    assert delay(5).delay_seconds == 5.0
    with pytest.raises(ValueError):
        delay(-1)
    with pytest.raises(ValueError):
        denysoft(-5)
    with pytest.raises(TypeError):
        denysoft(True)


async def test_chain_stops_at_first_result_in_order() -> None:
    runner = HookRunner([])
    calls: list[str] = []

    async def passes(*_: object) -> None:
        calls.append("first")

    async def decides(*_: object) -> HookResult:
        calls.append("second")
        return deny("stop")

    async def never(*_: object) -> HookResult:
        calls.append("third")
        return ok()

    runner.add("a", "send_email", passes)
    runner.add("b", "send_email", decides)
    runner.add("c", "send_email", never)
    outcome = await runner.run("send_email", object())
    assert calls == ["first", "second"]
    assert outcome.plugin == "b" and outcome.result == deny("stop")
    assert (await runner.run("bounce", object(), "x")).result is None


@pytest.mark.parametrize("kind", ["raise", "timeout", "junk"])
async def test_misbehaving_plugin_is_a_hook_failure(kind: str) -> None:
    runner = HookRunner([], timeout=0.1)

    async def bad(*_: object) -> object:
        if kind == "raise":
            raise RuntimeError("boom")
        if kind == "timeout":
            await asyncio.sleep(5)
        return "not a result"

    runner.add("broken", "get_mx", bad)
    with pytest.raises(HookFailure) as info:
        await runner.run("get_mx", object(), "example.test")
    assert info.value.plugin == "broken" and info.value.hook == "get_mx"
    expected = {"raise": "RuntimeError: boom", "timeout": "timed out", "junk": "returned str"}
    assert expected[kind] in info.value.reason


def test_unknown_hook_name_is_refused() -> None:
    async def fn(*_: object) -> None:
        return None

    with pytest.raises(ValueError):
        HookRunner([]).add("x", "no_such_hook", fn)


def test_plugin_loading_errors(tmp_path: Path) -> None:
    with pytest.raises(PluginLoadError, match="no built-in plugin"):
        load_plugins(["does_not_exist"], tmp_path)
    (tmp_path / "broken.py").write_text("raise ImportError('missing dependency')\n")
    with pytest.raises(PluginLoadError, match="failed to import"):
        load_plugins(["broken"], tmp_path)
    with pytest.raises(PluginLoadError, match="not a valid module name"):
        load_plugins(["../evil"], tmp_path)


def test_local_plugin_and_builtin_load(tmp_path: Path) -> None:
    (tmp_path / "mine.py").write_text(
        "from outboundd.hooks import ok\n\nasync def send_email(hmail):\n    return ok()\n"
    )
    runner = HookRunner(load_plugins(["mine", "auth_flat_file"], tmp_path))
    assert runner.has("send_email") and not runner.has("get_mx")
