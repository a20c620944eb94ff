"""Serving a trained run: export to ONNX / TorchScript and ONNX Runtime inference (``export.py``)."""
