"""What every route of one gateway process shares."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from shared.errors import UnknownJob
from shared.settings import Settings

from ..client import FleetClient, check_job_id
from ..fanout import FanOut
from .auth import Auth


@dataclass
class Gateway:
    fleet: FleetClient
    auth: Auth
    settings: Settings

    @property
    def fanout(self) -> FanOut:
        """The client's shared readers, started with the gateway's options (``app.lifespan``)."""
        return self.fleet.fanout

    async def job_for(self, request: Request, job_id: str, *, scope: str | None = None) -> str | None:
        """Check the caller may see ``job_id``; return its tenant. Another tenant's job is a 404.

        :param scope: set by the one route where a job-scoped read token stands in for a key.
        """
        tenant = self.auth.tenant(request, job=scope)
        check_job_id(job_id)
        if not await self.fleet.stores.streams.exists(job_id):  # no need to read (and decode) an event
            raise UnknownJob(job_id)
        if tenant is not None and await self.fleet.tenant_of(job_id) != tenant:
            raise UnknownJob(job_id)  # word for word what a job that never existed gets
        return tenant


def gateway_of(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway
