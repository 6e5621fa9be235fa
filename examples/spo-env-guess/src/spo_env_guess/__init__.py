"""Guess-the-number, an example environment plugin for spo-agents."""
