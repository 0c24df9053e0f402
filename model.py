"""The GPT model, re-exported for seed compatibility: `from model import GPT, GPTConfig`."""

from gptrain.config import GPTConfig
from gptrain.model import GPT, KVCache

__all__ = ["GPT", "GPTConfig", "KVCache"]
