"""Prepare a text corpus for training: parse, filter, deduplicate, split, tokenize and pack.

    spark-submit <site-packages>/llmops_provider/data/prepare_corpus.py --input DIR_OR_FILE [--input ...] \
        --output STAGING_DIR --recipe RECIPE.yaml
    spark-submit spark_jobs/prepare_corpus.py ...       # the same, from a checkout
    python -m llmops_provider.data.prepare_corpus ... [--master local[2]]

Reads JSONL lines as raw bytes so that no line is lost to a lenient reader: every input
line ends up kept in a split, quarantined (malformed, with a reason), excluded by a step
(with the step and the reason) or counted as blank; per step, in = out + dropped, and the
job refuses to publish when the files disagree with the counts. Steps (docs/data.md):
parse -> normalize -> length -> language -> quality filters -> blocklist -> pii ->
exact dedup -> MinHash near dedup -> ids -> split -> tokenize + pack. Output is the
dataset-version layout, written to a temporary sibling directory and renamed into place:

    train.jsonl validation.jsonl test.jsonl   {"id", "text"} per line, sorted by id
    quarantine.jsonl                          {"line", "reason", "source"}
    excluded.jsonl                            {"id", "step", "reason", "detail", "source", "text"}
    stats.json                                per-step counts (deterministic: same input, same bytes)
    data_card.json data_card.md length_histogram.png
    tokenizer/ packed/                        the llmops-packed-v1 layout (tokenizer.pack)
    _job.json                                 this run's provenance (spark_app_id, master, timing)

Run-specific values live in ``_job.json`` rather than ``stats.json``: a leading underscore
marks a file as not part of the dataset (the Hadoop convention the dataset store follows),
so re-running on the same input produces an identical dataset tree and no new commit.

This module ships in the provider's wheel, so the data operator submits it from wherever the
provider is installed. The driver needs ``llmops_provider`` importable (the recipe model is
pure pydantic); the executors need only ``llmops_provider.data``, which is shipped to a
cluster's executors with ``addPyFile``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Submitted as a script, this file's folder is sys.path[0]; the modules here are imported as
# llmops_provider.data.*, so their bare names (steps, language, ...) must not shadow anything.
if sys.path and sys.path[0] and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
import zipfile

SPLITS = ("train", "validation", "test")
REPO = Path(__file__).resolve().parents[2]  # a checkout's root (site-packages for an installed wheel)


def resolve_inputs(paths: list[str]) -> list[str]:
    """Directories -> their ``*.jsonl`` files (recursive, sorted); remote URIs pass through."""
    files: list[str] = []
    for p in paths:
        if "://" in p:
            files.append(p)
            continue
        path = Path(p).expanduser().resolve()
        if path.is_dir():
            found = sorted(str(f) for f in path.rglob("*.jsonl") if f.is_file())
            if not found:
                raise SystemExit(f"--input {p}: directory has no *.jsonl files; put raw JSONL records there")
            files.extend(found)
        elif path.is_file():
            files.append(str(path))
        else:
            raise SystemExit(f"--input {p}: no such file or directory; check data.sources[].path in the recipe")
    return sorted(set(files))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="prepare_corpus", description=__doc__.split("\n")[0])
    ap.add_argument("--input", action="append", required=True, help="JSONL file or directory (repeatable)")
    ap.add_argument("--output", required=True, help="staging directory to (re)write")
    ap.add_argument("--recipe", required=True, help="recipe YAML (its `data` section drives the job)")
    ap.add_argument("--master", default=None, help="Spark master when run with plain python (default local[*])")
    return ap.parse_args(argv)


LOCAL_LSH_MAX_ROWS = 4_000_000  # (doc, band) rows grouped on the driver (~100 MB) rather than shuffled
LOCAL_VERIFY_MAX_BYTES = 128 << 20  # candidates' shingle sets verified on the driver rather than shuffled
LOCAL_PARTS_MAX_ROWS = 2_000_000  # local masters: records written from part files, their keys sorted on the driver
BROADCAST_MAX_ROWS = 2_000_000  # removal lists up to this size are broadcast to the tasks holding texts


def _small(frame, rows: int):
    """``frame`` with a broadcast hint when it has at most ``BROADCAST_MAX_ROWS`` rows.

    Joining the documents (with their texts) against a list of removed ids would otherwise
    shuffle every text; beyond the limit a shuffle join is the safer plan.
    """
    from pyspark.sql import functions as F

    return F.broadcast(frame) if rows <= BROADCAST_MAX_ROWS else frame


def _spark_session(master: str | None, app_name: str):
    from pyspark.sql import SparkSession

    from llmops_provider.spark_local import local_defaults

    builder = SparkSession.builder.appName(app_name).config("spark.ui.showConsoleProgress", "false")
    if "PYSPARK_GATEWAY_PORT" not in os.environ:  # plain `python`, not spark-submit: this starts the JVM
        master = master or "local[*]"
        for key, value in local_defaults(master, {}).items():  # JVM options for a short local run
            builder = builder.config(key, value)
    if master:
        builder = builder.master(master)
    spark = builder.getOrCreate()
    sc = spark.sparkContext
    if sc.master.startswith("local") and not sc.getConf().contains("spark.sql.shuffle.partitions"):
        # 200 shuffle partitions on one machine is mostly per-task overhead
        spark.conf.set("spark.sql.shuffle.partitions", str(max(2, 2 * sc.defaultParallelism)))
    if sc.master.startswith("local") and not sc.getConf().contains("spark.sql.files.minPartitionNum"):
        # input splits of about a quarter of a core's share: Spark's default (one share per core)
        # left a 2-core run with 3 uneven splits, one core idle for the last of them
        spark.conf.set("spark.sql.files.minPartitionNum", str(4 * sc.defaultParallelism))
    return spark


# --------------------------------------------------------------------------- per-document pass

DOC_FIELDS = ("status", "step", "reason", "detail", "line", "source", "id", "text", "hash")
QUARANTINE_LINE_CHARS = 10_000  # an oversized line is kept in the quarantine as its head
OUTPUT_PARTITION_CHARS = 16 << 20  # text per partition of the final sorted pass (driver memory bound)


def _doc_schema():
    from pyspark.sql import types as T

    fields = [T.StructField(n, T.StringType()) for n in DOC_FIELDS]
    fields += [
        T.StructField("chars", T.LongType()),  # len(text): the counts never read a text
        T.StructField("modified", T.ArrayType(T.StringType())),
        # local masters: the text stays on this machine's disk as its JSON string (``text`` null),
        # in a file of the task that parsed it: where it sits
        *(
            T.StructField(n, t)
            for n, t in (("text_part", T.StringType()), ("text_offset", T.LongType()), ("text_size", T.LongType()))
        ),
        # near-dedup inputs of a kept document (null otherwise): LSH band keys, MinHash
        # signature (uint32 bytes) and its sorted word-shingle hash set (uint32 bytes)
        T.StructField("bands", T.ArrayType(T.LongType())),
        T.StructField("sig", T.BinaryType()),
        T.StructField("shingles", T.BinaryType()),
    ]
    return T.StructType(fields)


NEAR_FIELDS = ("bands", "sig", "shingles")
TEXT_AT = ("text_part", "text_offset", "text_size")


def document_pass(batches, data, doc_steps, hasher=None, signing_s=None, text_dir=None):
    """Arrow batches of (raw line bytes, source) -> one row per line with its outcome.

    Runs on the executors: parse, then the document steps; with a ``hasher`` (near dedup on),
    the kept documents are also shingled and signed here, from the word hashes the
    repetition filter already computed, so the near-dedup passes never read a text again
    (``signing_s``, an accumulator, sums the seconds spent on it: near-dedup work done here).
    With a ``text_dir`` (local masters: one shared disk), each text is written there once, as the
    JSON string its output line will hold, and the row says where (``TEXT_AT``) instead of
    carrying it: the texts never pass through Spark again.
    """
    texts = TextWriter(text_dir) if text_dir else None
    try:
        yield from _document_batches(batches, data, doc_steps, hasher, signing_s, texts)
    finally:
        if texts is not None:
            texts.close()


class TextWriter:
    """Appends texts, as JSON strings, to one new file in ``text_dir`` (a retried task writes its
    own file, so a row always points at the bytes of the attempt that produced it)."""

    def __init__(self, text_dir: str):
        self.path = os.path.join(text_dir, f"texts-{uuid.uuid4().hex}.json")
        self._fh = None
        self._offset = 0

    def add(self, text: str) -> tuple[str, int, int]:
        """Write ``text``; its (file, offset, size)."""
        if self._fh is None:
            self._fh = open(self.path, "wb")  # noqa: SIM115 - closed by close(), after the last batch
        data = json.dumps(text, ensure_ascii=False).encode("utf-8")
        self._fh.write(data)
        offset = self._offset
        self._offset += len(data)
        return self.path, offset, len(data)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


class TextReader:
    """Reads what :class:`TextWriter` wrote: the JSON string of a text at (file, offset, size)."""

    def __init__(self):
        self._fds: dict[str, int] = {}

    def json(self, part: str, offset: int, size: int) -> bytes:
        fd = self._fds.get(part)
        if fd is None:
            fd = self._fds[part] = os.open(part, os.O_RDONLY)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise RuntimeError(f"{part}: {size} bytes expected at {offset}, {len(data)} read (was it removed?)")
        return data

    def text(self, part: str, offset: int, size: int) -> str:
        return json.loads(self.json(part, offset, size))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> TextReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _document_batches(batches, data, doc_steps, hasher, signing_s, texts):
    import numpy as np
    import pyarrow as pa

    from llmops_provider.data import minhash
    from llmops_provider.data.steps import assign_id, content_hash, parse_line, run_steps_batch

    size = data.near_dedup.shingle_size
    for batch in batches:
        raws = batch.column(0).to_pylist()
        sources = batch.column(1).to_pylist()
        rows, parsed = [], []
        for raw, source in zip(raws, sources, strict=True):
            row = dict.fromkeys(DOC_FIELDS)
            row["source"], row["chars"], row["modified"] = source, None, None
            if not raw.strip():
                row["status"] = "blank"
            else:
                doc, reason = parse_line(raw, source, data.text_field, data.id_field, data.max_record_bytes)
                if doc is None:
                    line = raw[:QUARANTINE_LINE_CHARS].decode("utf-8", errors="replace")
                    row.update(status="quarantined", step="parse", reason=reason, line=line)
                else:
                    parsed.append((row, doc))
            rows.append(row)
        # the steps see the batch's documents together (language id runs vectorized over them)
        drops = run_steps_batch([doc for _, doc in parsed], doc_steps)
        kept = []
        for (row, doc), dropped in zip(parsed, drops, strict=True):
            assign_id(doc)
            row.update(id=doc.id, text=doc.text, chars=len(doc.text), modified=doc.modified or None)
            if texts is not None:
                row["text_part"], row["text_offset"], row["text_size"] = texts.add(doc.text)
                row["text"] = None
            if dropped is not None:
                row.update(status="excluded", step=dropped[0], reason=dropped[1], detail=dropped[2])
            else:
                row.update(status="ok", hash=content_hash(doc.text))
                kept.append((row, doc))
        if hasher is not None and kept:
            signing_started = time.perf_counter()
            sets = [minhash.sorted_unique(minhash.ngram_hashes(doc.words()[0], size)) for _, doc in kept]
            sigs = hasher.signatures(sets)
            for (row, _), shingles, sig, keys in zip(kept, sets, sigs, hasher.band_keys(sigs).tolist(), strict=True):
                row.update(bands=keys, sig=sig.tobytes(), shingles=shingles.astype(np.uint32).tobytes())
            if signing_s is not None:
                signing_s.add(time.perf_counter() - signing_started)
        cols = {name: [row.get(name) for row in rows] for name in (*DOC_FIELDS, "chars", "modified", *TEXT_AT,
                                                                  *NEAR_FIELDS)}  # fmt: skip
        yield pa.RecordBatch.from_pydict(cols, schema=_arrow_schema())


def _arrow_schema():
    import pyarrow as pa

    return pa.schema(
        [pa.field(n, pa.string()) for n in DOC_FIELDS]
        + [pa.field("chars", pa.int64()), pa.field("modified", pa.list_(pa.string()))]
        + [pa.field("text_part", pa.string()), pa.field("text_offset", pa.int64()), pa.field("text_size", pa.int64())]
        + [pa.field("bands", pa.list_(pa.int64())), pa.field("sig", pa.binary()), pa.field("shingles", pa.binary())]
    )


def _verify_components(batches, threshold: float, max_pairs: int, min_estimate: float):
    """Arrow batches of (comp, rid, shingles, bands, sig), sorted by comp -> verified edges (a, b, jaccard).

    A component's rows arrive together (the input is partitioned and sorted by ``comp``) but may
    span batches: rows are buffered until the component changes.
    """
    import numpy as np
    import pyarrow as pa

    from llmops_provider.data import minhash

    schema = pa.schema([("a", pa.int64()), ("b", pa.int64()), ("jaccard", pa.float64())])
    current, rids, sets, bands, sigs = None, [], [], [], []

    def flush():
        sig = np.frombuffer(b"".join(sigs), dtype=np.uint32).reshape(len(sigs), -1)
        shingle_sets = [np.frombuffer(s, dtype=np.uint32) for s in sets]
        edges, _, _ = minhash.component_edges(rids, shingle_sets, sig, bands, threshold, max_pairs, min_estimate)
        return pa.RecordBatch.from_pydict(
            {"a": [e[0] for e in edges], "b": [e[1] for e in edges], "jaccard": [e[2] for e in edges]}, schema=schema
        )

    for batch in batches:
        comps, rs = batch.column(0).to_pylist(), batch.column(1).to_pylist()
        ss, bs, gs = batch.column(2).to_pylist(), batch.column(3).to_pylist(), batch.column(4).to_pylist()
        for comp, rid, shingles, keys, sig in zip(comps, rs, ss, bs, gs, strict=True):
            if comp != current:
                if rids:
                    yield flush()
                current, rids, sets, bands, sigs = comp, [], [], [], []
            rids.append(rid)
            sets.append(shingles)
            bands.append(keys)
            sigs.append(sig)
    if rids:
        yield flush()


def near_duplicates(spark, ok, spec, log, max_docs: int | None = None) -> tuple[list[tuple[int, int, str]], dict]:
    """MinHash LSH over ``ok`` (rid, id, source, hash, bands, sig, shingles): ``[(rid, kept rid, detail)]``
    and cluster stats.

    ``rid`` here is a key derived from the content hash (unique after exact dedup), so
    bucket order, candidate pairs and the kept document do not depend on how Spark
    partitioned the input. The document pass already signed every kept document
    (:func:`document_pass`); three passes follow, none of them reads a text:

    1. LSH: each bucket links its members to its smallest member (integer edges, collected to
       the driver). (band, key, rid) rows are shuffled; when at most ``LOCAL_LSH_MAX_ROWS`` rows
       can exist (``max_docs`` x bands), the driver collects (rid, band keys) and groups them
       with numpy instead (same edges, :func:`llmops_provider.data.minhash.bucket_links`), saving two shuffles
       (the Spark conf ``spark.llmops.lsh.localMaxRows`` overrides the limit; 0: always shuffle);
    2. the driver finds the connected components of those edges (integers only);
    3. the shingle sets and band keys of each component (each document once) meet in one
       task, which verifies the candidate pairs of its buckets with exact Jaccard; when the
       candidates' shingle sets total at most ``LOCAL_VERIFY_MAX_BYTES`` (Spark conf
       ``spark.llmops.verify.localMaxBytes``), the driver collects them and verifies the
       components itself (same function, no shuffle).
    """
    return _near_duplicates(spark, ok, ok.select("rid", "bands", "sig", "shingles"), spec, log, max_docs)


def _near_duplicates(spark, ok, signed, spec, log, max_docs, local=None) -> tuple[list[tuple[int, int, str]], dict]:
    """``local``: the candidates already collected (Arrow: rid, doc_rid, id, source, hash, bands, n),
    from :func:`_dedup_on_driver`; ``ok`` is then the documents keyed by ``doc_rid``."""
    import numpy as np
    import pyarrow as pa
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from llmops_provider.data import minhash

    local_max = int(spark.conf.get("spark.llmops.lsh.localMaxRows", str(LOCAL_LSH_MAX_ROWS)))
    shingle_bytes = None  # {rid: size of its shingle set}, known when the driver groups the buckets
    if local is not None or (max_docs is not None and max_docs * spec.bands <= local_max):
        table = local if local is not None else signed.select("rid", "bands", F.length("shingles").alias("n")).toArrow()
        keys = table.column("bands").combine_chunks().flatten().to_numpy()
        all_rids = table.column("rid").to_numpy()
        rid, root = minhash.bucket_links(all_rids, keys.reshape(table.num_rows, spec.bands))
        links = pa.table({"rid": rid, "root": root})
        shingle_bytes = (all_rids, table.column("n").to_numpy())
        where = "on the driver"
    else:
        bucket = Window.partitionBy("band", "key")
        links = (
            signed.select("rid", F.posexplode("bands").alias("band", "key"))
            .withColumn("root", F.min("rid").over(bucket))
            .filter(F.col("rid") != F.col("root"))
            .select("rid", "root")
            .distinct()
            .toArrow()
        )
        where = "in Spark"
    empty = {"clusters": 0, "documents_in_clusters": 0, "largest_cluster": 0, "verified_pairs": 0, "lsh_candidates": 0}
    if links.num_rows == 0:
        log("near_dedup: no LSH candidates")
        return [], empty
    ids, labels = minhash.components(links.column("rid").to_numpy(), links.column("root").to_numpy())
    comp_sizes = np.unique(labels, return_counts=True)[1]
    log(
        f"near_dedup: {ids.size} LSH candidates in {comp_sizes.size} components (largest {comp_sizes.max()}; "
        f"buckets grouped {where})"
    )
    threshold, max_pairs = spec.threshold, spec.max_bucket_pairs
    min_estimate = max(0.0, threshold - spec.estimate_margin)
    if local is None:
        comp = spark.createDataFrame(pa.table({"rid": ids, "comp": labels}))
        candidates = ok.select("rid", "shingles", "bands", "sig").join(F.broadcast(comp), "rid")  # only they move on
    else:  # fetched by the document's own key (an exact duplicate shares the content key)
        doc_rids = pa.table({"rid": local.column("rid"), "doc_rid": local.column("doc_rid")})
        comp = pa.table({"rid": ids, "comp": labels}).join(doc_rids, "rid")
        candidates = (
            ok.select(F.col("rid").alias("doc_rid"), "shingles", "bands", "sig")
            .join(F.broadcast(spark.createDataFrame(comp)), "doc_rid")
            .drop("doc_rid")
        )
    local_max = int(spark.conf.get("spark.llmops.verify.localMaxBytes", str(LOCAL_VERIFY_MAX_BYTES)))
    size = None
    if shingle_bytes is not None:
        size = int(shingle_bytes[1][np.isin(shingle_bytes[0], ids)].sum())
    if size is not None and 0 < local_max and size <= local_max:
        # small enough for the driver: one Arrow collect instead of a shuffle and a sort
        table = (
            candidates.select("comp", "rid", "shingles", "bands", "sig")
            .toArrow()
            .sort_by([("comp", "ascending"), ("rid", "ascending")])
        )
        edges = [
            {"a": a, "b": b, "jaccard": j}
            for out in _verify_components(table.to_batches(), threshold, max_pairs, min_estimate)
            for a, b, j in zip(*(out.column(k).to_pylist() for k in range(3)), strict=True)
        ]
        where = "on the driver"
    else:
        edges = (
            candidates.repartition("comp")
            .sortWithinPartitions("comp", "rid")
            .select("comp", "rid", "shingles", "bands", "sig")
            .mapInArrow(
                lambda it: _verify_components(it, threshold, max_pairs, min_estimate), "a long, b long, jaccard double"
            )
            .collect()
        )
        where = "in Spark"
    log(f"near_dedup: {len(edges)} verified pairs at jaccard >= {threshold} (verified {where})")
    if not edges:
        return [], {**empty, "lsh_candidates": int(ids.size)}
    involved = sorted({e["a"] for e in edges} | {e["b"] for e in edges})
    if local is None:
        wanted = spark.createDataFrame(pa.table({"rid": pa.array(involved, pa.int64())}))
        names = {
            r["rid"]: (r["id"], r["source"] or "", r["hash"])
            for r in ok.select("rid", "id", "source", "hash").join(F.broadcast(wanted), "rid").collect()
        }
    else:
        cols = [local.column(k).to_pylist() for k in ("rid", "id", "source", "hash")]
        names = {rid: (i, src or "", h) for rid, i, src, h in zip(*cols, strict=True)}
    removed = minhash.clusters(((e["a"], e["b"]) for e in edges), names)
    sizes: dict[int, int] = {}
    for keep in removed.values():
        sizes[keep] = sizes.get(keep, 1) + 1
    out = [
        (rid, keep, f"near-duplicate of {names[keep][0]} (cluster of {sizes[keep]})") for rid, keep in removed.items()
    ]
    log(f"near_dedup: {len(removed)} near duplicates removed from {len(sizes)} clusters")
    histogram: dict[str, int] = {}
    for n in sizes.values():
        histogram[str(n)] = histogram.get(str(n), 0) + 1
    return out, {
        "clusters": len(sizes),
        "documents_in_clusters": sum(sizes.values()),
        "largest_cluster": max(sizes.values()),
        "cluster_sizes": dict(sorted(histogram.items(), key=lambda kv: int(kv[0]))),
        "verified_pairs": len(edges),
        "lsh_candidates": int(ids.size),
    }


def _dedup_on_driver(spark, ok, data, log, phase):
    """Exact dedup, near dedup and the id check with the kept documents' keys collected to the
    driver (no text): ``(removed, n_removed, clusters)`` as :func:`_dedup_in_spark` answers.

    Orders are the Spark plans' (ascending, strings by UTF-8 bytes; the keys are never null for
    a kept document): exact dedup keeps the smallest (id, source, rid) of each content hash, near
    dedup runs :func:`_near_duplicates` over the survivors keyed by their content, and the id check
    keeps the smallest (hash, source, rid) of each id among what is left.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    nd = data.near_dedup
    cols = ["rid", "id", "source", "hash"]
    if nd.enabled:
        table = ok.select(*cols, "bands", F.length("shingles").alias("n")).toArrow()
    else:
        table = ok.select(*cols).toArrow()
    rids, ids, _, hashes = (table.column(k).to_pylist() for k in cols)
    removals: list[tuple[int, str, str, str]] = []  # (rid, step, reason, detail)
    alive = [True] * table.num_rows
    if data.dedup == "exact" or nd.enabled:
        # without the exact step, identical texts (Jaccard 1) are near-duplicates and removed as such
        step, reason = ("exact_dedup", "exact_duplicate") if data.dedup == "exact" else ("near_dedup", "near_duplicate")
        order = pc.sort_indices(table, [(k, "ascending") for k in ("hash", "id", "source", "rid")]).to_pylist()
        first_of: dict[str, str] = {}  # content hash -> the id of its first copy
        for i in order:
            if hashes[i] in first_of:
                alive[i] = False
                removals.append((rids[i], step, reason, f"duplicate of {first_of[hashes[i]]}"))
            else:
                first_of[hashes[i]] = ids[i]
        log(f"{step}: {len(removals)} exact duplicates (on the driver)")
    phase("exact_dedup")  # the collect of the keys included
    clusters = None
    if nd.enabled:
        keep = pa.array(alive, pa.bool_())  # typed: an empty list would make a null array
        survivors = table.filter(keep)
        nkeys = pa.array([int(h[:15], 16) for h in survivors.column("hash").to_pylist()], pa.int64())
        local = survivors.rename_columns(["doc_rid", "id", "source", "hash", "bands", "n"]).append_column("rid", nkeys)
        by_key = dict(zip(nkeys.to_pylist(), local.column("doc_rid").to_pylist(), strict=True))
        near, clusters = _near_duplicates(spark, ok, None, nd, log, None, local=local)
        position = {rid: i for i, rid in enumerate(rids)}
        for nkey, _, detail in near:
            alive[position[by_key[nkey]]] = False
            removals.append((by_key[nkey], "near_dedup", "near_duplicate", detail))
        phase("near_dedup")
    # an id naming two different texts would make the splits ambiguous: keep one, exclude the rest
    order = pc.sort_indices(table, [(k, "ascending") for k in ("id", "hash", "source", "rid")]).to_pylist()
    seen: set[str] = set()
    for i in order:
        if not alive[i]:
            continue
        if ids[i] in seen:
            removals.append((rids[i], "ids", "duplicate_id", "another document with different text has this id"))
        seen.add(ids[i])
    removed = spark.createDataFrame(
        pa.table(
            {
                "rid": pa.array([r[0] for r in removals], pa.int64()),
                "r_step": pa.array([r[1] for r in removals], pa.string()),
                "r_reason": pa.array([r[2] for r in removals], pa.string()),
                "r_detail": pa.array([r[3] for r in removals], pa.string()),
            }
        )
    ).persist(StorageLevel.MEMORY_AND_DISK)
    return removed, len(removals), clusters


