"""The one table of supported Hugging Face architectures: adding a model is adding a row.

Each row names the ``transformers`` module classes fastlm replaces and the conventions that matter
for numerics: the norm kind (``rms``, ``rms_offset`` = Gemma's ``x * (1 + weight)``, ``layer``) and
the attribute holding its eps, the MLP layout (``gated``: gate/up/down Linear; ``gpt2``: Conv1D
c_fc/act/c_proj/dropout; ``dense_act``: BERT's Linear then activation), the config attribute naming
the activation and the MLP attribute holding transformers' activation module (read at each call, so a model
runs its own activation whatever the patch saw), post-norm blocks (BERT: ``LayerNorm(dropout(dense(h)) + input)``, fused with the
residual add), the attention class, whether it is rotary (its forward is replaced to run fastlm's rope) and
whether it norms q/k per head (Qwen3), and the
causal-LM head class with the attribute holding its decoder body and the output class its forward returns.
"""

from __future__ import annotations

from dataclasses import dataclass

# transformers activation names -> (fastlm activation, gelu approximation); anything else is refused.
ACTIVATIONS = {
    "silu": ("silu", None),
    "swish": ("silu", None),
    "gelu": ("gelu", "none"),
    "gelu_new": ("gelu", "tanh"),
    "gelu_pytorch_tanh": ("gelu", "tanh"),
}


@dataclass(frozen=True)
class Arch:
    """How one architecture is patched (see the module docstring for the field conventions)."""

    norm_classes: tuple[str, ...]
    norm_kind: str
    eps_attr: str
    mlp_class: str
    mlp_kind: str
    act_attr: str
    act_module: str
    attention_class: str
    rotary: bool = False
    qk_norm: bool = False
    post_norm_classes: tuple[str, ...] = ()
    causal_lm_class: str | None = None
    body_attr: str = "model"
    causal_lm_output: str = "CausalLMOutputWithPast"


def _llama_like(prefix: str, qk_norm: bool = False) -> Arch:
    return Arch(
        norm_classes=(f"{prefix}RMSNorm",), norm_kind="rms", eps_attr="variance_epsilon",
        mlp_class=f"{prefix}MLP", mlp_kind="gated", act_attr="hidden_act", act_module="act_fn",
        attention_class=f"{prefix}Attention", rotary=True, qk_norm=qk_norm, causal_lm_class=f"{prefix}ForCausalLM",
    )


def _bert_like(prefix: str) -> Arch:
    return Arch(
        norm_classes=("LayerNorm",), norm_kind="layer", eps_attr="eps",
        mlp_class=f"{prefix}Intermediate", mlp_kind="dense_act", act_attr="hidden_act",
        act_module="intermediate_act_fn", attention_class=f"{prefix}SelfAttention",
        post_norm_classes=(f"{prefix}SelfOutput", f"{prefix}Output"),
    )


ARCHITECTURES: dict[str, Arch] = {
    "llama": _llama_like("Llama"),
    "mistral": _llama_like("Mistral"),
    "qwen2": _llama_like("Qwen2"),
    "qwen3": _llama_like("Qwen3", qk_norm=True),
    "gemma": Arch(
        norm_classes=("GemmaRMSNorm",), norm_kind="rms_offset", eps_attr="eps",
        mlp_class="GemmaMLP", mlp_kind="gated", act_attr="hidden_act", act_module="act_fn",
        attention_class="GemmaAttention", rotary=True, causal_lm_class="GemmaForCausalLM",
    ),
    "gpt2": Arch(
        norm_classes=("LayerNorm",), norm_kind="layer", eps_attr="eps",
        mlp_class="GPT2MLP", mlp_kind="gpt2", act_attr="activation_function", act_module="act",
        attention_class="GPT2Attention", causal_lm_class="GPT2LMHeadModel", body_attr="transformer",
        causal_lm_output="CausalLMOutputWithCrossAttentions",
    ),
    "bert": _bert_like("Bert"),
    "roberta": _bert_like("Roberta"),
}


def supported() -> str:
    """The supported model types, for error messages."""
    return ", ".join(sorted(ARCHITECTURES))
