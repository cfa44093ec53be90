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


async def test_a_hook_that_waits_is_resumed_with_what_it_waited_for() -> None:
    """A hook that awaits runs past its first step exactly as a plain await would."""
    runner = HookRunner([], timeout=2.0)
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[str] = loop.create_future()
    loop.call_later(0.01, answer.set_result, "mx.example")

    async def waits(_hmail: object, domain: str) -> HookResult:
        await asyncio.sleep(0)
        host = await answer
        await asyncio.sleep(0.001)
        return ok(f"{host} for {domain}")

    runner.add("slow", "get_mx", waits)
    outcome = await runner.run("get_mx", object(), "example.test")
    assert outcome.plugin == "slow"
    assert outcome.result == ok("mx.example for example.test")


async def test_a_hook_that_fails_after_waiting_is_a_hook_failure() -> None:
    runner = HookRunner([], timeout=2.0)

    async def fails_late(*_: object) -> None:
        await asyncio.sleep(0)
        raise LookupError("gone")

    runner.add("late", "deferred", fails_late)
    with pytest.raises(HookFailure, match="LookupError: gone"):
        await runner.run("deferred", object(), {})


async def test_a_hook_that_returns_at_once_needs_no_timer() -> None:
    """No timer is set for a hook that decides without waiting (the common case)."""
    runner = HookRunner([], timeout=30.0)

    async def at_once(*_: object) -> HookResult:
        return ok("127.0.0.1")

    runner.add("table", "get_mx", at_once)
    loop = asyncio.get_running_loop()
    scheduled: list[float] = []
    real_call_at = loop.call_at

    def counting_call_at(when: float, *args: object, **kwargs: object) -> asyncio.TimerHandle:
        scheduled.append(when)
        return real_call_at(when, *args, **kwargs)  # type: ignore[arg-type]

    loop.call_at = counting_call_at  # type: ignore[method-assign]
    try:
        outcome = await runner.run("get_mx", object(), "example.test")
    finally:
        del loop.call_at
    assert outcome.result == ok("127.0.0.1")
    assert scheduled == []


async def test_cancelling_a_waiting_hook_reaches_the_plugin() -> None:
    """Cancellation (shutdown) is thrown into the plugin, which may clean up."""
    runner = HookRunner([], timeout=30.0)
    started = asyncio.Event()
    cleaned_up: list[bool] = []

    async def waits_forever(*_: object) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        finally:
            cleaned_up.append(True)

    runner.add("stuck", "send_email", waits_forever)
    task = asyncio.create_task(runner.run("send_email", object()))
    await asyncio.wait_for(started.wait(), 2.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned_up == [True]


async def test_a_hook_returning_another_awaitable_still_runs() -> None:
    """A plugin function that is not ``async def`` but returns an awaitable."""
    runner = HookRunner([], timeout=2.0)

    def returns_future(*_: object) -> asyncio.Future[HookResult]:
        fut: asyncio.Future[HookResult] = asyncio.get_running_loop().create_future()
        fut.set_result(deny("no route"))
        return fut

    runner.add("futures", "get_mx", returns_future)
    outcome = await runner.run("get_mx", object(), "example.test")
    assert outcome.result == deny("no route")
