"""Integrations with host ecosystems, imported as ``slimkit.plugins.<name>``.

Each plugin imports its library (transformers, timm, accelerate); the core never does.
"""
