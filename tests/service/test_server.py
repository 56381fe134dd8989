"""api.server: what `dpo-service api` gives uvicorn."""
from __future__ import annotations

import asyncio
import socket

from uvicorn.config import Config
from uvicorn.server import ServerState

from api.server import NoDelayProtocol


class _Transport:
    """Enough of an asyncio transport for a protocol's connection_made."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def get_extra_info(self, name: str, default=None):
        return {"socket": self.sock, "sockname": self.sock.getsockname(),
                "peername": self.sock.getpeername()}.get(name, default)


def _nodelay(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


def test_connections_get_nodelay_on_a_socket_bound_as_uvicorn_binds_it_for_workers():
    """uvicorn's --workers socket is socket.socket(AF_INET): protocol 0, on which asyncio sets no
    TCP_NODELAY (it checks the protocol is TCP). The protocol sets it on each accepted connection."""
    config = Config(app=lambda *_: None, http=NoDelayProtocol)
    config.load()
    with socket.socket(family=socket.AF_INET) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()) as _client:
            conn, _ = listener.accept()
            with conn:
                assert conn.proto == 0 and not _nodelay(conn)  # what asyncio would leave alone
                loop = asyncio.new_event_loop()  # its own: another test may have left none current
                try:
                    protocol = NoDelayProtocol(config=config, server_state=ServerState(), app_state={}, _loop=loop)
                    protocol.connection_made(_Transport(conn))
                    assert _nodelay(conn)
                finally:
                    loop.close()
