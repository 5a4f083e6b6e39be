"""Hostile inputs: what the watched user (or a careless admin, or a fault) can do to the agent."""
