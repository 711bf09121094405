"""The access log: one line per request, written by a thread so the event loop never waits on disk.

Lines are formatted on the loop (cheap string work) and handed to a writer
thread through a queue; the thread writes them in batches to one file opened
once (or stdout). If the disk cannot keep up, at most ``MAX_QUEUED`` lines
wait; beyond that lines are dropped and counted, never the loop blocked.
Query strings are logged with the values of secret-looking parameters
(``key``, ``token``, ``signature``...) replaced by ``[redacted]``.
"""

from __future__ import annotations

import json
import queue
import re
import sys
import threading
import time
from typing import IO, Any, Dict, List, Optional

MAX_QUEUED = 100_000
_SECRET_PARAM = re.compile(
    rb"(?i)([?&](?:[\w.-]*(?:key|token|secret|password|passwd|signature|sig|auth|credential)[\w.-]*)=)[^&#]*"
)


def redact_target(target: bytes) -> str:
    if b"?" in target:
        target = _SECRET_PARAM.sub(rb"\1[redacted]", target)
    return target.decode("latin-1")


class AccessLog:
    def __init__(self, destination: str, fmt: str) -> None:
        self.fmt = fmt
        self.dropped = 0
        self._stream: IO[str]
        self._owns_stream = destination != "-"
        self._stream = open(destination, "a", buffering=1 << 16) if self._owns_stream else sys.stdout
        self._queue: "queue.SimpleQueue[Optional[str]]" = queue.SimpleQueue()
        self._second = -1
        self._stamp = ""
        self._thread = threading.Thread(target=self._write_loop, name="pyproxy-access-log", daemon=True)
        self._thread.start()

    def log(
        self,
        client: str,
        method: str,
        target: bytes,
        status: int,
        body_bytes: int,
        duration: float,
        ttfb: float,
        cache: str,
        dedup: str,
        request_id: str,
        upstream: str = "",
        attempts: int = 0,
        usage: Optional[Dict[str, Any]] = None,
    ) -> None:
        """``usage``: with client keys, the key, tenant, model and tokens (see
        Admission.done); never the key itself."""
        if self._queue.qsize() >= MAX_QUEUED:
            self.dropped += 1
            return
        now = time.time()
        path = redact_target(target)
        if self.fmt == "json":
            line = json.dumps(
                {
                    "time": round(now, 3),
                    "client": client,
                    "method": method,
                    "path": path,
                    "status": status,
                    "bytes": body_bytes,
                    "duration_ms": round(duration * 1000, 3),
                    "upstream_ttfb_ms": round(ttfb * 1000, 3) if ttfb >= 0 else None,
                    "cache": cache,
                    "dedup": dedup,
                    "request_id": request_id,
                    "upstream": upstream or None,
                    "attempts": attempts or None,
                    **(usage or {}),
                },
                separators=(",", ":"),
            )
        else:
            second = int(now)
            if second != self._second:
                self._second = second
                self._stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(second))
            ttfb_text = f"{ttfb:.3f}" if ttfb >= 0 else "-"
            line = (
                f'{client} - - [{self._stamp}] "{method} {path} HTTP/1.1" {status} {body_bytes} '
                f"rt={duration:.3f} uct={ttfb_text} cache={cache} dedup={dedup} rid={request_id or '-'}"
            )
            if upstream:
                line += f" upstream={upstream} attempts={attempts}"
            if usage is not None:
                line += " key={key} tenant={tenant} model={model} in={input_tokens} out={output_tokens} usage={usage}".format(
                    **{k: "-" if v is None else v for k, v in usage.items()}
                )
        self._queue.put(line)

    def _write_loop(self) -> None:
        stream = self._stream
        while True:
            line = self._queue.get()
            batch: List[str] = []
            while line is not None:
                batch.append(line)
                if len(batch) >= 512:
                    break
                try:
                    line = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                try:
                    stream.write("\n".join(batch) + "\n")
                    stream.flush()
                except (OSError, ValueError):  # disk full, stdout closed: never the loop's problem
                    pass
            if line is None:
                return

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(5.0)
        if self._owns_stream:
            self._stream.close()
