"""Test helpers shared across test modules: parts of the tests' own that inject faults."""
