"""Models: the dense decoder (`transformer`), DeepSeek-V2/V3 (`deepseek`), HF interop (`hf`)."""

from r1jax.models.deepseek import DeepseekConfig, DeepseekDecoder, MLACache
from r1jax.models.transformer import Decoder, KVCache, ModelConfig

__all__ = ["DeepseekConfig", "DeepseekDecoder", "Decoder", "KVCache", "MLACache", "ModelConfig"]
