"""``bench``: prefill, decode and training-step speed of models, their TFLOP/s and MFU."""
