"""A StatsD -> Prometheus bridge for the local stack, compatible with Prometheus' statsd_exporter.

Airflow emits its scheduler, DAG-run and task metrics over StatsD (``[metrics] statsd_on``).
In production, Prometheus' ``statsd_exporter`` (the official Airflow Helm chart runs it) turns
them into labelled series with ``deploy/prometheus/statsd-mapping.yml``. Debian 12 ships no
statsd_exporter, so the local stack runs this module with the same flags and the same mapping
file::

    python -m llmops_provider.statsd_exporter --statsd.mapping-config=deploy/prometheus/statsd-mapping.yml \\
        --statsd.listen-udp=127.0.0.1:9125 --web.listen-address=127.0.0.1:9102

It implements the part of statsd_exporter's mapping language the mapping file uses: glob
``match`` (``*`` = one dot-separated component), ``name`` and ``labels`` with ``$n``
substitution, ``match_metric_type``, ``action: drop``, histogram observers with ``buckets``
(timers in ms are observed in seconds, as statsd_exporter does), unmapped metrics exposed under
their escaped name, DogStatsD (``|#k:v``) and InfluxDB (``name,k=v``) tags as labels. A mapping
key it does not know is an error naming the key. Malformed lines are counted per reason in
``statsd_exporter_lines_dropped_total`` and logged, never silently lost. Standard library only.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

log = logging.getLogger("llmops.statsd_exporter")

DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_MAPPING_KEYS = {
    "match",
    "name",
    "labels",
    "match_metric_type",
    "match_type",
    "action",
    "observer_type",
    "histogram_options",
    "help",
}
_DEFAULT_KEYS = {"observer_type", "match_type", "histogram_options"}
_TYPES = {"c": "counter", "g": "gauge", "ms": "observer", "h": "observer", "d": "observer"}
_ESCAPE = re.compile(r"[^a-zA-Z0-9_:]")
_SUB = re.compile(r"\$\{?(\d+)\}?")


class MappingError(ValueError):
    pass


def _buckets(options: dict | None, where: str) -> tuple[float, ...]:
    buckets = (options or {}).get("buckets", DEFAULT_BUCKETS)
    if not buckets or any(not isinstance(b, (int, float)) for b in buckets) or list(buckets) != sorted(set(buckets)):
        raise MappingError(f"{where}.histogram_options.buckets must be increasing numbers, e.g. [1, 10, 60]")
    return tuple(float(b) for b in buckets)


class Mapping:
    def __init__(self, raw: dict, index: int, defaults: dict) -> None:
        where = f"mappings[{index}]"
        unknown = set(raw) - _MAPPING_KEYS
        if unknown:
            raise MappingError(
                f"{where}: unknown key(s) {sorted(unknown)}; statsd_exporter knows {sorted(_MAPPING_KEYS)}"
            )
        if (raw.get("match_type") or defaults.get("match_type", "glob")) != "glob":
            raise MappingError(f"{where}.match_type: only glob matching is implemented here; rewrite it as a glob")
        if (raw.get("observer_type") or defaults.get("observer_type", "histogram")) != "histogram":
            raise MappingError(f"{where}.observer_type: only histogram observers are implemented; use histogram")
        self.action = raw.get("action", "map")
        if "match" not in raw or (self.action != "drop" and "name" not in raw):
            raise MappingError(f"{where}: needs `match` and `name` (or action: drop)")
        parts = [re.escape(part).replace(r"\*", "([^.]+)") for part in str(raw["match"]).split(".")]
        self.regex = re.compile("^" + r"\.".join(parts) + "$")
        self.name = raw.get("name", "")
        self.labels = {str(k): str(v) for k, v in (raw.get("labels") or {}).items()}
        self.metric_type = raw.get("match_metric_type")
        if self.metric_type not in (None, "counter", "gauge", "observer"):
            raise MappingError(f"{where}.match_metric_type: {self.metric_type!r} is not counter, gauge or observer")
        self.buckets = _buckets(raw.get("histogram_options") or defaults.get("histogram_options"), where)
        self.help = raw.get("help")


def load_mapping(text: str) -> tuple[list[Mapping], tuple[float, ...]]:
    import yaml

    raw = yaml.safe_load(text) or {}
    defaults = raw.get("defaults") or {}
    unknown = set(defaults) - _DEFAULT_KEYS
    if unknown:
        raise MappingError(f"defaults: unknown key(s) {sorted(unknown)}")
    mappings = [Mapping(m, i, defaults) for i, m in enumerate(raw.get("mappings") or [])]
    return mappings, _buckets(defaults.get("histogram_options"), "defaults")


class Registry:
    """Counters, gauges and histograms keyed by (name, labels); rendered in Prometheus' text format."""

    def __init__(self, mappings: list[Mapping], default_buckets: tuple[float, ...]) -> None:
        self.mappings, self.default_buckets = mappings, default_buckets
        self.lock = threading.Lock()
        self.types: dict[str, str] = {}
        self.help: dict[str, str] = {}
        self.values: dict[tuple[str, tuple], float] = {}
        self.histograms: dict[tuple[str, tuple], list] = {}  # [buckets, counts, sum, count]
        self.dropped: dict[str, int] = {}
        self.lines = 0

    def _drop(self, reason: str, line: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        log.warning("dropped statsd line %r: %s", line[:200], reason)

    def _map(self, stat: str, kind: str) -> tuple[str | None, dict[str, str], tuple[float, ...], str | None]:
        for m in self.mappings:
            if m.metric_type and m.metric_type != kind:
                continue
            match = m.regex.match(stat)
            if not match:
                continue
            if m.action == "drop":
                return None, {}, (), None
            groups = match.groups()

            def sub(text: str, groups=groups) -> str:
                return _SUB.sub(lambda g: groups[int(g.group(1)) - 1] if int(g.group(1)) <= len(groups) else "", text)

            return sub(m.name), {k: sub(v) for k, v in m.labels.items()}, m.buckets, m.help
        return _ESCAPE.sub("_", stat), {}, self.default_buckets, None

    def handle_line(self, line: str) -> None:
        line = line.strip()
        if not line:
            return
        self.lines += 1
        try:
            name_part, rest = line.split(":", 1)
            fields = rest.split("|")
            raw_value, type_code = fields[0], fields[1]
        except (ValueError, IndexError):
            return self._drop("malformed line (want name:value|type)", line)
        labels: dict[str, str] = {}
        if "," in name_part:  # InfluxDB-style tags
            name_part, *tags = name_part.split(",")
            for tag in tags:
                key, _, value = tag.partition("=")
                labels[_ESCAPE.sub("_", key)] = value
        rate = 1.0
        for extra in fields[2:]:
            if extra.startswith("@"):
                try:
                    rate = float(extra[1:]) or 1.0
                except ValueError:
                    return self._drop("bad sample rate", line)
            elif extra.startswith("#"):  # DogStatsD tags
                for tag in extra[1:].split(","):
                    key, _, value = tag.partition(":")
                    labels[_ESCAPE.sub("_", key)] = value
        kind = _TYPES.get(type_code)
        if kind is None:
            return self._drop(f"unknown metric type {type_code!r}", line)
        try:
            value = float(raw_value)
        except ValueError:
            return self._drop("value is not a number", line)
        if math.isnan(value):
            return self._drop("value is NaN", line)
        name, mapped_labels, buckets, help_text = self._map(name_part, kind)
        if name is None:
            return None
        if not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", name):
            return self._drop(f"mapped name {name!r} is not a Prometheus metric name", line)
        key = (name, tuple(sorted({**labels, **mapped_labels}.items())))
        prom_type = {"counter": "counter", "gauge": "gauge", "observer": "histogram"}[kind]
        with self.lock:
            if self.types.setdefault(name, prom_type) != prom_type:
                return self._drop(f"{name} is already a {self.types[name]}, not a {prom_type}", line)
            self.help.setdefault(name, help_text or f"Metric autogenerated by statsd_exporter from {name_part}.")
            if kind == "counter":
                if value < 0:
                    return self._drop("counter value is negative", line)
                self.values[key] = self.values.get(key, 0.0) + value / rate
            elif kind == "gauge":
                delta = raw_value[:1] in "+-"
                self.values[key] = (self.values.get(key, 0.0) if delta else 0.0) + value
            else:
                seconds = value / 1000.0 if type_code == "ms" else value
                hist = self.histograms.setdefault(key, [buckets, [0] * len(buckets), 0.0, 0])
                for i, bound in enumerate(hist[0]):
                    if seconds <= bound:
                        hist[1][i] += 1
                hist[2] += seconds
                hist[3] += 1
        return None

    def handle_packet(self, data: bytes) -> None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self.lines += 1
            return self._drop("packet is not UTF-8", repr(data[:80]))
        for line in text.splitlines():
            self.handle_line(line)
        return None

    def render(self) -> str:
        def fmt(labels: tuple, extra: tuple = ()) -> str:
            items = [*labels, *extra]
            return "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in items) + "}" if items else ""

        out: list[str] = []
        with self.lock:
            for name in sorted(self.types):
                out += [f"# HELP {name} {self.help[name]}", f"# TYPE {name} {self.types[name]}"]
                for (n, labels), value in sorted(self.values.items()):
                    if n == name:
                        out.append(f"{name}{fmt(labels)} {value:g}")
                for (n, labels), (buckets, counts, total, count) in sorted(self.histograms.items()):
                    if n != name:
                        continue
                    for bound, c in zip(buckets, counts, strict=True):
                        out.append(f"{name}_bucket{fmt(labels, (('le', f'{bound:g}'),))} {c}")
                    out.append(f"{name}_bucket{fmt(labels, (('le', '+Inf'),))} {count}")
                    out += [f"{name}_sum{fmt(labels)} {total:g}", f"{name}_count{fmt(labels)} {count}"]
            out += [
                "# HELP statsd_exporter_lines_total StatsD lines received.",
                "# TYPE statsd_exporter_lines_total counter",
                f"statsd_exporter_lines_total {self.lines}",
                "# HELP statsd_exporter_lines_dropped_total StatsD lines dropped, by reason.",
                "# TYPE statsd_exporter_lines_dropped_total counter",
            ]
            out += [f"statsd_exporter_lines_dropped_total{fmt((('reason', r),))} {n}" for r, n in self.dropped.items()]
        return "\n".join(out) + "\n"


