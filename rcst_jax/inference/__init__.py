"""Algorithm 2, what `rcst run` executes: the method table, edge step, selection, payload, server."""
