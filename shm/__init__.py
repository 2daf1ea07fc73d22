"""Tensor transport between the kernel and plugin hosts (shared memory, CUDA IPC); lands with [hosts]."""
