"""API keys and sockets: bearer keys checked in constant time, a socket bound before any model loads, uvicorn."""

from __future__ import annotations

import contextlib
import hmac
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from persllm.errors import ConfigError, PersllmError

KEYS_ENV = "PERSLLM_API_KEYS"


class PortInUseError(PersllmError):
    """The address to listen on is taken."""



def load_api_keys(path: Path | None = None, environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """Keys from a file (one per line, # comments) and from $PERSLLM_API_KEYS (comma-separated)."""
    env = os.environ if environ is None else environ
    keys = [k.strip() for k in env.get(KEYS_ENV, "").split(",") if k.strip()]
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"API key file {path} not found; create it with one key per line")
        found = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()
                 if ln.strip() and not ln.strip().startswith("#")]
        if not found:
            raise ConfigError(f"API key file {path} holds no keys; add one key per line")
        keys += found
    return tuple(dict.fromkeys(keys))


def key_ok(keys: Sequence[str], authorization: str | None) -> bool:
    """True when no keys are configured or the bearer token matches one (constant-time, no early exit)."""
    if not keys:
        return True
    scheme, _, token = (authorization or "").partition(" ")
    given = token.strip().encode() if scheme.lower() == "bearer" else b""
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(key.encode(), given)
    return ok and bool(given)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or PortInUseError; bound before any model loads."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise PersllmError(f"cannot listen on {host!r}: {exc.strerror}; use --host 127.0.0.1 or 0.0.0.0") from exc
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise PortInUseError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); the port is in use: stop the "
                             "other server or pick another with --port") from exc
    sock.set_inheritable(True)
    return sock


def run_server(app: Any, sock: socket.socket, log_level: str = "info") -> None:
    """Serve `app` on an already bound socket until interrupted."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5, access_log=log_level == "debug")
    uvicorn.Server(config).run(sockets=[sock])


@contextlib.contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` on a background thread (tests, notebooks); yields the base URL, stops on exit."""
    import uvicorn

    sock = bind_socket(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        raise PersllmError(f"the server on {host}:{sock.getsockname()[1]} did not start")
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
