"""Environments (installed as `spo_agents.envs`)."""
