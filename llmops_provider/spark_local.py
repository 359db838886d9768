"""Spark settings for short jobs on a local master, where the driver JVM is also the executor.

The data job on one machine is mostly Python (the document steps) plus JVM work that runs
once: start-up and Spark's generated code. HotSpot's optimizing compiler (C2) spends more CPU
compiling that code than it saves over a run of a minute or two, and on a small machine it
takes those cores from the Python workers: on the 2-core benchmark it used 18 of the JVM's
47 CPU seconds. The quick compiler alone (C1) and the parallel collector took the run from
~59 s to ~45 s (docs/data.md, "Performance"). Long-lived cluster executors keep the JVM's
defaults: there C2's faster code pays off.
"""

from __future__ import annotations

LOCAL_DRIVER_JAVA_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:+UseParallelGC"
JAVA_OPTIONS_KEY = "spark.driver.extraJavaOptions"


def is_local(master: str | None) -> bool:
    return (master or "").startswith("local")


def local_defaults(master: str | None, conf: dict) -> dict:
    """``conf`` plus the local JVM options when ``master`` is local and ``conf`` sets none."""
    if is_local(master) and JAVA_OPTIONS_KEY not in conf:
        return {**conf, JAVA_OPTIONS_KEY: LOCAL_DRIVER_JAVA_OPTIONS}
    return conf
