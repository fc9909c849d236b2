"""WiCore: LLM serving as gRPC microservices (gateway, scheduler, workers, memory tiers)."""

__version__ = "0.1.0"
