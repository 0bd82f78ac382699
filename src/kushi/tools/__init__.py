"""The user tools that ship with kushi: ``kushi check`` (does a site work over IPv6, and which
address did kushi use?) and ``kushi whoami`` (a test server that tells each client how it
arrived). They sit above the proxy core and use its connector, resolver and parser; nothing in
the core imports them."""
