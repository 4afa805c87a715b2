"""GGUF block grids for `rtn` and `gptq` (`gguf: TYPE`): each tensor's type, its grid, and rounding on it.

1. Type. `gguf: Q4_K` puts every quantized linear on that block type; `gguf: llama:Q4_K_M` (also
   `llama:Q3_K_M`, `llama:Q2_K`) chooses per tensor as llama.cpp's `llama-quantize` does for that file type:
   more bits for some layers' attn_v, ffn_down and attn_output (`llama_type`). A linear whose input width the
   block does not divide falls back as llama.cpp falls back (Q4_K -> Q5_0, Q2_K and Q3_K -> Q4_0, ...), and
   stays in float where no 32-block fits either; the record names the type each linear got.
2. Grid. Before any code is chosen, each block's fields (float16 d and dmin, the sub-block scales and mins)
   are fitted to the original weights: per group, scales (and offsets) are tried around the group's range,
   each refitted by weighted least squares on the codes it gives, and the one with the least
   importance-weighted squared error kept (importance: the Hessian's diagonal, as llama.cpp's imatrix; 1 for
   RTN). Then the fields are rounded to what the type stores, so the grid is exactly representable.
3. Rounding. RTN rounds every weight to the nearest point of its group's grid; GPTQ rounds column by column
   on the same fixed grids, spreading each column's error over the columns not yet rounded (`BlockRounding`).
The codes and grid are stored as the GGUF bytes themselves (nn.GGUFLinear), so an export copies them.
"""

import re

import torch

from compressor.errors import CompressorError
from compressor.gguf_blocks import BLOCK_TYPES, BlockGrid, BlockType
from compressor.passes.sweep import Ahead

LLAMA_FILE_TYPES = ("Q4_K_M", "Q3_K_M", "Q2_K")
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # llama.cpp's
SHRINKS = torch.linspace(0.7, 1.1, 17)  # candidate ranges, as a fraction of the group's own range


def check_spec(spec: str) -> None:
    if spec in BLOCK_TYPES or spec.removeprefix("llama:") in LLAMA_FILE_TYPES and spec.startswith("llama:"):
        return
    raise CompressorError(f"gguf: unknown type {spec!r}; use a GGUF block type ({', '.join(BLOCK_TYPES)}) or a "
                          f"llama.cpp file type ({', '.join('llama:' + t for t in LLAMA_FILE_TYPES)})")


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers that get more bits in its _M mixes."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def llama_type(file_type: str, name: str, index: int, n_layers: int, n_gqa: int) -> str:
    """The block type llama-quantize gives linear `name` of decoder layer `index` in `file_type`."""
    role = name.rpartition(".")[2]
    if file_type == "Q4_K_M":
        return "Q6_K" if role in ("v_proj", "down_proj") and use_more_bits(index, n_layers) else "Q4_K"
    if file_type == "Q3_K_M":
        if role == "v_proj":
            return "Q5_K" if index < 2 else "Q4_K"
        if role == "down_proj":
            return "Q5_K" if index < n_layers // 16 else "Q4_K"
        return "Q4_K" if role == "o_proj" else "Q3_K"
    if role == "v_proj":  # Q2_K
        return "Q4_K" if n_gqa >= 4 else "Q3_K"
    return "Q3_K" if role in ("down_proj", "o_proj") else "Q2_K"


def tensor_type(spec: str, name: str, in_features: int, config) -> BlockType | None:
    """The block type of linear `name` [*, in_features] (config: the model's), after llama.cpp's fallback for
    widths the block does not divide; None: no block fits, the linear stays in float."""
    if spec.startswith("llama:"):
        match = re.search(r"\.(\d+)\.", name)
        index = int(match.group(1)) if match else 0
        n_gqa = config.num_attention_heads // (getattr(config, "num_key_value_heads", None) or
                                               config.num_attention_heads)
        spec = llama_type(spec.removeprefix("llama:"), name, index, config.num_hidden_layers, n_gqa)
    fitted = fit_width(spec, in_features)
    return BLOCK_TYPES[fitted] if fitted else None


def fit_width(type_name: str, width: int) -> str | None:
    """Block type `type_name`, or llama.cpp's fallback where its block does not divide `width` (rows of that
    width); None where neither fits."""
    if width % BLOCK_TYPES[type_name].block:
        type_name = FALLBACK.get(type_name, type_name)
    return type_name if width % BLOCK_TYPES[type_name].block == 0 else None


