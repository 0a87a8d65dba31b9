"""recranker-jax: RecRanker (instruction-tuned LLM re-ranking for top-k recommendation) in JAX."""

__version__ = "0.1.0"
