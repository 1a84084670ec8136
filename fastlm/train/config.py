"""fastlm-train's configuration: nested dataclasses, TOML presets, ``--section.field=value`` overrides.

Precedence, lowest first: the field defaults below, the preset (``--preset NAME``, default
``tiny``; the TOML files in ``fastlm/train/presets/``), ``--config FILE.toml``, then the
command-line flags. A TOML file has one table per section::

    [model]
    d_model = 256
    [train]
    steps = 2000

Every field below can be set from the command line as ``--section.field=value`` (``none``
for an optional field, ``true``/``false`` for a flag).
"""

import json
import sys
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Literal

from fastlm.models.config import ModelConfig

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


class UserError(Exception):
    """A mistake in the run's input or settings: reported as one line, without a traceback."""


def _require(ok: bool, name: str, expected: str, value) -> None:
    """A section's check of one field (``build`` reports its ValueError as a UserError)."""
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


@dataclass
class DataConfig:
    path: str | None = None
    """Training text: a .txt/.md file, a .jsonl file (one document per line, see text_field), a
    directory of such files (recursively), each optionally gzipped. None: the shipped corpus (the
    works of Shakespeare, fastlm/train/corpus/)."""
    text_field: str = "text"
    """The field of each .jsonl line that holds the document's text."""
    format: Literal["auto", "text", "sft"] = "auto"
    """text: documents for language modelling. sft: supervised fine-tuning, .jsonl lines with "prompt"
    and "response" fields; the loss covers only the response (and the EOS after it). auto: sft when the
    first .jsonl line has prompt and response fields and no text_field, else text."""
    tokenizer: str | None = None
    """A Hugging Face tokenizer.json to use; None trains a byte-level BPE of vocab_size on the corpus
    (cached, and saved with every checkpoint)."""
    vocab_size: int = 50257
    """Vocabulary of the BPE trained when no tokenizer is given (the model's vocab is the
    tokenizer's, rounded up to a multiple of 64)."""
    seq_len: int = 1024
    """Tokens per training row. Documents are packed into rows, separated by EOS tokens; attention
    stays within each document (varlen attention)."""
    val_fraction: float = 0.02
    """Share of the token stream held out (its end) for validation."""
    mlm_probability: float = 0.15
    """MLM: share of tokens selected for prediction; of those 80% become the mask token, 10% a random
    token and 10% stay unchanged (BERT)."""
    cache_dir: str | None = None
    """Where trained tokenizers and token files are cached (keyed by content hash); None:
    $FASTLM_CACHE_DIR or ~/.cache/fastlm (where the C++ kernels are cached too)."""

    def __post_init__(self):
        _require(self.seq_len >= 1, "data.seq_len", "a positive integer", self.seq_len)
        _require(0.0 < self.val_fraction < 1.0, "data.val_fraction", "in (0, 1)", self.val_fraction)
        _require(0.0 < self.mlm_probability < 1.0, "data.mlm_probability", "in (0, 1)", self.mlm_probability)


