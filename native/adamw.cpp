// native_adamw: AdamW (Loshchilov & Hutter 2019, Algorithm 2) over all parameters in one call.
//
// One at::parallel_for runs over fixed-size chunks of all the parameters (swiftk/adam.h), so small tensors cost
// no thread start-up of their own; each chunk is updated in a single pass: parameter, gradient and both
// moments are read once and written once. float32 and bfloat16 parameters; float32 moments, or bfloat16 ones
// (bf16_moments: half the optimizer state). The arithmetic follows torch's AdamW operation for operation
// (compiled without FMA contraction), so float32 results equal torch.optim.AdamW's to the last bit or one ulp,
// not just in exact arithmetic. bfloat16 results are rounded to nearest, or stochastically
// (stochastic_rounding, from a hash of seed, step, tensor and element: reproducible, and exact on resume).
#include <swiftk/plugin.h>
#include <swiftk/adam.h>

#include <map>
#include <string>
#include <vector>

SWIFTK_PLUGIN("native_adamw", "optimizer");

namespace {

using State = std::map<std::string, std::vector<at::Tensor>>;
using Hyper = std::map<std::string, double>;

std::map<std::string, double> defaults() {
  return {{"lr", 1e-3}, {"beta1", 0.9}, {"beta2", 0.999}, {"eps", 1e-8}, {"weight_decay", 1e-2},
          {"amsgrad", 0.0}, {"maximize", 0.0}, {"bf16_moments", 0.0}, {"stochastic_rounding", 0.0},
          {"seed", 0.0}, {"group", 0.0}};
}

std::map<std::string, at::Tensor> init_state(const at::Tensor& param, const Hyper& h) {
  const bool bf16 = swiftk::hyper(h, "bf16_moments") != 0.0;
  TORCH_CHECK(!(bf16 && swiftk::hyper(h, "amsgrad") != 0.0),
              "native_adamw: amsgrad keeps float32 moments; set bf16_moments = false or amsgrad = false");
  auto options = param.options().dtype(bf16 ? at::kBFloat16 : at::kFloat);
  std::map<std::string, at::Tensor> state{{"exp_avg", at::zeros(param.sizes(), options)},
                                          {"exp_avg_sq", at::zeros(param.sizes(), options)}};
  if (swiftk::hyper(h, "amsgrad") != 0.0) {
    state["max_exp_avg_sq"] = at::zeros(param.sizes(), param.options().dtype(at::kFloat));
  }
  return state;
}

const std::vector<at::Tensor>& named(const State& state, const char* key, size_t n) {
  auto it = state.find(key);
  TORCH_CHECK(it != state.end(), "native_adamw: state '", key, "' is missing");
  TORCH_CHECK(it->second.size() == n, "native_adamw: state '", key, "' has ", it->second.size(),
              " tensors for ", n, " parameters");
  return it->second;
}

void check(const at::Tensor& t, const at::Tensor& like, at::ScalarType dtype, const char* what, size_t i) {
  TORCH_CHECK(t.device().is_cpu(), "native_adamw: ", what, " ", i, " is on ", t.device(),
              "; native_adamw runs on CPU tensors (use optimizer = \"adamw\" on CUDA)");
  TORCH_CHECK(t.scalar_type() == dtype, "native_adamw: ", what, " ", i, " is ", t.scalar_type(), ", expected ",
              dtype);
  TORCH_CHECK(t.is_contiguous() && t.numel() == like.numel(), "native_adamw: ", what, " ", i,
              " must be contiguous with ", like.numel(), " elements");
}

void step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads, const State& state,
          const std::vector<double>& steps, const Hyper& h) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && steps.size() == n, "native_adamw: ", n, " parameters but ", grads.size(),
              " gradients and ", steps.size(), " step counts");
  const bool amsgrad = swiftk::hyper(h, "amsgrad") != 0.0;
  const auto& exp_avg = named(state, "exp_avg", n);
  const auto& exp_avg_sq = named(state, "exp_avg_sq", n);
  const std::vector<at::Tensor>* max_sq = amsgrad ? &named(state, "max_exp_avg_sq", n) : nullptr;
  const auto moments = swiftk::hyper(h, "bf16_moments") != 0.0 ? at::kBFloat16 : at::kFloat;
  const bool stochastic = swiftk::hyper(h, "stochastic_rounding") != 0.0;
  const auto seed = uint64_t(int64_t(swiftk::hyper(h, "seed")));
  const auto group = uint64_t(int64_t(swiftk::hyper(h, "group")));  // so that groups draw different bits

  std::vector<swiftk::AdamScalars> scalars;
  std::vector<swiftk::Rounding> rounding;
  for (size_t i = 0; i < n; ++i) {
    const auto dtype = params[i].scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "native_adamw: parameter ", i, " is ", dtype,
                "; float32 and bfloat16 are supported");
    check(params[i], params[i], dtype, "parameter", i);
    check(grads[i], params[i], dtype, "gradient", i);
    check(exp_avg[i], params[i], moments, "exp_avg", i);
    check(exp_avg_sq[i], params[i], moments, "exp_avg_sq", i);
    if (amsgrad) check((*max_sq)[i], params[i], at::kFloat, "max_exp_avg_sq", i);
    scalars.emplace_back(swiftk::hyper(h, "lr"), swiftk::hyper(h, "beta1"), swiftk::hyper(h, "beta2"),
                         swiftk::hyper(h, "eps"), swiftk::hyper(h, "weight_decay"), steps[i], amsgrad,
                         swiftk::hyper(h, "maximize") != 0.0);
    const uint64_t key = (seed * 0x2545F4914F6CDD1DULL) ^ (group * 0x9E3779B97F4A7C15ULL) ^
                         (uint64_t(steps[i]) << 32) ^ uint64_t(i);
    rounding.push_back({stochastic, key});
  }
  swiftk::adam_update_all(params, grads, exp_avg, exp_avg_sq, max_sq, scalars, rounding);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  swiftk::export_info(m);
  m.def("defaults", &defaults, "hyperparameters and their defaults");
  m.def("init_state", &init_state, "zeroed moments (float32, or bfloat16 with bf16_moments) for one parameter");
  m.def("step", &step, "update every parameter in place", pybind11::call_guard<pybind11::gil_scoped_release>());
}
