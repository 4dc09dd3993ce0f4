"""ONNX mechanics, no recipe knowledge: I/O, weights in place, block partition and stitching, Q/DQ facts, runners."""