def to_codes(t: BlockType, w: torch.Tensor, s: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The nearest codes for w given s and b of the same shape (float32): c = round(w / s), q = round((w - b) / s),
    clamped to the type's range; 0 where s = 0."""
    x = (w - b) / s if t.affine else w / s
    return torch.where(s == 0, 0.0, torch.round(x)).clamp(t.lo, t.hi)


def fit_groups(t: BlockType, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float scale s and offset b [G] for groups x [G, sub] with importance h [G, sub] (the module docstring,
    step 2): the least weighted squared error over SHRINKS."""
    if t.affine:
        lo = x.amin(1) if t.block == 32 else x.amin(1).clamp(max=0)  # K-quants store b <= 0
        span = x.amax(1) - lo
    else:
        extreme = x.gather(1, x.abs().argmax(1, keepdim=True))[:, 0]  # the signed value of largest magnitude
        span = extreme / t.lo  # s < 0 puts the extreme at code lo, the side with one more level
    best_s, best_b = torch.zeros_like(span), torch.zeros_like(span)
    best = torch.full_like(span, float("inf"))
    for shrink in SHRINKS:
        s = span * shrink / (t.hi if t.affine else 1)
        b = lo if t.affine else torch.zeros_like(s)
        c = to_codes(t, x, s[:, None].expand_as(x), b[:, None].expand_as(x))
        s, b = refit(t, x, h, c, s, b)
        error = (h * (x - s[:, None] * c - b[:, None]) ** 2).sum(1)
        better = error < best
        best_s, best_b, best = torch.where(better, s, best_s), torch.where(better, b, best_b), error.minimum(best)
    return best_s, best_b


def refit(t: BlockType, x, h, c, s, b) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted least-squares s (and b) [G] for fixed codes c [G, sub]; the given s, b where undetermined."""
    hc, hcc, hx, hcx = (h * c).sum(1), (h * c * c).sum(1), (h * x).sum(1), (h * c * x).sum(1)
    if not t.affine:
        return torch.where(hcc > 0, hcx / hcc, s), b
    hs = h.sum(1)
    det = hs * hcc - hc * hc
    ok = det > 1e-12 * hs * hcc
    s_new, b_new = (hs * hcx - hc * hx) / det, (hcc * hx - hc * hcx) / det
    if t.block == 256:  # K-quants: b <= 0 (refit s alone where b came out positive), s >= 0
        s_new = torch.where(b_new > 0, hcx / hcc.clamp_min(1e-30), s_new)
        b_new = b_new.clamp(max=0)
        ok &= s_new >= 0
    return torch.where(ok, s_new, s), torch.where(ok, b_new, b)


def fit_grid(t: BlockType, weight: torch.Tensor, importance: torch.Tensor) -> BlockGrid:
    """The grid of weight [rows, in] in type t, fitted with importance [in] (module docstring, step 2)."""
    rows, in_features = weight.shape
    nb, ns = in_features // t.block, t.block // t.sub
    x = weight.float().reshape(-1, t.sub)
    h = importance.float().clamp_min(0).expand(rows, -1).reshape(-1, t.sub) + 1e-12
    s, b = (v.reshape(rows, nb, ns) for v in fit_groups(t, x, h))
    if ns == 1:  # 32-blocks store s and b as float16
        return BlockGrid(s[..., 0].half(), b[..., 0].half() if t.affine else torch.zeros(rows, nb).half(),
                         torch.ones(rows, nb, 1, dtype=torch.int64), torch.zeros(rows, nb, 1, dtype=torch.int64))
    lo, hi = t.scale_range
    top = hi if lo >= 0 else max(hi, -lo - 1)
    d = (s.abs().amax(2) / top).half()
    sc = torch.where(d[..., None] == 0, 0, torch.round(s / d.float()[..., None])).clamp(lo, hi).long()
    if not t.affine:
        return BlockGrid(d, torch.zeros_like(d), sc, torch.zeros_like(sc))
    dmin = ((-b).amax(2) / (2**t.scale_bits - 1)).half()
    mn = torch.where(dmin[..., None] == 0, 0, torch.round(-b / dmin.float()[..., None]))
    return BlockGrid(d, dmin, sc, mn.clamp(0, 2**t.scale_bits - 1).long())


def group_scale_offset(t: BlockType, grid: BlockGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """s and b per input column [rows, in] (each group's repeated over its columns)."""
    s, b = grid.scale_offset()
    return s.repeat_interleave(t.sub, 1), b.repeat_interleave(t.sub, 1)


class BlockRounding:
    """GPTQ's column rule on fixed GGUF grids: column j rounds to its group's s and b. With `keep_zero` [out, in]
    (a symmetric type only) those weights stay at code 0, which is exactly 0. `codes` [out, in] collects the codes."""

    def __init__(self, t: BlockType, s: torch.Tensor, b: torch.Tensor, perm: torch.Tensor,
                 keep_zero: torch.Tensor | None):
        self.t, self.s, self.b, self.perm, self.keep_zero = t, s, b, perm, keep_zero
        self.codes = torch.zeros_like(s)

    def begin_block(self, start: int, block: torch.Tensor, hinv_block: torch.Tensor) -> None:
        pass

    def column(self, index: int, ahead: Ahead) -> torch.Tensor:
        col = int(self.perm[index])
        s, b = self.s[:, col], self.b[:, col]
        c = to_codes(self.t, ahead.columns(1)[:, 0], s, b)
        if self.keep_zero is not None:
            c = torch.where(self.keep_zero[:, col], 0.0, c)
        self.codes[:, col] = c
        return s * c + b if self.t.affine else s * c
