"""The layer-by-layer loop.

1. Record what the model feeds each decoder layer: the hidden states entering layer 0 (one per
   calibration window, kept on CPU) and each layer's keyword arguments (attention mask, rotary
   position embeddings, ...; the same for every window, since all windows have one length).
   Layers are swapped for recorders during this, so only embeddings and masks are computed.
2. For each layer: move it to the compute device; for each pass, collect the statistics it needs
   with forward hooks while the layer runs on the cached inputs, then let the pass compress the
   targeted linears (a LayerPass, such as slicing, transforms the whole layer itself); run the
   compressed layer to get the next layer's inputs (unless the LayerPass that changed it last already
   has them); move it back. LayerPasses then `finish`.

So only one layer is on the compute device at a time, and layer i+1 is calibrated on the outputs
of the already compressed layer i.
"""

import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from compressor.distributed import broadcast_into, broadcast_object, rank_and_size, summed
from compressor.errors import CompressorError, CompressorWarning
from compressor.models import Adapter
from compressor.models.streamed import StreamedLayers
from compressor.nn import RUNTIME_MODULES, RotatedInput, UnfusedExperts
from compressor.passes import Pass
from compressor.passes.base import (
    LayerContext,
    LayerPass,
    LayerState,
    StopLayer,
    layer_output,
    matches,
    run_until_stopped,
)
from compressor.passes.hessian import window_hessian, with_sink_weight
from compressor.passes.prune import store_sparse
from compressor.resume import Progress
from compressor.runtime import is_out_of_memory


def plan(model: PreTrainedModel, adapter: Adapter, passes: list[Pass]) -> list[list[list[str]]]:
    """For each pass and decoder layer, the names of the linears it targets (mixture-of-experts experts once split
    by unfuse_experts, as load_model does). Fails before any work when
    a target matches nothing, a pass cannot run on a linear, or passes come in an order that cannot
    work (quantizing twice, pruning a quantized linear)."""
    layers = adapter.decoder_layers(model)
    warn_fused_experts(layers[0], adapter.layers + ".0")
    state: dict[str, tuple[str, str]] = {}  # linear name -> (what it is now, which pass made it so)
    selected = []
    for p in passes:
        p.check_model(model, adapter)
        per_layer, everything = [], []
        for i, layer in enumerate(layers):
            prefix = f"{adapter.layers}.{i}."
            chosen = [(prefix + n, m) for n, m in layer.named_modules() if p.selects(prefix + n, m)]
            everything += chosen
            names = []
            for name, linear in chosen:
                factorized = state.get(name, ("dense",))[0] == "lowrank" and not isinstance(p, LayerPass)
                for target in [f"{name}.down", f"{name}.up"] if factorized else [name]:  # factors: two linears
                    kind, by = state.get(target, ("dense", "the model"))
                    if kind not in p.accepts:
                        raise CompressorError(f"pass {p.name} cannot run on {target}: it was made {kind} by {by}, "
                                              f"and {p.name} needs it {' or '.join(p.accepts)}; reorder the passes "
                                              "or add the module to `ignore`")
                    names.append(target)
                if not factorized:
                    p.check_module(name, linear)
            per_layer.append(names)
        for target in p.targets:
            if not any(matches(name, module, [target]) for name, module in everything):
                raise CompressorError(f"pass {p.name}: target {target!r} matches no linear in the decoder "
                                      f"layers (after ignore); names look like '{adapter.layers}.0.mlp.up_proj', "
                                      "classes like 'Linear', regexes like 're:.*mlp.*'")
        for names in per_layer:
            state.update({name: (p.produces, p.name) for name in names})
        selected.append(per_layer)
    return selected


def warn_fused_experts(layer: nn.Module, prefix: str) -> None:
    """Experts kept as 3-D tensors in a layout that compressor/nn/experts.py does not split (biases, another
    order) hold no nn.Linear, so no pass reaches them: say so rather than leave a user to find them still in float."""
    fused = [f"{prefix}.{name}" for name, m in layer.named_modules() if any(p.dim() == 3 for p in m.parameters(False))]
    if fused:
        warnings.warn(f"{', '.join(fused)} ({type(layer.get_submodule(fused[0][len(prefix) + 1:])).__name__}) hold the "
                      "experts as fused 3-D tensors in a layout the toolkit does not split into linears: the experts "
                      "stay in float, the rest of each layer is compressed", CompressorWarning, stacklevel=3)


