"""The one configuration of fastlm's Transformer (``fastlm.models.Transformer``).

Three families come from the same fields; ``ModelConfig.llama(...)``, ``.gpt2(...)`` and
``.bert(...)`` fill in the family's choices and take overrides:

=============  ==========  ========  ========  =====  ======  ====================
family         norm        position  mlp       bias   causal  head
=============  ==========  ========  ========  =====  ======  ====================
Llama          rmsnorm     rope      swiglu    no     yes     LM head (untied)
GPT-2          layernorm   learned   gelu      yes    yes     LM head (tied)
BERT encoder   layernorm   learned   gelu      yes    no      MLM head (tied)
=============  ==========  ========  ========  =====  ======  ====================
"""

from dataclasses import asdict, dataclass, fields, replace
from typing import Literal


# rope_scaling["rope_type"] -> the numeric keys it needs.
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _check_rope_scaling(scaling) -> None:
    kind = scaling.get("rope_type") if isinstance(scaling, dict) else None
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(f"model.rope_scaling must be None or a dict with rope_type one of {sorted(ROPE_SCALING_KEYS)}, "
                         f"got {scaling!r}")
    for key in ROPE_SCALING_KEYS[kind]:
        value = scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"model.rope_scaling[{key!r}] must be a positive number for rope_type {kind!r}, got {value!r}")
    if kind == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ValueError(f"model.rope_scaling: high_freq_factor must exceed low_freq_factor, got {scaling!r}")


@dataclass
class ModelConfig:
    vocab_size: int = 50304
    """Rows of the token embedding (and of the output head). A multiple of 64 keeps matmuls aligned."""
    max_seq_len: int = 1024
    """Longest sequence (document) the model sees; sizes the learned position table and the RoPE cache."""
    d_model: int = 768
    """Width of the residual stream."""
    n_layers: int = 12
    """Number of Transformer blocks."""
    n_heads: int = 12
    """Query heads; ``d_model`` must be divisible by it (head dim = d_model // n_heads)."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention (GQA); None means n_heads (plain multi-head)."""
    d_ff: int | None = None
    """Hidden width of the MLP; None means 4 * d_model for gelu and 8/3 * d_model (rounded up to a
    multiple of 64) for swiglu, which gives both the same parameter count."""
    norm: Literal["rmsnorm", "layernorm"] = "layernorm"
    """Normalization of the pre-norm blocks (fused with the residual add)."""
    norm_eps: float = 1e-5
    """Epsilon added to the variance in the norms."""
    position: Literal["rope", "learned"] = "learned"
    """rope: rotary embeddings on queries and keys (Llama); learned: a position table added to the
    token embeddings (GPT-2, BERT)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: dict | None = None
    """RoPE frequency scaling of long-context models, in Hugging Face's form: None, {"rope_type":
    "linear", "factor": f} (every frequency / f) or {"rope_type": "llama3", "factor", "low_freq_factor",
    "high_freq_factor", "original_max_position_embeddings"} (Llama 3.1+: low frequencies / factor, high
    ones kept, a smooth blend between)."""
    mlp: Literal["swiglu", "gelu"] = "gelu"
    """swiglu: silu(x W_gate) * (x W_up) W_down (Llama); gelu: gelu(x W_1) W_2 (GPT-2, BERT)."""
    bias: bool = True
    """Biases in the linear layers and norms (GPT-2, BERT) or none (Llama)."""
    qkv_bias: bool = False
    """Biases on the query/key/value projection even when ``bias`` is False (Qwen2: biased q, k, v
    but unbiased output projection, MLP and norms)."""
    sliding_window: int | None = None
    """Causal models only: each token attends to itself and the sliding_window - 1 tokens before it
    (Mistral's sliding-window attention); None: to every earlier token of its document."""
    tie_embeddings: bool = True
    """The output head reuses the token embedding matrix."""
    causal: bool = True
    """True: decoder-only causal LM. False: bidirectional encoder with a BERT-style MLM head."""
    embd_dropout: float = 0.0
    """Dropout on the embeddings (token + position)."""
    attn_dropout: float = 0.0
    """Dropout on the attention probabilities."""
    resid_dropout: float = 0.0
    """Dropout on each block's attention and MLP outputs before they join the residual stream."""
    init_std: float = 0.02
    """Std of the normal init of embeddings and linear weights; the projections that write into the
    residual stream get init_std / sqrt(2 * n_layers) (GPT-2), so the stream's variance does not
    grow with depth."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of storing them."""

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model if self.mlp == "gelu" else 64 * -(-8 * self.d_model // 3 // 64)
        for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({self.n_kv_heads})")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ValueError(f"model.sliding_window must be a positive integer or None, got {self.sliding_window!r}")
        if self.sliding_window is not None and not self.causal:
            raise ValueError("model.sliding_window needs a causal model (model.causal=true)")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got d_model / n_heads = {self.head_dim}")
        choices = {"norm": ("rmsnorm", "layernorm"), "position": ("rope", "learned"), "mlp": ("swiglu", "gelu")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("embd_dropout", "attn_dropout", "resid_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.rope_theta > 0.0:
            raise ValueError(f"model.rope_theta must be > 0, got {self.rope_theta}")
        for name in ("norm_eps", "init_std"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"model.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def llama(cls, **overrides) -> "ModelConfig":
        base = dict(norm="rmsnorm", norm_eps=1e-5, position="rope", mlp="swiglu", bias=False,
                    tie_embeddings=False, causal=True)
        return cls(**{**base, **overrides})

    @classmethod
    def gpt2(cls, **overrides) -> "ModelConfig":
        base = dict(norm="layernorm", position="learned", mlp="gelu", bias=True, tie_embeddings=True, causal=True)
        return cls(**{**base, **overrides})

    @classmethod
    def bert(cls, **overrides) -> "ModelConfig":
        base = dict(norm="layernorm", norm_eps=1e-12, position="learned", mlp="gelu", bias=True,
                    tie_embeddings=True, causal=False)
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes) -> "ModelConfig":
        return replace(self, **changes)
