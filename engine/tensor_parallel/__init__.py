"""Tensor-parallel decode over torch.distributed: one model split over N ranks (Megatron).

    plan.py             which rows/columns of each weight a rank holds; the rank-count checks
    collectives.py      RankGroup: all-reduce, vocabulary gather, broadcast
    layers.py           the shard's modules (vocab-parallel embedding and head, row-parallel o/down)
    load.py             one rank's shard, read slice by slice (safetensors get_slice, GGUF, random)
    launch.py           spawning the ranks, the process group, one failure ends them all
    rank_engine.py      rank 0 leads (tokenizer, sampling, text), the others follow its steps
    parallel_engine.py  TensorParallelEngine: the Python face (`toyllm generate --tensor-parallel`)
    check.py            `toyllm check --tensor-parallel N`: shards vs one process vs the reference

docs/TENSOR_PARALLEL.md describes the design and how to run it.
"""
