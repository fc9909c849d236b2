"""WiCore tier service."""
