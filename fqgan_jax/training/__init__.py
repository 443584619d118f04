"""Training: the state, the pure step, building a run, and the loop with its side effects."""
