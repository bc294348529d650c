"""ONNX -> TensorRT plans (build, profiles, manifest, validation). Lands with the engines issue; the
runtime never imports this package."""
