"""GPT-2 parameter shapes, so the benchmark can time optimizers without building (or running) a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..layout import ParamLayout

MODELS: dict[str, tuple[int, int]] = {"gpt2-small": (768, 12), "gpt2-medium": (1024, 24)}
VOCAB = 50304  # GPT-2's 50257 padded to a multiple of 64, as nanoGPT does
CONTEXT = 1024


@dataclass(frozen=True)
class ParamSpec:
    """One parameter tensor: its name and its shape (nn.Linear weights are (out, in))."""

    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def gpt2_specs(model: str = "gpt2-small", layers: int | None = None) -> list[ParamSpec]:
    """The parameters of a GPT-2 (untied wte, learned wpe), with an optional layer-count override."""
    d, n_layer = MODELS[model]
    if layers is not None:
        n_layer = layers
    specs = [ParamSpec("wte.weight", (VOCAB, d)), ParamSpec("wpe.weight", (CONTEXT, d))]
    for i in range(n_layer):
        h = f"h.{i}."
        specs += [
            ParamSpec(h + "ln_1.weight", (d,)),
            ParamSpec(h + "ln_1.bias", (d,)),
            ParamSpec(h + "attn.c_attn.weight", (3 * d, d)),
            ParamSpec(h + "attn.c_attn.bias", (3 * d,)),
            ParamSpec(h + "attn.c_proj.weight", (d, d)),
            ParamSpec(h + "attn.c_proj.bias", (d,)),
            ParamSpec(h + "ln_2.weight", (d,)),
            ParamSpec(h + "ln_2.bias", (d,)),
            ParamSpec(h + "mlp.c_fc.weight", (4 * d, d)),
            ParamSpec(h + "mlp.c_fc.bias", (4 * d,)),
            ParamSpec(h + "mlp.c_proj.weight", (d, 4 * d)),
            ParamSpec(h + "mlp.c_proj.bias", (d,)),
        ]
    specs += [ParamSpec("ln_f.weight", (d,)), ParamSpec("ln_f.bias", (d,))]
    return specs


def factor_dims(shape: tuple[int, ...], max_precond_dim: int) -> list[bool]:
    """Which dims get a factor under the page's rule: a dim > max_precond_dim gets none, 1-D gets none."""
    if len(shape) < 2:
        return [False] * len(shape)
    return [s <= max_precond_dim for s in shape]


def count_factors(specs: list[ParamSpec], max_precond_dim: int = 10000) -> dict[str, int]:
    """Count tensors and Kronecker factors, split so a quoted total can be matched against its parts."""
    out = {
        "tensors": len(specs),
        "params": sum(s.numel for s in specs),
        "matrices": 0,
        "two_sided": 0,
        "one_sided": 0,
        "unpreconditioned": 0,
        "factors": 0,
    }
    for s in specs:
        if len(s.shape) < 2:
            continue
        out["matrices"] += 1
        k = sum(factor_dims(s.shape, max_precond_dim))
        out["factors"] += k
        key = "two_sided" if k == len(s.shape) else "one_sided" if k else "unpreconditioned"
        out[key] += 1
    return out


# Llama-3 shapes (d, layers, MLP width, KV width, vocab, tied embeddings): grouped-query attention
# with 8 KV heads; RMSNorm weights only (no biases).
LLAMA: dict[str, tuple[int, int, int, int, int, bool]] = {
    "llama-1b": (2048, 16, 8192, 512, 128256, True),
    "llama-8b": (4096, 32, 14336, 1024, 128256, False),
    "llama-70b": (8192, 80, 28672, 1024, 128256, False),
}


def llama_specs(model: str = "llama-8b") -> list[ParamSpec]:
    """The parameters of a Llama-3-shaped decoder (nn.Linear weights are (out, in))."""
    d, n_layer, mlp, kv, vocab, tied = LLAMA[model]
    specs = [ParamSpec("embed_tokens.weight", (vocab, d))]
    for i in range(n_layer):
        h = f"layers.{i}."
        specs += [
            ParamSpec(h + "input_layernorm.weight", (d,)),
            ParamSpec(h + "self_attn.q_proj.weight", (d, d)),
            ParamSpec(h + "self_attn.k_proj.weight", (kv, d)),
            ParamSpec(h + "self_attn.v_proj.weight", (kv, d)),
            ParamSpec(h + "self_attn.o_proj.weight", (d, d)),
            ParamSpec(h + "post_attention_layernorm.weight", (d,)),
            ParamSpec(h + "mlp.gate_proj.weight", (mlp, d)),
            ParamSpec(h + "mlp.up_proj.weight", (mlp, d)),
            ParamSpec(h + "mlp.down_proj.weight", (d, mlp)),
        ]
    specs.append(ParamSpec("norm.weight", (d,)))
    if not tied:
        specs.append(ParamSpec("lm_head.weight", (vocab, d)))
    return specs


def model_specs(model: str) -> list[ParamSpec]:
    """Parameter shapes of any model the benchmark and planner know by name."""
    if model in MODELS:
        return gpt2_specs(model)
    if model in LLAMA:
        return llama_specs(model)
    raise ValueError(f"unknown model {model!r}; known: {', '.join([*MODELS, *LLAMA])}")


def spec_layouts(
    specs: list[ParamSpec], block_size: int | None = None, max_precond_dim: int = 10000
) -> list[ParamLayout]:
    """SOAP's layouts of the shapes, as an optimizer with default options would plan them."""
    from ..layout import plan_param

    return [
        plan_param(
            i,
            0,
            s.name,
            s.shape,
            max_precond_dim=max_precond_dim,
            merge=False,
            precondition_1d=False,
            data_format="channels_first",
            block_size=block_size,
        )
        for i, s in enumerate(specs)
    ]
