"""Prepare a text corpus for training: parse, quarantine, normalize, deduplicate, split.

    spark-submit spark_jobs/prepare_corpus.py --input DIR_OR_FILE [--input ...] \
        --output STAGING_DIR --recipe RECIPE.yaml
    python spark_jobs/prepare_corpus.py ... [--master local[2]]

Reads JSONL as plain text so that no line is lost to a lenient JSON reader: every input
line ends up kept, quarantined with a reason, counted as a removed duplicate, or counted
as blank, and the job checks that these add up. Output is the dataset-version layout of
docs/architecture.md, written to a temporary sibling directory and renamed into place:

    train.jsonl validation.jsonl test.jsonl   {"id", "text"} per line, sorted by id
    quarantine.jsonl                          {"line", "reason", "source"}
    stats.json                                counts (deterministic: same input, same bytes)
    _job.json                                 this run's provenance (spark_app_id, master, timing)

Run-specific values live in ``_job.json`` rather than ``stats.json``: a leading underscore
marks a file as not part of the dataset (the Hadoop convention the dataset store follows),
so re-running on the same input produces an identical dataset tree and no new commit.

Needs ``llmops_provider`` importable (the operator puts the repo on PYTHONPATH); imports
nothing from the provider but the pure-pydantic recipe module.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import time
import unicodedata
import uuid
from pathlib import Path

QUARANTINE_REASONS = (
    "invalid_json",  # the line does not parse as JSON
    "not_an_object",  # valid JSON, but not a {...} record
    "missing_text",  # no text field, or it is null
    "text_not_string",  # the text field is a number, list, ...
    "bad_id",  # the id field is a list/object/bool
    "text_too_short",  # normalized text shorter than data.min_chars
    "text_too_long",  # normalized text longer than data.max_chars
    "duplicate_id",  # another kept document with different text has this id
)
SPLITS = ("train", "validation", "test")

# Cc controls except \t and \n; \r is folded into \n before this runs.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_INLINE_WS = re.compile(r"[^\S\n]+")
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalize(text: str) -> str:
    """NFC, no control characters, whitespace collapsed within lines, at most one blank line."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = "\n".join(_INLINE_WS.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n\n", text).strip()


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def parse_line(line: str, text_field: str, id_field: str | None, min_chars: int, max_chars: int):
    """One raw line -> (id, text, hash, reason); ``reason`` is None when the record is kept.

    A missing id is derived from the content hash, so records without ids still get a
    stable identity.
    """
    try:
        record = json.loads(line)
    except ValueError:
        return None, None, None, "invalid_json"
    if not isinstance(record, dict):
        return None, None, None, "not_an_object"
    text = record.get(text_field)
    if text is None:
        return None, None, None, "missing_text"
    if not isinstance(text, str):
        return None, None, None, "text_not_string"
    raw_id = record.get(id_field) if id_field else None
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int, float, type(None))):
        return None, None, None, "bad_id"
    text = normalize(text)
    if len(text) < min_chars:
        return None, None, None, "text_too_short"
    if len(text) > max_chars:
        return None, None, None, "text_too_long"
    digest = content_hash(text)
    doc_id = str(raw_id) if raw_id is not None and str(raw_id).strip() else f"doc-{digest[:16]}"
    return doc_id, text, digest, None


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


def _spark_session(master: str | None, app_name: str):
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(app_name)
    if master:
        builder = builder.master(master)
    elif "PYSPARK_GATEWAY_PORT" not in os.environ:  # plain `python`, not spark-submit
        builder = builder.master("local[*]")
    spark = builder.getOrCreate()
    sc = spark.sparkContext
    if sc.master.startswith("local") and not sc.getConf().contains("spark.sql.shuffle.partitions"):
        # 200 shuffle partitions on one machine is mostly per-task overhead
        spark.conf.set("spark.sql.shuffle.partitions", str(max(2, 2 * sc.defaultParallelism)))
    return spark


