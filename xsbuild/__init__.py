"""xsbuild: build, check, inspect and apply Xen live-patch payloads."""

__version__ = "0.1.0"
