"""Instruction data: RecRanker's prompt tasks, candidate selection, hints, tokenisation."""