def prepare(spark, inputs: list[str], data, output_tmp: Path) -> dict:
    """Run the pipeline on ``inputs`` and write the dataset files into ``output_tmp``.

    Every line gets exactly one status (blank, quarantined, duplicate, kept); one
    aggregation counts them and one sorted pass streams the files to the driver.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    text_field, id_field = data.text_field, data.id_field
    min_chars, max_chars = data.min_chars, data.max_chars
    result_type = T.StructType([T.StructField(n, T.StringType()) for n in ("id", "text", "hash", "reason")])

    # closes over plain values and this file's functions only: executors need nothing from the repo
    @F.udf(returnType=result_type, useArrow=False)
    def parse(line):
        return parse_line(line, text_field, id_field, min_chars, max_chars)

    lines = spark.read.text(inputs).select(F.col("value").alias("line"), F.col("_metadata.file_path").alias("source"))
    input_lines = lines.count()  # counted before any processing: the accounting check below relies on it

    blank = F.trim(F.col("line")) == ""
    parsed = (
        lines.filter(~blank)
        .withColumn("p", parse(F.col("line")))
        .select("line", "source", "p.id", "p.text", "p.hash", "p.reason")
        .cache()  # the UDF runs once per line, not once per branch below
    )
    rejected = parsed.filter(F.col("reason").isNotNull()).withColumn("status", F.lit("quarantined"))
    docs = parsed.filter(F.col("reason").isNull())

    if data.dedup == "exact":
        # keep the copy with the smallest id; source/line break ties so reruns agree
        by_hash = Window.partitionBy("hash").orderBy("id", "source", "line")
        docs = docs.withColumn("status", F.when(F.row_number().over(by_hash) > 1, "duplicate"))
    else:
        docs = docs.withColumn("status", F.lit(None).cast("string"))
    # an id naming two different texts would make the splits ambiguous: keep one, quarantine the rest
    unique = docs.filter(F.col("status").isNull())
    by_id = Window.partitionBy("id").orderBy("hash", "source", "line")
    unique = unique.withColumn("_rn", F.row_number().over(by_id))
    unique = unique.withColumn("reason", F.when(F.col("_rn") > 1, "duplicate_id")).withColumn(
        "status", F.when(F.col("_rn") > 1, "quarantined").otherwise("kept")
    ).drop("_rn")

    # the split depends on the content alone: a document never moves between splits across runs
    train_cut = data.splits["train"]
    validation_cut = train_cut + data.splits["validation"]
    bucket = F.conv(F.substring("hash", 1, 8), 16, 10).cast("double") / float(16**8)
    split = F.when(bucket < train_cut, "train").when(bucket < validation_cut, "validation").otherwise("test")
    outcome = (
        rejected.unionByName(docs.filter(F.col("status") == "duplicate"))
        .unionByName(unique)
        .withColumn("file", F.when(F.col("status") == "kept", split).when(F.col("status") == "quarantined", "quarantine"))
        .cache()
    )

    counts = outcome.groupBy("status", "reason", "file").agg(
        F.count("*").alias("n"), F.sum(F.length("text")).alias("chars")
    ).collect()
    per_split = {s: {"docs": 0, "chars": 0} for s in SPLITS}
    by_reason: dict[str, int] = {}
    duplicates_removed = 0
    for row in counts:
        if row["status"] == "kept":
            per_split[row["file"]] = {"docs": int(row["n"]), "chars": int(row["chars"] or 0)}
        elif row["status"] == "quarantined":
            by_reason[row["reason"]] = by_reason.get(row["reason"], 0) + int(row["n"])
        else:
            duplicates_removed += int(row["n"])
    kept = sum(s["docs"] for s in per_split.values())
    quarantined = sum(by_reason.values())
    blank_lines = input_lines - sum(int(row["n"]) for row in counts)

    # one sorted pass: documents by id within each split, quarantine by source, reason, line
    key = F.when(F.col("status") == "kept", F.col("id")).otherwise(F.col("source"))
    rows = outcome.filter(F.col("file").isNotNull()).orderBy("file", key, "reason", "line")
    handles = {name: (output_tmp / f"{name}.jsonl").open("w", encoding="utf-8", newline="\n") for name in (*SPLITS, "quarantine")}
    written = 0
    try:
        for r in rows.select("file", "id", "text", "line", "reason", "source").toLocalIterator(prefetchPartitions=True):
            rec = {"id": r["id"], "text": r["text"]} if r["file"] != "quarantine" else {"line": r["line"], "reason": r["reason"], "source": r["source"]}
            handles[r["file"]].write(json.dumps(rec, ensure_ascii=False) + "\n")
            written += 1
    finally:
        for fh in handles.values():
            fh.close()
    outcome.unpersist()
    parsed.unpersist()

    blank_check = lines.filter(blank).count()
    if blank_lines != blank_check or written != kept + quarantined:
        raise RuntimeError(
            f"line accounting is off: {input_lines} input lines, {blank_check} blank, {quarantined} quarantined, "
            f"{duplicates_removed} duplicates, {kept} kept, {written} written; refusing to publish a dataset that lost records"
        )
    return {
        "input_files": inputs,
        "input_lines": input_lines,
        "blank_lines": blank_lines,
        "kept": kept,
        "quarantined": quarantined,
        "quarantined_by_reason": dict(sorted(by_reason.items())),
        "duplicates_removed": duplicates_removed,
        "dedup": data.dedup,
        "splits": per_split,
    }


def _replace_dir(tmp: Path, final: Path) -> None:
    """Swap ``tmp`` into ``final`` so readers never see a half-written directory."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        from llmops_provider.recipes import load_recipe  # pure pydantic
    except ImportError:  # run from a checkout without PYTHONPATH: the package sits next to spark_jobs/
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from llmops_provider.recipes import load_recipe

    recipe = load_recipe(args.recipe)
    inputs = resolve_inputs(args.input)
    output = Path(args.output).expanduser().resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()

    started = time.time()
    spark = _spark_session(args.master, f"llmops-prepare-{recipe.name}")
    spark.sparkContext.setLogLevel("WARN")
    try:
        stats = prepare(spark, inputs, recipe.data, tmp)
        stats = {"recipe": recipe.name, "recipe_fingerprint": recipe.fingerprint(), **stats}
        job = {
            "spark_app_id": spark.sparkContext.applicationId,
            "master": spark.sparkContext.master,
            "spark_version": spark.version,
            "started_at": started,
            "duration_s": round(time.time() - started, 3),
        }
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
        (tmp / "_job.json").write_text(json.dumps(job, indent=2, sort_keys=True) + "\n")
        _replace_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        spark.stop()

    print(
        f"prepare_corpus: {stats['input_lines']} lines -> {stats['kept']} kept, {stats['quarantined']} quarantined "
        f"{stats['quarantined_by_reason']}, {stats['duplicates_removed']} duplicates removed; "
        f"splits {json.dumps(stats['splits'])}; app {job['spark_app_id']}; output {output}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
