"""Training: one loop for every stage, optimiser and schedules, checkpoints."""
