"""kv-latent: ablations of KV-cache dimension reduction in Llama-family decoders.

Importing the package registers the KV-Latent model with the transformers Auto classes.
"""

from kv_latent.modeling import KVLatentConfig, KVLatentForCausalLM

__all__ = ["KVLatentConfig", "KVLatentForCausalLM"]
