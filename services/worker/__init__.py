"""WiCore worker service."""
