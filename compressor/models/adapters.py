"""Architecture adapters: where an architecture keeps its parts, so passes never test `model_type`.

For each family: the decoder layers, embeddings, final norm and head; inside a layer, which linears
read the residual stream (after which norm) and which write it (after which output norm, if any).
"""

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel

from compressor.errors import CompressorError
from compressor.nn.sliced import llama_sliced_forward


@dataclass(frozen=True)
class Adapter:
    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    embeddings: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    head: str = "lm_head"
    # Inside a decoder layer: (norm that feeds them, linears that read the residual stream).
    attn_inputs: tuple[str, tuple[str, ...]] = ("input_layernorm",
                                                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
    mlp_inputs: tuple[str, tuple[str, ...]] = ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))
    # Linears that write the residual stream, and the norm applied to their output before the add
    # (None: plain pre-norm block).
    attn_output: tuple[str, str | None] = ("self_attn.o_proj", None)
    mlp_output: tuple[str, str | None] = ("mlp.down_proj", None)
    # The decoder layer's forward with shortcut matrices on the residual connections (None: cannot be sliced).
    sliced_forward: Callable | None = None
    # lrec_refine's defaults for `reference` and `loss` (what a recipe that leaves them out gets): the settings
    # measured to work on the family (docs/design-decisions.md).
    refine_reference: str = "layer"
    refine_loss: str = "total"
    # How llama.cpp stores the family in GGUF, where it differs from transformers: for these model types, q/k rows
    # in the rotary order of llama.cpp's Llama graph; norm weights w stored as w + offset (Gemma's: 1 + w).
    gguf_permute_qk: tuple[str, ...] = ()
    gguf_norm_offset: float = 0.0

    def decoder_layers(self, model: PreTrainedModel) -> nn.ModuleList:
        return model.get_submodule(self.layers)


LLAMA = Adapter(name="llama", model_types=("llama", "mistral", "qwen2"), sliced_forward=llama_sliced_forward,
                gguf_permute_qk=("llama", "mistral"))

# Gemma3 uses "sandwich" norms: a norm on each block's output before the residual add.
GEMMA3 = Adapter(
    name="gemma3",
    model_types=("gemma3_text",),
    mlp_inputs=("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    attn_output=("self_attn.o_proj", "post_attention_layernorm"),
    mlp_output=("mlp.down_proj", "post_feedforward_layernorm"),
    # A few residual channels near 1e5 that each next norm scales back down: `loss: total` fits only those and
    # breaks the model, and fitted layer by layer even `next_norm` made W2 + LREC r16 worse than unrefined.
    refine_reference="model",
    refine_loss="next_norm",
    gguf_norm_offset=1.0,
)

ADAPTERS = (LLAMA, GEMMA3)


def supported_model_types() -> list[str]:
    return [t for a in ADAPTERS for t in a.model_types]


def adapter_for(model: PreTrainedModel) -> Adapter:
    model_type = model.config.model_type
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise CompressorError(f"architecture {model_type!r} ({type(model).__name__}) is not supported; "
                          f"supported model types: {', '.join(supported_model_types())}")


def adapter_named(name: str) -> Adapter:
    return next(a for a in ADAPTERS if a.name == name)
