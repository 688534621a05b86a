"""Models: architectures built from `kernels` ops, the artifact format, the repository and warm cache."""
