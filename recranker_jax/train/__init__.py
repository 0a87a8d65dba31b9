"""Instruction tuning of the ranker LLM: packing, the sharded train step, the loop."""