def _dedup_in_spark(spark, docs, data, log, input_lines, phase):
    """Exact dedup, near dedup and the id check as Spark plans: ``(removed, n_removed, clusters)``,
    ``removed`` the persisted (rid, r_step, r_reason, r_detail) frame of every removal."""
    from pyspark import StorageLevel
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    nd = data.near_dedup
    ok = docs.filter(F.col("status") == "ok")
    removals = []  # small frames of (rid, step, reason, detail): only ids travel, never texts
    n_removed = 0
    if data.dedup == "exact" or nd.enabled:
        # keep the copy with the smallest id; source/rid break ties so reruns agree. Without the
        # exact step, identical texts (Jaccard 1) are near-duplicates and removed as such.
        step, reason = ("exact_dedup", "exact_duplicate") if data.dedup == "exact" else ("near_dedup", "near_duplicate")
        by_hash = Window.partitionBy("hash").orderBy("id", "source", "rid")
        exact = (
            ok.select("rid", "hash", "id", "source")
            .withColumn("_rn", F.row_number().over(by_hash))
            .withColumn("_first", F.first("id").over(by_hash))
            .filter(F.col("_rn") > 1)
            .select(
                "rid",
                F.lit(step).alias("step"),
                F.lit(reason).alias("reason"),
                F.concat(F.lit("duplicate of "), F.col("_first")).alias("detail"),
            )
        ).persist(StorageLevel.MEMORY_AND_DISK)
        removals.append(exact)
        n_removed = exact.count()
        log(f"{step}: {n_removed} exact duplicates")
        ok = ok.join(_small(exact.select("rid"), n_removed), "rid", "left_anti")
    clusters = None
    if nd.enabled:
        ok = ok.withColumn("nkey", F.conv(F.substring("hash", 1, 15), 16, 10).cast("long"))
        candidates = ok.select(F.col("nkey").alias("rid"), "id", "source", "hash", *NEAR_FIELDS)
        phase("exact_dedup")  # lazy until here: only what near-dedup needs of it is computed by then
        near, clusters = near_duplicates(spark, candidates, nd, log, max_docs=input_lines)
        phase("near_dedup")
        if near:
            import pyarrow as pa

            near_df = spark.createDataFrame(  # from Arrow: no per-row pickling
                pa.table(
                    {
                        "nkey": pa.array([nkey for nkey, _, _ in near], pa.int64()),
                        "step": pa.array(["near_dedup"] * len(near), pa.string()),
                        "reason": pa.array(["near_duplicate"] * len(near), pa.string()),
                        "detail": pa.array([detail for _, _, detail in near], pa.string()),
                    }
                )
            )
            near_keys = near_df.select("nkey")
            near_df = ok.select("rid", "nkey").join(_small(near_df, len(near)), "nkey").drop("nkey")
            removals.append(near_df)
            ok = ok.join(_small(near_keys, len(near)), "nkey", "left_anti")
            n_removed += len(near)
    # an id naming two different texts would make the splits ambiguous: keep one, exclude the rest
    by_id = Window.partitionBy("id").orderBy("hash", "source", "rid")
    removals.append(
        ok.select("rid", "id", "hash", "source")
        .withColumn("_rn", F.row_number().over(by_id))
        .filter(F.col("_rn") > 1)
        .select(
            "rid",
            F.lit("ids").alias("step"),
            F.lit("duplicate_id").alias("reason"),
            F.lit("another document with different text has this id").alias("detail"),
        )
    )
    removed = removals[0]
    for frame in removals[1:]:
        removed = removed.unionByName(frame)
    removed = (
        removed.withColumnRenamed("step", "r_step")
        .withColumnRenamed("reason", "r_reason")
        .withColumnRenamed("detail", "r_detail")
        .persist(StorageLevel.MEMORY_AND_DISK)  # ids only; used by each pass below
    )
    return removed, n_removed, clusters


