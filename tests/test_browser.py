"""A real browser against a real gateway: headless Chromium (Debian's ``chromium`` package) runs the page
of docs/browser.md from another origin, with a job-scoped read token and EventSource, and reports what
it saw to the page's own server."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from simulator import expected_text
from tests.conftest import ROOT, GatewayFactory, WorkerFactory, free_port, stop_process
from tests.test_failures import chat

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DOC_PAGE = re.search(r"```html\n(.*?)```", (ROOT / "docs" / "browser.md").read_text(), re.S)
REPORT = (
    "<script>window.finished = (seen, text) =>"
    " fetch('/report', {method: 'POST', body: JSON.stringify({seen, text})});</script>"
)
NAIVE_PAGE = """<!doctype html><script>
  const p = new URLSearchParams(location.search);
  const source = new EventSource(`${p.get("gateway")}/v1/jobs/${p.get("job")}/events?token=${p.get("token")}`);
  let events = 0, ends = 0, errors = 0;
  for (const t of ["queued", "started", "delta", "done"]) source.addEventListener(t, (m) => {
    events += 1; if (t === "done") ends += 1;
  });
  source.onerror = () => {  // never closes the source itself: the browser reconnects after the end
    errors += 1;
    if (source.readyState === EventSource.CLOSED)
      fetch('/report', {method: 'POST', body: JSON.stringify({events, ends, errors, state: source.readyState})});
  };
</script>"""


class Pages:
    """The page's own origin: serves a page, collects what the page reports."""

    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []
        self.reported = threading.Event()
        self.page = b""
        pages = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/html")
                self.end_headers()
                self.wfile.write(pages.page)

            def do_POST(self) -> None:
                pages.reports.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
                pages.reported.set()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def pages() -> Iterator[Pages]:
    served = Pages()
    yield served
    served.server.shutdown()
    served.server.server_close()


def browse(url: str, profile: Path, pages: Pages, timeout: float = 60) -> dict[str, Any]:
    """Open ``url`` in headless Chromium until the page reports (the probe's flags: no network of its own)."""
    assert CHROMIUM is not None, "STREAMFLEET_REQUIRE_BROWSER is set and no Chromium is installed"
    pages.reported.clear()
    browser = subprocess.Popen(
        [
            CHROMIUM,
            *("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"),
            *("--disable-background-networking", "--disable-component-update", "--disable-sync"),
            f"--user-data-dir={profile}",
            url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert pages.reported.wait(timeout), "the page never reported"
        return pages.reports[-1]
    finally:
        stop_process(browser)


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("STREAMFLEET_REQUIRE_BROWSER"),
    reason="no Chromium: apt-get install chromium (Debian's package), or `make browser`",
)
async def test_a_browser_page_streams_a_job_with_a_read_token(
    start_gateway: GatewayFactory, start_worker: WorkerFactory, pages: Pages, tmp_path: Path
) -> None:
    assert DOC_PAGE is not None, "docs/browser.md lost its page"
    start_worker()
    gateway = start_gateway(
        env={"STREAMFLEET_GATEWAY_API_KEYS": "backend-key", "STREAMFLEET_GATEWAY_CORS_ORIGINS": pages.origin}
    )
    key = {"Authorization": "Bearer backend-key"}
    request = chat("to the browser", tokens=40, tps=40)
    async with httpx.AsyncClient(base_url=gateway, timeout=30) as backend:
        job_id = (await backend.post("/v1/jobs", json={"request": request}, headers=key)).json()["id"]
        token = (await backend.post(f"/v1/jobs/{job_id}/tokens", headers=key)).json()["token"]
        other = (await backend.post("/v1/jobs", json={"request": chat("another job")}, headers=key)).json()["id"]
        # The token reads its own job's events, and nothing else.
        assert (await backend.get(f"/v1/jobs/{other}/events", params={"token": token})).status_code == 401
        assert (await backend.get(f"/v1/jobs/{job_id}", params={"token": token})).status_code == 401
        preflight = await backend.options(
            f"/v1/jobs/{job_id}/events",
            headers={"Origin": pages.origin, "Access-Control-Request-Method": "GET"},
        )
        assert preflight.headers["access-control-allow-origin"] == pages.origin
        refused = await backend.options(
            "/v1/jobs", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
        )
        assert "access-control-allow-origin" not in refused.headers

    query = urlencode({"gateway": gateway, "job": job_id, "token": token})
    pages.page = REPORT.encode() + DOC_PAGE[1].encode()
    report = browse(f"{pages.origin}/?{query}", tmp_path / "profile-1", pages)
    assert report["text"] == expected_text(request)
    assert report["seen"]["end"] == "done" and report["seen"]["reopened"] == 0

    # A page that never closes its source: the browser reconnects after the end with the terminal
    # event's id, gets a 204, and stops for good.
    pages.page = NAIVE_PAGE.encode()
    naive = browse(f"{pages.origin}/?{query}", tmp_path / "profile-2", pages)
    assert naive["ends"] == 1 and naive["state"] == 2
    async with httpx.AsyncClient(base_url=gateway, timeout=30) as backend:
        metrics = (await backend.get("/metrics", headers=key)).text
    assert re.search(r'streamfleet_gateway_requests_total\{route="[^"]*events[^"]*",status="204"\} 1\.0', metrics), [
        line for line in metrics.splitlines() if "status=" in line
    ]
