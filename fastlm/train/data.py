"""Training data: read text, train or load a tokenizer, cache the tokens, pack rows, mask for MLM.

- Input: a .txt/.md file (one document), a .jsonl file (one document per line, in the
  ``data.text_field`` field), or a directory of those (recursively, sorted), each optionally
  gzipped (.gz).
- Tokenizer: a given ``tokenizer.json``, else a byte-level BPE trained on the corpus with
  Hugging Face ``tokenizers`` (cached by the corpus's content hash and the vocab size).
- Tokens: every document followed by an EOS token, in one stream stored as a flat uint16
  (uint32 for vocabularies over 65535) file, cached under the hash of the corpus and the
  tokenizer and memory-mapped, so a second run skips tokenization.
- Split: the last ``val_fraction`` of the stream is the validation set.
- Rows: the stream cut into rows of ``seq_len`` tokens (causal LM: inputs and targets shifted by
  one). A row may hold the end of one document and the start of others; the batch's
  ``cu_seqlens`` marks where each document (EOS included) starts, so attention never crosses one
  and positions restart at each.
- Supervised fine-tuning (``data.format=sft``, or auto-detected: .jsonl lines with ``prompt`` and
  ``response``): each example is prompt + response + EOS, with each token's role kept beside the
  stream; rows start at an example and hold whole examples (the next one's head fills the rest
  untrained; an example longer than a row is cut), every example is its own document in
  ``cu_seqlens``, and only response tokens and the closing EOS are targets.
- Order: a permutation of the rows per epoch, from the seed and the epoch; micro-batch ``k`` is
  a pure function of ``k``, so resuming needs only ``k``. MLM masks likewise come from a generator
  seeded by the seed and ``k``.
- Ranks: with N processes, micro-batch ``k`` is a global batch of N * batch_size rows and rank r
  reads rows [r * batch_size, (r + 1) * batch_size) of it (MLM masks drawn for the whole global
  batch), so N ranks see exactly the rows and masks one process with N * batch_size sees.
"""

import gzip
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from fastlm.train import distributed
from fastlm.train.config import UserError

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "[SEP]", "<eos>", "<|eos|>")
MASK_CANDIDATES = ("<|mask|>", "[MASK]", "<mask>")
IGNORE_INDEX = -100
SFT_FIELDS = ("prompt", "response")
# Role of each token of an SFT stream: the loss covers RESPONSE and END (the EOS closing an example).
PROMPT, RESPONSE, END = 0, 1, 2
_CACHE_VERSION = "1"


def shipped_corpus() -> Path:
    return Path(str(resources.files("fastlm.train").joinpath("corpus/shakespeare.jsonl.gz")))


def cache_root(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    return Path(os.environ.get("FASTLM_CACHE_DIR", Path.home() / ".cache" / "fastlm"))


def _kind(path: Path) -> str | None:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


def corpus_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"data path {path} does not exist; pass --data FILE_OR_DIR (.txt, .md, .jsonl, optionally .gz)")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p))
        if not files:
            raise UserError(f"no .txt/.md/.jsonl files (optionally .gz) under {path}; point --data at your text")
        return files
    if _kind(path) is None:
        raise UserError(f"{path}: unsupported file type; use .txt, .md or .jsonl (optionally .gz)")
    return [path]


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.name.lower().endswith(".gz") else raw
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None


def _jsonl_records(path: Path, text: str):
    """(line number, record) of each non-blank line of a .jsonl file's text."""
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{line_no} is not valid JSON ({exc.msg})") from None
        yield line_no, record


def _read_text(path: Path, digest) -> str:
    raw = _read_bytes(path)
    digest.update(path.name.encode() + b"\0" + len(raw).to_bytes(8, "little") + raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_documents(files: list[Path], text_field: str) -> tuple[list[str], str]:
    """The documents and the corpus's content hash (names, text field and bytes)."""
    digest = hashlib.sha256(f"v{_CACHE_VERSION}|{text_field}".encode())
    docs = []
    for path in files:
        text = _read_text(path, digest)
        if _kind(path) == "text":
            docs.append(text)
            continue
        for line_no, record in _jsonl_records(path, text):
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise UserError(f"{path}:{line_no} has no string field {text_field!r}; set --data.text_field")
            docs.append(record[text_field])
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"no text in {', '.join(map(str, files[:3]))}; the data is empty")
    return docs, digest.hexdigest()


