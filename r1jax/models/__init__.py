"""Models: the dense decoder (`transformer`) and Hugging Face interop (`hf`)."""

from r1jax.models.transformer import Decoder, KVCache, ModelConfig

__all__ = ["Decoder", "KVCache", "ModelConfig"]
