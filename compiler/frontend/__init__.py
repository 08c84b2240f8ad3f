"""Front end: ONNX files -> IR graphs."""