def detect_format(files: list[Path], text_field: str) -> str:
    """``data.format=auto``: "sft" when every file is .jsonl and the first record has string ``prompt``
    and ``response`` fields and no ``text_field``; else "text"."""
    if not all(_kind(p) == "jsonl" for p in files):
        return "text"
    record = None
    opener = gzip.open if files[0].name.lower().endswith(".gz") else open
    try:
        with opener(files[0], "rt", encoding="utf-8", errors="replace") as f:
            line = next((line for line in f if line.strip()), "")
        record = json.loads(line)
    except (OSError, EOFError, json.JSONDecodeError):
        pass  # unreadable: the reader of the text format reports it
    if isinstance(record, dict) and text_field not in record and all(isinstance(record.get(f), str) for f in SFT_FIELDS):
        return "sft"
    return "text"


def read_examples(files: list[Path]) -> tuple[list[tuple[str, str]], str]:
    """Supervised fine-tuning examples ``(prompt, response)`` from .jsonl files, and their content hash."""
    digest = hashlib.sha256(f"v{_CACHE_VERSION}|sft".encode())
    examples = []
    for path in files:
        if _kind(path) != "jsonl":
            raise UserError(f"{path}: SFT data (data.format=sft) must be .jsonl lines with "
                            f"{' and '.join(map(repr, SFT_FIELDS))} fields")
        for line_no, record in _jsonl_records(path, _read_text(path, digest)):
            missing = [f for f in SFT_FIELDS if not isinstance(record, dict) or not isinstance(record.get(f), str)]
            if missing:
                raise UserError(f"{path}:{line_no} has no string field {missing[0]!r}; SFT lines need "
                                f"{' and '.join(map(repr, SFT_FIELDS))}")
            examples.append((record["prompt"], record["response"]))
    if not examples:
        raise UserError(f"no examples in {', '.join(map(str, files[:3]))}; the data is empty")
    return examples, digest.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def train_tokenizer(docs: list[str], vocab_size: int, corpus_hash: str, cache: Path):
    """A byte-level BPE of ``vocab_size`` with <|endoftext|> and <|mask|>, cached per corpus; says on
    stderr (rank 0) whether it is trained, which takes a while on a large corpus, or read from the cache."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = cache / "tokenizers" / f"bpe-{vocab_size}-{corpus_hash[:24]}.json"
    if path.exists():
        distributed.print0(f"fastlm-train: using the {vocab_size}-token byte-level BPE of this corpus cached in {path}",
                           file=sys.stderr)
        return Tokenizer.from_file(str(path))
    distributed.print0(f"fastlm-train: training a {vocab_size}-token byte-level BPE on the corpus (saved in {path} "
                       "for later runs)", file=sys.stderr)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_CANDIDATES[0], MASK_CANDIDATES[0]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer)
    _write_atomic(path, tokenizer.to_str().encode())
    return tokenizer


def read_tokenizer_file(path):
    """A tokenizers.Tokenizer from a tokenizer.json; ValueError (what tokenizers says, its first line) when
    the file is missing or malformed. Callers word the UserError: the fix depends on where the file is from."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for unreadable or malformed files
        raise ValueError((str(exc).splitlines() or [type(exc).__name__])[0]) from None


def load_tokenizer(path: str):
    """The tokenizer given as --data.tokenizer."""
    try:
        return read_tokenizer_file(path)
    except ValueError as exc:
        raise UserError(f"cannot load tokenizer {path} ({exc}); give a Hugging Face tokenizer.json, or drop "
                        "--data.tokenizer to train one on the corpus") from None


def special_id(tokenizer, candidates, what: str, required: bool = True) -> int | None:
    for token in candidates:
        idx = tokenizer.token_to_id(token)
        if idx is not None:
            return idx
    if required:
        raise UserError(f"the tokenizer has no {what} token (looked for {', '.join(candidates)}); add one or "
                        "drop --data.tokenizer to train one on the corpus")
    return None


