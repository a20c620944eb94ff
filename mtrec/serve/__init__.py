"""Serving a trained run: request encoding, scorers (PyTorch, ONNX Runtime), export and the HTTP service."""

from typing import Literal, get_args

# how ONNX Runtime's intra-op threads wait (mtrec.serve.export.OnnxScorer; `mtrec serve --ort-spin`): kept here,
# light, because the CLI checks the option before it imports anything heavy
SpinMode = Literal["auto", "on", "off"]
SPIN_MODES: tuple[str, ...] = get_args(SpinMode)
