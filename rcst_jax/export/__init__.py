"""The edge as a file an edge device runs: `onnx_edge` writes the whole edge
step (Algorithm 2 up to the kept patches) as ONNX, for rcst_edge's runtime.
Needs the export environment (`make export-env`: jax2onnx)."""