def tokenize(docs: list[str], tokenizer, eos_id: int, corpus_hash: str, cache: Path) -> np.ndarray:
    """All documents, each followed by EOS, as a memory-mapped token array (cached)."""
    tok_hash = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.uint32
    path = cache / "tokens" / f"{corpus_hash[:24]}-{tok_hash[:24]}.{np.dtype(dtype).name}"
    if not path.exists():
        pieces = []
        for enc in tokenizer.encode_batch(docs, add_special_tokens=False):
            pieces.append(np.asarray(enc.ids, dtype=dtype))
            pieces.append(np.asarray([eos_id], dtype=dtype))
        _write_atomic(path, np.concatenate(pieces).tobytes())
    return np.memmap(path, dtype=dtype, mode="r")


def tokenize_sft(examples: list[tuple[str, str]], tokenizer, eos_id: int, corpus_hash: str,
                 cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every example as prompt + response + EOS in one token stream, and each token's role (PROMPT,
    RESPONSE, END) as uint8; both memory-mapped from the cache. Prompt and response are tokenized
    separately, so the boundary between them is exact."""
    tok_hash = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.uint32
    stem = cache / "tokens" / f"sft-{corpus_hash[:24]}-{tok_hash[:24]}"
    path, roles_path = stem.with_suffix("." + np.dtype(dtype).name), stem.with_suffix(".roles")
    if not (path.exists() and roles_path.exists()):
        prompts = tokenizer.encode_batch([p for p, _ in examples], add_special_tokens=False)
        responses = tokenizer.encode_batch([r for _, r in examples], add_special_tokens=False)
        tokens, roles = [], []
        for prompt, response in zip(prompts, responses):
            tokens += [np.asarray(prompt.ids, dtype=dtype), np.asarray(response.ids, dtype=dtype),
                       np.asarray([eos_id], dtype=dtype)]
            roles += [np.full(len(prompt.ids), PROMPT, np.uint8), np.full(len(response.ids), RESPONSE, np.uint8),
                      np.asarray([END], np.uint8)]
        _write_atomic(roles_path, np.concatenate(roles).tobytes())
        _write_atomic(path, np.concatenate(tokens).tobytes())
    return np.memmap(path, dtype=dtype, mode="r"), np.memmap(roles_path, dtype=np.uint8, mode="r")


def sft_rows(roles: np.ndarray, span: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows of ``span`` tokens for SFT packing: each row starts at an example's first token and holds
    the examples that fit in it whole; ``ends[r]`` is where row r's trained tokens stop (the tokens
    after it, the start of the next row's first example, get no loss). An example longer than a row
    is cut to its first ``span`` tokens. Returns (starts, ends, number of cut examples)."""
    example_ends = np.flatnonzero(np.asarray(roles) == END) + 1
    example_starts = np.concatenate([[0], example_ends[:-1]])
    starts, ends, cut, e = [], [], 0, 0
    while e < len(example_starts):
        start = example_starts[e]
        fit = int(np.searchsorted(example_ends, start + span, side="right"))  # examples ending within the row
        if fit == e:
            starts.append(start)
            ends.append(start + span)
            cut, e = cut + 1, e + 1
        else:
            starts.append(start)
            ends.append(example_ends[fit - 1])
            e = fit
    return np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64), cut


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats per token) of the tokens' frequency distribution: the loss of a model that
    ignores context entirely."""
    counts = np.bincount(tokens)
    p = counts[counts > 0] / len(tokens)
    return float(-(p * np.log(p)).sum())


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64, IGNORE_INDEX where there is nothing to predict
    cu_seqlens: torch.Tensor  # (n_docs + 1,) int32: document starts in the flattened B*T tokens
    max_seqlen: int

    def to(self, device) -> "Batch":
        return Batch(self.inputs.to(device, non_blocking=True), self.targets.to(device, non_blocking=True),
                     self.cu_seqlens.to(device, non_blocking=True), self.max_seqlen)


class PackedData:
    """Rows of a token stream, batched in a seeded per-epoch order (see the module docstring).

    With ``roles`` (SFT, see ``tokenize_sft``): rows start at example starts and hold whole examples
    (``sft_rows``), targets are IGNORE_INDEX except on response tokens and the closing EOS, and the
    validation split is the last ``val_fraction`` of the rows.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, val_fraction: float, eos_id: int,
                 objective: str, seed: int, mask_id: int | None = None, vocab_size: int = 0,
                 mlm_probability: float = 0.15, roles: np.ndarray | None = None, rank: int = 0, world: int = 1):
        if roles is not None and objective != "clm":
            raise UserError("SFT data (prompt/response) trains a causal LM; use --objective clm")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.eos_id, self.objective, self.seed = eos_id, objective, seed
        self.mask_id, self.vocab_size, self.mlm_probability = mask_id, vocab_size, mlm_probability
        self.roles = roles
        self.rank, self.world = rank, world
        global_batch = batch_size * world
        self.span = seq_len + 1 if objective == "clm" else seq_len  # tokens a row reads
        n = len(tokens)
        if roles is None:
            n_val = max(int(n * val_fraction), self.span)
            self.train_rows = (n - n_val - (self.span - seq_len)) // seq_len
            self.val_start = n - n_val
            self.val_rows = (n_val - (self.span - seq_len)) // seq_len
            self.row_starts = self.row_ends = None
            self.cut_examples = 0
        else:
            self.row_starts, self.row_ends, self.cut_examples = sft_rows(roles, self.span)
            self.val_rows = max(int(len(self.row_starts) * val_fraction), world)
            self.train_rows = len(self.row_starts) - self.val_rows
            self.val_start = int(self.row_starts[self.train_rows]) if self.train_rows >= 0 else 0
        if self.train_rows < global_batch or self.val_rows < world:
            raise UserError(
                f"the corpus has {n} tokens: too few for a batch of {global_batch} rows of {seq_len} tokens plus a "
                f"validation split; use more text or lower --train.batch_size / --data.seq_len")
        self.batches_per_epoch = self.train_rows // global_batch
        self._epoch, self._perm = -1, None

    def _rows(self, starts: np.ndarray, generator_seed: int, offset: int = 0, total: int | None = None) -> Batch:
        """The batch of the rows at ``starts``: rows [offset, offset + len(starts)) of a global batch of
        ``total`` rows (default: just these)."""
        rows = np.stack([self.tokens[s:s + self.span] for s in starts]).astype(np.int64)
        data = torch.from_numpy(rows)  # (B, span)
        if self.objective == "clm":
            inputs, targets = data[:, :-1], data[:, 1:].clone()  # (B, T) each
        else:
            # Masks are drawn for the whole global batch, so they do not depend on the number of ranks.
            full = data
            if total is not None and total != len(data):
                full = data.new_zeros(total, self.span)  # (total, span); the other ranks' rows do not matter
                full[offset:offset + len(data)] = data
            inputs, targets = mask_tokens(full, self.mask_id, self.eos_id, self.vocab_size, self.mlm_probability,
                                          torch.Generator().manual_seed(generator_seed))
            inputs, targets = inputs[offset:offset + len(data)], targets[offset:offset + len(data)]
        cu_seqlens, max_seqlen = document_boundaries(inputs, self.eos_id)
        return Batch(inputs.contiguous(), targets, cu_seqlens, max_seqlen)

    def _sft_batch(self, rows: np.ndarray) -> Batch:
        """SFT rows ``rows``: loss on the response tokens and closing EOS of the examples each row
        holds whole; a document boundary after each example; past the stream's end, EOS padding."""
        data = np.full((len(rows), self.span), self.eos_id, dtype=np.int64)
        roles = np.full((len(rows), self.span), END, dtype=np.uint8)
        trained = np.zeros((len(rows), self.span), dtype=bool)
        for r, row in enumerate(rows):
            start, end = self.row_starts[row], self.row_ends[row]
            piece = slice(start, min(start + self.span, len(self.tokens)))
            length = piece.stop - piece.start
            data[r, :length] = self.tokens[piece]
            roles[r, :length] = self.roles[piece]
            trained[r, :end - start] = True
        data, roles = torch.from_numpy(data), torch.from_numpy(roles)  # (B, span) each
        # A target is trained if it is a response token or the closing EOS of an example the row holds
        # whole, predicted from within its example: never from the previous example's EOS (so an
        # example with an empty prompt has its first response token untrained).
        loss = (torch.from_numpy(trained) & (roles != PROMPT))[:, 1:] & (roles[:, :-1] != END)  # (B, T)
        inputs = data[:, :-1].contiguous()  # (B, T)
        targets = torch.where(loss, data[:, 1:], IGNORE_INDEX)  # (B, T)
        cu_seqlens, max_seqlen = document_boundaries(inputs, self.eos_id, ends=roles[:, :-1] == END)
        return Batch(inputs, targets, cu_seqlens, max_seqlen)

    def train_batch(self, k: int) -> Batch:
        """This rank's rows of micro-batch ``k`` (0-based, counted over the whole run)."""
        epoch, i = divmod(k, self.batches_per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.train_rows, generator=gen).numpy()
        global_batch = self.batch_size * self.world
        first = i * global_batch + self.rank * self.batch_size
        rows = self._perm[first:first + self.batch_size]
        if self.roles is not None:
            return self._sft_batch(rows)
        return self._rows(rows * self.seq_len, generator_seed=(self.seed * 1_000_003 + k) * 2 + 1,
                          offset=self.rank * self.batch_size, total=global_batch)

    def val_batches(self, count: int) -> list[Batch]:
        """This rank's part of the first ``count`` validation micro-batches (fixed: the same every
        evaluation). A short last global batch is split as evenly as the ranks allow; it is left
        out if some rank would get no row (every rank must run every forward under FSDP)."""
        out = []
        global_batch = self.batch_size * self.world
        for b in range(min(count, -(-self.val_rows // global_batch))):
            rows = np.arange(b * global_batch, min((b + 1) * global_batch, self.val_rows))
            if len(rows) < self.world:
                break
            parts = np.array_split(rows, self.world)
            if self.roles is not None:
                out.append(self._sft_batch(self.train_rows + parts[self.rank]))
                continue
            offset = sum(len(p) for p in parts[:self.rank])
            out.append(self._rows(self.val_start + parts[self.rank] * self.seq_len,
                                  generator_seed=(self.seed * 1_000_003 + b) * 2, offset=offset, total=len(rows)))
        return out


def document_boundaries(inputs: torch.Tensor, eos_id: int, ends: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, int]:
    """cu_seqlens (int32) of the documents in the flattened rows: a document ends after each EOS
    (or, given the (B, T) bool ``ends``, after each position marked there) and at each row end.
    Also the longest document's length."""
    B, T = inputs.shape
    ends = inputs == eos_id if ends is None else ends  # (B, T)
    after_eos = ends.flatten().nonzero().flatten() + 1
    row_starts = torch.arange(0, B * T + 1, T)
    cu = torch.unique(torch.cat([row_starts, after_eos]))  # sorted
    return cu.to(torch.int32), int(cu.diff().max())


def mask_tokens(tokens: torch.Tensor, mask_id: int, eos_id: int, vocab_size: int, probability: float,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: select ``probability`` of the non-EOS tokens; of those, 80% -> mask_id,
    10% -> a random token, 10% unchanged. Returns (inputs, targets); targets are IGNORE_INDEX
    except at the selected positions."""
    selected = (torch.rand(tokens.shape, generator=generator) < probability) & (tokens != eos_id)
    targets = torch.where(selected, tokens, IGNORE_INDEX)
    action = torch.rand(tokens.shape, generator=generator)
    random_tokens = torch.randint(vocab_size, tokens.shape, generator=generator)
    inputs = torch.where(selected & (action < 0.8), mask_id, tokens)
    inputs = torch.where(selected & (action >= 0.8) & (action < 0.9), random_tokens, inputs)
    return inputs, targets