def compress_model(model: PreTrainedModel, adapter: Adapter, passes: list[Pass], windows: torch.Tensor | None,
                   device: torch.device, progress: bool = True, saved: Progress | None = None,
                   streamed: StreamedLayers | None = None) -> dict[str, list[dict]]:
    """Run `passes` over every decoder layer; return per-module records of what was done.

    windows: [n, L] calibration token ids, required when a pass needs statistics.
    saved: where each finished layer is kept (compressor/resume.py); the run starts after the layers it holds.
    streamed: the decoder layers are read from the model's files as the loop comes to them and dropped once kept
    in `saved` (compressor/models/streamed.py), so only one is ever in memory.
    Mixture-of-experts experts are expected split into linears (compressor/nn/experts.py; load_model and
    compressor.compress do it), so the passes reach them; each expert's statistics come from the tokens routed to it.
    """
    records: dict[str, list[dict]] = defaultdict(list)
    for name, experts in model.named_modules():  # recorded first: loading rebuilds them before their linears
        if isinstance(experts, UnfusedExperts):
            records[name].append({"pass": "unfuse_experts", "experts": len(experts),
                                  "runtime": experts.runtime_config()})
    targets = plan(model, adapter, passes)
    needs_data = any(p.stats for p in passes)
    if needs_data and windows is None:
        raise CompressorError("these passes need calibration data but none was given")
    layers = adapter.decoder_layers(model)
    hidden: list[torch.Tensor] = []  # the inputs of the layer being compressed, one per window
    if needs_data:
        hidden, layer_kwargs = capture_layer_inputs(model, adapter, windows)
    runs = {k: p.new_run() for k, p in enumerate(passes) if isinstance(p, LayerPass)}  # carried across layers
    first = saved.layers_done if saved is not None else 0
    if first:
        done_records, hidden = saved.restore(model, layers, runs, load_layers=streamed is None)
        records.update(done_records)
    bar = tqdm(total=len(layers) * len(passes), initial=first * len(passes), disable=not progress, unit="step")
    for i in range(first, len(layers)):
        if streamed is not None:
            streamed.load(i)
        layer = layers[i]
        home = next(layer.parameters()).device
        layer.to(device)
        kwargs = _to(layer_kwargs[i], device) if needs_data else {}
        state = LayerState(index=i, config=model.config)  # what the passes on this layer hand each other
        outputs = None  # the compressed layer's outputs, when the last pass to change it computed them
        for k, (p, per_layer) in enumerate(zip(passes, targets, strict=True)):
            start = time.perf_counter()
            bar.set_description(f"layer {i + 1}/{len(layers)} {p.name}")
            if isinstance(p, LayerPass):
                ctx = LayerContext(model, adapter, i, layer, hidden, kwargs, device,
                                   list(current_targets(model, per_layer[i])), state, progress=bar.set_postfix_str)
                hidden, done, outputs = p.apply_layer(ctx, runs[k])
                for name, record in done.items():
                    records[name].append(record)
            else:
                outputs = None
                for name, record in apply_linear_pass(p, model, i, layer, hidden, kwargs, device, per_layer[i],
                                                      state, progress=bar.set_postfix_str):
                    records[name].append(record)
            bar.set_postfix_str(f"{p.name} took {time.perf_counter() - start:.1f}s")
            bar.update()
        if needs_data and i + 1 < len(layers):
            hidden = outputs if outputs is not None else [run_layer(layer, h, kwargs, device) for h in hidden]
        layer.to(home)
        store_sparse(model, {name: records[name] for name in records if name.startswith(f"{adapter.layers}.{i}.")})
        if saved is not None:
            saved.save_layer(i, layers[i], records, hidden, runs)  # layers[i]: a pass may have replaced the layer
        if streamed is not None:
            streamed.release(i)
    for k, run in runs.items():
        for name, record in passes[k].finish(model, adapter, run).items():
            records[name].append(record)
    bar.close()
    return dict(records)


