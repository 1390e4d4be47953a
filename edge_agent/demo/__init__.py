"""`edge-agent demo`: simulated devices, a local broker, the agent and the verifier, live."""

from edge_agent.demo.runner import run_demo

__all__ = ["run_demo"]
