"""Quantization-aware training and INT8 conversion (built in the quantization issue)."""
