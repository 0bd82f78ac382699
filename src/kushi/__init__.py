"""kushi: an HTTP proxy that bridges IPv4 and IPv6."""

__version__ = "0.1.0"
