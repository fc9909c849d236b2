"""WiCore scheduler service."""
