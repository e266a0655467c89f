"""Transforms applied to a built model, each f(model, cfg) -> model: they swap submodules for typed
ones (LoRA adapters, the fused decode layout) instead of tagging the model with attributes."""
