"""Re-ranking stage: turn the tuned LLM's answers into utilities (pointwise, pairwise, listwise,
hybrid), re-order the backbone's candidates by them and evaluate the orders."""
