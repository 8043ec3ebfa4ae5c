"""Malformed requests against the sandbox: a 4xx answer, at most a structlog event, and never a
traceback or a plain-text line from aiohttp's own loggers."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import textwrap

import aiohttp
import pytest
import structlog

from runner.sandbox import SandboxConfig, serve_sandbox
from tests.e2e import ROOT, clean_env

TOKEN = "uc_" + "Ab3" * 13 + "x"
HUGE = "a" * 10_000_000
# Raw requests aiohttp's parser refuses before any handler runs.
MALFORMED = {
    "huge header": b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Big: "
    + b"b" * 100_000
    + b"\r\n\r\n",
    "header without a colon": b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    "two lengths": b"POST /api/v1/cards/x/topup HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nhello",
    "not HTTP at all": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
}


async def _raw(port: int, data: bytes) -> bytes:
    """Send `data` as is and return the start of whatever comes back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(200), 5)
    finally:
        writer.close()


@pytest.mark.anyio
async def test_malformed_requests_get_400_and_one_event_without_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 10 MB card id, a header over the limit, a broken request: each is answered 400, and
    logged as a structlog event naming the error type and status, without traceback or request
    text; nothing reaches stdlib logging."""
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as events:
        async with serve_sandbox(SandboxConfig(token=TOKEN)) as sandbox:
            async with (
                aiohttp.ClientSession() as session,
                session.get(
                    f"{sandbox.base_url}/cards/{HUGE}",
                    headers={"Authorization": f"Bearer {TOKEN}"},
                ) as reply,
            ):
                statuses = [reply.status]
            for data in MALFORMED.values():
                answer = await _raw(sandbox.port, data)
                statuses.append(int(answer.split(b" ")[1]) if answer else 0)
    assert statuses[:-1] == [400] * len(MALFORMED)
    assert statuses[-1] in (0, 400)  # garbage that is not HTTP may just be hung up on
    assert [r for r in caplog.records if r.name.startswith("aiohttp")] == []
    errors = [e for e in events if e["event"] == "sandbox.http_error"]
    assert len(errors) >= len(MALFORMED)
    for event in events:
        assert "exc_info" not in event
        text = json.dumps(event)
        assert "aaaaaaaa" not in text
        assert "bbbbbbbb" not in text
        assert TOKEN not in text
    assert {e["error"] for e in errors} >= {"LineTooLong", "BadHttpMessage"}
    assert {e["status"] for e in errors} == {400}


@pytest.mark.anyio
async def test_routing_ends_with_the_last_sandbox() -> None:
    """aiohttp's loggers are left as they were once every sandbox has stopped."""
    server = logging.getLogger("aiohttp.server")
    before = list(server.filters)
    async with serve_sandbox(SandboxConfig()), serve_sandbox(SandboxConfig()):
        assert len(server.filters) == len(before) + 1
    assert server.filters == before


_SCRIPT = textwrap.dedent(
    """
    import asyncio, aiohttp
    from runner.logs import configure_logging
    from runner.sandbox import SandboxConfig, serve_sandbox

    async def main():
        configure_logging(provider="sandbox", fmt="json")
        async with serve_sandbox(SandboxConfig()) as sandbox, aiohttp.ClientSession() as session:
            url = sandbox.base_url + "/cards/" + "a" * 10_000_000
            async with session.get(url, headers={"Authorization": "Bearer uc_" + "a" * 40}) as r:
                print(r.status)

    asyncio.run(main())
    """
)


def test_json_mode_stderr_holds_json_lines_only() -> None:
    """In a process logging JSON, a 10 MB card id leaves only JSON lines on stderr."""
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout.strip()) == (0, "400"), done.stderr[-2000:]
    lines = done.stderr.splitlines()
    assert lines, "the bad request was not logged at all"
    events = [json.loads(line) for line in lines]  # raises on any line that is not JSON
    assert [e["event"] for e in events] == ["sandbox.http_error"]
