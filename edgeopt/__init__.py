"""edgeopt: build per-device model bundles on a host and serve them on edge boards."""

__version__ = "0.1.0"
