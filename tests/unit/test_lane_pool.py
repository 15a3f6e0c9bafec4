"""The sessions pool of a sender with few sessions (email): free sessions go by lane."""

from __future__ import annotations

import asyncio

from operators.adapters.channels.sessions import LanePool


def test_a_freed_session_goes_to_the_most_urgent_waiter_then_in_arrival_order() -> None:
    async def main() -> list[str]:
        pool: LanePool[str] = LanePool(["s1"])
        served: list[str] = []
        first = await pool.get("bulk")  # the only session, taken

        async def wait(name: str, lane: str) -> None:
            session = await pool.get(lane)
            served.append(name)
            await asyncio.sleep(0)
            pool.put(session)

        tasks = [
            asyncio.create_task(wait(name, lane))
            for name, lane in [
                ("bulk-1", "bulk"),
                ("bulk-2", "bulk"),
                ("normal-1", "normal"),
                ("login-1", "transactional"),
                ("login-2", "transactional"),
            ]
        ]
        await asyncio.sleep(0.01)
        assert served == [] and pool.waiting == 5
        pool.put(first)
        await asyncio.gather(*tasks)
        return served

    assert asyncio.run(main()) == ["login-1", "login-2", "normal-1", "bulk-1", "bulk-2"]


def test_a_cancelled_waiter_loses_no_session() -> None:
    async def main() -> str:
        pool: LanePool[str] = LanePool(["s1"])
        taken = await pool.get("normal")
        gone = asyncio.create_task(pool.get("bulk"))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        pool.put(taken)  # skips the cancelled waiter: the session is idle again
        return await asyncio.wait_for(pool.get("bulk"), 1)

    assert asyncio.run(main()) == "s1"
