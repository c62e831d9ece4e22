"""prunec: compiler passes that make exported ONNX models smaller and faster, and prove it."""

__version__ = "0.1.0"
