"""Writes that go straight to the socket when nothing is queued before them.

Why it exists: Twisted's TCP transport always queues a write and sends it on the
reactor's next turn, after registering the socket for write readiness (an
``epoll_ctl``) and unregistering it once the queue is empty (another).  For the
small messages of the HTTP passthrough (a request head to the upstream, an answer
to the client) on a socket whose buffer is empty, that is two system calls and a
reactor turn spent to learn what ``send`` knows at once: strace counted them on
every proxied request (bench/http_passthrough/README.md).
"""

from __future__ import annotations

from twisted.internet import tcp


def write_now(transport, data: bytes) -> None:
    """``transport.write(data)``, sent at once when nothing is queued before it.

    Only a plain TCP connection (not TLS) with an empty queue and no producer
    qualifies; what the socket does not take, and any error, go the usual way
    (the queue, and ``doWrite`` meeting the error and closing the connection)."""
    if (type(transport) is tcp.Server or type(transport) is tcp.Client) and not transport.TLS \
            and not transport._tempDataBuffer and not transport.dataBuffer and transport.connected \
            and not transport.disconnecting and not transport._writeDisconnected and transport.producer is None:
        sent = transport.writeSomeData(data)
        if isinstance(sent, int):
            if sent == len(data):
                return
            data = data[sent:]
        # An error instance: transport.write below meets it in doWrite and closes as usual.
    transport.write(data)
