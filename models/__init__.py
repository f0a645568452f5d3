"""Shipped ONNX models and their cards (package data)."""
