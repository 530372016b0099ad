"""HTTP serving benchmark: the random workload through `toyllm serve` at several request rates,
and through the Python API in the same run (engine/tools/http_bench.py).

    python scripts/bench_server.py --model llama-1b --device cuda --dtype bf16 --rates 4,16,inf \
        --clients 4
    python scripts/bench_server.py --paced 4.4,1.5 --rates 64,inf      # the server alone
"""

from toyllm.engine.tools.http_bench import main

if __name__ == "__main__":
    raise SystemExit(main())
