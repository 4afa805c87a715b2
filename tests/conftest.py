"""Tiny random models of every supported family, saved as local HF folders, and a small text corpus."""

import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

COMMON = dict(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**COMMON),
    "qwen2": lambda: Qwen2Config(**COMMON),
    # sliding window shorter than the test windows, so per-layer masks matter
    "gemma3": lambda: Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=8,
                                       layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}
WORDS = ("the of and a to in is was for on as with by he at from his an were are which this be has or "
         "river city music king war team album film born state county school music church party").split()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: 256 byte tokens plus <s> (id 256) as BOS. The alphabet comes as a set, in an order
    that changes with the process's string hashing: sorted, the ids are the same in every process."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<s>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>")


def make_model_dir(path, arch: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch]())
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def model_dir(request, tmp_path_factory):
    """A tiny model folder of each supported family."""
    return make_model_dir(tmp_path_factory.mktemp(request.param) / "model", request.param)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("llama") / "model", "llama")


@pytest.fixture(scope="session")
def gemma_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("gemma3") / "model", "gemma3")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A .txt file of 60 short documents separated by blank lines."""
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))).capitalize() + "." for _ in range(60)]
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n\n".join(docs))
    return path


def recipe_dict(model_dir, corpus, passes, output=None, **extra) -> dict:
    """A small recipe for the tiny models: 4 calibration windows of 32 tokens, eval on the corpus."""
    return {"model": str(model_dir), "passes": passes, "output": None if output is None else str(output),
            "calibration": {"dataset": str(corpus), "samples": 4, "seqlen": 32, "seed": 0}, **extra}
