"""secretsd: the long-running agent (server, agent state, storage backends)."""
