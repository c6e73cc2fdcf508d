"""Scale-out on Ray Serve: an ingress deployment that authenticates, validates and routes
every call as the single server does, and replica deployments that each own a base model,
an engine and an adapter cache. Calls reach a replica through Ray Serve's model
multiplexing, keyed by the routed adapters, so a ``wuyu`` call goes to a replica where
``wuyu`` is already hot. See docs/cluster.md.

It needs the ``switchboard[cluster]`` extra; its settings (``cluster:`` in the server's
configuration) live in ``server/service/cluster_settings.py``. The single-process server
never imports it: this package depends on ``server.service``, never the reverse.
"""
