"""The upstream simulator: a real OpenAI-compatible HTTP server with deterministic text."""

from .app import SimulatorConfig, create_app
from .text import expected_text

__all__ = ["SimulatorConfig", "create_app", "expected_text"]