@dataclass
class OptimConfig:
    name: Literal["adamw", "adamw8bit"] = "adamw"
    """Optimizer: torch's AdamW (fused: one kernel for all parameters), or fastlm.optim.AdamW8bit
    (block-wise 8-bit states, ~2 bytes per parameter instead of 8)."""
    lr: float = 6e-4
    """Peak learning rate."""
    beta1: float = 0.9
    """AdamW's first-moment decay."""
    beta2: float = 0.95
    """AdamW's second-moment decay."""
    eps: float = 1e-8
    """AdamW's denominator epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to the matmul weights only (never to norms, biases, embeddings)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""

    def __post_init__(self):
        _require(0.0 <= self.lr < float("inf"), "optim.lr", "a finite number >= 0", self.lr)
        for name in ("beta1", "beta2"):
            _require(0.0 <= getattr(self, name) < 1.0, f"optim.{name}", "in [0, 1)", getattr(self, name))
        _require(self.eps > 0.0, "optim.eps", "> 0", self.eps)
        _require(self.weight_decay >= 0.0, "optim.weight_decay", ">= 0", self.weight_decay)
        _require(self.grad_clip >= 0.0, "optim.grad_clip", ">= 0 (0 disables clipping)", self.grad_clip)


@dataclass
class ScheduleConfig:
    kind: Literal["cosine", "linear", "constant", "exponential", "step"] = "cosine"
    """After the linear warmup: cosine or linear decay to min_lr_ratio * lr, constant, exponential
    decay reaching min_lr_ratio * lr at the last step (with min_lr_ratio = 0, which no exponential
    reaches, a linear decay to 0), or step decay (times step_gamma every step_every)."""
    warmup_steps: int = 100
    """Steps of linear warmup from 0 to lr."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr (cosine, linear, exponential; 0 makes exponential linear)."""
    step_every: int = 0
    """Step decay: multiply by step_gamma every this many steps after warmup; 0 means a third of the run."""
    step_gamma: float = 0.5
    """Step decay factor."""

    def __post_init__(self):
        _require(self.warmup_steps >= 0, "schedule.warmup_steps", ">= 0", self.warmup_steps)
        _require(0.0 <= self.min_lr_ratio <= 1.0, "schedule.min_lr_ratio", "in [0, 1]", self.min_lr_ratio)
        _require(self.step_every >= 0, "schedule.step_every", ">= 0", self.step_every)
        _require(0.0 < self.step_gamma <= 1.0, "schedule.step_gamma", "in (0, 1]", self.step_gamma)


@dataclass
class TrainConfig:
    objective: Literal["clm", "mlm"] = "clm"
    """clm: causal (next-token) LM with a decoder; mlm: masked LM with a bidirectional encoder."""
    steps: int = 1000
    """Optimizer steps; the schedule spans them."""
    batch_size: int = 16
    """Rows (of data.seq_len tokens) per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    seed: int = 0
    """Seed of the initialization, the data order, the MLM masking and dropout."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available, else cpu."""
    compile: bool = False
    """Run the model through torch.compile."""
    max_nonfinite: int = 5
    """Non-finite losses in a row (each step is skipped with a warning) before the run stops."""
    log_every: int = 10
    """Steps between metrics lines (metrics.jsonl in --out) and progress-bar updates."""

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "max_nonfinite", "log_every"):
            _require(getattr(self, name) >= 1, f"train.{name}", "a positive integer", getattr(self, name))


@dataclass
class EvalConfig:
    every: int = 250
    """Steps between validation passes (one also runs at the end); 0: only at the end."""
    batches: int = 20
    """Validation micro-batches per pass (fixed, the first of the held-out split)."""

    def __post_init__(self):
        _require(self.every >= 0, "eval.every", ">= 0 (0: only at the end)", self.every)
        _require(self.batches >= 1, "eval.batches", "a positive integer", self.batches)


@dataclass
class CheckpointConfig:
    every: int = 500
    """Steps between checkpoints (one is also written at the end, at --stop-at and on Ctrl-C / SIGTERM);
    0: only those."""
    keep_last: int = 2
    """Checkpoints kept in --out/checkpoints; older ones are deleted after a new one is complete. 0:
    keep all."""

    def __post_init__(self):
        _require(self.every >= 0, "checkpoint.every", ">= 0 (0: only at the end)", self.every)
        _require(self.keep_last >= 0, "checkpoint.keep_last", ">= 0 (0: keep all)", self.keep_last)


@dataclass
class SampleConfig:
    prompt: str = ""
    """Text the end-of-run sample continues (empty: start of a document)."""
    tokens: int = 100
    """Tokens generated for the sample; 0 skips it."""
    temperature: float = 0.8
    """Sampling temperature; 0 is greedy."""

    def __post_init__(self):
        _require(self.tokens >= 0, "sample.tokens", ">= 0 (0 skips the sample)", self.tokens)
        _require(self.temperature >= 0.0, "sample.temperature", ">= 0 (0 is greedy)", self.temperature)


