#!/usr/bin/env bash
# toyllm as a user installs it: build the wheel from this checkout, install it (not editable) in
# a fresh virtual environment, and run every command from an empty temporary directory, so that
# nothing can come from the checkout: not the code, not configs/, not the shipped model.
#
#   bash scripts/wheel_check.sh            # from an environment that can build the extension
#                                          # (torch, setuptools, pybind11: the README's set-up)
#
# PYTHON builds the wheel (default: python3 on PATH) and makes the fresh venv; TORCH is what
# the fresh venv installs first (default torch==2.13.0, the CPU wheel our machines keep on
# disk). Each stage prints one `== wheel: ... ==` line with the seconds since the start.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
PYTHON="${PYTHON:-python3}"
TORCH="${TORCH:-torch==2.13.0}"
start=$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/toyllm-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
stage() { echo "== wheel: $* ($(( $(date +%s) - start )) s) =="; }
fail() { echo "wheel check FAILED: $*" >&2; exit 1; }

stage "build the wheel"
TOYLLM_NO_CUDA="${TOYLLM_NO_CUDA:-1}" "$PYTHON" -m pip wheel -q --no-build-isolation --no-deps \
    -w "$work/dist" .
wheel=$(ls "$work"/dist/toyllm-*.whl)
echo "$(basename "$wheel"): $(( $(stat -c %s "$wheel") / 1024 )) KiB"
"$PYTHON" -m zipfile -l "$wheel" > "$work/contents.txt"
for f in toyllm/configs/llama-1b.toml toyllm/configs/experiments/attention-variants.toml \
         toyllm/models/default/model.safetensors toyllm/models/default/tokenizer.model; do
    grep -q "^$f " "$work/contents.txt" || fail "$f is not in the wheel"
done

stage "a fresh venv: $TORCH, then the wheel (not editable)"
"$PYTHON" -m venv "$work/venv"
"$work/venv/bin/pip" install -q "$TORCH"
"$work/venv/bin/pip" install -q "$wheel"
export PATH="$work/venv/bin:$PATH"
mkdir "$work/run" && cd "$work/run"
# the package must come from the venv, never from the checkout
where=$(python -c "import toyllm.engine.cli, toyllm.models.shipped as s; print(s.CONFIGS_DIR)")
case "$where" in
    "$work"/venv/*) echo "configs from $where" ;;
    *) fail "toyllm's configs come from $where, not from the venv" ;;
esac

run() {  # run CMD...: from the empty directory; show its last $SHOW lines (or first $HEAD;
    echo "\$ $*"  # all of them on failure)
    local rc=0
    "$@" > "$work/out.txt" 2>&1 || rc=$?
    [[ $rc == 0 ]] || { cat "$work/out.txt"; fail "exit $rc from: $*"; }
    if [[ -n ${HEAD:-} ]]; then head -n "$HEAD" "$work/out.txt"; else tail -n "${SHOW:-2}" "$work/out.txt"; fi
}
stage "toyllm --help"
SHOW=0 run toyllm --help
stage "toyllm generate (the shipped model; a shipped config with random weights)"
SHOW=3 run toyllm generate "def f" --max-new-tokens 4 --seed 0 --stats
SHOW=3 run toyllm generate "def f" --model default --random-weights --max-new-tokens 4 --seed 0
stage "toyllm info (the shipped model, shipped configs by name)"
HEAD=1 run toyllm info
HEAD=1 run toyllm info llama-1b
SHOW=0 run toyllm info stories15m.toml --json
if toyllm info llama-9b 2> "$work/err.txt"; then fail "toyllm info llama-9b succeeded"; fi
grep -q "shipped: default, llama-1b" "$work/err.txt" || fail "unknown name: $(cat "$work/err.txt")"
echo "unknown name -> $(cat "$work/err.txt")"
stage "toyllm check (the shipped weights and one random shape, fp32, CPU)"
SHOW=1 run toyllm check --device cpu --configs shipped-default,gqa-tied --no-hf
stage "toyllm sweep (shipped experiments by name)"
SHOW=1 run toyllm sweep attention-variants --dry-run
SHOW=1 run toyllm sweep cpu-smoke --out sweep-out
ls sweep-out/sweep.csv sweep-out/sweep.json > /dev/null || fail "toyllm sweep wrote no CSV/JSON"
stage "toyllm bench (CPU, smallest settings)"
SHOW=4 run toyllm bench --device cpu --models default --contexts 16 --new-tokens 8 --no-hf \
    --json bench.json
stage "toyllm serve (the shipped model on a free loopback port, one completion, SIGTERM)"
toyllm serve --port 0 --kv-memory 32MiB > serve.txt 2> serve-err.txt &
serve_pid=$!
url=""
for _ in $(seq 1 600); do  # up to 60 s for the address line
    url=$(sed -n 's/^toyllm serve: .* on \(http:[^ ]*\) .*/\1/p' serve.txt)
    [[ -n $url ]] && break
    kill -0 "$serve_pid" 2> /dev/null || break
    sleep 0.1
done
[[ -n $url ]] || { cat serve.txt serve-err.txt; fail "toyllm serve printed no address"; }
python - "$url" <<'PY' || { kill "$serve_pid"; cat serve-err.txt; fail "toyllm serve did not answer"; }
import json, sys, urllib.request
body = json.dumps({"model": "default", "prompt": "def f", "max_tokens": 4, "temperature": 0})
req = urllib.request.Request(sys.argv[1] + "/v1/completions", body.encode(),
                             {"Content-Type": "application/json"})
answer = json.load(urllib.request.urlopen(req, timeout=60))
assert answer["usage"]["completion_tokens"] == 4, answer
print("completion:", repr(answer["choices"][0]["text"]))
PY
kill -TERM "$serve_pid"
wait "$serve_pid" || fail "toyllm serve exited $? on SIGTERM (expected 0)"
stage "done: every command ran from $work/run"
cd "$repo"
