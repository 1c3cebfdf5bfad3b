"""From a PyTorch model to a float ncnn model: the flat input/output signature
(:mod:`lightning_ncnnqat.conversion.model_io`), tracing the deployable form (:mod:`.tracing`; the form itself is :mod:`lightning_ncnnqat.qat.export_form`), ONNX
(:mod:`.onnx`), pnnx (:mod:`.pnnx`, :mod:`.op_origin`), which ncnn layer holds which torch layer
(:mod:`.matching`, :mod:`.graph_match`)."""
