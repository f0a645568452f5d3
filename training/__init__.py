"""cordseg.training: synthetic data, networks, training loop and ONNX export (needs the train extra)."""
