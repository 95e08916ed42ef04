"""Experiments that put the stack to work end to end (`python -m derta_jax.experiments.<name>`)."""