def _escape_label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "0.0.0.0", int(port)


def serve(registry: Registry, udp: tuple[str, int], web: tuple[str, int]) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(udp)

    def receive() -> None:
        while True:
            registry.handle_packet(sock.recv(65535))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path.split("?")[0] == "/metrics":
                body, ctype = registry.render().encode(), "text/plain; version=0.0.4; charset=utf-8"
            elif self.path in ("/-/healthy", "/-/ready"):
                body, ctype = b"OK\n", "text/plain"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # scrapes every few seconds: keep the log for drops
            pass

    threading.Thread(target=receive, daemon=True, name="statsd-udp").start()
    log.info("statsd on udp %s:%s, metrics on http://%s:%s/metrics", *udp, *web)
    ThreadingHTTPServer(web, Handler).serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmops_provider.statsd_exporter", description=__doc__.split("\n")[0])
    parser.add_argument("--statsd.mapping-config", dest="mapping", required=True, help="statsd_exporter mapping YAML")
    parser.add_argument("--statsd.listen-udp", dest="udp", default="127.0.0.1:9125")
    parser.add_argument("--statsd.listen-tcp", dest="tcp", default="", help="only '' (off) is implemented")
    parser.add_argument("--web.listen-address", dest="web", default="127.0.0.1:9102")
    args = parser.parse_args(argv)
    if args.tcp:
        parser.error("--statsd.listen-tcp: StatsD over TCP is not implemented here; Airflow sends UDP (pass '')")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        mappings, buckets = load_mapping(Path(args.mapping).read_text())
    except (OSError, MappingError) as exc:
        parser.error(f"--statsd.mapping-config={args.mapping}: {exc}")
    serve(Registry(mappings, buckets), _address(args.udp), _address(args.web))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
