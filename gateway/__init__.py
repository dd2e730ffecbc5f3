"""Wicket: everything that awaits (the local gateway, the cluster, the CLI)."""

__version__ = "0.1.0"
