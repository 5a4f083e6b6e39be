"""exfilwatch: an insider-risk monitoring agent for tagged R&D directories."""

__version__ = "0.1.0"
