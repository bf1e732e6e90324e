"""Script calls coalesced per loop turn (shared/store/calls.py), on a real Redis: a turn's calls
leave in one write, each caller gets its own reply or its own error, a script Redis forgot is
loaded again, and a caller that gives up costs the others nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import ResponseError

from shared.store import calls
from shared.store.calls import Calls, Lua

ECHO = Lua("return {KEYS[1], ARGV[1]}")
FAIL_ON_BAD = Lua("if ARGV[1] == 'bad' then return redis.error_reply('ERR bad argument') end return ARGV[1]")


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    connection = Redis.from_url(redis_url)
    yield connection
    await connection.aclose()


async def test_a_turns_calls_leave_in_one_write_and_each_gets_its_own_reply(
    client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[int] = []
    exchange = calls._exchange

    async def counted(connection: object, payload: bytes, replies: int) -> list[object]:
        writes.append(replies)
        return await exchange(connection, payload, replies)

    monkeypatch.setattr(calls, "_exchange", counted)
    coalesced = Calls(client)
    await coalesced.run(ECHO, keys=["warm"], args=[0])  # Redis learns the script (NOSCRIPT, load, again)
    writes.clear()
    replies = await asyncio.gather(*(coalesced.run(ECHO, keys=[f"k{i}"], args=[i]) for i in range(200)))
    assert replies == [[f"k{i}".encode(), str(i).encode()] for i in range(200)]
    assert writes == [200]  # one write for the turn's 200 calls


async def test_an_error_is_its_callers_alone_and_a_forgotten_script_is_loaded_again(
    client: Redis, redis_url: str
) -> None:
    coalesced = Calls(client)
    arguments = ["good", "bad", "good", "bad", "fine"]
    results = await asyncio.gather(
        *(coalesced.run(FAIL_ON_BAD, keys=["k"], args=[argument]) for argument in arguments), return_exceptions=True
    )
    for argument, result in zip(arguments, results, strict=True):
        if argument == "bad":
            assert isinstance(result, ResponseError) and "bad argument" in str(result)
        else:
            assert result == argument.encode()
    redis.Redis.from_url(redis_url).script_flush()  # as a Redis that restarted without its scripts
    assert await coalesced.run(FAIL_ON_BAD, keys=["k"], args=["again"]) == b"again"


async def test_a_caller_that_gives_up_costs_the_others_nothing(client: Redis) -> None:
    coalesced = Calls(client)
    slow = Lua("for i = 1, 3000000 do end return ARGV[1]")  # tens of milliseconds of Redis's time
    first = asyncio.create_task(coalesced.run(slow, keys=["k"], args=["first"]))
    second = asyncio.create_task(coalesced.run(ECHO, keys=["k"], args=["second"]))
    await asyncio.sleep(0)
    first.cancel()
    assert await second == [b"k", b"second"]
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await coalesced.run(ECHO, keys=["k"], args=["after"]) == [b"k", b"after"]


async def test_a_lost_connection_fails_the_batch_and_the_next_call_reconnects(client: Redis) -> None:
    coalesced = Calls(client)
    assert await coalesced.run(ECHO, keys=["k"], args=["before"]) == [b"k", b"before"]
    await client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "no")
    outcome = await asyncio.gather(coalesced.run(ECHO, keys=["k"], args=["lost"]), return_exceptions=True)
    assert outcome == [[b"k", b"lost"]] or isinstance(outcome[0], redis.exceptions.ConnectionError)
    assert await coalesced.run(ECHO, keys=["k"], args=["after"]) == [b"k", b"after"]


async def test_a_line_keeps_its_connection_while_used_and_checks_one_after_a_pause(
    client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flusher's batches share one connection, lent once (the pool checks each it lends: a read
    with a zero timeout); after a pause the connection goes back and the next is lent checked, so a
    connection closed while idle (a proxy's idle timeout, here CLIENT KILL) costs no error."""
    lent: list[int] = []
    get_connection = client.connection_pool.get_connection

    async def counted() -> object:
        lent.append(1)
        return await get_connection()

    monkeypatch.setattr(client.connection_pool, "get_connection", counted)
    line = calls.Line(client)
    client_id = calls.resp([b"CLIENT", b"ID"])
    ids = {(await line.send_packed(client_id, 1))[0] for _ in range(20)}
    assert len(ids) == 1 and len(lent) == 1

    # Two users at once: the second borrows a connection of its own; both get their own replies.
    echoes = await asyncio.gather(*(line.send_packed(calls.resp([b"ECHO", b"%d" % i]), 1) for i in range(2)))
    assert echoes == [[b"0"], [b"1"]]

    monkeypatch.setattr(calls, "HOLD_IDLE_S", 0.05)
    (kept,) = ids
    await client.execute_command("CLIENT", "KILL", "ID", kept)
    await asyncio.sleep(0.1)
    assert await line.send_packed(calls.resp([b"ECHO", b"after"]), 1) == [b"after"]
    assert (await line.send_packed(client_id, 1))[0] != kept


async def test_a_line_on_a_bounded_pool_keeps_nothing(redis_url: str) -> None:
    """A bounded pool's connections are for whoever waits: a line borrows one per batch."""
    bounded = Redis.from_pool(BlockingConnectionPool.from_url(redis_url, max_connections=1, timeout=1))
    try:
        line = calls.Line(bounded)
        assert await line.send_packed(calls.resp([b"ECHO", b"x"]), 1) == [b"x"]
        assert await bounded.echo("free") == b"free"  # the one connection is back in the pool
    finally:
        await bounded.aclose()
