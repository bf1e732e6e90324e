"""The arq worker: taking jobs, the upstream client, publishing to the job stream."""

from .job import generate
from .main import build_worker, run, serve

__all__ = ["build_worker", "generate", "run", "serve"]
