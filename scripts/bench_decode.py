"""Decode and prefill benchmark, the same as `toyllm bench` (engine/tools/bench.py): kept so
that `python scripts/bench_decode.py ARGS` runs where the console script is not on PATH."""

from toyllm.engine.tools.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
