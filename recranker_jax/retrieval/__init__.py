"""Retrieval stage: the conventional recommenders (LightGCN, BPR-MF, explicit MF, popularity)
that produce RecRanker's top-k candidates and the hints in its prompts."""
