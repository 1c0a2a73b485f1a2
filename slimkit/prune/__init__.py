"""Structured and unstructured pruning (built in the pruning issue)."""
