"""The sweep: every operating point of every method on a test set, cached (`engine.Sweep`)."""
