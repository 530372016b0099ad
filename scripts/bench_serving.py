"""Serving benchmark: the random workload (256 requests, lengths 100-1024) or 64 requests sharing
a 1,000-token prompt, through toyllm's ServingEngine, its static batch and transformers' continuous
batching in one run. The same as `toyllm bench --workload ...`; engine/tools/serving_bench.py.

    python scripts/bench_serving.py --workload random --model llama-1b --dtype bf16
    python scripts/bench_serving.py --workload shared-prefix --model llama-1b --dtype bf16
"""

from toyllm.engine.tools.serving_bench import main

if __name__ == "__main__":
    raise SystemExit(main())
