"""derta_jax: Decoupled Refusal Training (DeRTa) for LLaMA-3, Mistral and Mixtral in JAX/Flax."""
