"""Fine-tuning stages: chat SFT and sequence classification."""
