"""The correctness harness behind `toyllm check`: cases, the no-cache reference, tolerances, report."""
