"""The gRPC service: configuration, routing, auth, metrics and the server lifecycle."""
