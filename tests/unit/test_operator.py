"""Held requests and their answers (gvmrt.proxy.operator), on a real event loop, without sockets."""

from __future__ import annotations

import asyncio
import time

import pytest

from gvmrt.proxy.operator import Approvals, Events, Held

ID = "00112233aabbccdd"


def held(request_id: str = ID, timeout_s: int = 5, path: str = "/x") -> Held:
    return Held(request_id, "POST", "api.example.com", 443, path, 12, "needs-ok", timeout_s)


def test_approve_releases_the_held_request_and_publishes_it() -> None:
    async def main() -> None:
        events = Events()
        q = events.subscribe()
        a = Approvals(events)
        task = asyncio.ensure_future(a.hold(held()))
        await asyncio.sleep(0)
        assert [p["request_id"] for p in a.pending()] == [ID]
        assert (await q.get())["event"] == "held"
        assert a.answer(ID, True, by=1000) == (True, f"request {ID} approved")
        outcome = await task
        assert outcome.approved and outcome.by == 1000
        assert a.pending() == []
    asyncio.run(main())


def test_an_answer_is_given_once_and_the_second_is_refused_by_name() -> None:
    async def main() -> None:
        a = Approvals()
        task = asyncio.ensure_future(a.hold(held()))
        await asyncio.sleep(0)
        # Concurrent answers on the loop: the first applies, the second finds it answered.
        first, second = a.answer(ID, True, by=1), a.answer(ID, False, by=2)
        assert first[0] and not second[0]
        assert "was approved by uid 1 already" in second[1]
        assert (await task).approved
    asyncio.run(main())


@pytest.mark.parametrize("bad", ["", "xyz", "00112233AABBCCDD", "00112233aabbccdd0", None, 7, "../etc/passwd"])
def test_malformed_ids_are_refused(bad: object) -> None:
    ok, why = Approvals().answer(bad, True, by=0)  # type: ignore[arg-type]
    assert not ok and "not a request id" in why


def test_unknown_id_and_bad_for() -> None:
    async def main() -> None:
        a = Approvals()
        assert a.answer(ID, True, by=0) == (False, f"no request {ID} is held by this container (see `gvmrt pending`)")
        task = asyncio.ensure_future(a.hold(held()))
        await asyncio.sleep(0)
        for for_s in (0, -5, 10**9, "10m"):
            ok, why = a.answer(ID, True, by=0, for_s=for_s)  # type: ignore[arg-type]
            assert not ok and "--for" in why
        assert not a.answer(ID, False, by=0, for_s=60)[0], "--for goes with approve only"
        a.answer(ID, False, by=0)
        assert not (await task).approved
    asyncio.run(main())


def test_timeout_denies_and_is_remembered() -> None:
    async def main() -> None:
        a = Approvals()
        start = time.monotonic()
        outcome = await a.hold(held(timeout_s=1))
        assert not outcome.approved and outcome.by is None and time.monotonic() - start >= 1
        assert "timed out already" in a.answer(ID, True, by=0)[1]
    asyncio.run(main())


def test_approval_for_a_duration_covers_identical_requests_only() -> None:
    async def main() -> None:
        a = Approvals()
        task = asyncio.ensure_future(a.hold(held(path="/x?q=1")))
        await asyncio.sleep(0)
        assert a.answer(ID, True, by=0, for_s=60)[0]
        await task
        assert a.allowed_before("POST", "api.example.com", 443, "/x?q=1") == ID
        assert a.allowed_before("POST", "api.example.com", 443, "/x?q=2") is None
        assert a.allowed_before("GET", "api.example.com", 443, "/x?q=1") is None
        a.allows[("POST", "api.example.com", 443, "/x?q=1")] = (time.monotonic() - 1, ID)   # expired
        assert a.allowed_before("POST", "api.example.com", 443, "/x?q=1") is None
    asyncio.run(main())


def test_a_slow_subscriber_is_dropped_with_a_last_word() -> None:
    async def main() -> None:
        events = Events()
        q = events.subscribe()
        for i in range(Events.QUEUE + 5):
            events.publish({"event": "decision", "n": i})
        assert not events.subscribers
        items = [q.get_nowait() for _ in range(q.qsize())]
        assert items[-1]["event"] == "overflow" and len(items) == Events.QUEUE
    asyncio.run(main())
