"""What each process of a multi-process gateway (``streamfleet gateway --workers N``) loads by name.

uvicorn's supervisor starts every gateway process afresh and imports the application and the HTTP
protocol from ``producer.gateway.asgi:app`` and ``:Protocol``. Importing this module configures one
such process from the environment its supervisor passed down; one process alone
(``--workers 1``) never imports it.
"""

from __future__ import annotations

from shared import logs, processes
from shared.settings import load_settings

from .app import create_app
from .limits import bounded_by

processes.end_with_parent()  # a supervisor killed outright takes its processes with it
processes.forget_dead()  # a process that died before this one (restarted): its gauges leave the sums
settings = load_settings()
logs.configure(settings.log_format)

app = create_app(settings)
Protocol = bounded_by(settings)
