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


def test_the_http_client_serves_a_transactional_post_before_queued_bulk_ones() -> None:
    from aiohttp import web

    from operators.adapters.channels.http import HttpClient

    async def main() -> list[str]:
        arrivals: list[str] = []

        async def handle(request: web.Request) -> web.Response:
            arrivals.append(request.path.strip("/"))
            await asyncio.sleep(0.05)
            return web.Response(status=201)

        app = web.Application()
        app.router.add_post("/{name}", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        client = HttpClient(5.0, None, connections=1)
        base = f"http://127.0.0.1:{port}"
        try:
            first = asyncio.create_task(client.post(f"{base}/b1", data=b"", lane="bulk"))
            await asyncio.sleep(0.01)  # b1 holds the only slot
            rest = [
                asyncio.create_task(client.post(f"{base}/{name}", data=b"", lane=lane))
                for name, lane in [("b2", "bulk"), ("n1", "normal"), ("t1", "transactional")]
            ]
            replies = await asyncio.gather(first, *rest)
        finally:
            await client.close()
            await runner.cleanup()
        assert all(getattr(r, "status", None) == 201 for r in replies)
        return arrivals

    assert asyncio.run(main()) == ["b1", "t1", "n1", "b2"]
