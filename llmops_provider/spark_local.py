"""Spark settings for short jobs on a local master, where the driver JVM is also the executor.

The data job on one machine is mostly Python (the document steps) plus JVM work that runs
once: start-up and Spark's generated code. HotSpot's optimizing compiler (C2) spends more CPU
compiling that code than it saves over a run of a minute or two, and on a small machine it
takes those cores from the Python workers: on the 2-core benchmark it used 18 of the JVM's
47 CPU seconds. The quick compiler alone (C1) and the parallel collector took the run from
~59 s to ~45 s (docs/data.md, "Performance"). Long-lived cluster executors keep the JVM's
defaults: there C2's faster code pays off.

Start-up itself is mostly loading and verifying Spark's classes: ~5 CPU seconds on the
thread that builds the SQL session and plans the first job. A class-data-sharing archive
(JDK CDS, ``-XX:SharedArchiveFile``) maps them pre-parsed and pre-verified instead: ~4 s less
per run on the benchmark. :func:`build_cds_archive` makes one per machine (``make setup``
does; ``python -m llmops_provider.spark_local --build-cds`` by hand, ~45 s once); local
masters use it whenever it exists (~180 MB in ``~/.cache/llmops``, one per Spark installation).
It is keyed by the Spark and Java installations, so an upgrade of either simply finds none (and
the JVM itself ignores an archive that does not match its class path, loading the classes).
An archive is used only once it was checked (a driver started with ``-Xshare:on`` mapped it)
and sealed with its size: a JDK 17 JVM dies of SIGBUS on a truncated one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

LOCAL_DRIVER_JAVA_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:+UseParallelGC"
JAVA_OPTIONS_KEY = "spark.driver.extraJavaOptions"
CDS_VERSION = 1  # bump when the warm-up job changes what the archive should hold


def is_local(master: str | None) -> bool:
    return (master or "").startswith("local")


def local_java_options() -> str:
    """The driver JVM options of a local run: :data:`LOCAL_DRIVER_JAVA_OPTIONS`, plus this machine's
    class-data-sharing archive when there is a complete one."""
    archive = cds_archive_path()
    if archive is not None and archive_recorded(archive):
        return f"{LOCAL_DRIVER_JAVA_OPTIONS} -XX:SharedArchiveFile={archive}"
    return LOCAL_DRIVER_JAVA_OPTIONS


def local_defaults(master: str | None, conf: dict) -> dict:
    """``conf`` plus the local JVM options when ``master`` is local and ``conf`` sets none."""
    if is_local(master) and JAVA_OPTIONS_KEY not in conf:
        return {**conf, JAVA_OPTIONS_KEY: local_java_options()}
    return conf


# --------------------------------------------------------------------------- class data sharing


def spark_home() -> Path | None:
    """``$SPARK_HOME``, else the pyspark package of this interpreter (pip's pyspark is a Spark home)."""
    if os.environ.get("SPARK_HOME"):
        return Path(os.environ["SPARK_HOME"])
    import importlib.util

    spec = importlib.util.find_spec("pyspark")  # finds, does not import
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).parent


def java_binary() -> Path | None:
    """The ``java`` that spark-submit runs: ``$JAVA_HOME/bin/java``, else the one on ``PATH``."""
    if os.environ.get("JAVA_HOME"):
        candidate = Path(os.environ["JAVA_HOME"]) / "bin" / "java"
        return candidate.resolve() if candidate.is_file() else None
    found = shutil.which("java")
    return Path(found).resolve() if found else None


