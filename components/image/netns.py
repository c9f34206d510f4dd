"""A network namespace whose only way out is the given TCP ports of the host's 127.0.0.1.

Inside it only a loopback interface exists (no route anywhere else); on its 127.0.0.1:<port> a listener, made from
a thread that joined the namespace for that one call, relays each connection to the host's 127.0.0.1:<port>. So a
step reaches the MLflow server on the host at the same URL, and nothing else on the host or beyond.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _listener_inside(name: str, port: int) -> socket.socket:
    """A listening socket on 127.0.0.1:port of namespace ``name``; setns applies to the calling thread only,
    so a short-lived thread makes it and the socket keeps the namespace."""
    result: dict[str, object] = {}

    def make() -> None:
        try:
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into network namespace {name}")
            finally:
                os.close(fd)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(64)
            result["sock"] = sock
        except OSError as exc:
            result["error"] = exc

    t = threading.Thread(target=make)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["sock"]  # type: ignore[return-value]


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def _serve(listener: socket.socket, port: int) -> None:
    while True:
        try:
            inner, _ = listener.accept()
        except OSError:
            return  # listener closed
        try:
            outer = socket.create_connection(("127.0.0.1", port), timeout=30)
            outer.settimeout(None)
        except OSError:
            inner.close()
            continue
        for a, b in ((inner, outer), (outer, inner)):
            threading.Thread(target=_pump, args=(a, b), daemon=True).start()


@contextlib.contextmanager
def loopback_only(*ports: int) -> Iterator[str]:
    """Yield the name of a fresh network namespace (for `ip netns exec`) reaching only these host ports."""
    name = f"finetune-image-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    listeners: list[socket.socket] = []
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True)
        for port in ports:
            listeners.append(_listener_inside(name, port))
            threading.Thread(target=_serve, args=(listeners[-1], port), daemon=True).start()
        yield name
    finally:
        for sock in listeners:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)
