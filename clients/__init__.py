"""Switchboard clients: the ``switchboard`` CLI entry point (and, later, the gRPC client).

Nothing here imports torch or ``server``; command modules that need them are imported
lazily by :mod:`clients.cli`.
"""
