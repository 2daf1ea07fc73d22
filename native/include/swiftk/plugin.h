// The native plugin contract: what a C++ plugin file includes and declares.
//
//   #include <swiftk/plugin.h>
//   SWIFTK_PLUGIN("my_loss", "loss")            // name and kind, as a config names them
//   ... the kind's functions (see native/README.md) ...
//   PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { swiftk::export_info(m); m.def("forward", &forward); ... }
//
// SWIFTK_PLUGIN embeds an info record in the shared object as a plain string: the plugin's name and kind, the
// contract version, and the torch version and C++ ABI the file was compiled against. The loader reads it from
// the file's bytes *before* loading the library, so a build for another torch is refused with both versions
// named instead of failing inside the dynamic linker (or worse, crashing in a mismatched ABI).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/headeronly/version.h>

#include <string>

#ifndef SWIFTK_CONTRACT
#error "SWIFTK_CONTRACT is not defined: build native plugins with `swiftk native build FILE.cpp`"
#endif

#define SWIFTK_STR_(x) #x
#define SWIFTK_STR(x) SWIFTK_STR_(x)
#define SWIFTK_INFO_MARKER "SWIFTK_NATIVE_INFO:"

#define SWIFTK_PLUGIN(NAME, KIND)                                                                   \
  extern "C" __attribute__((used, visibility("default"))) const char swiftk_native_info[] =         \
      SWIFTK_INFO_MARKER "{\"name\": \"" NAME "\", \"kind\": \"" KIND "\", \"contract\": \""          \
      SWIFTK_STR(SWIFTK_CONTRACT) "\", \"torch\": \"" SWIFTK_STR(TORCH_VERSION_MAJOR) "." SWIFTK_STR(         \
          TORCH_VERSION_MINOR) "." SWIFTK_STR(TORCH_VERSION_PATCH) "\", \"cxx11_abi\": "            \
      SWIFTK_STR(_GLIBCXX_USE_CXX11_ABI) ", \"compiler\": \"" __VERSION__ "\"}"

extern "C" const char swiftk_native_info[];

namespace swiftk {

// `module.swiftk_info()` returns the record as JSON text, for the loader to compare with the file's bytes.
inline void export_info(pybind11::module_& m) {
  m.def("swiftk_info", [] { return std::string(swiftk_native_info + sizeof(SWIFTK_INFO_MARKER) - 1); },
        "this plugin's name, kind, contract version, and the torch version and C++ ABI it was built against");
}

// A float hyperparameter from the dict the Python side passes (every value is sent as a float).
inline double hyper(const std::map<std::string, double>& h, const char* key) {
  auto it = h.find(key);
  TORCH_CHECK(it != h.end(), "swiftk native plugin: hyperparameter '", key, "' was not passed");
  return it->second;
}

}  // namespace swiftk
