"""WiCore gateway service."""
