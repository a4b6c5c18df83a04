"""registry-proxy: a caching pull-through proxy for OCI and Docker registries."""

__version__ = "0.1.0"
