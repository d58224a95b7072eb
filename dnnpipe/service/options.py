"""The inference service's options, and the trust rules checked once before it listens (docs/service.md)."""

from __future__ import annotations

import hmac
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import ConfigError


@dataclass(frozen=True)
class ServiceOptions:
    model_name: str
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the service reports the one it got)
    http: bool = True  # serve REST at host:port (False: the gRPC front end alone)
    grpc_host: Optional[str] = None  # serve the OIP's gRPC side here too (None: not at all)
    grpc_port: int = 0
    request_timeout: float = 30.0  # s from arrival to answer, else 504
    token_file: Optional[Path] = None  # a bearer token every non-health request must carry
    insecure: bool = False  # a non-loopback address without a token
    tls_cert: Optional[Path] = None
    tls_key: Optional[Path] = None
    queue_size: int = 64  # inputs accepted and not yet delivered, at most; beyond: 503
    max_batch: int = 32
    max_body_bytes: int = 64 << 20
    read_timeout: float = 10.0  # s a request may take to arrive once its first byte came, else 408
    idle_timeout: float = 60.0  # s a kept-alive connection may stay silent
    max_connections: int = 256  # open at once, each with its thread; beyond: 503 and close
    drain_timeout: float = 12.0  # s for in-flight requests on shutdown (exit within 15 s)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def addresses(options: ServiceOptions) -> list[tuple[str, str, int]]:
    """The front ends to listen on: (flag, host, port)."""
    found = [("--http", options.host, options.port)] if options.http else []
    if options.grpc_host is not None:
        found.append(("--grpc", options.grpc_host, options.grpc_port))
    return found


def read_token(options: ServiceOptions) -> Optional[str]:
    """The bearer token, or None when requests need none; refuses a non-loopback address without one."""
    if options.token_file is None:
        for flag, host, port in addresses(options):
            if not is_loopback(host) and not options.insecure:
                raise ConfigError(f"{flag} {host}:{port} is not a loopback address: give "
                                  f"--http-token-file (or --http-insecure to serve anyone who can reach it)")
        return None
    try:
        token = options.token_file.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{options.token_file}: cannot read the token ({e})") from None
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        raise ConfigError(f"{options.token_file}: the token must be one word of printable characters")
    return token


def tls_context(options: ServiceOptions) -> Optional[ssl.SSLContext]:
    if (options.tls_cert is None) != (options.tls_key is None):
        raise ConfigError("--http-tls-cert and --http-tls-key go together")
    if options.tls_cert is None or options.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(options.tls_cert, options.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"{options.tls_cert}, {options.tls_key}: cannot load the certificate and key ({e})") \
            from None
    return context


def tls_pair(options: ServiceOptions) -> Optional[tuple[bytes, bytes]]:
    """The PEM key and certificate as bytes (grpc.ssl_server_credentials takes them so), once tls_context has
    checked they load."""
    if options.tls_cert is None or options.tls_key is None:
        return None
    try:
        return options.tls_key.read_bytes(), options.tls_cert.read_bytes()
    except OSError as e:
        raise ConfigError(f"{options.tls_cert}, {options.tls_key}: cannot read the certificate and key ({e})") \
            from None


def bearer_ok(token: Optional[str], authorization: str) -> bool:
    """Whether an `Authorization` value (HTTP header, gRPC metadata) carries the token (constant time)."""
    if token is None:
        return True
    scheme, _, value = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())
