"""serve's links to its agents (control links, the last stage's results): every connection vetted on its own thread,
so a silent or trickling peer never holds up the next one; one way to hang a link up."""

from __future__ import annotations

import socket
import threading
from typing import Callable

from ..runtime.transport import shut_link


def accept_each(listener: socket.socket, closed: threading.Event, vet: Callable[[socket.socket, str], None],
                name: str) -> threading.Thread:
    """Accept until `closed` (or the listener is closed), handing each connection and its peer to `vet` on a
    thread of its own; the accepting thread, started."""

    def accept() -> None:
        listener.settimeout(0.2)
        while not closed.is_set():
            try:
                sock, address = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=vet, args=(sock, f"{address[0]}:{address[1]}"), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True, name=name)
    thread.start()
    return thread


def hang_up(sock: socket.socket) -> None:
    """Both directions shut (a reader blocked on it wakes; under TLS a write racing it stays encrypted), then
    closed."""
    shut_link(sock)
    sock.close()
