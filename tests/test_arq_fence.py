"""The arq surface the fleet depends on, pinned: an arq release that changes any of it fails here, naming
what changed, instead of somewhere else as a mystery. ``shared.store.queue`` is the only module that
touches arq's internals (its key layout, its job payload, the Worker methods it replaces)."""

from __future__ import annotations

import inspect

import arq
import arq.constants
import pytest
from arq.worker import Worker, func

from shared.store import keys, queue


def test_arq_is_the_pinned_release() -> None:
    assert arq.VERSION.startswith(queue.ARQ_VERSION), (
        f"arq {arq.VERSION} is installed, the fleet is fenced against {queue.ARQ_VERSION}x: "
        "re-read the sources named in shared/store/queue.py ARQ_SURFACE, then re-pin"
    )


@pytest.mark.parametrize("name", sorted(queue.ARQ_SURFACE))
def test_arq_source_the_fence_relies_on_is_unchanged(name: str) -> None:
    pinned, now = queue.ARQ_SURFACE[name], queue.arq_source_hash(name)
    assert now == pinned, (
        f"arq's {name} changed (source sha256 {now}, pinned {pinned}): re-read it against FencedWorker and "
        f"QueueStore in shared/store/queue.py, then update ARQ_SURFACE"
    )


def test_arq_key_layout_is_what_the_scripts_assume() -> None:
    assert (keys.QUEUE, keys.arq_job("x"), keys.arq_in_progress("x"), keys.arq_retry("x"), keys.ARQ_ABORT) == (
        "arq:queue",
        "arq:job:x",
        "arq:in-progress:x",
        "arq:retry:x",
        "arq:abort",
    ), "arq's key names changed: the queue scripts in shared/store/queue.py spell arq's layout"


async def test_arq_worker_has_what_the_fence_reads() -> None:
    async def job(ctx: dict[str, object]) -> None:
        pass

    worker = Worker(functions=[func(job, name="f")], queue_name=keys.QUEUE)
    missing = [name for name in queue.ARQ_ATTRIBUTES if not hasattr(worker, name)]
    assert not missing, f"arq's Worker no longer has {missing}: FencedWorker reads them"
    signature = inspect.signature(Worker.__init__)
    for option in ("redis_pool", "poll_delay", "max_jobs", "job_completion_wait", "job_serializer", "ctx"):
        assert option in signature.parameters, f"arq's Worker() no longer takes {option!r}"


def test_the_job_payload_is_arqs_format() -> None:
    """arq's run_job reads the entry FleetClient writes: function, args, kwargs, try, enqueue time."""
    from arq.jobs import deserialize_job_raw

    raw = queue.payload(endpoint="responses", request={"model": "m"}, tenant="t", enqueue_time_ms=123)
    assert deserialize_job_raw(raw, deserializer=queue.deserialize) == (
        queue.FUNCTION,
        [],  # a tuple, as JSON
        {"endpoint": "responses", "request": {"model": "m"}, "tenant": "t"},
        None,
        123,
    )


def test_arq_does_not_format_a_jobs_whole_request_as_it_starts_it() -> None:
    """arq's run_job builds a log line of every job's arguments (their repr, cut to 80 characters)
    whether or not it is logged: the request comes out of the payload with a repr of a few words,
    and is otherwise the same dict."""
    from arq.jobs import deserialize_job_raw
    from arq.utils import args_to_string

    from shared import jsonutil

    request = {"model": "m", "messages": [{"role": "user", "content": "word " * 20_000}]}
    raw = queue.payload(endpoint="chat.completions", request=request, tenant=None, enqueue_time_ms=1)
    _, args, kwargs, _, _ = deserialize_job_raw(raw, deserializer=queue.deserialize)
    assert kwargs["request"] == request and jsonutil.dumps(kwargs["request"]) == jsonutil.dumps(request)
    assert repr(kwargs["request"]) == "<request: 2 fields>"
    assert "word" not in args_to_string(args, kwargs)


async def test_run_jobs_transaction_through_the_fence_answers_as_arqs_own(redis_url: str) -> None:
    """arq's run_job opens a transaction as each job starts (GET its entry, INCR and EXPIRE its try
    counter); the fence's claim reads and counts the same, and the transaction answers from it:
    the same replies, counter and TTL as arq's own MULTI on a twin job, on a real Redis."""
    from shared.settings import Settings
    from shared.store import open_stores

    stores = await open_stores(Settings(redis_url=redis_url), name="test")
    try:
        client = stores.queue.redis
        claimed: dict[str, queue.Claimed] = {}
        fenced = queue._WorkerPool(stores.queue, claimed)
        payload = queue.payload(endpoint="chat.completions", request={}, tenant=None, enqueue_time_ms=0)
        for _ in range(2):
            replies = []
            await client.set(keys.arq_job("by-arq"), payload)
            await stores.queue.enqueue("fenced", payload, score_ms=0, idempotency_key=None)
            for claim in await stores.queue.claim(4, lease_ms=5000, in_progress_ms=5000):
                claimed[claim.job_id] = claim
            for pool, job_id in ((client, "by-arq"), (fenced, "fenced")):
                async with pool.pipeline(transaction=True) as pipe:  # as arq's run_job spells it
                    pipe.get(arq.constants.job_key_prefix + job_id)
                    pipe.incr(arq.constants.retry_key_prefix + job_id)
                    pipe.expire(arq.constants.retry_key_prefix + job_id, 88400)
                    replies.append(await pipe.execute())
            assert replies[1] == replies[0] and not claimed
            await stores.queue.finish("fenced", again_at_ms="now")  # back in the queue: claimed again
        assert replies[0] == [payload, 2, True]
        assert await client.ttl(keys.arq_retry("fenced")) == await client.ttl(keys.arq_retry("by-arq")) > 88000
        await client.delete(keys.arq_job("fenced"))  # expired in the queue: arq's run_job gives it up
        (claim,) = await stores.queue.claim(4, lease_ms=5000, in_progress_ms=5000)
        assert (claim.job_id, claim.entry, claim.tries) == ("fenced", None, 3)
        async with fenced.pipeline(transaction=True) as pipe:  # a job the fence did not claim
            pipe.get(keys.arq_job("other"))
            pipe.incr(keys.arq_retry("other"))
            pipe.expire(keys.arq_retry("other"), 88400)
            with pytest.raises(RuntimeError, match="does not know"):
                await pipe.execute()
    finally:
        await stores.aclose()
