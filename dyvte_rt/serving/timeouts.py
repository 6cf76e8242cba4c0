"""A header timeout for uvicorn, which has none: a connection that does not finish sending a
request's headers within the limit (after it opens, or after its previous answer once it starts
the next request) gets a JSON 408 and is closed. Without it a client that opens connections and
sends nothing, or a header a byte a minute, holds them forever. The body's own limit is the app's
(`ServerLimits.body_timeout`); idle keep-alive connections are uvicorn's `timeout_keep_alive`.
"""

from __future__ import annotations

import asyncio
import json

TIMEOUT_BODY = json.dumps(
    {
        "error": {
            "message": "the request headers did not arrive in time",
            "type": "invalid_request_error",
            "param": None,
            "code": "timeout",
        }
    }
).encode()


def header_timeout_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol with the header timeout (made on first use: uvicorn is optional)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # a request begun, its headers not complete
                self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()  # arms the keep-alive timer; ours waits for data
            self._disarm()

        def _arm(self) -> None:
            if self._header_timer is None and not self.transport.is_closing():
                self._header_timer = self.loop.call_later(seconds, self._timed_out)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _timed_out(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            head = (
                "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                f"content-length: {len(TIMEOUT_BODY)}\r\nconnection: close\r\n\r\n"
            )
            self.transport.write(head.encode() + TIMEOUT_BODY)
            self.transport.close()

    return HeaderTimeoutProtocol