def prepare(
    spark,
    inputs: list[str],
    data,
    output_tmp: Path,
    doc_steps: list,
    log=print,
    tokenizer=None,
    seq_len: int = 0,
    timings: dict[str, float] | None = None,
    lengths: dict[str, list[int]] | None = None,
) -> tuple[dict, dict | None]:
    """Run the pipeline on ``inputs`` and write the dataset files into ``output_tmp``.

    Every line gets exactly one outcome: blank, quarantined (malformed, step ``parse``),
    excluded (dropped by a step, with the reason) or kept in a split. The stats count
    each step's input, output and drops by reason; the job checks that they add up and
    that the files hold exactly what the stats say. ``timings`` receives the wall seconds of
    each phase (they go to ``_job.json``, never into the dataset version); ``lengths`` the kept
    documents' lengths in characters per split (the data card's; in no particular order).
    """
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from llmops_provider.data.steps import step_names
    from llmops_provider.data.tokenization import pack_version

    names = step_names(doc_steps, data)
    nd = data.near_dedup
    timings = {} if timings is None else timings
    phase_started = [time.time()]

    def phase(name: str) -> None:
        now = time.time()
        timings[name] = round(now - phase_started[0], 2)
        phase_started[0] = now

    # the raw bytes of each line (a cast keeps them as read), so invalid UTF-8 is seen, not replaced
    lines = spark.read.text(inputs).select(
        F.col("value").cast("binary").alias("raw"), F.col("_metadata.file_path").alias("source")
    )
    hasher = signing_s = None
    if nd.enabled:
        from llmops_provider.data import minhash

        hasher = minhash.MinHasher(nd.num_perm, nd.bands, nd.rows, nd.seed)
        signing_s = spark.sparkContext.accumulator(0.0)
    parts_max = int(spark.conf.get("spark.llmops.write.localPartsMaxRows", str(LOCAL_PARTS_MAX_ROWS)))
    text_dir = where_texts = None
    if spark.sparkContext.master.startswith("local") and parts_max > 0:
        # one machine, one disk: the tasks leave the texts there and Spark carries only where they are
        # (removed at the end; a failed run's whole temporary output is removed by the caller)
        text_dir = output_tmp / "_texts"
        text_dir.mkdir()
        where_texts = str(text_dir)
    docs = lines.mapInArrow(
        lambda batches: document_pass(batches, data, doc_steps, hasher, signing_s, where_texts), _doc_schema()
    ).withColumn("rid", F.monotonically_increasing_id())
    docs = docs.persist(StorageLevel.MEMORY_AND_DISK)
    input_lines = docs.count()
    log(f"document steps done: {input_lines} lines")
    phase("documents")
    if signing_s is not None:  # task seconds (summed over the parallel tasks) of MinHash signing
        timings["near_dedup_signing_task_s"] = round(signing_s.value, 2)

    ok = docs.filter(F.col("status") == "ok")
    dedup_max = int(spark.conf.get("spark.llmops.lsh.localMaxRows", str(LOCAL_LSH_MAX_ROWS)))
    if (data.dedup == "exact" or nd.enabled) and 0 < dedup_max and input_lines * max(1, nd.bands) <= dedup_max:
        # small enough for the driver: one collect of the kept documents' keys (no text), then exact
        # dedup, LSH, clustering and the id check there; verification fetches only the candidates'
        # shingle sets. Same decisions as the Spark plans (the integration test runs both ways).
        removed, n_removed, clusters = _dedup_on_driver(spark, ok, data, log, phase)
    else:
        removed, n_removed, clusters = _dedup_in_spark(spark, docs, data, log, input_lines, phase)

    # the split depends on the content alone: a document never moves between splits across runs
    train_cut = data.splits["train"]
    validation_cut = train_cut + data.splits["validation"]
    bucket = F.conv(F.substring("hash", 1, 8), 16, 10).cast("double") / float(16**8)
    split = F.when(bucket < train_cut, "train").when(bucket < validation_cut, "validation").otherwise("test")
    is_removed = F.col("r_step").isNotNull()
    outcome = (
        docs.drop(*NEAR_FIELDS)
        .join(_small(removed, n_removed), "rid", "left")
        .withColumn("status", F.when(is_removed, "excluded").otherwise(F.col("status")))
        .withColumn("step", F.when(is_removed, F.col("r_step")).otherwise(F.col("step")))
        .withColumn("reason", F.when(is_removed, F.col("r_reason")).otherwise(F.col("reason")))
        .withColumn("detail", F.when(is_removed, F.col("r_detail")).otherwise(F.col("detail")))
        .withColumn(
            "file",
            F.when(F.col("status") == "ok", split)
            .when(F.col("status") == "quarantined", "quarantine")
            .when(F.col("status") == "excluded", "excluded"),
        )
        .drop("r_step", "r_reason", "r_detail")
    )  # not cached: a broadcast join over the cached documents, cheaper to redo than to copy every text

    # one sorted pass: documents by id within each split, exclusions by step order and id,
    # quarantine by source, reason and line
    order = F.create_map(*[x for i, n in enumerate(names) for x in (F.lit(n), F.lit(i))])
    key1 = F.when(F.col("file") == "excluded", order[F.col("step")]).otherwise(F.lit(0))
    key2 = F.when(F.col("file") == "quarantine", F.col("source")).otherwise(F.col("id"))
    sort_keys = ("file", key1, key2, "reason", "source", "line", "hash")
    via_files = text_dir is not None and input_lines <= parts_max
    stats = None
    if not via_files:
        counts = (
            outcome.groupBy("status", "step", "reason", "file")
            .agg(F.count("*").alias("n"), F.sum("chars").alias("chars"))
            .collect()
        )
        # a removal by dedup or ids never changes a text: the document pass alone knows the modifications
        modified = dict(docs.select(F.explode("modified").alias("step")).groupBy("step").count().collect())
        stats = _stats(counts, modified, names, input_lines)
        log(f"outcomes counted: {stats['kept']} kept, {stats['excluded']} excluded, {stats['quarantined']} quarantined")
        phase("outcomes")
    files = (*SPLITS, "quarantine", "excluded")
    cols = ("file", "id", "text", "line", "step", "reason", "detail", "source")
    handles = {n: (output_tmp / f"{n}.jsonl").open("wb") for n in files}  # UTF-8 JSON lines
    written = dict.fromkeys(files, 0)
    try:
        if via_files:
            # the texts already sit on this machine's disk as JSON strings: the driver collects every
            # line's sort keys, outcome and text location (no text), sorts them and writes each line
            # from its fields and its text's bytes (no shuffle of the texts, no Python tasks); the
            # counts come from the same table: no pass of their own
            keyed = outcome.select(*cols, "status", "chars", "modified", *TEXT_AT, key1.alias("_k1"),
                                   key2.alias("_k2"), "hash")  # fmt: skip
            outcomes = _write_from_texts(keyed, handles, written)
            where = "from the texts on disk"
        else:
            # the driver writes the files one sorted partition at a time: size partitions so that one
            # partition (a task result held in the driver's heap) stays small whatever the corpus size
            total_chars = sum((r["chars"] or 0) for r in counts)
            n_parts = max(spark.sparkContext.defaultParallelism, -(-total_chars // OUTPUT_PARTITION_CHARS))
            rows = (
                outcome.filter(F.col("file").isNotNull())
                .repartitionByRange(n_parts, *sort_keys)
                .sortWithinPartitions(*sort_keys)
            )
            # the tasks encode the JSON lines (in parallel, order kept); the driver only appends them,
            # fetching the next sorted partition while it writes this one (two partitions in memory)
            lines = rows.select(*cols, *TEXT_AT).mapInArrow(_encode_records, "file string, json binary")
            for r in lines.toLocalIterator(prefetchPartitions=True):
                handles[r[0]].write(r[1])
                written[r[0]] += 1
            where = f"sorted in Spark ({n_parts} partitions)"
    finally:
        for fh in handles.values():
            fh.close()
    if lengths is not None:
        kept_chars = (
            outcomes if via_files else outcome.filter(F.col("status") == "ok").select("file", "chars").toArrow()
        )
        lengths.update(_split_lengths(kept_chars))
    if stats is None:
        stats = _stats(*_counts(outcomes), names, input_lines)
        log(f"outcomes counted: {stats['kept']} kept, {stats['excluded']} excluded, {stats['quarantined']} quarantined")
    log(f"wrote {sum(written.values())} records ({where}): {written}")
    phase("write")
    if clusters is not None:
        stats["near_dedup"] = {
            **clusters,
            "threshold": nd.threshold,
            "num_perm": nd.num_perm,
            "bands": nd.bands,
            "rows": nd.rows,
            "shingle_size": nd.shingle_size,
        }
    _check_accounting(stats, written)
    packed = None
    if tokenizer is not None and tokenizer.pack:
        kept = outcome.filter(F.col("status") == "ok").withColumnRenamed("file", "split")
        if text_dir is not None:
            kept = kept.select("split", "id", *TEXT_AT).mapInArrow(_read_texts, "split string, id string, text string")
        packed = pack_version(spark, kept, output_tmp, tokenizer, seq_len, log)
        counted = ("documents", "document_tokens", "blocks", "tokens", "dropped_tail_tokens")
        stats["tokens"] = {s: {k: v[k] for k in counted} for s, v in packed["splits"].items()}
        phase("tokenize")
    removed.unpersist()
    docs.unpersist()
    if text_dir is not None:
        shutil.rmtree(text_dir)
    return stats, packed


# the sort keys of the output lines, in ``prepare``'s order (``_k1``/``_k2`` as it computes them)
_SORT_KEYS = ("file", "_k1", "_k2", "reason", "source", "line", "hash")


def _write_from_texts(keyed, handles: dict, written: dict):
    """The output files from the texts the document pass left on disk (local masters); returns
    every line's outcome (an Arrow table: status, step, reason, file, chars, modified).

    The order is Spark's ascending sort of the same keys: nulls first, strings by their UTF-8
    bytes, so this path writes the bytes the shuffle-and-sort path writes (the integration test
    compares them).
    """
    import pyarrow.compute as pc

    table = keyed.toArrow()
    order = pc.sort_indices(table, sort_keys=[(n, "ascending", "at_start") for n in _SORT_KEYS])
    placed = table.take(order)
    with TextReader() as reader:
        for batch in placed.to_batches(max_chunksize=8192):
            for name, line in zip(batch.column("file").to_pylist(), _json_lines(batch, reader), strict=True):
                if name is None:  # a blank line: counted, written nowhere
                    continue
                handles[name].write(line)
                written[name] += 1
    return table.select(["status", "step", "reason", "file", "chars", "modified"])


def _counts(outcomes) -> tuple[list[dict], dict]:
    """The outcome counts (the Spark aggregation's rows) and the modifications per step, from
    :func:`_write_from_texts`'s table."""
    import pyarrow.compute as pc

    keys = ["status", "step", "reason", "file"]
    grouped = outcomes.group_by(keys, use_threads=False).aggregate([("status", "count"), ("chars", "sum")])
    counts = [{**{k: row[k] for k in keys}, "n": row["status_count"], "chars": row["chars_sum"]}
              for row in grouped.to_pylist()]  # fmt: skip
    steps = pc.value_counts(pc.list_flatten(outcomes.column("modified")))
    modified = dict(zip(steps.field("values").to_pylist(), steps.field("counts").to_pylist(), strict=True))
    return counts, modified


def _split_lengths(table) -> dict[str, list[int]]:
    """The ``chars`` of the kept rows (``file`` a split) of an Arrow table, per split."""
    import pyarrow.compute as pc

    return {split: table.filter(pc.equal(table["file"], split))["chars"].to_pylist() for split in SPLITS}


def _encode_records(batches):
    """Arrow batches of output rows -> (file, JSON line with its newline), in the same order."""
    import pyarrow as pa

    schema = pa.schema([("file", pa.string()), ("json", pa.binary())])
    with TextReader() as reader:
        for batch in batches:
            lines = _json_lines(batch, reader)
            yield pa.RecordBatch.from_arrays([batch.column("file"), pa.array(lines, pa.binary())], schema=schema)


def _json_lines(batch, reader: TextReader | None = None) -> list[bytes]:
    """The UTF-8 JSON line (with its newline) that each row of ``batch`` gets in its output file
    (b"" for a blank line, which goes to no file): ``json.dumps`` of the record, ``text`` last, taken
    from the row or, where the row says where it sits (``TEXT_AT``), from the disk with ``reader``.
    """
    names = ["file", "id", "text", "line", "step", "reason", "detail", "source"]
    names += [n for n in TEXT_AT if n in batch.schema.names]
    out = []
    for r in batch.select(names).to_pylist():
        if r["file"] is None:
            out.append(b"")
            continue
        if r["file"] == "quarantine":
            rec = {"line": r["line"], "reason": r["reason"], "source": r["source"]}
            out.append((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
            continue
        if r["file"] == "excluded":
            head = {
                "id": r["id"],
                "step": r["step"],
                "reason": r["reason"],
                "detail": r["detail"],
                "source": r["source"],
            }
        else:
            head = {"id": r["id"]}
        if r.get("text_part") is None:
            text = json.dumps(r["text"], ensure_ascii=False).encode("utf-8")
        else:
            text = reader.json(r["text_part"], r["text_offset"], r["text_size"])
        # json.dumps({**head, "text": text}) without decoding and re-encoding the text
        out.append(json.dumps(head, ensure_ascii=False)[:-1].encode("utf-8") + b', "text": ' + text + b"}\n")
    return out


def _read_texts(batches):
    """Arrow batches of (split, id, text location) -> (split, id, text): the tokenizer's input."""
    import pyarrow as pa

    schema = pa.schema([("split", pa.string()), ("id", pa.string()), ("text", pa.string())])
    with TextReader() as reader:
        for batch in batches:
            where = zip(*(batch.column(n).to_pylist() for n in TEXT_AT), strict=True)
            texts = [reader.text(*at) for at in where]
            yield pa.RecordBatch.from_arrays([batch.column("split"), batch.column("id"), pa.array(texts, pa.string())],
                                             schema=schema)  # fmt: skip


def _stats(counts, modified: dict, names: list[str], input_lines: int) -> dict:
    """Per-step in/out/dropped-by-reason from the outcome counts (steps chain: out of one = in of the next)."""
    per_split = {s: {"docs": 0, "chars": 0} for s in SPLITS}
    dropped: dict[str, dict[str, int]] = {n: {} for n in names}
    blank = 0
    for row in counts:
        if row["status"] == "blank":
            blank += int(row["n"])
        elif row["status"] == "ok":
            per_split[row["file"]] = {"docs": int(row["n"]), "chars": int(row["chars"] or 0)}
        else:
            step_drops = dropped.setdefault(row["step"], {})
            step_drops[row["reason"]] = step_drops.get(row["reason"], 0) + int(row["n"])
    steps, flowing = [], input_lines - blank
    for name in names:
        out = flowing - sum(dropped[name].values())
        steps.append(
            {
                "step": name,
                "in": flowing,
                "out": out,
                "dropped": dict(sorted(dropped[name].items())),
                "modified": int(modified.get(name, 0)),
            }
        )
        flowing = out
    kept = sum(s["docs"] for s in per_split.values())
    quarantined_by_reason = dropped["parse"]
    excluded_by_step = {n: sum(d.values()) for n, d in dropped.items() if n != "parse" and d}
    return {
        "input_lines": input_lines,
        "blank_lines": blank,
        "kept": kept,
        "quarantined": sum(quarantined_by_reason.values()),
        "quarantined_by_reason": dict(sorted(quarantined_by_reason.items())),
        "excluded": sum(excluded_by_step.values()),
        "excluded_by_step": excluded_by_step,
        "duplicates_removed": sum(dropped.get("exact_dedup", {}).values())
        + sum(dropped.get("near_dedup", {}).values()),
        "steps": steps,
        "splits": per_split,
    }


def _check_accounting(stats: dict, written: dict) -> None:
    """input = blank + quarantined + excluded + kept, per step and in the files; else refuse to publish."""
    problems = []
    if stats["steps"][-1]["out"] != stats["kept"]:
        problems.append(f"last step keeps {stats['steps'][-1]['out']} but the splits hold {stats['kept']}")
    total = stats["blank_lines"] + stats["quarantined"] + stats["excluded"] + stats["kept"]
    if total != stats["input_lines"]:
        problems.append(f"{stats['input_lines']} input lines but {total} outcomes")
    if written["quarantine"] != stats["quarantined"] or written["excluded"] != stats["excluded"]:
        problems.append(f"wrote {written} for {stats['quarantined']} quarantined, {stats['excluded']} excluded")
    if sum(written[s] for s in SPLITS) != stats["kept"]:
        problems.append(f"wrote {written} for {stats['kept']} kept")
    if problems:
        raise RuntimeError(
            f"record accounting is off: {'; '.join(problems)}; refusing to publish a dataset that lost records"
        )


def _replace_dir(tmp: Path, final: Path) -> None:
    """Swap ``tmp`` into ``final`` so readers never see a half-written directory."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _ship_modules(spark, scratch: Path) -> None:
    """Send ``llmops_provider.data`` to the executors of a cluster (they may not have the provider).

    Only the package marker and the data modules travel (no Airflow code). Local masters share
    this machine's ``PYTHONPATH`` and need nothing.
    """
    if spark.sparkContext.master.startswith("local"):
        return
    here = Path(__file__).resolve().parent
    archive = scratch / "llmops_data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(here.parent / "__init__.py", "llmops_provider/__init__.py")
        for path in sorted(here.glob("*.py")):
            zf.write(path, f"llmops_provider/data/{path.name}")
    spark.sparkContext.addPyFile(str(archive))


def _import_plotting() -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    except Exception:  # noqa: BLE001 - only a head start: the data card imports it again and reports
        pass


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if str(REPO) not in sys.path:  # submitted from a checkout without the provider installed
        sys.path.insert(0, str(REPO))
    from llmops_provider.data.data_card import write_data_card
    from llmops_provider.data.steps import build_steps
    from llmops_provider.recipes import load_recipe  # pure pydantic

    recipe = load_recipe(args.recipe)
    doc_steps = build_steps(recipe.data, os.environ.get("LLMOPS_HOME"))  # reads the blocklist file here, once
    inputs = resolve_inputs(args.input)
    output = Path(args.output).expanduser().resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()

    started = time.time()
    # the data card's plotting library loads while the JVM starts (a core is mostly idle then)
    threading.Thread(target=_import_plotting, name="import-matplotlib", daemon=True).start()
    spark = _spark_session(args.master, f"llmops-prepare-{recipe.name}")
    spark.sparkContext.setLogLevel("WARN")
    scratch = Path(tempfile.mkdtemp(prefix="llmops-prepare-"))
    _ship_modules(spark, scratch)
    try:
        log = lambda m: print(f"prepare_corpus: [{time.time() - started:6.1f}s] {m}", flush=True)  # noqa: E731
        timings: dict[str, float] = {}
        lengths: dict[str, list[int]] = {}
        stats, packed = prepare(
            spark,
            inputs,
            recipe.data,
            tmp,
            doc_steps,
            log,
            tokenizer=recipe.tokenizer,
            seq_len=recipe.training.seq_len,
            timings=timings,
            lengths=lengths,
        )
        stats = {"recipe": recipe.name, "recipe_fingerprint": recipe.fingerprint(), "input_files": inputs, **stats}
        write_data_card(tmp, stats, packed, lengths)
        job = {
            "spark_app_id": spark.sparkContext.applicationId,
            "master": spark.sparkContext.master,
            "spark_version": spark.version,
            "driver_java_options": spark.sparkContext.getConf().get("spark.driver.extraJavaOptions", None),
            "started_at": started,
            "duration_s": round(time.time() - started, 3),
            "timings_s": timings,
        }
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
        (tmp / "_job.json").write_text(json.dumps(job, indent=2, sort_keys=True) + "\n")
        _replace_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        spark.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    print(
        f"prepare_corpus: {stats['input_lines']} lines -> {stats['kept']} kept, {stats['quarantined']} quarantined "
        f"{stats['quarantined_by_reason']}, {stats['excluded']} excluded {stats['excluded_by_step']}; "
        f"splits {json.dumps(stats['splits'])}; app {job['spark_app_id']}; output {output}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
