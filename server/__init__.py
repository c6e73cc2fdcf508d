"""Switchboard server: the base model, the adapters and the gRPC service around them.

``server.basemodel`` and ``server.formats`` are also the trainer's: one loader and one
prompt builder, so training and serving cannot drift apart.
"""
