"""Fine-tuning transforms on built models (LoRA adapters)."""
