"""Property-based tests of the gateway against its own OpenAPI document (schemathesis + hypothesis):
whatever a client sends to any route, the gateway never answers with a 5xx.

(schemathesis's own pytest plugin does not run under pytest 9 yet, so its strategies are driven by
hypothesis directly.)
"""

from __future__ import annotations

from typing import Any

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck

from tests.conftest import GatewayFactory, WorkerFactory

pytestmark = [pytest.mark.schemathesis, pytest.mark.slow, pytest.mark.timeout(600)]

EXAMPLES = 25


def test_no_5xx_for_any_input(start_gateway: GatewayFactory, start_worker: WorkerFactory) -> None:
    start_worker()
    gateway_url = start_gateway()
    schema = schemathesis.openapi.from_url(f"{gateway_url}/openapi.json")
    server_errors: list[str] = []
    calls = 0

    for result in schema.get_all_operations():
        operation = result.ok()

        @hypothesis.settings(
            max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @hypothesis.given(case=operation.as_strategy())
        def call(case: Any) -> None:
            nonlocal calls
            calls += 1
            response = case.call(base_url=gateway_url, timeout=60)
            if response.status_code >= 500:
                server_errors.append(
                    f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:200]}"
                )

        call()
    assert calls >= 100
    assert not server_errors, "\n".join(server_errors[:10])
