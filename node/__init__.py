"""The node agent: capability probe, presence and command handling."""