def apply_linear_pass(p: Pass, model: PreTrainedModel, index: int, layer: nn.Module, hidden: list[torch.Tensor],
                      kwargs: dict, device: torch.device, names: list[str], state: LayerState,
                      progress: Callable[[str], None] = lambda text: None) -> list[tuple[str, dict]]:
    """Collect the statistics pass `p` needs on decoder layer `index`, then compress each of its target
    linears (`names`) in place, handing on what later passes need through `state`; return (name, record)
    for each."""
    linears = current_targets(model, names)
    try:
        tokens: dict[str, int] = {}
        stats = collect_stats(layer, linears, hidden, kwargs, p.stats, device,
                              getattr(p, "sink_weight", 1.0), tokens) if p.stats else {}
        total = int(summed(torch.tensor(sum(h.shape[:-1].numel() for h in hidden), device=device)))  # all processes'
        routed = routed_statistics(stats, tokens, total, p.stats, linears)
        owner = owners(model, index, layer, linears)
        rank = rank_and_size()[0]
        done = {}
        for k, (name, linear) in enumerate(linears.items()):
            if owner[name] != rank:  # another process compresses it (compressor/distributed.py)
                continue
            progress(f"{k + 1}/{len(linears)} {name.rpartition('.')[2]}")
            module, record = p.apply(name, linear, stats.pop(name, None), state)
            if module is not linear:
                model.set_submodule(name, module)
            done[name] = record | routed.get(name, {})
        if rank_and_size()[1] > 1:
            done = {name: receive_linear(model, name, linears[name], done.get(name), owner[name]) for name in linears}
        return list(done.items())
    except (MemoryError, RuntimeError) as error:  # torch.OutOfMemoryError is a RuntimeError
        if not is_out_of_memory(error):
            raise
        raise out_of_memory(p.name, index, linears, device) from error


def owners(model: PreTrainedModel, index: int, layer: nn.Module, linears: dict[str, nn.Module]) -> dict[str, int]:
    """Which process compresses each linear: the linears of the layer (in the layer's order, the same in every
    process and for every pass, so the state one pass hands to the next on a linear stays in one process) dealt
    out in turn. One process: 0 for all."""
    size = rank_and_size()[1]
    if size == 1:
        return dict.fromkeys(linears, 0)
    prefix = next(name for name, m in model.named_modules() if m is layer) + "."
    order = [prefix + n for n, m in layer.named_modules() if hasattr(m, "in_features")]
    return {name: order.index(name) % size for name in linears}


def receive_linear(model: PreTrainedModel, name: str, linear: nn.Module, record: dict | None, owner: int) -> dict:
    """The linear `name` as process `owner` compressed it, in every process: its record, then (elsewhere) a module
    of the class and shapes the record's runtime names (an in-place change keeps the linear) filled with the
    owner's tensors. Returns the record."""
    record = broadcast_object(record, owner)
    if rank_and_size()[0] != owner and "runtime" in record:
        device = next(iter(linear.state_dict().values())).device
        model.set_submodule(name, RUNTIME_MODULES[record["runtime"]["class"]](record["runtime"], linear,
                                                                              model.dtype).to(device))
    module = model.get_submodule(name)  # the owner's compressed module, or its empty twin here
    for _, tensor in sorted(module.state_dict(keep_vars=True).items()):
        broadcast_into(tensor.data, owner)
    return record


MIN_ROUTED_TOKENS = 16  # an expert linear that saw fewer calibration tokens gets the identity as its statistic


def routed_statistics(stats: dict[str, Any], tokens: dict[str, int], total: int, kind: str | None,
                      linears: dict[str, nn.Module]) -> dict[str, dict]:
    """For the linears that saw fewer than all `total` calibration tokens (experts, which see the tokens the
    router sends them), what goes into their records: how many they saw, and where that is under
    MIN_ROUTED_TOKENS, that their statistic was replaced (in `stats`, in place) by the identity: H = I (GPTQ then
    rounds to nearest, SparseGPT prunes by magnitude) or input norms of 1 (Wanda by magnitude)."""
    routed = {}
    for name, linear in linears.items():
        seen = tokens.get(name, 0)
        if not kind or seen >= total:
            continue
        routed[name] = {"calibration_tokens": seen}
        if seen < MIN_ROUTED_TOKENS:
            n, like = linear.in_features, stats[name]
            stats[name] = torch.eye(n, device=like.device) if kind == "hessian" else torch.ones_like(like)
            routed[name]["statistic"] = f"identity (fewer than {MIN_ROUTED_TOKENS} calibration tokens)"
    return routed