def cds_archive_path() -> Path | None:
    """Where this machine keeps the archive for this Spark and this Java (``$XDG_CACHE_HOME`` or
    ``~/.cache``, under ``llmops/``); None when either is missing or no home directory is known."""
    home, java = spark_home(), java_binary()
    try:
        if home is None or java is None:
            return None
        jars = home / "jars"
        # the JVM itself (a JDK update replaces it): bin/java is only its launcher
        jvm = [p for p in (java.parent.parent / "lib" / "server" / "libjvm.so", java) if p.is_file()][0]
        jvm_stat = jvm.stat()
        key = "\n".join(
            [
                str(CDS_VERSION),
                str(home.resolve()),
                str(jvm),
                f"{jvm_stat.st_size}:{jvm_stat.st_mtime_ns}",
                # the class path the archive was made from: the JVM checks it too, this only names it
                *sorted(f"{p.name}:{p.stat().st_size}" for p in jars.glob("*.jar")),
            ]
        )
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except (OSError, RuntimeError):
        return None
    return base / "llmops" / f"spark-cds-{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsa"


def _seal_path(archive: Path) -> Path:
    return archive.with_suffix(".json")


def archive_recorded(archive: Path) -> bool:
    """``archive`` is there and is the file :func:`build_cds_archive` checked and sealed (same size
    and time). A truncated archive must never reach a JVM: JDK 17 dies of SIGBUS mapping one."""
    try:
        seal = json.loads(_seal_path(archive).read_text())
        st = archive.stat()
    except (OSError, ValueError):
        return False
    return seal == {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


# A local driver that must map ``archive`` (-Xshare:on: the JVM refuses to start otherwise).
_CHECK = r"""
import sys
from pyspark.sql import SparkSession
spark = (SparkSession.builder.master("local[1]").config("spark.ui.enabled", "false")
         .config("spark.driver.extraJavaOptions", sys.argv[1]).getOrCreate())
print("rows", spark.range(5).count())
spark.stop()
"""


def check_cds_archive(archive: Path, timeout_s: float = 300) -> tuple[bool, str]:
    """Start a local Spark driver that must map ``archive``: (it did, the output's tail)."""
    options = f"{LOCAL_DRIVER_JAVA_OPTIONS} -XX:SharedArchiveFile={archive} -Xshare:on"
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    env.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    done = subprocess.run([sys.executable, "-c", _CHECK, options], env=env, capture_output=True, text=True,
                          timeout=timeout_s)  # fmt: skip
    tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
    return done.returncode == 0 and "rows 5" in done.stdout, tail


# The warm-up job the archive is recorded from: the DataFrame operations the data and
# tokenization jobs use (text and Parquet sources, Arrow UDFs, a cache, a broadcast join,
# aggregations, a range sort, collects to Arrow and to an iterator). Classes it does not touch
# still load normally.
_WARMUP = r"""
import os, sys
import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import SparkSession, functions as F

spark = SparkSession.builder.getOrCreate()
spark.sparkContext.setLogLevel("ERROR")
work = sys.argv[1]
with open(os.path.join(work, "a.jsonl"), "w") as fh:
    fh.writelines('{"id": "%d", "text": "warm up %d"}\n' % (i, i % 7) for i in range(2000))

def parse(batches):
    for b in batches:
        raws = b.column(0).to_pylist()
        yield pa.RecordBatch.from_pydict({"n": [len(r) for r in raws], "k": [r[-3:].decode() for r in raws],
                                          "source": b.column(1), "tags": [["a"] for _ in raws]})

lines = spark.read.text(work).select(F.col("value").cast("binary").alias("raw"),
                                     F.col("_metadata.file_path").alias("source"))
docs = lines.mapInArrow(parse, "n long, k string, source string, tags array<string>").withColumn(
    "rid", F.monotonically_increasing_id()).persist(StorageLevel.MEMORY_AND_DISK)
docs.count()
small = spark.createDataFrame(pa.table({"rid": pa.array([1, 2], pa.int64()), "why": pa.array(["x", "y"])}))
out = docs.join(F.broadcast(small), "rid", "left").withColumn(
    "file", F.when(F.col("why").isNotNull(), "excluded").otherwise(F.lit("train")))
out.groupBy("file", "k").agg(F.count("*").alias("c"), F.sum("n").alias("s")).collect()
docs.select(F.explode("tags").alias("t")).groupBy("t").count().collect()
out.select("rid", "k", F.conv(F.substring("k", 1, 2), 16, 10).alias("b")).toArrow()
order = F.create_map(F.lit("train"), F.lit(0), F.lit("excluded"), F.lit(1))
ranged = out.withColumn("o", order[F.col("file")]).repartitionByRange(2, "file", "o", "k").sortWithinPartitions(
    "file", "o", "k")
for _ in ranged.select("file", "k").mapInArrow(lambda it: it, "file string, k string").toLocalIterator(
        prefetchPartitions=True):
    pass
for _ in out.select("file", "k").orderBy("file", "k").toLocalIterator(prefetchPartitions=True):
    pass
out.select("rid", "n", "k").write.parquet(os.path.join(work, "p"))
spark.read.parquet(os.path.join(work, "p")).filter(F.col("n") > 3).count()
docs.unpersist()
spark.stop()
"""


def build_cds_archive(force: bool = False, timeout_s: float = 900, log=print) -> Path:
    """Record this machine's class-data-sharing archive (a warm-up job with
    ``-XX:ArchiveClassesAtExit``), written atomically; returns its path. An existing one is kept
    unless ``force``."""
    final = cds_archive_path()
    home = spark_home()
    if final is None or home is None:
        raise RuntimeError(
            "no Spark or Java installation found for a class-data-sharing archive: install pyspark and a JDK "
            "(or set SPARK_HOME / JAVA_HOME)"
        )
    if archive_recorded(final) and not force:
        log(f"class-data-sharing archive up to date: {final}")
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    with tempfile.TemporaryDirectory(prefix="llmops-cds-") as work:
        script = Path(work) / "warmup.py"
        script.write_text(_WARMUP)
        data = Path(work) / "data"
        data.mkdir()
        options = f"{LOCAL_DRIVER_JAVA_OPTIONS} -XX:ArchiveClassesAtExit={tmp} -Xlog:cds=off -Xlog:cds+dynamic=off"
        cmd = [str(home / "bin" / "spark-submit"), "--master", "local[2]", "--conf", f"{JAVA_OPTIONS_KEY}={options}",
               "--conf", "spark.ui.enabled=false", "--conf", "spark.ui.showConsoleProgress=false",
               str(script), str(data)]  # fmt: skip
        env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
        env.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        log(f"recording the class-data-sharing archive (a warm-up Spark job and a check, ~45 s): {final}")
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, cwd=work)
            if done.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
                tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
                raise RuntimeError(f"the warm-up job for the archive failed (exit {done.returncode}):\n{tail}")
            # spark-submit returns once the JVM has written the archive and exited; a driver must map it
            ok, tail = check_cds_archive(tmp)
            if not ok:
                raise RuntimeError(f"the recorded archive does not map into a Spark driver:\n{tail}")
            _seal_path(final).unlink(missing_ok=True)
            os.replace(tmp, final)
            st = final.stat()
            seal = _seal_path(final)
            seal_tmp = seal.with_name(f".{seal.name}.tmp-{os.getpid()}")
            seal_tmp.write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns}))
            os.replace(seal_tmp, seal)
        finally:
            tmp.unlink(missing_ok=True)
    log(f"class-data-sharing archive ready: {final} ({final.stat().st_size >> 20} MiB)")
    return final


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build-cds", action="store_true", help="record this machine's class-data-sharing archive")
    parser.add_argument("--force", action="store_true", help="record it again even if one exists")
    parser.add_argument("--print-options", action="store_true", help="print the driver JVM options of a local run")
    args = parser.parse_args(argv)
    if args.build_cds:
        build_cds_archive(force=args.force)
    if args.print_options or not args.build_cds:
        print(local_java_options())
    return 0


if __name__ == "__main__":
    sys.exit(main())
