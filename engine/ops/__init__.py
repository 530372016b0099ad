"""The one Python face of the C++/CUDA extension (`_C`): the KV cache and the toyllm:: operators."""
