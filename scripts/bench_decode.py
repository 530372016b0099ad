"""Decode and prefill benchmark (the same as `toyllm bench`): see engine/bench_decode.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toyllm.engine.tools.bench import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
