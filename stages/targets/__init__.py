"""What each GPU and TensorRT flavour can honour: GPUs, compute capabilities, memory arithmetic, backends."""
