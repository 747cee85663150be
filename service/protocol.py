"""The HTTP connection protocol `coordtok serve` runs: uvicorn's h11 protocol with a deadline on
request headers, which uvicorn lacks (a connection that sends nothing, or a header line now and
then, stayed open indefinitely: its keep-alive timer starts only after a response and any byte
stops it).

The headers of a request must be complete within `header_timeout_s` of the connection opening,
or of the first byte of a later request on a kept-alive connection; otherwise the connection is
closed. Bodies have their own deadline (service.middleware.BodyLimitMiddleware); idle kept-alive
connections keep uvicorn's `timeout_keep_alive`.
"""
from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def header_timeout_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """An H11Protocol class (uvicorn.Config's `http`) whose connections enforce `header_timeout_s`."""

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and self._between_requests():  # a later request begins
                self._arm()
            super().data_received(data)
            if not self._between_requests():  # its headers are complete: the body has its own deadline
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self._between_requests() and not self.transport.is_closing():
                try:
                    self.conn.send(h11.ConnectionClosed())
                except h11.LocalProtocolError:
                    pass
                self.transport.close()

    return HeaderTimeoutProtocol
