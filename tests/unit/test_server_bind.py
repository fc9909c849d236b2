"""A service never shares its port silently (gRPC's default SO_REUSEPORT is off)."""

from __future__ import annotations

import pytest

from wicore.server import ServiceServer

from stack import free_port


async def test_a_taken_port_is_refused_with_its_address() -> None:
    port = free_port()
    first = ServiceServer("first", "127.0.0.1", port)
    await first.start()
    try:
        second = ServiceServer("second", "127.0.0.1", port)
        with pytest.raises(OSError, match=f"second: cannot listen on 127.0.0.1:{port}"):
            await second.start()
        await second.server.stop(0)
    finally:
        await first.server.stop(0)
