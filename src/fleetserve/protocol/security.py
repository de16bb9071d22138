"""The fleet's link security: the shared secret on every gRPC call of both planes, and optional mutual TLS.

One :class:`FleetCredentials` holds what a process knows: the fleet secret (the ``registration_token``
setting) and, optionally, the fleet CA's certificate with this process's own certificate and key. From it come

* the server side: :meth:`FleetCredentials.server` (a ``grpc.aio`` server whose interceptor refuses, with
  UNAUTHENTICATED, every call that lacks ``authorization: Bearer <secret>``) and
  :meth:`FleetCredentials.server_port` (a mutual-TLS port when certificates are configured, else a plain one);
* the client side: :meth:`FleetCredentials.channel`, a channel whose interceptors put the secret on every call,
  over mutual TLS when certificates are configured.

No secret configured: the calls are not checked (local development). Certificate settings take a file path or
the PEM text itself (a config file may carry it inline). This module imports nothing of the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from fleetserve.errors import InvalidRequestError

AUTH_HEADER = "authorization"
SECRET_ENV = "FLEETSERVE_REGISTRATION_TOKEN"
TLS_ENV = ("FLEETSERVE_TLS_CA", "FLEETSERVE_TLS_CERT", "FLEETSERVE_TLS_KEY")
PRIORITY_MIN = -1000
PRIORITY_MAX = 1000
"""The Generate priorities a worker accepts (smaller runs first); others are refused with INVALID_ARGUMENT."""

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _pem(value: str, setting: str) -> bytes:
    """A PEM block given inline, or the contents of the file it names."""
    if value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise InvalidRequestError(f"cannot read {setting} {value}: {exc.strerror}", setting) from None


@dataclass(frozen=True)
class FleetCredentials:
    """The fleet secret and this process's TLS material (each a file path or PEM text; empty: none)."""

    secret: str = ""
    ca: str = ""
    cert: str = ""
    key: str = ""

    @classmethod
    def from_settings(cls, settings: Any) -> FleetCredentials:
        """From a gateway's or worker's settings; a half-configured TLS (not all three files) is refused."""
        creds = cls(
            settings.registration_token,
            getattr(settings, "tls_ca", "") or "",
            getattr(settings, "tls_cert", "") or "",
            getattr(settings, "tls_key", "") or "",
        )
        creds.check()
        return creds

    @property
    def tls(self) -> bool:
        return bool(self.ca or self.cert or self.key)

    def check(self) -> None:
        """Raise InvalidRequestError unless TLS is off or fully configured with readable files."""
        if not self.tls:
            return
        missing = [
            name for name, value in (("tls_ca", self.ca), ("tls_cert", self.cert), ("tls_key", self.key)) if not value
        ]
        if missing:
            raise InvalidRequestError(
                f"mutual TLS needs tls_ca, tls_cert and tls_key together; missing: {', '.join(missing)}", missing[0]
            )
        self._material()

    def _material(self) -> tuple[bytes, bytes, bytes]:
        return _pem(self.ca, "tls_ca"), _pem(self.cert, "tls_cert"), _pem(self.key, "tls_key")

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata a call needs (empty without a secret)."""
        return ((AUTH_HEADER, f"Bearer {self.secret}"),) if self.secret else ()

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> FleetCredentials:
        """What ``child_env`` hands a process: the secret and TLS material from its variables (unset: none)."""
        env = os.environ if env is None else env
        ca, cert, key = (env.get(name, "") for name in TLS_ENV)
        return cls(env.get(SECRET_ENV, ""), ca, cert, key)

    def child_env(self) -> dict[str, str | None]:
        """FLEETSERVE_* variables that hand a child process this secret and TLS material (None: unset it)."""
        values = (self.secret, self.ca, self.cert, self.key)
        return {name: value or None for name, value in zip((SECRET_ENV, *TLS_ENV), values, strict=True)}

    # -- server side -------------------------------------------------------------------------------------

    def server(self, options: Sequence[tuple[str, Any]] | None = None) -> grpc.aio.Server:
        """A grpc.aio server whose every call must carry the secret (when there is one)."""
        interceptors = [SecretInterceptor(self.secret)] if self.secret else []
        return grpc.aio.server(options=options, interceptors=interceptors)

    def server_port(self, server: grpc.aio.Server, address: str) -> int:
        """Listen on ``address``: mutual TLS (client certificates signed by the fleet CA required) when
        certificates are configured, else plain. Returns the bound port; OSError when it cannot listen."""
        if self.tls:
            ca, cert, key = self._material()
            creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        return port

    # -- client side -------------------------------------------------------------------------------------

    def channel(self, target: str, options: Sequence[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
        """A grpc.aio channel to ``target`` that puts the secret on every call, over mutual TLS when
        certificates are configured."""
        interceptors = _client_interceptors(self.metadata()) if self.secret else None
        if self.tls:
            ca, cert, key = self._material()
            creds = grpc.ssl_channel_credentials(ca, key, cert)
            return grpc.aio.secure_channel(target, creds, options=options, interceptors=interceptors)
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)


# -- the secret on the server --------------------------------------------------------------------------------


async def _deny_unary(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)


async def _deny_stream(request: Any, context: grpc.aio.ServicerContext):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)
    yield  # never reached: makes this an async generator, as streaming handlers are


async def _first_message(requests: Any) -> None:
    """Wait briefly for a streaming call's first message (left unparsed). A client whose first message is still
    being sent when the refusal arrives would see its send fail (INTERNAL) instead of the refusal."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(requests.__anext__(), FIRST_MESSAGE_WAIT_S)


