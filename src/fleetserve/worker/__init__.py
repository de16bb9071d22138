"""A worker node: one engine served over gRPC, registered with a gateway."""
