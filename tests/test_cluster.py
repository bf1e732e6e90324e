"""The stream store's keys on a real local Redis Cluster (tests/cluster.py): what the data model
promises a cluster today. Every key of one job is in one slot (the job id is the hash tag), so each
script of a job's life runs on one node; job ids spread evenly over the primaries."""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path

import pytest
import redis

from shared.store import keys
from tests.cluster import local_cluster

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def test_a_jobs_keys_share_a_slot_and_jobs_spread_over_the_primaries(tmp_path: Path) -> None:
    with local_cluster(tmp_path) as cluster:
        node = cluster.client(cluster.primaries[0])
        job_ids = ["job_" + uuid.uuid4().hex for _ in range(3000)]  # as FleetClient.submit makes them
        for job_id in job_ids[:50]:
            job_keys = [keys.events(job_id), keys.owner(job_id), keys.attempts(job_id), keys.tenant(job_id)]
            job_keys.append(keys.cancel_flag(job_id))
            assert len({node.execute_command("CLUSTER", "KEYSLOT", key) for key in job_keys}) == 1, job_id
        spread = Counter(cluster.owner(keys.events(job_id)) for job_id in job_ids)
        shares = sorted(count / len(job_ids) for count in spread.values())
        print(f"3,000 jobs over 3 primaries: {sorted(spread.values())}")
        assert len(spread) == 3 and shares[0] > 0.29 and shares[-1] < 0.38
        # A script over one job's keys runs on the node that owns them; across two jobs it is refused.
        owner = cluster.client(cluster.owner(keys.events(job_ids[0])))
        assert owner.eval(
            "return redis.call('XADD', KEYS[1], '*', 'k', 'v')", 2, keys.events(job_ids[0]), keys.owner(job_ids[0])
        )
        other = next(
            job_id
            for job_id in job_ids[1:]
            if cluster.owner(keys.events(job_id)) == cluster.owner(keys.events(job_ids[0]))
            and node.execute_command("CLUSTER", "KEYSLOT", keys.events(job_id))
            != node.execute_command("CLUSTER", "KEYSLOT", keys.events(job_ids[0]))
        )
        with pytest.raises(redis.ResponseError, match="CROSSSLOT"):  # same node, another slot
            owner.xread({keys.events(job_ids[0]): "0", keys.events(other): "0"})
