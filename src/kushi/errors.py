"""One error hierarchy for kushi.

Every error that can end a request declares the HTTP status kushi answers with and the
RFC 9209 (Proxy-Status) error type that names it. ``render_error`` in ``http1`` turns any
of them into a response; nothing else builds error responses.

Statuses follow RFC 9209 section 2.3's recommendations, except ``destination_not_found``,
which kushi (a forward proxy choosing among a name's addresses by family) answers with
502: the destination exists but has no address of a family the egress policy allows.
"""

from __future__ import annotations


class KushiError(Exception):
    """Base of every error kushi raises on purpose."""

    status: int = 500
    error_type: str = "proxy_internal_error"
    #: Whether the client connection must be closed after the error response.
    close: bool = False
    #: Connection attempts that led to this error (see connector.Attempt.describe).
    attempts: tuple[str, ...] = ()

    def __init__(self, details: str = "") -> None:
        super().__init__(details or self.error_type)
        self.details = details

    @property
    def params(self) -> tuple[tuple[str, str], ...]:
        """Extra RFC 9209 parameters of this error type (name, string value)."""
        return ()


class ConfigError(KushiError):
    """A bad configuration value: one line naming the key, exit code 2."""

    error_type = "proxy_configuration_error"

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem

    def __str__(self) -> str:
        return f"config error: {self.key}: {self.problem}"


# --- the client sent something wrong (RFC 9112, RFC 9110) ---------------------------------


class RequestError(KushiError):
    """Malformed request: answered, then the connection is closed (RFC 9112 section 2.2)."""

    status = 400
    error_type = "http_request_error"
    close = True


class URITooLong(RequestError):
    status = 414


class HeaderTooLarge(RequestError):
    status = 431


class VersionNotSupported(RequestError):
    status = 505


class RequestTimeout(RequestError):
    status = 408


class SocksRequestError(RequestError):
    """Malformed SOCKS5 input (RFC 1928, RFC 1929): answered with ``reply`` where a reply
    can be sent, then the connection is closed. ``socks5.reply_for`` maps the others."""

    #: RFC 1928 section 6 REP code (0x01: general SOCKS server failure).
    reply: int = 0x01


class SocksCommandNotSupported(SocksRequestError):
    reply = 0x07


class SocksAddressTypeNotSupported(SocksRequestError):
    reply = 0x08


class RequestDenied(KushiError):
    """The client or the request is not allowed (allow list, CONNECT port, policy)."""

    status = 403
    error_type = "http_request_denied"


class ClientNotAllowed(RequestDenied):
    """The client is not in the listener's allow list: no request of it can pass, so the
    connection is closed after the 403 (it must not hold a slot with keep-alive)."""

    close = True


class ProxyAuthRequired(KushiError):
    status = 407
    error_type = "http_request_denied"


class AuthRateLimited(KushiError):
    """Too many failed proxy-authentication attempts from one client (RFC 6585 429):
    answered at once, without a bcrypt check, and the connection closed."""

    status = 429
    error_type = "http_request_denied"
    close = True


class CodingNotImplemented(RequestError):
    """RFC 9112 section 6.1: a transfer coding kushi does not understand gets 501."""

    status = 501


class LoopDetected(KushiError):
    status = 502
    error_type = "proxy_loop_detected"


class NotProxied(KushiError):
    """An absolute-form request on a listener that does not forward to arbitrary hosts."""

    status = 403
    error_type = "http_request_denied"


class TooManyConnections(KushiError):
    status = 503
    error_type = "connection_limit_reached"
    close = True


# --- name resolution and connecting (the egress policy) -------------------------------


class DNSError(KushiError):
    """RFC 9209 section 2.3.2: ``rcode`` is the DNS RCODE the nameserver answered with
    (NXDOMAIN, SERVFAIL, REFUSED...; NOERROR for a name without address records)."""

    status = 502
    error_type = "dns_error"

    def __init__(self, details: str = "", rcode: str | None = None) -> None:
        super().__init__(details)
        self.rcode = rcode

    @property
    def params(self) -> tuple[tuple[str, str], ...]:
        return (("rcode", self.rcode),) if self.rcode else ()


class DNSTimeout(KushiError):
    status = 504
    error_type = "dns_timeout"


class DestinationNotFound(KushiError):
    """The name has no address of a family the egress policy allows."""

    status = 502
    error_type = "destination_not_found"


class DestinationUnavailable(KushiError):
    """No backend is available (reverse and TCP modes: all marked down)."""

    status = 503
    error_type = "destination_unavailable"


class DestinationProhibited(KushiError):
    status = 502
    error_type = "destination_ip_prohibited"


class DestinationUnroutable(KushiError):
    status = 502
    error_type = "destination_ip_unroutable"


class ConnectionRefused(KushiError):
    status = 502
    error_type = "connection_refused"


class ConnectionLost(KushiError):
    """The peer closed or reset a connection while kushi was writing to it or waiting on
    it. ``netio.Conn`` maps the operating system's connection errors to this one, at the
    network boundary; nothing more can be sent on that connection."""

    status = 502
    error_type = "connection_terminated"


class ConnectionTimeout(KushiError):
    status = 504
    error_type = "connection_timeout"


# --- the upstream answered wrongly ---------------------------------------------------


class UpstreamError(KushiError):
    status = 502
    error_type = "http_protocol_error"
    close = True


class ResponseIncomplete(UpstreamError):
    error_type = "http_response_incomplete"


class ResponseTimeout(UpstreamError):
    status = 504
    error_type = "http_response_timeout"


class ConnectionReadTimeout(UpstreamError):
    """The upstream sent nothing of the response body for ``timeouts.response_body_idle``."""

    status = 504
    error_type = "connection_read_timeout"


class ConnectionTerminated(UpstreamError):
    error_type = "connection_terminated"


class ResponseHeaderTooLarge(UpstreamError):
    error_type = "http_response_header_section_size"


class ProxyProtocolError(KushiError):
    """A malformed or untrusted PROXY protocol header: the connection is closed unanswered."""

    status = 400
    error_type = "http_request_error"
    close = True


class TLSHandshakeError(KushiError):
    """A client of a TLS listener failed its handshake (plain text or garbage sent to the
    TLS port, no common version or ALPN protocol, or a reset): closed unanswered, as
    nothing can be said to it in TLS. RFC 9209 names TLS errors with the next hop
    ``tls_protocol_error``; kushi uses the same type for the client side."""

    status = 400
    error_type = "tls_protocol_error"
    close = True


class TLSHandshakeTimeout(TLSHandshakeError):
    """No finished handshake within ``timeouts.header_read``."""

    status = 408
