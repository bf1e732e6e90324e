"""The Redis data model: the one package that knows the keys, the scripts, the entry encoding, and the
reads and writes. Every other module calls it; none spells a key or sends a Redis command of its own.

Two roles, each a Redis of its own or one Redis for both (``STREAMFLEET_STREAM_REDIS_URL`` unset). No
script, transaction or pipeline spans the two.

**The queue** (``STREAMFLEET_REDIS_URL``; ``store.queue``): small, and arq needs multi-key transactions.

=========================== ============ ======================================= ================== ==============
key                         type         role                                    TTL                written by
=========================== ============ ======================================= ================== ==============
``arq:queue``               sorted set   waiting job ids, scored by when due     none               submit, claim,
                                         (ms); held jobs are not in it                              finish, requeue
``arq:job:<id>``            string       arq's job entry: JSON of endpoint,      1 day (arq's       submit; arq
                                         request body, tenant, enqueue time      queue expiry)      deletes it at
                                                                                                    the job's end
``arq:in-progress:<id>``    string       arq's claim marker                      job timeout + 10 s claim; finish
``arq:retry:<id>``          string       arq's count of runs of the job          88,400 s (arq)     claim (for arq's
                                         (counted as a claim takes the job)                         run_job)
``arq:queue:health-check``  string       arq's own health line                   1 h (arq)          arq
``arq:abort``               sorted set   arq's jobs to abort (the fleet cancels  none               no one; finish
                                         its own way: only cleared, as arq does)                    clears an id
``sf:running``              sorted set   held jobs, scored by lease end (ms,     none               claim, renew,
                                         the server's clock)                                        finish, requeue
``sf:worker:<worker>``      string       a live worker's heartbeat (JSON: pid,   10 s               its worker
                                         jobs it holds, entries written)
``sf:idem:<tenant>:<key>``  string       idempotency key -> job id               1 day              submit
``sf:failures``             list         latest 50 jobs that ended in error      none               worker, reaper
``sf:sweep``                string       lock of the worker sweeping for         the sweep period   a worker
                                         orphans
``sf:models``               string       the upstream's model list (JSON), for   15 min             a worker, every
                                         the gateway's ``/v1/models``                               5 min
``sf:cancel``               channel      a cancel names its job id               -                  cancel
``sf:queued``               channel      a submit names its job id               -                  submit
``sf:queued:pending``       string       a wake is on its way and no claim has   1 s                submit (with
                                         looked at the queue since: a submit                        its wake);
                                         need not publish                                           claim deletes
=========================== ============ ======================================= ================== ==============

**The stream store** (``STREAMFLEET_STREAM_REDIS_URL``; ``store.streams``, or ``store.cluster`` on a
Redis Cluster): every key of one job, each with the job id as a hash tag so that a job's keys share a
Redis Cluster slot.

=========================== ============ ======================================= ================== ==============
key                         type         role                                    TTL                written by
=========================== ============ ======================================= ================== ==============
``sf:{<id>}:events:v1``     stream       every event of the job, entry format 1  queue expiry +    submit or the
                                         (``store.codec``, docs/stream-format.md) 2 deadlines; once  first worker;
                                                                                 ended, the stream  the workers;
                                                                                 TTL (1 h)          cancel
``sf:{<id>}:attempt``       string       the ``started`` id of the attempt that  as the stream      start, void
                                         owns the job (may write its end)
``sf:{<id>}:attempts``      string       attempts started (numbers, bounds)      as the stream      start
``sf:{<id>}:tenant``        string       hash of the submitting gateway key      as the stream      submit
``sf:{<id>}:cancel``        string       a cancel was asked for                  the stream TTL     cancel
``sf:gateway:<uuid>:<i>``   stream       wakes a gateway reader (one entry)      10 min, renewed    the gateway
=========================== ============ ======================================= ================== ==============

**Submit is two steps, queue first** (``producer.client.FleetClient.submit``): the job is queued
(``QueueStore.enqueue``: arq's entry, the queue, the idempotency key), then its stream is opened
(``StreamStore.create``: ``queued``, the tenant). The queue's entry carries what ``create`` writes,
so whichever comes first, the submitter's second step or a worker starting the job
(``StreamStore.start`` creates a missing stream), the stream is the same; a crash between the two
steps loses nothing, and a retried submit with the same idempotency key opens the stream if arq
still has the job.

**The queue holds a job until its stream has ended**: the terminal event is written before arq
finishes the job, a cancelled job leaves the queue only after ``cancelled`` is written, and a lease
that lapses puts the job back in the queue before its lost attempt is voided. So a stream without a
terminal event always has a job in the queue, unless the queue lost data (a Redis without
persistence restarted, an unreplicated failover): the orphan sweep (``worker.heartbeat``) finds such
streams and ends them.
"""

from .codec import DeltaEncoder, Entry, Fields, Position, RawEntry, format_id, parse_cursor, parse_id
from .queue import QueueStore
from .stores import OutOfMemory, StoreError, Stores, Unavailable, open_stores, stream_ttl_while_queued
from .streams import Batch, Start, StreamReader, StreamStore

__all__ = [
    "Batch",
    "DeltaEncoder",
    "Entry",
    "Fields",
    "OutOfMemory",
    "Position",
    "QueueStore",
    "RawEntry",
    "Start",
    "StoreError",
    "Stores",
    "StreamReader",
    "StreamStore",
    "Unavailable",
    "format_id",
    "open_stores",
    "parse_cursor",
    "parse_id",
    "stream_ttl_while_queued",
]