def out_of_memory(pass_name: str, index: int, linears: dict[str, nn.Module], device: torch.device
                  ) -> CompressorError:
    """The error for a pass that ran out of memory on a layer: what its statistics needed, what to do."""
    widest = max((lin.in_features for lin in linears.values()), default=0)
    hessian_mb = widest * widest * 4 / 2**20
    return CompressorError(
        f"pass {pass_name} ran out of memory on {device} in decoder layer {index} (its widest linear input is "
        f"{widest}: a {widest} x {widest} float32 Hessian takes {hessian_mb:.0f} MB, and the pass holds one per "
        "distinct input plus a working copy); nothing was written. Free memory or run on a device with more "
        "(`device:` in the recipe), or leave the widest linears out of this pass with `ignore`.")


def current_targets(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """The planned names resolved against the model as the earlier passes left it: the factors of a
    low-rank linear (NAME.down, NAME.up) that stayed dense (no parameters saved) resolve to NAME; a linear that
    rotation gave an online input transform (RotatedInput) resolves to the linear inside it, NAME.linear."""
    modules = {}
    for name in names:
        try:
            module = model.get_submodule(name)
            if isinstance(module, RotatedInput):
                name, module = f"{name}.linear", module.linear
            modules[name] = module
        except AttributeError:
            parent = name.rpartition(".")[0]
            modules[parent] = model.get_submodule(parent)
    return modules


@torch.no_grad()
def capture_layer_inputs(model: PreTrainedModel, adapter: Adapter, windows: torch.Tensor,
                         ) -> tuple[list[torch.Tensor], list[dict]]:
    """Hidden states entering layer 0 (a [1, L, d] CPU tensor per window) and every layer's kwargs."""
    layers = adapter.decoder_layers(model)
    hidden: list[torch.Tensor] = []
    layer_kwargs: list[dict] = [{} for _ in layers]

    def recorder(i: int):
        def forward(hidden_states, *args, **kwargs):
            if args:
                raise CompressorError(f"{type(layers[i]).__name__} got positional arguments the engine "
                                      "does not know how to replay; the architecture adapter needs work")
            if i == 0:
                hidden.append(hidden_states.detach().cpu())
            if not layer_kwargs[i]:
                # the KV cache (`past_key_values`, `cache` from transformers 5.24) is not replayed
                layer_kwargs[i] = _to({k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache")},
                                      "cpu")
            if i == len(layers) - 1:
                raise StopLayer  # the model's forward is not needed past the last layer's input
            return hidden_states
        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    device = next(model.parameters()).device
    try:
        for ids in windows:
            try:
                model(input_ids=ids[None].to(device), use_cache=False)
            except StopLayer:
                pass
    finally:
        for layer in layers:
            del layer.forward
    return hidden, layer_kwargs


@torch.no_grad()
def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, device: torch.device) -> torch.Tensor:
    return layer_output(layer, hidden.to(device), kwargs).cpu()


@torch.no_grad()
def collect_stats(layer: nn.Module, linears: dict[str, nn.Linear], hidden: list[torch.Tensor], kwargs: dict,
                  kind: str, device: torch.device, sink_weight: float = 1.0, tokens: dict[str, int] | None = None,
                  ) -> dict[str, Any]:
    """Run the layer on every cached input with hooks on `linears`; return one statistic per linear:
    "input_sq_norms": sum_t x_t^2, [in] float64; "hessian": sum_t x_t x_t^T, [in, in] float32;
    "input_sq_norms_running_mean": llm-compressor's Wanda arithmetic for the same norms, up to scale: per
    window w, the float32 norm over its tokens squared, folded into a float32 running mean
    S <- S * w / (w + 1) + ||x_w||^2 / (w + 1), [in] float32 (the same masks as llm-compressor's, not a
    more exact sum). The first position of every window (the attention sink) counts `sink_weight` times in the sums.
    Each window's forward stops as soon as every linear has seen its input (with all of a layer's linears
    targeted, the last one's matmul and what follows it are skipped), so a linear called twice in one
    forward counts its first call only. `tokens`, if given, gets how many tokens each linear saw (fewer than the
    windows hold for a mixture-of-experts expert; its inputs [tokens, in] have no window positions, so no token
    counts as the sink there)."""
    if kind not in ("input_sq_norms", "input_sq_norms_running_mean", "hessian"):
        raise ValueError(f"unknown statistic {kind!r}")
    running_mean = kind == "input_sq_norms_running_mean"
    sums = {}
    for name, lin in linears.items():
        shape, dtype = ((lin.in_features, lin.in_features), torch.float32) if kind == "hessian" else \
            ((lin.in_features,), torch.float32 if running_mean else torch.float64)
        sums[name] = torch.zeros(shape, dtype=dtype, device=device)

    # One statistic per input tensor: q/k/v (and gate/up) read the same one. The cache holds the input
    # itself, so its id cannot be reused by a later tensor during the forward.
    shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    seen: set[str] = set()  # the linears whose input this window's forward has reached
    window = 0  # how many windows came before this one (the running mean's weights)

    def hook(name: str):
        def accumulate(module, inputs):
            if name in seen:
                return
            if id(inputs[0]) not in shared:
                stat = _input_statistic(inputs[0], kind, sink_weight)
                # sum_t x_tj^2 is finite exactly when column j is (and does not overflow): checking the
                # statistic costs a fraction of checking every activation
                if not torch.isfinite(torch.diagonal(stat) if kind == "hessian" else stat).all():
                    raise CompressorError(f"non-finite calibration activations entering {name}")
                shared[id(inputs[0])] = (inputs[0], stat)
            if tokens is not None:
                tokens[name] = tokens.get(name, 0) + inputs[0].shape[:-1].numel()
            if running_mean:
                sums[name] *= window / (window + 1)
                sums[name] += shared[id(inputs[0])][1] / (window + 1)
            else:
                sums[name] += shared[id(inputs[0])][1]
            seen.add(name)
            if len(seen) == len(linears):
                raise StopLayer  # nothing later in the layer is needed
        return accumulate

    handles = [lin.register_forward_pre_hook(hook(name)) for name, lin in linears.items()]
    try:
        for h in hidden:
            run_until_stopped(layer, h, kwargs, device)
            shared.clear()
            seen.clear()
            window += 1
    finally:
        for handle in handles:
            handle.remove()
    return summed_over_processes(sums, tokens, window, running_mean, device)


def summed_over_processes(sums: dict[str, torch.Tensor], tokens: dict[str, int] | None, windows: int,
                          running_mean: bool, device: torch.device) -> dict[str, torch.Tensor]:
    """The statistics of all the processes that share the calibration windows (compressor/distributed.py):
    sums and token counts add up, running means are weighted by each process's window count. One process: as
    they are."""
    if rank_and_size()[1] == 1:
        return sums
    if running_mean:
        total = summed(torch.tensor(float(windows), device=device))
        sums = {name: summed(s * windows) / total for name, s in sums.items()}
    else:
        sums = {name: summed(s) for name, s in sums.items()}
    if tokens is not None:
        counts = summed(torch.tensor([tokens.get(name, 0) for name in sums], dtype=torch.int64, device=device))
        tokens.update(zip(sums, counts.tolist(), strict=True))
    return sums


def _input_statistic(x: torch.Tensor, kind: str, sink_weight: float = 1.0) -> torch.Tensor:
    """One window's statistic of a linear's input x [windows, L, in] (see collect_stats): sum_t x_t^2 in
    float64, its float32 norm squared, or sum_t x_t x_t^T in float32; the first position counts
    `sink_weight` times."""
    if kind == "hessian":
        return window_hessian(x, sink_weight)
    x = with_sink_weight(x, sink_weight).reshape(-1, x.shape[-1])  # [tokens, in]
    if kind == "input_sq_norms":
        x = x.to(torch.float64)
        return (x * x).sum(dim=0)
    return torch.norm(x.to(torch.float32).T, p=2, dim=1) ** 2


def _to(value: Any, device: torch.device | str) -> Any:
    """Move the tensors inside nested tuples/lists/dicts to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    return value
