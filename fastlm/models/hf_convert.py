"""Hugging Face causal LMs <-> fastlm's Transformer: load their weights, export ours.

    from fastlm.models.hf_convert import from_hf, load_hf, save_hf
    model = load_hf("path/to/llama-dir")            # config.json + *.safetensors -> fastlm Transformer
    cfg, state_dict = from_hf("path/to/qwen2-dir")  # or from_hf(a transformers model object)
    save_hf(model, tokenizer, "out/hf-dir")         # transformers' from_pretrained loads it

    python -m fastlm.models.hf_convert CHECKPOINT_OR_RUN_DIR OUT_DIR   # a fastlm checkpoint -> HF dir

Loading reads ``config.json`` and the safetensors file(s) (``model.safetensors`` or a sharded
``model.safetensors.index.json``) directly: ``transformers`` is not needed. Everything is driven by
``ARCHITECTURES``, one row per ``model_type``: how its config maps onto ``ModelConfig`` and a
``NAMES`` table (fastlm parameter -> HF tensor names). Conventions the table encodes:

- fastlm's attention has one fused projection ``qkv`` = [q; k; v] (rows), HF Llama-style models
  three (``q_proj``, ``k_proj``, ``v_proj``): concatenated on load, split on export. GPT-2's
  ``c_attn`` is already fused in that order.
- fastlm's SwiGLU ``fc1`` = [gate; up] (``layers.fused_mlp`` computes silu(gate) * up), HF's
  ``gate_proj`` and ``up_proj``.
- GPT-2 stores its linear layers as ``Conv1D`` with (in, out) weights: transposed both ways.
- RoPE: HF Llama rotates the halves (``rotate_half``, the GPT-NeoX convention), as fastlm's
  ``rope`` does by default, so q/k weights need no permutation. Rope types: default, linear and
  llama3 (``ModelConfig.rope_scaling``), with the full head rotated.
- Qwen2 has q/k/v biases but no other bias: ``ModelConfig.qkv_bias``. Mistral's (and Phi-3's)
  sliding window: ``ModelConfig.sliding_window``. Phi-3 is Llama with fused ``qkv_proj`` and
  ``gate_up_proj`` (import only: such a model exports as Llama or Mistral).

An unsupported ``model_type`` or config option, a missing file or tensor, or an HF tensor the
table does not account for raises a ValueError / FileNotFoundError that says which.
"""

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fastlm.models import layers
from fastlm.models.config import ROPE_SCALING_KEYS, ModelConfig
from fastlm.models.transformer import Transformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"

# Tensors some checkpoints carry that are not weights (GPT-2's causal-mask buffers, older Llama
# files' RoPE frequencies): skipped on load.
_BUFFERS = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|\.rotary_emb\.inv_freq)$")


@dataclass(frozen=True)
class Arch:
    """One HF architecture: its ``config.json`` <-> ``ModelConfig``, and its tensor names.

    ``names`` maps a fastlm parameter name (``{i}`` for the block index) to the HF tensor name, or
    to a tuple of names concatenated along dim 0 (fused projections). ``transposed``: the fastlm
    names whose HF tensors are stored (in, out) (GPT-2's Conv1D). ``body``: the prefix of the
    decoder body's tensors (some GPT-2 files omit it). ``write_config`` None: import only (export
    writes another row's architecture for such a model).
    """

    hf_class: str
    body: str
    names: dict
    read_config: Callable[[dict], ModelConfig]
    write_config: Callable[[ModelConfig], dict] | None
    transposed: frozenset = frozenset()


