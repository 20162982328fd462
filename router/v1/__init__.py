"""Generated gRPC stubs for the `router.v1` API (built from proto/router/v1 at install time; do not edit)."""
