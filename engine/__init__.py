"""The engine side of toyllm: KV-cache extension, cached attention, sampling, generation, CLI."""
