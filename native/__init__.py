"""C++ plugins built against torch (pybind11); lands with the [native] issue."""
