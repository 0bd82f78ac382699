"""TLS on kushi's own listeners: the server-side context, built (and rebuilt) here only.

A forward or reverse listener with ``tls_cert`` and ``tls_key`` accepts TLS connections:
clients reach an ``https://`` proxy (curl ``-x https://``, a PAC file's ``HTTPS
host:port``) or a reverse proxy that terminates TLS in front of a plain-HTTP backend.

- **One context per listener build.** ``server_context`` loads the certificate chain and
  the key into a new ``ssl.SSLContext``; ``ListenerState`` calls it on start and on every
  reload (SIGHUP), so a renewed certificate reaches the next handshake while connections
  already open keep the context they were accepted with. A reload whose files are bad
  keeps the running context (the reload fails as a whole, in one log line).
- **TLS 1.2 or later, ALPN ``http/1.1``** (RFC 7301): kushi speaks HTTP/1.1 only; a
  client offering ``h2`` alone gets no protocol selected, so it knows before it sends.
- **Files checked at load.** A missing or unreadable file, a file without a certificate
  or a key, a key protected by a passphrase and a key that does not belong to the
  certificate are each a ``ConfigError`` naming the file (exit 2, or a failed reload).
- **The handshake is the connection's first phase**, run by the listener's connection
  task (``netio.Conn.accept_tls``) under ``timeouts.header_read``: plain text sent to a
  TLS port fails it and is never read as a request, and a client that stops halfway is
  closed at that deadline (``errors.TLSHandshakeError``).
"""

from __future__ import annotations

import ssl

from kushi.errors import ConfigError

#: RFC 7301 protocol ids kushi offers: HTTP/1.1 only (no h2).
ALPN = ("http/1.1",)


class _Encrypted(Exception):
    """Raised from the password callback: kushi never prompts for a key passphrase."""


def _no_passphrase() -> bytes:
    raise _Encrypted


def _readable(key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise ConfigError(key, f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(key, f"{path}: is a directory") from None
    except OSError as exc:
        raise ConfigError(key, f"{path}: {exc.strerror or exc}") from None


def server_context(cert: str, key: str, where: str = "") -> ssl.SSLContext:
    """A server context for ``cert`` (PEM, the leaf first, then intermediates: certbot's
    ``fullchain.pem``) and ``key`` (PEM, unencrypted). ``where`` prefixes the config key
    in errors (``"listener main: "``)."""
    cert_key, key_key = f"{where}tls_cert", f"{where}tls_key"
    cert_pem = _readable(cert_key, cert)
    key_pem = _readable(key_key, key)
    if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
        raise ConfigError(cert_key, f"{cert}: no PEM certificate in the file")
    if b"PRIVATE KEY-----" not in key_pem:
        raise ConfigError(key_key, f"{key}: no PEM private key in the file")
    if b"ENCRYPTED" in key_pem:
        raise ConfigError(
            key_key, f"{key}: the key is encrypted with a passphrase; kushi needs it unencrypted"
        )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(list(ALPN))
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        ctx.load_cert_chain(cert, key, password=_no_passphrase)
    except _Encrypted:
        raise ConfigError(
            key_key, f"{key}: the key is encrypted with a passphrase; kushi needs it unencrypted"
        ) from None
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in str(exc) or reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                key_key, f"{key}: the key does not match the certificate {cert}"
            ) from None
        # OpenSSL reads the certificate first: a PEM error before the key is the cert's.
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=cert)
        except ssl.SSLError:
            raise ConfigError(cert_key, f"{cert}: not a valid PEM certificate ({reason})") from None
        raise ConfigError(key_key, f"{key}: not a valid PEM private key ({reason})") from None
    except OSError as exc:  # the files changed between the checks above and here
        raise ConfigError(cert_key, f"{cert}: {exc.strerror or exc}") from None
    return ctx
