"""The correctness harness behind `toyllm check`: cases, no-cache reference, tolerances, report."""
