"""Tokenizer training/loading and packing into the shared ``llmops-packed-v1`` layout.

    tokenizer/               tokenizer.json + tokenizer_config.json + special_tokens_map.json
                             (``transformers.AutoTokenizer.from_pretrained`` loads it)
    packed/manifest.json     {"format": "llmops-packed-v1", "seq_len", "dtype", "eos_token_id",
                              "vocab_size", "tokenizer": "tokenizer", "splits": {...}}
    packed/<split>-NNNNN.npy [n_blocks, seq_len] arrays

Documents are concatenated in id order with ``eos_token_id`` after each one and cut into
full blocks; the last partial block of a split is dropped (its tokens are counted).
The byte-level BPE matches what the trainer builds when a version has no tokenizer
(same special tokens, same ids), so both paths produce interchangeable tokenizers.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

PACKED_FORMAT = "llmops-packed-v1"
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
BLOCKS_PER_SHARD = 8192


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE trained on ``texts`` (deterministic for the same texts in the same order)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return bpe


def load_tokenizer(path: str | Path):
    """The ``tokenizer.json`` of a Hugging Face tokenizer directory (tokenizer.path in the recipe)."""
    from tokenizers import Tokenizer

    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise SystemExit(
            f"tokenizer.path {path}: no tokenizer.json there; point it at a directory saved with "
            "save_pretrained (a fast tokenizer), or unset it to train one on the train split"
        )
    return Tokenizer.from_file(str(file))


def save_tokenizer(tokenizer, out: Path, source: str | Path | None = None) -> None:
    """Write the tokenizer directory; a loaded one is copied as is (its config, its special tokens)."""
    out.mkdir(parents=True, exist_ok=True)
    if source is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (Path(source) / name).is_file():
                shutil.copyfile(Path(source) / name, out / name)
        if (out / "tokenizer_config.json").is_file():
            return
    tokenizer.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1_000_000_000, **SPECIAL_TOKENS}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2, sort_keys=True) + "\n")


def eos_id(tokenizer) -> int:
    for token in (SPECIAL_TOKENS["eos_token"], "<|endoftext|>", "</s>", "<eos>"):
        tid = tokenizer.token_to_id(token)
        if tid is not None:
            return tid
    raise SystemExit("the tokenizer has no end-of-sequence token (</s>, <|endoftext|>, <eos>); add one and retry")


def encode_batches(batches: Iterator, tokenizer_json: str) -> Iterator:
    """Arrow batches of (split, id, text) -> (split, id, token ids). Runs on the executors."""
    import pyarrow as pa
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    schema = pa.schema([("split", pa.string()), ("id", pa.string()), ("ids", pa.list_(pa.int32()))])
    for batch in batches:
        texts = batch.column(2).to_pylist()
        encoded = tok.encode_batch(texts, add_special_tokens=False)
        yield pa.RecordBatch.from_pydict(
            {"split": batch.column(0), "id": batch.column(1), "ids": [e.ids for e in encoded]}, schema=schema
        )


class Packer:
    """Concatenate documents with EOS, cut ``seq_len`` blocks, write ``.npy`` shards of one split."""

    def __init__(self, out: Path, split: str, seq_len: int, eos: int, dtype: str) -> None:
        self.out, self.split, self.seq_len, self.eos, self.dtype = out, split, seq_len, eos, np.dtype(dtype)
        self.buffer: list[int] = []
        self.blocks: list[np.ndarray] = []
        self.files: list[str] = []
        self.n_blocks = self.tokens = self.docs = 0

    def add(self, ids: list[int]) -> None:
        self.buffer.extend(ids)
        self.buffer.append(self.eos)
        self.tokens += len(ids) + 1
        self.docs += 1
        full = len(self.buffer) // self.seq_len
        if full:
            cut = full * self.seq_len
            self.blocks.append(np.asarray(self.buffer[:cut], dtype=self.dtype).reshape(full, self.seq_len))
            del self.buffer[:cut]
            if sum(len(b) for b in self.blocks) >= BLOCKS_PER_SHARD:
                self._flush()

    def _flush(self) -> None:
        if not self.blocks:
            return
        rows = np.concatenate(self.blocks)
        self.blocks = []
        for start in range(0, len(rows), BLOCKS_PER_SHARD):
            name = f"packed/{self.split}-{len(self.files):05d}.npy"
            np.save(self.out / name, rows[start : start + BLOCKS_PER_SHARD])
            self.files.append(name)
            self.n_blocks += len(rows[start : start + BLOCKS_PER_SHARD])

    def close(self) -> dict:
        self._flush()
        return {
            "files": self.files,
            "blocks": self.n_blocks,
            "tokens": self.n_blocks * self.seq_len,
            "documents": self.docs,
            "dropped_tail_tokens": len(self.buffer),
            "document_tokens": self.tokens,
        }


def pack_version(spark, kept, out: Path, tokenizer_spec, seq_len: int, log=print) -> dict:
    """Train (or load) the tokenizer, tokenize ``kept`` (split, id, text) in Spark, write packed/ + tokenizer/.

    Returns the manifest plus per-split token-length histograms for the data card.
    """
    if tokenizer_spec.path:
        tokenizer = load_tokenizer(tokenizer_spec.path)
    else:
        with (out / "train.jsonl").open(encoding="utf-8") as fh:
            tokenizer = train_tokenizer((json.loads(line)["text"] for line in fh), tokenizer_spec.vocab_size)
    save_tokenizer(tokenizer, out / "tokenizer", tokenizer_spec.path)
    vocab = tokenizer.get_vocab_size()
    dtype = "uint16" if vocab <= 65_535 else "uint32"
    eos = eos_id(tokenizer)
    log(f"tokenizer: vocab {vocab} ({'loaded from ' + tokenizer_spec.path if tokenizer_spec.path else 'trained'})")

    (out / "packed").mkdir(exist_ok=True)
    tok_json = tokenizer.to_str()
    encoded = kept.select("split", "id", "text").mapInArrow(
        lambda it: encode_batches(it, tok_json), "split string, id string, ids array<int>"
    )
    packers = {s: Packer(out, s, seq_len, eos, dtype) for s in ("train", "validation", "test")}
    lengths: dict[str, list[int]] = {s: [] for s in packers}
    for row in encoded.orderBy("split", "id").toLocalIterator(prefetchPartitions=True):
        packers[row["split"]].add(row["ids"])
        lengths[row["split"]].append(len(row["ids"]))
    splits = {s: p.close() for s, p in packers.items()}
    manifest = {
        "format": PACKED_FORMAT,
        "seq_len": seq_len,
        "dtype": dtype,
        "eos_token_id": eos,
        "vocab_size": vocab,
        "tokenizer": "tokenizer",
        "splits": {s: {k: v[k] for k in ("files", "blocks", "tokens")} for s, v in splits.items()},
    }
    (out / "packed" / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return {"manifest": manifest, "splits": splits, "lengths": lengths}
