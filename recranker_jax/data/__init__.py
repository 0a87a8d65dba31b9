"""Data layer: sources -> one `Interactions` table -> the RecRanker leave-one-out split."""
