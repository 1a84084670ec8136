"""The training loop behind ``fastlm-train`` (see fastlm/train/__init__.py for the user guide)."""

import math
import os
import random
import resource
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from fastlm.generate import generate
from fastlm.models import ModelConfig, Transformer, hf_convert
from fastlm.optim import AdamW8bit
from fastlm.train import checkpoint, data, distributed
from fastlm.train.config import Config, UserError
from fastlm.train.metrics import MetricsLog, peak_bf16_flops


def _adamw(groups, cfg):
    # fused: one kernel for all parameters (CPU and CUDA), what the Hugging Face Trainer uses by
    # default; the for-loop implementation torch picks on CPU ran ~10 ops per parameter.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)


def _adamw8bit(groups, cfg):
    return AdamW8bit(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


# optim.name -> constructor(param_groups, OptimConfig); each group carries its own weight decay.
OPTIMIZERS = {"adamw": _adamw, "adamw8bit": _adamw8bit}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the matmul weights only: not on norms, biases or embedding tables (a tied
    output head is the embedding table, so it is not decayed either)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, total: int, cfg) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based) of ``total``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(total - 1 - cfg.warmup_steps, 1)  # the last step (total - 1) is at the schedule's end
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    floor = cfg.min_lr_ratio
    if cfg.kind == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.kind == "linear":
        return 1 - (1 - floor) * progress
    if cfg.kind == "exponential":
        return floor ** progress if floor > 0 else 1 - progress
    if cfg.kind == "step":
        every = cfg.step_every or max(span // 3, 1)
        return cfg.step_gamma ** ((step - cfg.warmup_steps) // every)
    return 1.0


def _peak_memory(device: torch.device) -> float:
    """Peak memory in MiB: the CUDA allocator's peak, or this process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Stop:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint after the current step and exits."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum
        distributed.print0(f"\nfastlm-train: {signal.Signals(signum).name} received; saving a checkpoint after this "
                           "step", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _check_writable(path: Path, flag: str) -> None:
    """A UserError now, not after the data is prepared or the model trained, when ``path`` cannot be
    created or written; creates nothing (a run with bad input leaves no folder behind)."""
    existing = path
    while not existing.exists():  # where the folder would be created
        existing = existing.parent
    try:
        # A folder made and removed at once, not os.access: that answers yes to root everywhere, /proc
        # included, and knows nothing of read-only mounts.
        os.rmdir(tempfile.mkdtemp(prefix=".fastlm-write-check-", dir=existing))
    except OSError:
        raise UserError(f"{flag} {path}: {existing} is not a writable directory") from None


def _check_resume(out: Path, cfg: Config):
    """The checkpoint to resume from (or None), refusing combinations that would overwrite one."""
    last = checkpoint.latest(out)
    if cfg.run.resume and last is None:
        raise UserError(f"--resume: no checkpoint in {out / 'checkpoints'}; drop --resume to start a new run")
    if not cfg.run.resume and last is not None:
        raise UserError(f"{out} already holds checkpoints ({last.name}); pass --resume to continue that run, "
                        "or choose another --out")
    return last


# Model fields that change only how the computation runs, not the model: free to differ on resume.
_RUNTIME_MODEL_FIELDS = {"activation_checkpointing"}


def _compare_model_config(saved: dict, current: ModelConfig, where: Path) -> None:
    ours = current.to_dict()
    # A field added after the checkpoint was written has its default there.
    saved = {k: saved.get(k, getattr(ModelConfig, k, None)) for k in ours}
    diffs = [f"model.{k}={saved[k]!r} there, {v!r} here" for k, v in ours.items()
             if saved[k] != v and k not in _RUNTIME_MODEL_FIELDS]
    if diffs:
        raise UserError(f"checkpoint {where} is from another model config ({'; '.join(diffs[:3])}); resume with "
                        "the settings it was trained with, or use another --out")


# Settings that decide which tokens each step sees: the checkpoint's data position counts
# micro-batches of that stream, so a resumed run must keep them (or it is no longer the same run).
_DATA_STREAM_FIELDS = {"data": ("format", "text_field", "tokenizer", "vocab_size", "seq_len", "val_fraction",
                                "mlm_probability"),
                       "train": ("objective", "batch_size", "grad_accum", "seed")}
# Settings a resumed run may change on purpose (a longer run, another learning rate), at the cost
# of bit-for-bit continuation: said once, not refused.
_NOTED_FIELDS = {"optim": ("lr", "beta1", "beta2", "eps", "weight_decay", "grad_clip"),
                 "schedule": ("kind", "warmup_steps", "min_lr_ratio", "step_every", "step_gamma"),
                 "train": ("steps",)}


def _differences(saved: dict, current: dict, fields: dict) -> list[str]:
    return [f"{section}.{name}={saved[section][name]!r} there, {current[section][name]!r} here"
            for section, names in fields.items() for name in names
            if name in saved.get(section, {}) and saved[section][name] != current[section][name]]


def _check_resume_settings(saved: dict, cfg: Config, done: int, where: Path) -> None:
    """Refuse a resume that would change the data stream or whose --steps / --stop-at lie behind the
    checkpoint; note the optimizer and schedule settings that differ."""
    if done > cfg.train.steps:
        raise UserError(f"checkpoint {where} is at step {done}, past --steps {cfg.train.steps}; pass a larger --steps "
                        "to train further")
    if cfg.run.stop_at and cfg.run.stop_at <= done:
        raise UserError(f"--stop-at {cfg.run.stop_at} is not after the checkpoint's step {done}")
    current = cfg.to_dict()
    diffs = _differences(saved, current, _DATA_STREAM_FIELDS)
    if diffs:
        raise UserError(f"checkpoint {where} was trained on another data stream ({'; '.join(diffs[:3])}); resume with "
                        "the settings it was trained with, or use another --out")
    notes = _differences(saved, current, _NOTED_FIELDS)
    if notes:
        distributed.print0(f"fastlm-train: resuming with other settings than the checkpoint's ({'; '.join(notes)}); "
                           "the run goes on from it, no longer bit for bit the run it was", file=sys.stderr)


def _optimizer_converts(saved: dict, current: str, where: Path) -> bool:
    """Whether this run's optimizer converts the checkpoint's states (AdamW's moments quantized
    into AdamW8bit's); a UserError where it cannot take them."""
    saved_name = saved.get("name", "adamw")
    if saved_name == current:
        return False
    if (saved_name, current) == ("adamw", "adamw8bit"):
        return True
    raise UserError(f"checkpoint {where} was trained with --optim.name {saved_name}, whose states "
                    f"--optim.name {current} cannot take; resume with --optim.name {saved_name}, or use another --out")


def _prepare_data(cfg: Config, resume_from: Path | None, init: checkpoint.Pretrained | None):
    files = data.corpus_files(cfg.data.path or data.shipped_corpus())
    sft = (cfg.data.format if cfg.data.format != "auto" else data.detect_format(files, cfg.data.text_field)) == "sft"
    if sft:
        examples, corpus_hash = data.read_examples(files)
        docs = [prompt + response for prompt, response in examples]  # what a trained tokenizer learns from
    else:
        docs, corpus_hash = data.read_documents(files, cfg.data.text_field)
    cache = data.cache_root(cfg.data.cache_dir)
    if resume_from is not None:
        tokenizer = checkpoint.read_tokenizer(resume_from)
    elif init is not None:
        if cfg.data.tokenizer:
            raise UserError("--data.tokenizer cannot be combined with --init-from: the pretrained model's tokenizer "
                            f"({init.tokenizer_path}) is the one its token ids refer to")
        tokenizer = init.load_tokenizer()
    elif cfg.data.tokenizer:
        tokenizer = data.load_tokenizer(cfg.data.tokenizer)
    else:
        if cfg.data.vocab_size < 300:
            raise UserError(f"data.vocab_size must be at least 300 (256 bytes + specials + merges); got "
                            f"{cfg.data.vocab_size}")
        tokenizer = data.train_tokenizer(docs, cfg.data.vocab_size, corpus_hash, cache)
    if init is not None and init.eos_token_id is not None:  # an HF model names its end-of-text token
        eos_id = init.eos_token_id
    else:
        eos_id = data.special_id(tokenizer, data.EOS_CANDIDATES, "end-of-text")
    mask_id = data.special_id(tokenizer, data.MASK_CANDIDATES, "mask", required=cfg.train.objective == "mlm")
    if sft:
        tokens, roles = data.tokenize_sft(examples, tokenizer, eos_id, corpus_hash, cache)
    else:
        tokens, roles = data.tokenize(docs, tokenizer, eos_id, corpus_hash, cache), None
    packed = data.PackedData(tokens, cfg.data.seq_len, cfg.train.batch_size, cfg.data.val_fraction, eos_id,
                             cfg.train.objective, cfg.train.seed, mask_id, tokenizer.get_vocab_size(),
                             cfg.data.mlm_probability, roles=roles, rank=distributed.rank(),
                             world=distributed.world_size())
    if packed.cut_examples:
        distributed.print0(f"fastlm-train: {packed.cut_examples} SFT examples are longer than data.seq_len + 1 "
                           f"({cfg.data.seq_len + 1} tokens) and were cut", file=sys.stderr)
    return tokenizer, tokens, packed, eos_id, mask_id, corpus_hash


@torch.no_grad()
def evaluate(model, batches, device, autocast) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        b = batch.to(device)
        with autocast():
            loss = model(b.inputs, b.targets, b.cu_seqlens, b.max_seqlen)
        n = int((b.targets != data.IGNORE_INDEX).sum())
        total += float(loss) * n
        count += n
    total, count = distributed.all_reduce_sum([total, count])
    model.train(was_training)
    return total / max(count, 1)


def _sample(model, tokenizer, cfg: Config, eos_id, mask_id, val_batch, device) -> str:
    model.eval()
    if model.cfg.causal:
        prompt_len = len(tokenizer.encode(cfg.sample.prompt, add_special_tokens=False).ids) or 1
        tokens = min(cfg.sample.tokens, model.cfg.max_seq_len - prompt_len)  # the KV cache holds one context
        if tokens < 1:
            return cfg.sample.prompt
        text = generate(model, tokenizer, cfg.sample.prompt, max_new_tokens=tokens,
                        temperature=cfg.sample.temperature, seed=cfg.train.seed, eos_id=eos_id)[0]
        return cfg.sample.prompt + text
    # MLM: fill the masks of one validation row with the model's best guesses.
    inputs = val_batch.inputs[:1].to(device)
    with torch.no_grad():
        guess = model(inputs).argmax(-1)  # (1, T, V) -> (1, T)
    filled = torch.where(inputs == mask_id, guess, inputs)[0, :64].tolist()
    return tokenizer.decode(filled)


def train(cfg: Config) -> dict:
    """Run training as configured; returns the summary. Raises UserError for bad input."""
    out = Path(cfg.run.out)
    _check_writable(out, "--out")
    if cfg.run.export_hf:
        export = Path(cfg.run.export_hf)
        _check_writable(export, "--export-hf")
        # A run directory holding the export would be read as the export (config.json beside checkpoints/)
        # by --init-from and fastlm-generate, no longer as its newest checkpoint.
        if (export / "checkpoints").is_dir() or export.resolve() == out.resolve():
            raise UserError(f"--export-hf {export} is a training run's directory; export into a directory of its own")
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise UserError(f"data.seq_len ({cfg.data.seq_len}) exceeds model.max_seq_len ({cfg.model.max_seq_len})")
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--train.device=cuda but no CUDA device is available; use --train.device=cpu")
    device = torch.device("cuda" if cfg.train.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.train.device == "auto" else cfg.train.device)
    if cfg.run.export_hf:
        try:
            hf_convert.export_type(cfg.model.replace(causal=cfg.train.objective == "clm"))
        except ValueError as exc:
            raise UserError(f"--export-hf: {exc}") from None
    mode = distributed.resolve_mode(cfg.parallel)
    device = distributed.init(mode, device)
    if cfg.run.stop_at > cfg.train.steps:
        raise UserError(f"--stop-at {cfg.run.stop_at} is beyond --steps {cfg.train.steps}: it would never stop the run")
    resume_from = _check_resume(out, cfg)
    saved_cfg = checkpoint.read_config(resume_from) if resume_from else None
    saved_state = checkpoint.read_json(resume_from / "trainer_state.json") if resume_from else None
    if resume_from is not None:
        done = saved_state.get("step", 0)
        if done == cfg.train.steps:  # nothing left to do: touch nothing
            print(f"fastlm-train: the run in {out} is complete ({resume_from.name}); pass a larger --steps to train "
                  "further", file=sys.stderr)
            return {"steps": done, "complete": True, "checkpoint": str(resume_from), "exit_code": 0}
        _check_resume_settings(saved_cfg, cfg, done, resume_from)
    init = None
    if cfg.run.init_from:  # the model config is already the pretrained one (config.resolve)
        if cfg.model.causal != (cfg.train.objective == "clm"):
            raise UserError(f"--init-from {cfg.run.init_from} is a {'causal' if cfg.model.causal else 'masked'} LM; "
                            f"train it with --objective {'clm' if cfg.model.causal else 'mlm'}")
        try:
            init = checkpoint.resolve_pretrained(cfg.run.init_from, load_weights=resume_from is None)
        except UserError as exc:
            raise UserError(f"--init-from {exc}") from None

    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    with distributed.main_first():  # rank 0 trains and caches the tokenizer and tokens; the others read them
        tokenizer, tokens, packed, eos_id, mask_id, corpus_hash = _prepare_data(cfg, resume_from, init)
    if saved_state is not None and saved_state.get("corpus_hash", corpus_hash) != corpus_hash:
        raise UserError(f"checkpoint {resume_from} was trained on another corpus than --data "
                        f"{cfg.data.path or '(the shipped corpus)'}; resume with the data it was trained on, or use "
                        "another --out")
    if init is None:
        cfg.model = cfg.model.replace(vocab_size=64 * -(-tokenizer.get_vocab_size() // 64),
                                      causal=cfg.train.objective == "clm")
    elif tokenizer.get_vocab_size() > cfg.model.vocab_size:
        raise UserError(f"--init-from {init.path}: its tokenizer has {tokenizer.get_vocab_size()} tokens but the model "
                        f"only {cfg.model.vocab_size} embeddings")
    converts = False
    if saved_cfg is not None:
        _compare_model_config(saved_cfg["model"], cfg.model, resume_from)
        converts = _optimizer_converts(saved_cfg["optim"], cfg.optim.name, resume_from)

    net = Transformer(cfg.model).to(device)  # the Transformer itself (its methods); model may wrap it
    if init is not None and init.state_dict is not None:  # before sharding: every rank loads the full weights
        try:
            net.load_state_dict(init.state_dict)
        except RuntimeError as exc:
            raise UserError(f"--init-from {init.path}: the weights do not match its config "
                            f"({str(exc).splitlines()[0]})") from None
        distributed.print0(f"fastlm-train: starting from {init.path} "
                           f"({'Hugging Face' if init.source == 'hf' else 'fastlm'} weights)", file=sys.stderr)
    model = distributed.wrap(net, mode, cfg.parallel.reshard_after_forward)
    distributed.seed_ranks(cfg.train.seed)
    optimizer = OPTIMIZERS[cfg.optim.name](param_groups(model, cfg.optim.weight_decay), cfg.optim)
    step, micro, tokens_seen, nonfinite = 0, 0, 0, 0
    if resume_from is not None:
        state = checkpoint.load(resume_from, model, optimizer)
        step, micro, tokens_seen = state["step"], state["micro_batch"], state["tokens_seen"]
        distributed.print0(f"fastlm-train: resumed from {resume_from} (step {step})", file=sys.stderr)
        if converts:
            distributed.print0("fastlm-train: the checkpoint's AdamW moments were quantized into AdamW8bit's states; "
                               "the run goes on from them, no longer bit for bit the AdamW run", file=sys.stderr)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "tokenizer.json").write_text(tokenizer.to_str())
    forward = torch.compile(model) if cfg.train.compile else model
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else \
        (lambda: torch.autocast("cpu", enabled=False))

    entropy = data.unigram_entropy(tokens[:packed.val_start])
    val_batches = packed.val_batches(cfg.eval.batches)
    n_params = net.num_params()
    flops_per_token = net.flops_per_token(cfg.data.seq_len)
    peak_flops = peak_bf16_flops(device)
    world = distributed.world_size()
    distributed.print0(f"fastlm-train: {n_params / 1e6:.2f}M parameters, {len(tokens):,} tokens "
                       f"({packed.train_rows} train rows x {cfg.data.seq_len}), unigram entropy {entropy:.3f} "
                       f"nats/token, device {device}" + (f", {mode} over {world} processes" if mode != "none" else ""),
                       file=sys.stderr)

    metrics = MetricsLog(out if distributed.is_main() else None, cfg.run.tensorboard)
    config_dict = cfg.to_dict()

    def save(reason: str) -> Path:
        path = checkpoint.save(out, step, model, optimizer, config_dict, tokenizer.to_str(),
                               {"micro_batch": micro, "tokens_seen": tokens_seen, "reason": reason,
                                "corpus_hash": corpus_hash},
                               cfg.checkpoint.keep_last)
        return path

    from tqdm import tqdm

    model.train()
    start, cpu_start = time.perf_counter(), time.process_time()
    window_start, window_tokens = start, 0
    train_loss = val_loss = float("nan")
    tokens_per_step = cfg.train.batch_size * world * cfg.train.grad_accum * cfg.data.seq_len
    # disable=None: a live bar on a terminal, none in logs (metrics.jsonl has the figures).
    bar = tqdm(total=cfg.train.steps, initial=step, desc="fastlm-train", dynamic_ncols=True, file=sys.stderr,
               disable=None if distributed.is_main() else True)
    stopped = None
    try:
        with _Stop() as stop:
            while step < cfg.train.steps:
                lr = cfg.optim.lr * lr_factor(step, cfg.train.steps, cfg.schedule)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum, finite = 0.0, True
                for j in range(cfg.train.grad_accum):
                    batch = packed.train_batch(micro).to(device)
                    micro += 1
                    # Gradients are communicated on the last micro-step only.
                    with distributed.grad_sync(model, j == cfg.train.grad_accum - 1):
                        with autocast():
                            loss = forward(batch.inputs, batch.targets, batch.cu_seqlens, batch.max_seqlen)
                        finite = finite and bool(torch.isfinite(loss))
                        if not finite and world == 1:
                            break  # with several ranks, every rank runs every backward (the step is skipped below)
                        (loss / cfg.train.grad_accum).backward()
                    loss_sum += float(loss.detach())
                # The ranks agree on the loss and on skipping the step.
                loss_sum, bad = distributed.all_reduce_sum([loss_sum, float(not finite)])
                finite = bad == 0
                grad_norm = None
                if finite and cfg.optim.grad_clip > 0:
                    grad_norm = distributed.clip_grad_norm_(list(model.parameters()), cfg.optim.grad_clip)
                    finite = math.isfinite(grad_norm)
                if finite:
                    optimizer.step()
                    nonfinite = 0
                    train_loss = loss_sum / (cfg.train.grad_accum * world)
                else:
                    nonfinite += 1
                    # Steps count from 1 here, as in metrics.jsonl and the checkpoints' names.
                    warnings.warn(f"step {step + 1}: non-finite loss or gradient; step skipped ({nonfinite} in a row)")
                    if nonfinite >= cfg.train.max_nonfinite:
                        raise UserError(f"{nonfinite} non-finite steps in a row at step {step + 1}; lower --optim.lr or "
                                        "raise --schedule.warmup_steps, then --resume from the last checkpoint")
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens_seen += tokens_per_step
                window_tokens += tokens_per_step
                bar.update(1)

                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    now = time.perf_counter()
                    tok_s = window_tokens / max(now - window_start, 1e-9)
                    window_start, window_tokens = now, 0
                    # A skipped step has no loss (not the last finite one).
                    record = {"step": step, "loss": train_loss if finite else None, "lr": lr, "grad_norm": grad_norm,
                              "tokens": tokens_seen, "tokens_per_s": tok_s, "peak_mem_mib": _peak_memory(device)}
                    if not finite:
                        record["skipped"] = True
                    postfix = {"loss": f"{train_loss:.3f}", "lr": f"{lr:.2e}", "tok/s": f"{tok_s:,.0f}",
                               "mem": f"{record['peak_mem_mib']:.0f}MiB"}
                    if peak_flops:
                        record["mfu"] = tok_s * flops_per_token / (peak_flops * world)  # tok_s counts every rank
                        postfix["mfu"] = f"{record['mfu']:.1%}"
                    bar.set_postfix(postfix, refresh=False)
                    metrics.log(record)
                if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.steps:
                    val_loss = evaluate(net, val_batches, device, autocast)
                    metrics.log({"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))})
                    if distributed.is_main():
                        bar.write(f"step {step}: val loss {val_loss:.4f} (ppl {math.exp(min(val_loss, 50)):.1f})")
                if step == cfg.run.stop_at and step < cfg.train.steps:
                    stopped = f"--stop-at {step}"
                    break
                stop_signal = distributed.all_reduce_max(stop.signal or 0)  # a signal to any rank stops all
                if stop_signal:
                    stopped = signal.Signals(stop_signal).name
                    break
                if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.train.steps:
                    save("periodic")
    finally:
        bar.close()
    if stopped is not None:
        path = save(stopped)
        metrics.close()
        distributed.print0(f"fastlm-train: stopped at step {step} ({stopped}); checkpoint {path}. Continue with the "
                           "same command plus --resume", file=sys.stderr)
        return {"stopped": stopped, "step": step, "checkpoint": str(path),
                "exit_code": 0 if stopped.startswith("--stop-at") else 128 + int(getattr(signal, stopped))}

    # Saved before the final evaluation, which may be long: a signal during it loses no training.
    path = save("final")
    try:
        with _Interrupt():
            return _finish(cfg, net, model, tokenizer, metrics, path, val_batches, device, autocast, eos_id, mask_id,
                           step=step, tokens_seen=tokens_seen, train_loss=train_loss, entropy=entropy,
                           n_params=n_params, start=start, cpu_start=cpu_start)
    except KeyboardInterrupt as exc:
        metrics.close()
        name = str(exc) or "SIGINT"
        distributed.print0(f"\nfastlm-train: {name} during the final evaluation; training had finished and "
                           f"checkpoint {path} holds it", file=sys.stderr)
        return {"stopped": name, "step": step, "checkpoint": str(path),
                "exit_code": 128 + int(getattr(signal, name))}


class _Interrupt:
    """SIGINT and SIGTERM raise KeyboardInterrupt (naming the signal) for the length of the block."""

    def __enter__(self):
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    @staticmethod
    def _handle(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _finish(cfg, net, model, tokenizer, metrics, path, val_batches, device, autocast, eos_id, mask_id, *, step,
            tokens_seen, train_loss, entropy, n_params, start, cpu_start) -> dict:
    """The final evaluation, sample, summary and export of a completed run."""
    val_loss = evaluate(net, val_batches, device, autocast)
    metrics.log({"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))})
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    # Rank 0 samples and exports. An FSDP-sharded model is whole on no rank (and generation calls
    # no forward that would gather it): rank 0 then uses the final checkpoint's full weights.
    sample, whole = "", None
    if distributed.is_main() and (cfg.sample.tokens or cfg.run.export_hf):
        whole = checkpoint.load_pretrained_model(path, device=device)[0] if distributed.is_sharded(model) else net
        if cfg.sample.tokens:
            sample = _sample(whole, tokenizer, cfg, eos_id, mask_id, val_batches[0], device)
    summary = {"steps": step, "tokens": tokens_seen, "wall_s": wall, "cpu_s": cpu, "train_loss": train_loss,
               "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)), "unigram_entropy": entropy,
               "params": n_params, "checkpoint": str(path), "sample": sample, "exit_code": 0}
    metrics.log({"summary": {k: v for k, v in summary.items() if k != "sample"}})
    metrics.close()
    if cfg.run.export_hf and whole is not None:
        hf_convert.save_hf(whole, tokenizer, cfg.run.export_hf, eos_token_id=eos_id)
        summary["export_hf"] = cfg.run.export_hf
        print(f"fastlm-train: wrote the model as a Hugging Face directory to {cfg.run.export_hf}", file=sys.stderr)
    distributed.print0(f"\nfastlm-train: {step} steps, {tokens_seen:,} tokens in {wall:.0f} s ({cpu:.0f} s CPU) this "
                       f"session; train loss {train_loss:.3f}, val loss {val_loss:.3f} (ppl {summary['val_ppl']:.1f}) "
                       f"vs unigram entropy {entropy:.3f} nats/token; checkpoint {path}")
    if sample:
        distributed.print0(f"--- sample ({'fill-mask' if not net.cfg.causal else 'generated'}) ---\n{sample}\n---")
    return summary
