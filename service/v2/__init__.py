"""The Open Inference Protocol (KServe v2, Triton's HTTP/gRPC API): thin adapters over the one
classify pipeline and the model repository."""
