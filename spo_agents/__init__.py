"""spo-agents: Single-stream Policy Optimization for LLM agents in tool-integrated environments.

Importing the package is cheap and has no side effects; heavy modules (torch, transformers,
sandboxes, environments) are imported only where they are used.
"""

__version__ = "0.1.0"
