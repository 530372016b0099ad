"""Tools over the engine: `toyllm bench`, `toyllm info`, `toyllm sweep` (and its plots)."""
