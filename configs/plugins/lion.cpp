// An example native optimizer plugin: Lion (Chen et al. 2023, "Symbolic Discovery of Optimization
// Algorithms", Algorithm 2). Use it with
//
//   plugins = ["native:configs/plugins/lion.cpp"]
//   [train]
//   optimizer = "native_lion"
//   optimizer_config = { beta1 = 0.9, beta2 = 0.99 }
//
//   c = beta1 m + (1 - beta1) g          the update's direction: only its sign is used
//   p = p (1 - lr wd) - lr sign(c)
//   m = beta2 m + (1 - beta2) g          one moment, float32
//
// What a native optimizer defines (native/README.md): defaults(), init_state(param, hyper) and
// step(params, grads, state, steps, hyper), which updates every parameter of one group in one call.
#include <swiftk/plugin.h>

#include <map>
#include <string>
#include <vector>

SWIFTK_PLUGIN("native_lion", "optimizer");

namespace {

using Hyper = std::map<std::string, double>;

std::map<std::string, double> defaults() {
  return {{"lr", 1e-4}, {"beta1", 0.9}, {"beta2", 0.99}, {"weight_decay", 0.0}};
}

std::map<std::string, at::Tensor> init_state(const at::Tensor& param, const Hyper&) {
  return {{"exp_avg", at::zeros(param.sizes(), param.options().dtype(at::kFloat))}};
}

void step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
          const std::map<std::string, std::vector<at::Tensor>>& state, const std::vector<double>& /*steps*/,
          const Hyper& h) {
  const float lr = float(swiftk::hyper(h, "lr")), b1 = float(swiftk::hyper(h, "beta1")),
              b2 = float(swiftk::hyper(h, "beta2"));
  const float decay = float(1.0 - swiftk::hyper(h, "lr") * swiftk::hyper(h, "weight_decay"));
  const auto& moments = state.at("exp_avg");
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].scalar_type() == at::kFloat && params[i].is_contiguous() && grads[i].is_contiguous(),
                "native_lion: parameters must be contiguous float32");
    float* p = params[i].data_ptr<float>();
    const float* g = grads[i].data_ptr<float>();
    float* m = moments[i].data_ptr<float>();
    at::parallel_for(0, params[i].numel(), 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const float c = b1 * m[j] + (1.f - b1) * g[j];
        p[j] = p[j] * decay - lr * float((c > 0.f) - (c < 0.f));
        m[j] = b2 * m[j] + (1.f - b2) * g[j];
      }
    });
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  swiftk::export_info(m);
  m.def("defaults", &defaults);
  m.def("init_state", &init_state);
  m.def("step", &step, pybind11::call_guard<pybind11::gil_scoped_release>());
}
