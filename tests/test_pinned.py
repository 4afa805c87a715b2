"""Pinned behaviour: every pass, alone and in a few combined recipes, gives bit-identical tensors and records.

tests/data/pinned.json holds, per (family, recipe), a SHA-256 of the tensors of each decoder layer of the
compressed model's state dict (names, dtypes, shapes and bytes), of the tensors outside them, and of the
per-module records. A refactor that changes no behaviour keeps them all. A change
that is meant to alter results re-records them, and says so in its commit:

    COMPRESSOR_PIN_RECORD=1 python -m pytest tests/test_pinned.py

The tiny models and corpus are those of conftest.py; torch runs on one thread here, so the float
reductions do not depend on the machine's core count.
"""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import make_model_dir, recipe_dict

import compressor

PINNED = Path(__file__).parent / "data" / "pinned.json"
RECORD = os.environ.get("COMPRESSOR_PIN_RECORD") == "1"

RECIPES = {
    "magnitude-50": [{"magnitude": {"sparsity": 0.5}}],
    "magnitude-2of4": [{"magnitude": {"pattern": "2:4"}}],
    "wanda-50": [{"wanda": {"sparsity": 0.5}}],
    "wanda-2of4-sum-sink": [{"wanda": {"pattern": "2:4", "norms": "sum", "sink_weight": 8}}],
    "sparsegpt-50": [{"sparsegpt": {"sparsity": 0.5, "block_size": 32}}],
    "sparsegpt-2of4": [{"sparsegpt": {"pattern": "2:4", "sink_weight": 1}}],
    "sparsegpt-4of8": [{"sparsegpt": {"pattern": "4:8", "block_size": 16}}],
    "rtn-w4g32": [{"rtn": {"bits": 4, "group_size": 32}}],
    "rtn-w3-asym-clip": [{"rtn": {"bits": 3, "group_size": None, "symmetric": False, "clip_search": True}}],
    "gptq-w4g32": [{"gptq": {"bits": 4, "group_size": 32, "sink_weight": 16}}],
    "gptq-w2g16-no-act-order": [{"gptq": {"bits": 2, "group_size": 16, "act_order": False, "block_size": 32}}],
    "gptq-w4-per-channel-no-act-order": [{"gptq": {"bits": 4, "group_size": None, "act_order": False,
                                                   "block_size": 16}}],
    "gptq-w8-asym-keep-zeros": [{"gptq": {"bits": 8, "group_size": 32, "symmetric": False, "keep_zeros": True}}],
    "gptq-w2-lrec": [{"gptq": {"bits": 2, "group_size": 32}}, {"lrec": {"rank": 8}}],
    "rtn-w2-lrec-int8-alternate": [{"rtn": {"bits": 2, "group_size": 32}},
                                   {"lrec": {"extra_bits": 1.0, "factor_bits": 8, "alternate": 2}}],
    "gptq-w3-lrec-int4-plain": [{"gptq": {"bits": 3, "group_size": 32}},
                                {"lrec": {"rank": 4, "factor_bits": 4, "whiten": False}}],
    "gptq-w2-lrec-refine": [{"gptq": {"bits": 2, "group_size": 32}}, {"lrec": {"rank": 4}},
                            {"lrec_refine": {"steps": 6}}],
    "rtn-w2-refine-scales-model-channel": [{"rtn": {"bits": 2, "group_size": 32}},
                                           {"lrec_refine": {"steps": 5, "scales": True, "reference": "model",
                                                            "loss": "channel"}}],
    "lowrank-activation": [{"lowrank": {"param_ratio": 0.8}}],
    "lowrank-svd-gptq-lrec": [{"lowrank": {"rank": 30, "method": "svd"}}, {"gptq": {"bits": 4, "group_size": 16}},
                              {"lrec": {"rank": 4}}],
    "sparsegpt-gptq": [{"sparsegpt": {"sparsity": 0.5}}, {"gptq": {"bits": 4, "group_size": 32}}],
    "wanda-2of4-rtn": [{"wanda": {"pattern": "2:4"}}, {"rtn": {"bits": 4, "group_size": 32}}],
    "slice": [{"slice": {"fraction": 0.25}}],
    "slice-embeddings-gptq": [{"slice": {"fraction": 0.25, "slice_embeddings": True}},
                              {"gptq": {"bits": 4, "group_size": 16}}],
}
FAMILIES = ("llama", "qwen2", "gemma3")
CASES = [(f, r) for f in FAMILIES for r in RECIPES if not (f == "gemma3" and r.startswith("slice"))]


def fingerprint(model) -> dict:
    """A digest of the state dict's tensors per decoder layer ("model.layers.3"; "rest" for the others) and
    one of the per-module records."""
    digests: dict[str, hashlib._Hash] = {}
    for name, tensor in sorted(model.state_dict().items()):
        group = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else "rest"
        t = tensor.detach().cpu().contiguous()
        h = digests.setdefault(group, hashlib.sha256())
        h.update(f"{name}:{t.dtype}{list(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    records = json.dumps(model.compression_config["modules"], sort_keys=True)
    return {"tensors": {group: h.hexdigest()[:32] for group, h in digests.items()},
            "records": hashlib.sha256(records.encode()).hexdigest()[:32]}


@pytest.fixture(scope="module")
def pinned():
    stored = json.loads(PINNED.read_text()) if PINNED.exists() else {}
    yield stored
    if RECORD:
        PINNED.parent.mkdir(exist_ok=True)
        PINNED.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    return {f: make_model_dir(tmp_path_factory.mktemp(f) / "model", f) for f in FAMILIES}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("family", "recipe"), CASES, ids=[f"{f}-{r}" for f, r in CASES])
def test_compressed_tensors_are_pinned(family, recipe, family_dirs, corpus, pinned, one_thread, recwarn):
    model = compressor.compress(recipe_dict(family_dirs[family], corpus, RECIPES[recipe]), progress=False)
    got = fingerprint(model)
    key = f"{family}/{recipe}"
    if RECORD:
        pinned[key] = got
        return
    assert key in pinned, f"no pinned record for {key}; record with COMPRESSOR_PIN_RECORD=1 (module docstring)"
    want = pinned[key]
    changed = [k for k in want["tensors"].keys() | got["tensors"].keys()
               if want["tensors"].get(k) != got["tensors"].get(k)]
    assert not changed, f"tensors changed in {sorted(changed)}"
    assert got["records"] == want["records"], "the per-module records changed"
