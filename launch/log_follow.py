"""`dgm logs --follow`: a Ray job's log stream kept honest. Ray's log websocket carries no pings, so a connection
that dies without a close frame would leave its reader waiting forever: a heartbeat checks the job after each silent
stretch, and a stream found dead while the job runs is reopened, its replay (Ray reads the log from its start on
each connection) skipped up to what was already printed."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from launch.jobs import RECONNECT_AFTER, ClusterError, JobInfo, JobNotFoundError


@dataclass
class LogCursor:
    """How much of the job's log `stream_with_heartbeat` has passed on: `offset` characters from its start (as
    Ray's text-mode readers count them; the stream and the stored log agree)."""

    offset: int = 0


async def stream_with_heartbeat(open_stream: Callable[[], AsyncIterable[str]], write: Callable[[str], Any],
                                status: Callable[[], JobInfo], heartbeat_s: float, *, address: str, job_id: str,
                                stored_log: Callable[[], str], reconnect_after: int = RECONNECT_AFTER,
                                cursor: LogCursor | None = None) -> JobInfo | None:
    """Pass the chunks of `open_stream()` to `write` until they end (returns None), or until a status check made
    after `heartbeat_s` seconds of silence finds the job ended (returns that state; the stream may have missed
    output, which the caller takes from the stored log from `cursor.offset` on; so too when a replay ends short).

    Why: Ray's log websocket carries no pings, so a connection that dies without a close frame (a NAT's idle
    timeout, a head node gone) would leave the reader waiting forever. `status` (a blocking call, run in a
    thread so the stream keeps being read) uses a fresh connection. When `reconnect_after` checks in a row find
    the job running (not pending: no log yet), the stream is closed and a new one opened: Ray's job agent replays
    the log file from its start on every stream (`file_tail_iterator`), so the first `cursor.offset` characters of
    the new one, which were passed on already, are dropped, across chunk boundaries. After a stream that brought
    nothing new (a quiet job, whose every reopening replays its whole log; a head slow to start streams), twice as
    many checks are waited for before the next reopening, up to 8 times as many: a quiet job's log is replayed
    at most every `8 * reconnect_after * heartbeat_s` seconds, and new output resets the wait. A replay still short of `cursor.offset` at a heartbeat is checked
    against the stored log (`stored_log`, blocking): one shorter than what was passed on was cut down (rotated,
    truncated) and is passed on from its new start after a note on stderr. A failing `status` or `stored_log` is
    ClusterError (JobNotFoundError when the job is gone).
    """
    if reconnect_after < 1:
        raise ValueError(f"reconnect_after={reconnect_after}: must be at least 1")
    cursor = cursor if cursor is not None else LogCursor()
    last = time.monotonic()

    async def next_chunk(stream: AsyncIterator[str]) -> str | None:  # None: the stream ended
        try:
            return await anext(stream)
        except StopAsyncIteration:
            return None

    async def close(stream: AsyncIterator[str], pending: asyncio.Future[str | None]) -> None:
        pending.cancel()  # a read on a dead connection ends only so
        await asyncio.gather(pending, return_exceptions=True)  # lets the stream close its session
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()

    async def ask(check: Callable[[], Any]) -> Any:
        try:
            return await asyncio.to_thread(check)
        except JobNotFoundError:
            raise JobNotFoundError(
                f"following logs of job {job_id} on {address}: nothing came for {time.monotonic() - last:.1f} s "
                "and the job no longer exists on the cluster (it was deleted, or the head restarted and lost its "
                "job table); what it printed is gone with it") from None
        except ClusterError as e:
            raise ClusterError(
                f"following logs of job {job_id} on {address}: nothing came for {time.monotonic() - last:.1f} "
                f"s and checking the job's state failed ({e}); the job may still be running: check "
                f"`dgm status {job_id}` once the cluster is reachable") from None

    stream = aiter(open_stream())
    pending = asyncio.ensure_future(next_chunk(stream))
    skip = 0  # characters of this stream still to drop: its replay of what was passed on already
    replayed = 0  # characters of this stream dropped so far
    fresh = False  # whether this stream has brought anything not passed on before (more than its replay)
    silent = 0  # checks in a row that found the job running and nothing come since
    patience = reconnect_after  # silent checks before the stream is reopened
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=heartbeat_s)
            if done:
                chunk = pending.result()
                if chunk is None:  # the job ended; a replay that ended short of what was passed on: a cut log
                    return await ask(status) if skip else None
                last, silent = time.monotonic(), 0
                if skip:
                    dropped = min(skip, len(chunk))
                    chunk, skip, replayed = chunk[dropped:], skip - dropped, replayed + dropped
                if chunk:
                    write(chunk)
                    cursor.offset += len(chunk)
                    fresh, patience = True, reconnect_after
                pending = asyncio.ensure_future(next_chunk(stream))
                continue
            info = await ask(status)
            if info.terminal:
                return info
            if pending.done():  # a chunk came during the check
                continue
            if skip:  # the replay stopped short of what was passed on: stalled, or the log is shorter now
                log = await ask(stored_log)
                if len(log) < cursor.offset:
                    note_shorter_log(job_id, cursor.offset)
                    skip = 0
                    if log[:replayed]:
                        write(log[:replayed])
                    cursor.offset = replayed
            if info.status == "PENDING":  # no driver, so no log yet: the stream waits for one
                continue
            silent += 1
            if silent >= patience:
                if not fresh:  # a quiet job (each reopening replays its whole log), or a head slow to start streams
                    patience = min(2 * patience, 8 * reconnect_after)
                await close(stream, pending)
                stream = aiter(open_stream())
                pending = asyncio.ensure_future(next_chunk(stream))
                skip, replayed, fresh, silent = cursor.offset, 0, False, 0
    finally:
        await close(stream, pending)


def note_shorter_log(job_id: str, offset: int) -> None:
    print(f"[logs] the log of job {job_id} is now shorter than the {offset} characters already printed (rotated or "
          "truncated?): printing it from its new start", file=sys.stderr)
