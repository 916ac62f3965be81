"""The model: loading and building it, the sparse MLM head and its loss, the CPU kernels."""