def _llama_names() -> dict:
    layer, attn, mlp = "model.layers.{i}.", "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
    return {
        "tok_emb.weight": "model.embed_tokens.weight",
        "norm_f.weight": "model.norm.weight",
        "head.weight": "lm_head.weight",
        "blocks.{i}.norm1.weight": layer + "input_layernorm.weight",
        "blocks.{i}.norm2.weight": layer + "post_attention_layernorm.weight",
        "blocks.{i}.attn.qkv.weight": (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
        "blocks.{i}.attn.qkv.bias": (attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias"),
        "blocks.{i}.attn.proj.weight": attn + "o_proj.weight",
        "blocks.{i}.attn.proj.bias": attn + "o_proj.bias",
        "blocks.{i}.mlp.fc1.weight": (mlp + "gate_proj.weight", mlp + "up_proj.weight"),
        "blocks.{i}.mlp.fc1.bias": (mlp + "gate_proj.bias", mlp + "up_proj.bias"),
        "blocks.{i}.mlp.fc2.weight": mlp + "down_proj.weight",
        "blocks.{i}.mlp.fc2.bias": mlp + "down_proj.bias",
    }


def _phi3_names() -> dict:
    """Llama's names, but q/k/v and gate/up are already fused (in fastlm's order: [q; k; v], [gate; up])."""
    names = _llama_names()
    names.update({"blocks.{i}.attn.qkv.weight": "model.layers.{i}.self_attn.qkv_proj.weight",
                  "blocks.{i}.mlp.fc1.weight": "model.layers.{i}.mlp.gate_up_proj.weight"})
    return names


def _gpt2_names() -> dict:
    h = "transformer.h.{i}."
    return {
        "tok_emb.weight": "transformer.wte.weight",
        "pos_emb.weight": "transformer.wpe.weight",
        "norm_f.weight": "transformer.ln_f.weight",
        "norm_f.bias": "transformer.ln_f.bias",
        "head.weight": "lm_head.weight",
        **{f"blocks.{{i}}.{ours}.{p}": f"{h}{theirs}.{p}" for ours, theirs in [
            ("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
            ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")] for p in ("weight", "bias")},
    }


def _get(hf: dict, key: str, default=None, required: bool = False):
    if key not in hf or hf[key] is None:
        if required:
            raise ValueError(f"config.json ({hf.get('model_type')}) has no {key!r}")
        return default
    return hf[key]


def _rope(hf: dict) -> tuple[float, dict | None]:
    """The RoPE base and ``ModelConfig.rope_scaling``; refuses the scalings fastlm does not implement."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}  # older files, transformers >= 5
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type != "default" and rope_type not in ROPE_SCALING_KEYS:
        raise ValueError(f"config.json: rope type {rope_type!r} is not supported; fastlm implements default, "
                         f"{', '.join(sorted(ROPE_SCALING_KEYS))}")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"config.json: partial_rotary_factor {partial} is not supported; only full-head RoPE")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if rope_type == "default":
        return theta, None
    return theta, {"rope_type": rope_type, **{key: params.get(key) for key in ROPE_SCALING_KEYS[rope_type]}}


def _read_llama_like(hf: dict, qkv_bias: bool = False, window: bool = False) -> ModelConfig:
    model_type = hf.get("model_type")
    act = _get(hf, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"config.json ({model_type}): hidden_act {act!r} is not supported; fastlm's gated MLP is SwiGLU")
    d_model, n_heads = _get(hf, "hidden_size", required=True), _get(hf, "num_attention_heads", required=True)
    head_dim = _get(hf, "head_dim", d_model // n_heads)
    if head_dim * n_heads != d_model:
        raise ValueError(f"config.json ({model_type}): head_dim {head_dim} x {n_heads} heads != hidden_size {d_model}; "
                         "fastlm needs head_dim = hidden_size / num_attention_heads")
    attention_bias, mlp_bias = bool(_get(hf, "attention_bias", False)), bool(_get(hf, "mlp_bias", False))
    if attention_bias != mlp_bias:
        raise ValueError(f"config.json ({model_type}): attention_bias={attention_bias} with mlp_bias={mlp_bias} is not "
                         "supported (fastlm has biases in all linear layers or in none)")
    max_seq_len = _get(hf, "max_position_embeddings", 2048)
    rope_theta, rope_scaling = _rope(hf)
    sliding_window = _get(hf, "sliding_window") if window else None
    if _get(hf, "use_sliding_window", False) or any(t != "full_attention" for t in _get(hf, "layer_types", [])):
        raise ValueError(f"config.json ({model_type}): per-layer sliding-window attention (use_sliding_window / "
                         "layer_types) is not supported")
    return ModelConfig.llama(
        vocab_size=_get(hf, "vocab_size", required=True), max_seq_len=max_seq_len, d_model=d_model,
        n_layers=_get(hf, "num_hidden_layers", required=True), n_heads=n_heads,
        n_kv_heads=_get(hf, "num_key_value_heads", n_heads), d_ff=_get(hf, "intermediate_size", required=True),
        norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)), rope_theta=rope_theta, rope_scaling=rope_scaling,
        bias=attention_bias,
        qkv_bias=qkv_bias, tie_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
        # A window at least as long as any sequence the model takes masks nothing.
        sliding_window=sliding_window if sliding_window is not None and sliding_window < max_seq_len else None,
    )


def _read_gpt2(hf: dict) -> ModelConfig:
    act = _get(hf, "activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"config.json (gpt2): activation_function {act!r} is not supported; fastlm's GELU is the tanh "
                         "approximation (gelu_new)")
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)):
        if _get(hf, key, ok) != ok:
            raise ValueError(f"config.json (gpt2): {key}={hf[key]} is not supported")
    d_model = _get(hf, "n_embd", required=True)
    return ModelConfig.gpt2(
        vocab_size=_get(hf, "vocab_size", required=True), max_seq_len=_get(hf, "n_positions", 1024), d_model=d_model,
        n_layers=_get(hf, "n_layer", required=True), n_heads=_get(hf, "n_head", required=True),
        d_ff=_get(hf, "n_inner", 4 * d_model), norm_eps=float(_get(hf, "layer_norm_epsilon", 1e-5)),
        tie_embeddings=bool(_get(hf, "tie_word_embeddings", True)),
    )


def _write_llama_like(cfg: ModelConfig, model_type: str) -> dict:
    out = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        # Both spellings: transformers >= 5 reads rope_parameters, older versions rope_theta + rope_scaling.
        "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})},
    }
    if model_type == "llama":
        out.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    if model_type == "mistral":
        out.update(sliding_window=cfg.sliding_window)
    if model_type == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers,
                   layer_types=["full_attention"] * cfg.n_layers)
    return out


def _write_gpt2(cfg: ModelConfig) -> dict:
    return {
        "vocab_size": cfg.vocab_size, "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
        "n_inner": cfg.d_ff, "n_positions": cfg.max_seq_len, "layer_norm_epsilon": cfg.norm_eps,
        "activation_function": "gelu_new", "tie_word_embeddings": cfg.tie_embeddings,
        "resid_pdrop": cfg.resid_dropout, "embd_pdrop": cfg.embd_dropout, "attn_pdrop": cfg.attn_dropout,
    }


ARCHITECTURES: dict[str, Arch] = {
    "llama": Arch("LlamaForCausalLM", "model.", _llama_names(), _read_llama_like,
                  lambda cfg: _write_llama_like(cfg, "llama")),
    "mistral": Arch("MistralForCausalLM", "model.", _llama_names(), lambda hf: _read_llama_like(hf, window=True),
                    lambda cfg: _write_llama_like(cfg, "mistral")),
    "qwen2": Arch("Qwen2ForCausalLM", "model.", _llama_names(), lambda hf: _read_llama_like(hf, qkv_bias=True),
                  lambda cfg: _write_llama_like(cfg, "qwen2")),
    "phi3": Arch("Phi3ForCausalLM", "model.", _phi3_names(), lambda hf: _read_llama_like(hf, window=True), None),
    "gpt2": Arch("GPT2LMHeadModel", "transformer.", _gpt2_names(), _read_gpt2, _write_gpt2,
                 transposed=frozenset({"blocks.{i}.attn.qkv.weight", "blocks.{i}.attn.proj.weight",
                                       "blocks.{i}.mlp.fc1.weight", "blocks.{i}.mlp.fc2.weight"})),
}


def supported() -> str:
    return ", ".join(sorted(ARCHITECTURES))


def _arch(hf_config: dict) -> tuple[str, Arch]:
    model_type = hf_config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"unsupported Hugging Face model_type {model_type!r}; fastlm converts {supported()}")
    return model_type, ARCHITECTURES[model_type]


def export_type(cfg: ModelConfig) -> str:
    """The HF ``model_type`` a fastlm config is exported as; ValueError if none fits it."""
    if not cfg.causal:
        raise ValueError("only causal LMs can be exported to Hugging Face (model.causal is False)")
    llama_like = (cfg.norm, cfg.position, cfg.mlp) == ("rmsnorm", "rope", "swiglu")
    gpt2_like = (cfg.norm, cfg.position, cfg.mlp) == ("layernorm", "learned", "gelu")
    if llama_like and cfg.sliding_window is None:
        return "qwen2" if cfg.qkv_bias and not cfg.bias else "llama"  # bias=True biases qkv anyway
    if llama_like and not (cfg.bias or cfg.qkv_bias):
        return "mistral"
    if gpt2_like and cfg.bias and cfg.n_kv_heads == cfg.n_heads and cfg.sliding_window is None:
        return "gpt2"
    raise ValueError(
        f"no Hugging Face architecture matches this model (norm={cfg.norm}, position={cfg.position}, mlp={cfg.mlp}, "
        f"bias={cfg.bias}, qkv_bias={cfg.qkv_bias}, n_kv_heads={cfg.n_kv_heads}/{cfg.n_heads}, "
        f"sliding_window={cfg.sliding_window}); exportable: Llama/Mistral/Qwen2 style (rmsnorm, rope, swiglu) or "
        "GPT-2 style (layernorm, learned, gelu, biases, no GQA)")


def _template(name: str) -> tuple[str, int | None]:
    """'blocks.3.attn.qkv.weight' -> ('blocks.{i}.attn.qkv.weight', 3)."""
    match = re.match(r"blocks\.(\d+)\.(.*)", name)
    return (f"blocks.{{i}}.{match.group(2)}", int(match.group(1))) if match else (name, None)


def _expected(cfg: ModelConfig) -> dict[str, torch.Size]:
    """fastlm's parameter names and shapes for ``cfg`` (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return {name: t.shape for name, t in model.state_dict().items()}


def _hf_names(arch: Arch, name: str) -> tuple[tuple[str, ...], bool]:
    """The HF tensor names fastlm's ``name`` is made of, and whether they are transposed."""
    template, i = _template(name)
    if template not in arch.names:
        raise ValueError(f"fastlm parameter {name} has no Hugging Face counterpart in this architecture")
    hf = arch.names[template]
    hf = hf if isinstance(hf, tuple) else (hf,)
    return tuple(n.format(i=i) for n in hf), template in arch.transposed


def _read_config(path: Path) -> dict:
    file = path / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory: no {CONFIG_FILE}")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file} is not valid JSON ({exc.msg})") from None


def _damaged(file: Path, detail: str) -> ValueError:
    return ValueError(f"{file} is damaged ({detail}); download or export the model again")


def _read_index(file: Path) -> list[str]:
    """The safetensors file names a ``model.safetensors.index.json`` lists; ValueError when it is damaged."""
    try:
        index = json.loads(file.read_text())
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8
        raise _damaged(file, (str(exc).splitlines() or [type(exc).__name__])[0]) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise _damaged(file, 'no "weight_map" object of tensor name -> file name')
    return sorted(set(weight_map.values()))


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (OSError, SafetensorError) as exc:
        raise _damaged(file, (str(exc).splitlines() or [type(exc).__name__])[0]) from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if (path / WEIGHTS_FILE).is_file():
        files = [path / WEIGHTS_FILE]
    elif (path / INDEX_FILE).is_file():
        files = [path / name for name in _read_index(path / INDEX_FILE)]
    else:
        raise FileNotFoundError(f"{path} has no {WEIGHTS_FILE} or {INDEX_FILE}; fastlm reads safetensors weights "
                                "only (save the model with save_pretrained(..., safe_serialization=True))")
    tensors = {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{file} (listed in {INDEX_FILE}) is missing")
        tensors.update(_load_safetensors(file))
    return tensors


def config_from_hf(hf_config: dict) -> ModelConfig:
    """The ModelConfig of an HF ``config.json`` dict; ValueError for an unsupported architecture or option."""
    return _arch(hf_config)[1].read_config(hf_config)


def convert_state_dict(hf_config: dict, tensors: dict[str, torch.Tensor]) -> tuple[ModelConfig, dict]:
    """(ModelConfig, fastlm state_dict) from an HF config dict and its tensors (any dtype, kept)."""
    _, arch = _arch(hf_config)
    cfg = arch.read_config(hf_config)
    tensors = {k: v for k, v in tensors.items() if not _BUFFERS.search(k)}
    if not any(k.startswith(arch.body) for k in tensors):  # the original GPT-2 files: "h.0...", not "transformer.h.0..."
        tensors = {k if k.startswith("lm_head.") else arch.body + k: v for k, v in tensors.items()}
    used, state = set(), {}
    for name, shape in _expected(cfg).items():
        hf_names, transposed = _hf_names(arch, name)
        missing = [n for n in hf_names if n not in tensors]
        if missing:
            raise ValueError(f"the checkpoint has no tensor {missing[0]} (for fastlm's {name}); is config.json the "
                             "one these weights were saved with?")
        parts = [tensors[n].t() if transposed else tensors[n] for n in hf_names]
        value = torch.cat(parts) if len(parts) > 1 else parts[0]
        if value.shape != shape:
            raise ValueError(f"{' + '.join(hf_names)} has shape {tuple(value.shape)}, fastlm's {name} needs "
                             f"{tuple(shape)} for this config.json")
        state[name] = value.contiguous()
        used.update(hf_names)
    if cfg.tie_embeddings:
        used.add("lm_head.weight")  # some tied checkpoints store the (shared) head anyway
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"the checkpoint has tensors fastlm's {hf_config['model_type']} conversion does not use "
                         f"({', '.join(unused[:3])}{', ...' if len(unused) > 3 else ''}); unsupported config option?")
    return cfg, state


def from_hf(path_or_model) -> tuple[ModelConfig, dict]:
    """(ModelConfig, state_dict for ``Transformer``) from a local HF model directory (``config.json``
    + safetensors) or a ``transformers`` causal-LM object (its ``config`` and ``state_dict()``)."""
    if isinstance(path_or_model, (str, Path)):
        path = Path(path_or_model)
        if not path.is_dir():
            raise FileNotFoundError(f"Hugging Face model directory {path} does not exist")
        return convert_state_dict(_read_config(path), _read_tensors(path))
    if not (hasattr(path_or_model, "config") and hasattr(path_or_model, "state_dict")):
        raise TypeError(f"from_hf: expected a directory or a transformers model, got {type(path_or_model).__name__}")
    return convert_state_dict(path_or_model.config.to_dict(), path_or_model.state_dict())


def load_hf(path_or_model, dtype: torch.dtype = torch.float32, device=None) -> Transformer:
    """A fastlm ``Transformer`` with the weights of an HF model (see ``from_hf``), in eval mode."""
    cfg, state = from_hf(path_or_model)
    return build_model(cfg, state, dtype, device)


def build_model(cfg: ModelConfig, state: dict, dtype: torch.dtype = torch.float32, device=None) -> Transformer:
    """A ``Transformer`` for ``cfg`` holding ``state`` (strict), in eval mode, without the cost of a
    random init: built on the meta device, materialised empty, then filled."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device or "cpu").to(dtype)
    model.load_state_dict(state)
    if model.rope_cos is not None:  # non-persistent buffers: not in the state dict, left empty by to_empty
        cos, sin = layers.rope_cache(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta, device=model.rope_cos.device,
                                     scaling=cfg.rope_scaling)
        model.rope_cos, model.rope_sin = cos, sin
    return model.eval()


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under the HF names of its export architecture (``export_type``)."""
    cfg = model.cfg
    arch = ARCHITECTURES[export_type(cfg)]
    sizes = {"qkv": [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim],
             "fc1": [cfg.d_ff, cfg.d_ff]}
    out = {}
    for name, value in model.state_dict().items():
        hf_names, transposed = _hf_names(arch, name)
        value = value.detach().cpu()
        parts = value.split(sizes[name.split(".")[-2]]) if len(hf_names) > 1 else (value,)
        for hf_name, part in zip(hf_names, parts):
            out[hf_name] = (part.t() if transposed else part).contiguous()
    return out


def _token(tokenizer, token_id):
    return None if token_id is None else tokenizer.id_to_token(token_id)


def save_hf(model: Transformer, tokenizer, path, eos_token_id: int | None = None,
            dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as a transformers-loadable directory: config.json, model.safetensors and,
    when ``tokenizer`` (a ``tokenizers.Tokenizer``) is given, tokenizer.json + tokenizer_config.json.

    ``eos_token_id``: written to the config and the tokenizer config (default: the tokenizer's
    first end-of-text token that fastlm-train recognises, if any). ``dtype``: of the saved
    weights (default: the model's).
    """
    from safetensors.torch import save_file

    if not isinstance(model, Transformer):
        raise TypeError(f"save_hf: model must be a fastlm Transformer, got {type(model).__name__}")
    cfg = model.cfg
    model_type = export_type(cfg)
    arch = ARCHITECTURES[model_type]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    if eos_token_id is None and tokenizer is not None:
        from fastlm.train.data import EOS_CANDIDATES

        eos_token_id = next((i for i in map(tokenizer.token_to_id, EOS_CANDIDATES) if i is not None), None)
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    weight_dtype = next(iter(tensors.values())).dtype
    config = {"architectures": [arch.hf_class], "model_type": model_type, **arch.write_config(cfg),
              "bos_token_id": eos_token_id, "eos_token_id": eos_token_id, "pad_token_id": None,
              "dtype": str(weight_dtype).removeprefix("torch."), "use_cache": True}
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        (path / TOKENIZER_FILE).write_text(tokenizer.to_str())
        eos = _token(tokenizer, eos_token_id)
        tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len,
                      "bos_token": eos, "eos_token": eos, "unk_token": None, "pad_token": None,
                      "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False}
        (path / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    return path


def is_hf_dir(path) -> bool:
    """Whether ``path`` looks like an HF model directory (a config.json with a model_type)."""
    file = Path(path) / CONFIG_FILE
    try:
        return file.is_file() and "model_type" in json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def main(argv: list[str] | None = None) -> int:
    """``python -m fastlm.models.hf_convert SRC OUT``: a fastlm checkpoint (or run --out dir) -> an HF dir."""
    import argparse

    from fastlm.train import checkpoint
    from fastlm.train.config import UserError

    p = argparse.ArgumentParser(prog="python -m fastlm.models.hf_convert",
                                description="Export a fastlm checkpoint as a Hugging Face (transformers) directory.")
    p.add_argument("src", help="a checkpoint directory (checkpoints/step_XXXXXXXX) or a fastlm-train --out directory "
                               "(its newest checkpoint)")
    p.add_argument("out", help="the directory to write (config.json, model.safetensors, tokenizer files)")
    args = p.parse_args(argv)
    out = Path(args.out)
    blocker = next((q for q in (out, *out.parents) if q.exists()), None)
    if blocker is not None and not blocker.is_dir():
        print(f"hf_convert: error: cannot write {out}: {blocker} is a file, not a directory", file=sys.stderr)
        return 2
    try:
        model, tokenizer = checkpoint.load_pretrained_model(args.src)
        save_hf(model, tokenizer, out)
    except (UserError, ValueError, OSError) as exc:  # OSError: FileNotFoundError, or OUT cannot be written
        print(f"hf_convert: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({export_type(model.cfg)}, {model.num_params() / 1e6:.2f}M parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
