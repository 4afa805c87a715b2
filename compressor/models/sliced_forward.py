"""Decoder-layer forwards for sliced models (compressor/passes/slice.py): the architecture's own
forward with a change of basis on each residual connection (SliceGPT's shortcut matrices), held
by the layer as `attn_shortcut` [k_in, k_mid] and `mlp_shortcut` [k_mid, k_out]."""

import torch


def llama_sliced_forward(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None,
                         position_embeddings=None, **kwargs) -> torch.Tensor:
    """LlamaDecoderLayer.forward (also Mistral's and Qwen2's) with the two shortcut matrices. The KV cache
    travels in kwargs under whichever name the transformers version uses (`past_key_values`, `cache`)."""
    residual = self.attn_shortcut(hidden_states)
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                      position_ids=position_ids, position_embeddings=position_embeddings, **kwargs)
    hidden_states = residual + hidden_states
    residual = self.mlp_shortcut(hidden_states)
    hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
    return residual + hidden_states
