"""Per-rank execution of a LoadPlan: coordination, reads, transfers, materialization, reports."""
