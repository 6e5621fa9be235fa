"""Code-execution sandboxes (installed as `spo_agents.sandboxes`)."""
