"""Training data: the packed token blocks of a dataset version, and the order they are read in.

Two sources, one shape (``[n_blocks, seq_len]`` integer arrays):

- ``packed/manifest.json`` (written by the data stage, format ``llmops-packed-v1``): numpy
  ``.npy`` shards read with ``mmap_mode="r"``, so a large split is never loaded whole, plus
  the dataset's own ``tokenizer/`` directory;
- otherwise ``train.jsonl`` / ``validation.jsonl``, tokenized and packed here.

Only stdlib and numpy at import: the unit tests run it in the control-plane venv.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PACKED_FORMAT = "llmops-packed-v1"
MANIFEST = "packed/manifest.json"


class PackedDataError(ValueError):
    """A packed dataset that does not match its manifest or the recipe: names the field and the fix."""


def read_texts(path: Path) -> list[str]:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: dataset_dir must hold train.jsonl and validation.jsonl (or {MANIFEST})"
        )
    texts = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{n}: expected a JSON object with a `text` field ({exc})") from None
    return texts


def pack(tokenizer, texts: list[str], seq_len: int) -> np.ndarray:
    """Documents as <s> ids </s>, concatenated and cut into seq_len blocks (the tail is dropped)."""
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id])
    n = len(stream) // seq_len
    return np.asarray(stream[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


class Blocks:
    """Rows of one or more ``[n, seq_len]`` arrays (memory-mapped shards), indexed as one."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = [a for a in arrays if len(a)]
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def take(self, indices) -> np.ndarray:
        """Rows ``indices`` (in that order) as an int64 array."""
        indices = np.asarray(indices, dtype=np.int64)
        shard = np.searchsorted(self.offsets, indices, side="right") - 1
        out = np.empty((len(indices), self.seq_len), dtype=np.int64)
        for k, (s, i) in enumerate(zip(shard, indices, strict=True)):
            out[k] = self.arrays[s][i - self.offsets[s]]
        return out

    @property
    def seq_len(self) -> int:
        return int(self.arrays[0].shape[1]) if self.arrays else 0


@dataclass
class PackedManifest:
    root: Path
    raw: dict[str, Any]

    @property
    def seq_len(self) -> int:
        return int(self.raw["seq_len"])

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / self.raw.get("tokenizer", "tokenizer")

    def split(self, name: str, limit: int | None = None) -> Blocks:
        """The split's shards, memory-mapped and checked against the manifest."""
        info = self.raw["splits"].get(name)
        if info is None:
            raise PackedDataError(
                f"{self.root / MANIFEST}: no `splits.{name}`; re-run the data stage "
                "(it writes train, validation and test)"
            )
        arrays = []
        for rel in info.get("files", []):
            path = self.root / rel
            if not path.is_file():
                raise PackedDataError(f"{self.root / MANIFEST}: `splits.{name}.files` lists {rel}, which is missing")
            arr = np.load(path, mmap_mode="r")
            if arr.ndim != 2 or arr.shape[1] != self.seq_len:
                raise PackedDataError(
                    f"{path}: shape {arr.shape}, expected [n_blocks, {self.seq_len}] "
                    "(the manifest's seq_len); re-run the data stage"
                )
            if arr.dtype != np.dtype(self.raw["dtype"]):
                raise PackedDataError(f"{path}: dtype {arr.dtype}, the manifest says `dtype: {self.raw['dtype']}`")
            arrays.append(arr)
            if limit is not None and sum(len(a) for a in arrays) >= limit:
                break
        blocks = Blocks(arrays)
        declared = info.get("blocks")
        if limit is None and declared is not None and int(declared) != len(blocks):
            raise PackedDataError(
                f"{self.root / MANIFEST}: `splits.{name}.blocks` is {declared} but the files hold "
                f"{len(blocks)} blocks; the dataset version is incomplete: re-run the data stage"
            )
        return blocks


def load_manifest(dataset_dir: Path, seq_len: int) -> PackedManifest | None:
    """The dataset's packed manifest, or None when it has none (then the trainer packs the JSONL)."""
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PackedDataError(f"{path}: not JSON ({exc}); re-run the data stage") from None
    if raw.get("format") != PACKED_FORMAT:
        raise PackedDataError(f"{path}: `format` is {raw.get('format')!r}; this trainer reads {PACKED_FORMAT!r}")
    for key in ("seq_len", "dtype", "splits"):
        if key not in raw:
            raise PackedDataError(f"{path}: missing `{key}`; re-run the data stage")
    if raw["dtype"] not in ("uint16", "uint32", "int32", "int64"):
        raise PackedDataError(f"{path}: `dtype` {raw['dtype']!r} is not an integer token dtype (uint16/uint32)")
    if int(raw["seq_len"]) != seq_len:
        raise PackedDataError(
            f"{path}: the dataset is packed with seq_len {raw['seq_len']} but training.seq_len is {seq_len}; "
            f"set training.seq_len: {raw['seq_len']} in the recipe, or re-pack the data with seq_len {seq_len}"
        )
    return PackedManifest(Path(dataset_dir), raw)


class BlockSampler:
    """Deterministic micro-batches: micro step m on rank r is a pure function of (seed, m, r).

    The data position of a checkpoint is therefore just its micro step: restarting at step s
    continues exactly the same order, on the same number of ranks.
    """

    def __init__(self, n_blocks: int, batch: int, rank: int, world: int, seed: int):
        self.n, self.batch, self.rank, self.world, self.seed = n_blocks, batch, rank, world, seed
        self.per_epoch = n_blocks // (batch * world)
        if self.per_epoch < 1:
            raise ValueError(
                f"{n_blocks} training blocks cannot fill one step of {batch * world} "
                "(micro_batch_size x ranks): add data or lower training.seq_len/micro_batch_size"
            )
        self._perm: tuple[int, np.ndarray] | None = None

    def indices(self, micro_step: int) -> np.ndarray:
        epoch, i = divmod(micro_step, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        start = (i * self.world + self.rank) * self.batch
        return self._perm[1][start : start + self.batch]

    def state(self, micro_step: int) -> dict[str, int]:
        """What a checkpoint records about the data position (checked on resume)."""
        return {
            "micro_step": micro_step,
            "n_blocks": self.n,
            "world": self.world,
            "batch": self.batch,
            "seed": self.seed,
        }
