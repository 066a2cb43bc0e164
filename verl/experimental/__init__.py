"""Features still settling their interfaces: the agent loop (server-mode, multi-turn, tool-calling rollouts)."""