@dataclass
class RunConfig:
    out: str = "runs/default"
    """Output directory: checkpoints/, metrics.jsonl, tokenizer.json (and tensorboard/)."""
    resume: bool = False
    """Continue from the newest checkpoint in out (same settings needed; the result is bit-for-bit
    what an uninterrupted run gives on CPU)."""
    stop_at: int = 0
    """Save and exit after this step without changing the schedule (a cluster time limit); 0: never."""
    tensorboard: bool = True
    """Also write TensorBoard event files to out/tensorboard when the tensorboard package is
    installed (metrics.jsonl is written either way)."""
    init_from: str | None = None
    """Start from these weights: a fastlm checkpoint directory, a fastlm-train --out directory (its newest
    checkpoint) or a local Hugging Face model directory (config.json + safetensors + tokenizer.json;
    Llama, Mistral, Qwen2, Phi-3, GPT-2). The model config and the tokenizer come from it; model.* settings may
    change only dropout, activation checkpointing and (RoPE models) max_seq_len."""
    export_hf: str | None = None
    """After the run completes, also write the model as a Hugging Face (transformers) directory here."""

    def __post_init__(self):
        _require(self.stop_at >= 0, "run.stop_at", ">= 0 (0: never)", self.stop_at)


@dataclass
class ParallelConfig:
    mode: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    """How the processes torchrun starts share the training (fastlm/train/distributed.py): ddp
    (DistributedDataParallel: a replica per rank, gradients averaged), fsdp (FSDP2 fully_shard per
    block: parameters, gradients and optimizer states sharded over ranks), none (one process), or
    auto: ddp under torchrun with more than one process, else none. Each rank reads its own
    train.batch_size rows of every global batch of world_size * batch_size rows."""
    reshard_after_forward: bool = True
    """fsdp: free each block's gathered weights after its forward and gather them again for the
    backward (least memory); false keeps them until the backward (one all-gather less per block)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The network (fastlm.models.ModelConfig). model.vocab_size is taken from the tokenizer and
    model.causal from train.objective, so neither can be set (under run.init_from both are the
    pretrained model's)."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    run: RunConfig = field(default_factory=RunConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict:
        return asdict(self)


SECTIONS = {f.name: f.default_factory for f in fields(Config)}


def presets() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in resources.files("fastlm.train.presets").iterdir()
                  if p.name.endswith(".toml"))


def _read_toml(text: str, where: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{where} is not valid TOML ({exc})") from None


def load_preset(name: str) -> dict:
    if name not in presets():
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(presets())}")
    return _read_toml(resources.files("fastlm.train.presets").joinpath(name + ".toml").read_text(), f"preset {name}")


def load_toml_file(path: str) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UserError(f"cannot read --config {path}: {exc.strerror}") from None
    return _read_toml(text, path)


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def coerce(value, tp, name: str):
    """``value`` (from TOML, or a command-line string) as type ``tp``; UserError if it is not one."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in options:
                return None
        inner = [t for t in options if t is not type(None)]
        return coerce(value, inner[0], name)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise UserError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"{name} must be true or false; got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise UserError(f"{name} must be a number; got {value!r}")
        try:
            number = tp(value) if isinstance(value, str) or tp is float else value
        except ValueError:
            raise UserError(f"{name} must be {'an integer' if tp is int else 'a number'}; got {value!r}") from None
        if not isinstance(number, tp):
            raise UserError(f"{name} must be {'an integer' if tp is int else 'a number'}; got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{name} must be a string; got {value!r}")
        return value
    if tp is dict:  # a TOML table, or JSON on the command line
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise UserError(f"{name} must be a JSON object ({{...}}) or a TOML table; got {value!r}") from None
        if not isinstance(value, dict):
            raise UserError(f"{name} must be a JSON object ({{...}}) or a TOML table; got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {name}")


def _defaults() -> dict:
    """Raw field defaults (before ModelConfig fills d_ff / n_kv_heads from the other fields)."""
    out = {}
    for section, factory in SECTIONS.items():
        out[section] = {}
        for f in fields(factory):
            out[section][f.name] = f.default if f.default is not MISSING else f.default_factory()
    return out