async def _deny_stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> None:
    await _first_message(requests)
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)


async def _deny_stream_stream(requests: Any, context: grpc.aio.ServicerContext):
    await _first_message(requests)
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)
    yield  # never reached: makes this an async generator, as streaming handlers are


FIRST_MESSAGE_WAIT_S = 0.5
_DENIED = "missing or wrong fleet secret (authorization: Bearer <registration token>)"
# Raw bytes in, nothing out: a refused call's message is never parsed.
_DENIALS = {
    (False, False): grpc.unary_unary_rpc_method_handler(_deny_unary),
    (False, True): grpc.unary_stream_rpc_method_handler(_deny_stream),
    (True, False): grpc.stream_unary_rpc_method_handler(_deny_stream_unary),
    (True, True): grpc.stream_stream_rpc_method_handler(_deny_stream_stream),
}


class SecretInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call of the server it guards that does not carry the fleet secret."""

    def __init__(self, secret: str):
        self._expected = f"Bearer {secret}".encode()

    def allowed(self, metadata: Any) -> bool:
        """Whether the call's metadata carries the secret (compared in constant time)."""
        for key, value in metadata or ():
            if key == AUTH_HEADER:
                given = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(given, self._expected)
        return False

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        if self.allowed(handler_call_details.invocation_metadata):
            return handler
        if handler is None:  # an unknown method: refused the same way, so nothing is learned without the secret
            return _DENIALS[(False, False)]
        return _DENIALS[(bool(handler.request_streaming), bool(handler.response_streaming))]


# -- the secret on the client --------------------------------------------------------------------------------


def _with_secret(details: grpc.aio.ClientCallDetails, extra: tuple[tuple[str, str], ...]):
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    for key, value in extra:
        metadata.add(key, value)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, extra: tuple[tuple[str, str], ...]):
        self.extra = extra

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_secret(client_call_details, self.extra), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, extra: tuple[tuple[str, str], ...]):
        self.extra = extra

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_with_secret(client_call_details, self.extra), request)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, extra: tuple[tuple[str, str], ...]):
        self.extra = extra

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(_with_secret(client_call_details, self.extra), request_iterator)


def _client_interceptors(extra: tuple[tuple[str, str], ...]) -> list[grpc.aio.ClientInterceptor]:
    return [_UnaryUnary(extra), _UnaryStream(extra), _StreamStream(extra)]


# -- where a gateway listens, and whom it dials --------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether a listening host is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_networks(cidrs: Sequence[str]) -> list[Network]:
    """The allowed worker networks; a malformed one raises InvalidRequestError naming it."""
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError as exc:
            raise InvalidRequestError(f"worker_networks: {cidr!r} is not a network: {exc}", "worker_networks") from None
    return networks


def split_host(address: str) -> str:
    """The host part of HOST:PORT or [V6]:PORT."""
    if address.startswith("["):
        return address[1:].split("]", 1)[0]
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


def resolve(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses a host name (or literal) stands for; empty when it does not resolve. Blocking."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return []
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


def address_allowed(address: str, networks: Sequence[Network]) -> bool:
    """Whether every address the host of ``address`` resolves to lies in one of ``networks`` (none: any)."""
    if not networks:
        return True
    found = resolve(split_host(address))
    return bool(found) and all(any(ip in net for net in networks) for ip in found)
