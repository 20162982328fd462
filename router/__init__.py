"""specialist-router gateway: gRPC front door, routing policy, vLLM backends, client SDK."""
__version__ = "0.1.0"
