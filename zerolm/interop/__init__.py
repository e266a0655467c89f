"""Interoperability with other libraries' checkpoints (HF transformers: zerolm.interop.hf)."""