def merge(base: dict, layer: dict, where: str) -> None:
    """Apply one TOML layer onto ``base`` in place, rejecting unknown sections and fields."""
    for section, values in layer.items():
        if section not in SECTIONS and not isinstance(values, dict):  # `key = value` above every [section]
            owners = [f"[{name}]" for name, factory in SECTIONS.items() if section in _field_types(factory)]
            where_to = f"put it under {' or '.join(owners)}" if owners else "keys go under a section such as [train]"
            raise UserError(f"{where}: top-level key {section!r} (outside any [section]); {where_to}")
        if section not in SECTIONS:
            raise UserError(f"{where}: unknown section [{section}]; sections are {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise UserError(f"{where}: {section} must be a table ([{section}])")
        types_ = _field_types(SECTIONS[section])
        for key, value in values.items():
            if key not in types_:
                raise UserError(f"{where}: unknown field {section}.{key}; fields are {', '.join(types_)}")
            base[section][key] = coerce(value, types_[key], f"{section}.{key}")


def set_field(base: dict, dotted: str, text: str) -> None:
    """Apply one ``--section.field=value`` override."""
    section, _, key = dotted.partition(".")
    merge(base, {section: {key: text}}, f"--{dotted}")


def build(values: dict) -> Config:
    """The Config for a fully merged dict of values."""
    try:
        return Config(**{section: SECTIONS[section](**values[section]) for section in SECTIONS})
    except ValueError as exc:
        raise UserError(str(exc)) from None


# Model fields the trainer sets itself (a run not started --init-from), so a value given for them would be
# replaced without a word: field -> why, and what to set instead.
DERIVED_MODEL_FIELDS = {
    "vocab_size": "follows the tokenizer (its vocabulary, rounded up to a multiple of 64); set --data.vocab_size "
                  "instead (the size of the BPE trained on the corpus), or give --data.tokenizer",
    "causal": "follows the objective (clm: causal, mlm: bidirectional); set --objective instead",
}

# Model fields a run started --init-from may still set: how the model trains, not what its weights are.
INIT_FREE_MODEL_FIELDS = ("embd_dropout", "attn_dropout", "resid_dropout", "activation_checkpointing", "init_std")


def _init_model_values(path: str, explicit: dict) -> dict:
    """The model section of a run started --init-from ``path``: the pretrained model's config, with the
    model.* values set in --config or on the command line (``explicit``) where they are free to differ."""
    from fastlm.train.checkpoint import resolve_pretrained

    try:
        base = resolve_pretrained(path, load_weights=False).config.to_dict()
    except UserError as exc:
        raise UserError(f"--init-from {exc}") from None
    for key, value in explicit.items():
        free = key in INIT_FREE_MODEL_FIELDS or (key == "max_seq_len" and base["position"] == "rope")
        if not free and value != base[key]:
            raise UserError(f"model.{key}={value!r} conflicts with --init-from {path}, whose model has {key}="
                            f"{base[key]!r}; the model config comes from the pretrained model (only "
                            f"{', '.join(INIT_FREE_MODEL_FIELDS)} and, with RoPE, max_seq_len may change)")
        base[key] = value
    return base


def resolve(preset: str, config_file: str | None, overrides: list[tuple[str, str]]) -> Config:
    values = _defaults()
    merge(values, load_preset(preset), f"preset {preset}")
    # model.* fields set by --config or a flag -> where (the preset's yield to --init-from)
    explicit_model: dict[str, str] = {}
    if config_file:
        layer = load_toml_file(config_file)
        merge(values, layer, config_file)
        explicit_model.update(dict.fromkeys(layer.get("model", {}), config_file))
    for dotted, text in overrides:
        set_field(values, dotted, text)
        section, _, key = dotted.partition(".")
        if section == "model":
            explicit_model[key] = f"--{dotted}={text}"
    if values["run"]["init_from"]:
        values["model"] = _init_model_values(values["run"]["init_from"],
                                             {k: values["model"][k] for k in explicit_model})
    else:
        for key, instead in DERIVED_MODEL_FIELDS.items():
            if key in explicit_model:
                raise UserError(f"{explicit_model[key]}: model.{key} {instead}")
    return build(values)
