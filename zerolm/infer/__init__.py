"""Inference: token-id generation with a KV cache, sampling and stop conditions."""
