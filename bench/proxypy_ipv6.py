"""A proxy.py plugin (loaded by proxy.py's own interpreter, not by the harness).

proxy.py 2.4 keeps the brackets of an IPv6 literal (``http://[::1]:8080/``) in the host it
hands to ``getaddrinfo``, so it cannot reach an IPv6-literal origin at all. This plugin uses
proxy.py's ``resolve_dns`` hook to strip the brackets; nothing else changes.
"""

from __future__ import annotations

from proxy.http.proxy import HttpProxyBasePlugin  # type: ignore[import-not-found]


class BracketedIPv6(HttpProxyBasePlugin):  # type: ignore[misc]
    def resolve_dns(self, host: str, port: int) -> tuple[str | None, None]:
        if host.startswith("[") and host.endswith("]"):
            return host[1:-1], None
        return None, None
