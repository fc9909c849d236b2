"""Generated protobuf and gRPC stubs (package wicore.v1)."""
