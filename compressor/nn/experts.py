"""Mixture-of-experts experts as linears, one pair per expert, in place of transformers' fused 3-D tensors.

transformers 5 keeps a block's experts as two parameters, gate_up_proj [experts, 2 * inter, hidden] and
down_proj [experts, hidden, inter], which no pass reaches (they are not nn.Linear). UnfusedExperts holds the same
weights as one `Expert` per expert (gate_up_proj and down_proj linears, named `experts.E.gate_up_proj`, ...) and
computes what the fused module computes: every pass then treats each expert's linears like any other, and the
statistics each one collects come from exactly the tokens the router sent that expert.
"""

from collections.abc import Callable

import torch
from torch import nn


class Expert(nn.Module):
    """One expert: down(act(gate) * up), gate and up from one [2 * inter, hidden] linear (as fused)."""

    def __init__(self, gate_up_proj: nn.Linear, down_proj: nn.Linear, act_fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.gate_up_proj, self.down_proj, self.act_fn = gate_up_proj, down_proj, act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [tokens, hidden]
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class UnfusedExperts(nn.ModuleList):
    """The experts of one mixture-of-experts block, called as the fused module is:
    (hidden_states [tokens, hidden], top_k_index [tokens, k], top_k_weights [tokens, k]) -> [tokens, hidden]."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):  # in expert order, as the fused module adds them up
            token, slot = torch.where(top_k_index == e)
            if len(token):
                y = expert(hidden_states[token]) * top_k_weights[token, slot, None]
                out.index_add_(0, token, y.to(out.dtype))
        return out

    @classmethod
    def from_fused(cls, fused: nn.Module) -> "UnfusedExperts":
        """The same experts as `fused` (is_fused_experts), sharing its weight tensors' values (copies on a real
        device; shapes only on the meta device)."""
        experts, inter2, hidden = fused.gate_up_proj.shape
        kind = dict(dtype=fused.gate_up_proj.dtype, device=fused.gate_up_proj.device)
        unfused = cls()
        for e in range(experts):
            gate_up = nn.Linear(hidden, inter2, bias=False, **kind)
            down = nn.Linear(inter2 // 2, hidden, bias=False, **kind)
            if fused.gate_up_proj.device.type != "meta":
                gate_up.weight.data.copy_(fused.gate_up_proj.data[e])
                down.weight.data.copy_(fused.down_proj.data[e])
            unfused.append(Expert(gate_up, down, fused.act_fn))
        return unfused

    def runtime_config(self) -> dict:
        return {"class": "UnfusedExperts"}

    @classmethod
    def from_runtime_config(cls, runtime: dict, fused: nn.Module, dtype: torch.dtype) -> "UnfusedExperts":
        return fused if isinstance(fused, cls) else cls.from_fused(fused)


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers 5 experts module this file unfuses: 3-D gate_up_proj [E, 2I, H] and down_proj [E, H, I]
    parameters, an act_fn, no biases."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == down.dim() == 3
            and gate_up.shape[0] == down.shape[0] and gate_up.shape[1] == 2 * down.shape[2]
            and gate_up.shape[2] == down.shape[1] and hasattr(module, "act_fn")
            and not any(p.dim() < 3 for p in module.parameters(recurse=False)))


def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace each fused experts module of `model` by UnfusedExperts with the same weights; return their names."""
    names = [name for name, module in model.named_modules() if is_fused_experts(module)]
    for name in names:
        model.set_submodule(name, UnfusedExperts.from_fused(model.get_submodule(name)))
    return names

