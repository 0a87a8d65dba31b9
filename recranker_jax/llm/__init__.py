"""The ranker LLM: LLaMA-2 in Flax NNX and Hugging Face checkpoint import."""
