"""Architecture adapters: where an architecture keeps its parts, so passes never test `model_type`.

For each family: the decoder layers, embeddings, final norm and head; inside a layer, which linears
read the residual stream (after which norm) and which write it (after which output norm, if any).
A family listed in ADAPTERS has quirks the passes need to know (Gemma's sandwich norms, slicing's layer
forward, llama.cpp's storage); any other causal LM gets an adapter discovered from its structure.
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
    head: str = "lm_head"
    final_norm: str | None = "model.norm"  # None: discovered, none found
    # Inside a decoder layer: (norm that feeds them, linears that read the residual stream); None: not known (a
    # discovered family whose layer does not have the Llama layout), and the passes that need it refuse.
    attn_inputs: tuple[str, tuple[str, ...]] | None = (
        "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
    mlp_inputs: tuple[str, tuple[str, ...]] | None = ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))
    # Linears that write the residual stream, and the norm applied to their output before the add
    # (None: plain pre-norm block).
    attn_output: tuple[str, str | None] | None = ("self_attn.o_proj", None)
    mlp_output: tuple[str, str | None] | None = ("mlp.down_proj", None)
    # The decoder layer's forward with shortcut matrices on the residual connections (None: cannot be sliced).
    sliced_forward: Callable | None = None
    # lrec_refine's defaults for `reference` and `loss` (what a recipe that leaves them out gets): the settings
    # measured to work on the family (docs/design-decisions.md).
    refine_reference: str = "layer"
    refine_loss: str = "total"
    # The norms scale by offset + w, not by their weight w (Gemma's: 1 + w): what AWQ divides, what GGUF stores.
    norm_offset: float = 0.0
    # Whether `rotate` folds the scales of the norms that feed linears into those linears (else each such norm keeps
    # its scale and writes the rotated stream). The default of its `fold_norms`.
    rotate_folds_norms: bool = True
    # How llama.cpp stores the family in GGUF, where it differs from transformers: for these model types, q/k rows
    # in the rotary order of llama.cpp's Llama graph (its norm weights: w + norm_offset).
    gguf_permute_qk: tuple[str, ...] = ()

    def decoder_layers(self, model: PreTrainedModel) -> nn.ModuleList:
        return model.get_submodule(self.layers)


LLAMA = Adapter(name="llama", model_types=("llama", "mistral", "qwen2"), sliced_forward=llama_sliced_forward,
                gguf_permute_qk=("llama", "mistral"))

# Gemma-3 (and Gemma-2) use "sandwich" norms: a norm on each block's output before the residual add.
GEMMA = Adapter(
    name="gemma",
    model_types=("gemma3_text", "gemma2"),
    mlp_inputs=("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    attn_output=("self_attn.o_proj", "post_attention_layernorm"),
    mlp_output=("mlp.down_proj", "post_feedforward_layernorm"),
    # A few residual channels near 1e5 that each next norm scales back down: `loss: total` fits only those and
    # breaks the model, and fitted layer by layer even `next_norm` made W2 + LREC r16 worse than unrefined.
    refine_reference="model",
    refine_loss="next_norm",
    norm_offset=1.0,
    # The same channels reach the linears that read a norm at about sqrt(width) before its scale (down to ~0.3)
    # brings them back: folded into the weights, a small column meets a huge input, and rounding the folded (and
    # rotated) weights multiplied the output error several times over (docs/design-decisions.md).
    rotate_folds_norms=False,
)

ADAPTERS = (LLAMA, GEMMA)


def adapter_for(model: PreTrainedModel) -> Adapter:
    """The adapter of a listed family, else one discovered from the model's structure (`discover`)."""
    model_type = model.config.model_type
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    return discover(model)


def discover(model: PreTrainedModel) -> Adapter:
    """An adapter for a causal LM of a family not in ADAPTERS, found from its structure as transformers builds
    models: the decoder layers are the ModuleList of `config.num_hidden_layers` blocks of one class; the embeddings
    and the head are what get_input_embeddings() and get_output_embeddings() return; the final norm is the norm
    module beside the layers. Inside a layer, the Llama layout is used where the layer has it (q/k/v after
    input_layernorm, ...); otherwise it stays unknown and the passes that need it (slice, lrec_refine's next_norm
    loss) refuse."""
    names = {module: name for name, module in model.named_modules()}
    head = model.get_output_embeddings()
    if head is None or model.get_input_embeddings() is None:
        raise CompressorError(f"{type(model).__name__} has no input embeddings or no output head; the toolkit "
                              "compresses decoder-only language models (AutoModelForCausalLM)")
    layers = decoder_blocks(model)
    layers_name = names[layers]
    parent = model.get_submodule(layers_name.rpartition(".")[0]) if "." in layers_name else model
    norms = [names[m] for m in parent.children() if m is not layers and type(m).__name__.lower().endswith("norm")]
    final_norm = norms[0] if len(norms) == 1 else None
    layer = layers[0]
    llama_layout = all(has_submodule(layer, name) for name in (
        "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    layout = {} if llama_layout else {"attn_inputs": None, "mlp_inputs": None, "attn_output": None,
                                      "mlp_output": None}
    return Adapter(name=model.config.model_type, model_types=(model.config.model_type,), layers=layers_name,
                   embeddings=names[model.get_input_embeddings()], final_norm=final_norm, head=names[head], **layout)


def decoder_blocks(model: PreTrainedModel) -> nn.ModuleList:
    """The ModuleList of the model's `num_hidden_layers` decoder blocks, all of one class (the outermost such list:
    a layer's list of experts may happen to have as many)."""
    count = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    lists = [(name.count("."), m) for name, m in found if len(m) == count and len({type(b) for b in m}) == 1]
    blocks = [m for depth, m in lists if depth == min(d for d, _ in lists)]
    if len(blocks) != 1:
        seen = ", ".join(f"{name} ({len(m)} x {type(m[0]).__name__})" for name, m in found) or "no module lists"
        raise CompressorError(f"cannot find the decoder layers of {type(model).__name__}: expected one list of "
                              f"{count} blocks of one class (config.num_hidden_layers), found {seen}")
    return blocks[0]


def has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False


def adapter_named(name: str) -> Adapter:
    return next(a for a in ADAPTERS if a.name == name)
