"""Scale-out on Ray Serve: an ingress deployment that authenticates, validates and routes
every call as the single server does, and replica deployments that each own a base model,
an engine and an adapter cache. Calls reach a replica through Ray Serve's model
multiplexing, keyed by the routed adapters, so a ``wuyu`` call goes to a replica where
``wuyu`` is already hot. See docs/cluster.md.

Only ``settings`` imports without Ray (it is part of the server's configuration); the
rest needs the ``switchboard[cluster]`` extra. The single-process server never imports it.
"""
