"""What a sliced model (compressor/passes/slice.py) is rebuilt from.

- `RMSNormOverWidth`: a weightless RMS norm whose mean square is taken over the original width,
  x / sqrt(sum(x^2) / full_width + eps), so it agrees with the dense model's norm when the deleted
  dimensions carry nothing.
- `Rotation`: x -> x R, a change of basis of the residual stream (a decoder layer's shortcuts).
- `sliced_layer`: give a decoder layer the forward that uses its shortcuts (`SLICED_FORWARDS`: per
  architecture adapter, the architecture's own layer forward with a change of basis on each residual
  connection, SliceGPT's shortcut matrices, held by the layer as `attn_shortcut` [k_in, k_mid] and
  `mlp_shortcut` [k_mid, k_out]).
- `resize`: rebuild a linear or embedding whose weights changed shape.
"""

import types

import torch
from torch import nn


class RMSNormOverWidth(nn.Module):
    def __init__(self, full_width: int, eps: float):
        super().__init__()
        self.full_width, self.eps = full_width, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).sum(-1, keepdim=True) / self.full_width + self.eps)).to(x.dtype)

    def runtime_config(self) -> dict:
        return {"class": "RMSNormOverWidth", "full_width": self.full_width, "eps": self.eps}

    @classmethod
    def from_runtime_config(cls, config: dict, old: nn.Module | None, dtype: torch.dtype) -> "RMSNormOverWidth":
        return cls(config["full_width"], config["eps"])

    def extra_repr(self) -> str:
        return f"full_width={self.full_width}, eps={self.eps}"


class Rotation(nn.Module):
    """x -> x R, R [in, out]: a change of basis of the residual stream (with deletion when out < in)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(in_features, out_features, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.to(x.dtype)

    def runtime_config(self) -> dict:
        return {"class": type(self).__name__, "shape": list(self.weight.shape)}

    @classmethod
    def from_runtime_config(cls, config: dict, old: nn.Module | None, dtype: torch.dtype) -> "Rotation":
        return cls(*config["shape"], dtype=dtype)


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


SLICED_FORWARDS = {"llama": llama_sliced_forward}  # adapter name -> sliced layer forward


def sliced_layer(config: dict, old: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Give a decoder layer its architecture's sliced forward; its shortcut Rotations have their own records."""
    old.forward = types.MethodType(SLICED_FORWARDS[config["adapter"]], old)
    return old


def resize_config(module: nn.Module) -> dict:
    """The record that lets `resize` rebuild `module` (a linear or embedding) at its current shapes."""
    attributes = {k: getattr(module, k) for k in ("in_features", "out_features", "embedding_dim")
                  if hasattr(module, k)}
    return {"class": "Resized", "shapes": {n: list(p.shape) for n, p in module.named_parameters(recurse=False)},
            "attributes": attributes}


def resize(config: dict, old: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Give `old` empty parameters of the recorded shapes (its values come from the checkpoint)."""
    for name, shape in config["shapes"].items():
        setattr(old, name, nn.Parameter(torch.empty(shape, dtype=dtype)))
    for name, value in config["attributes"].items():
        setattr(old, name, value)
    return old
