// native_cross_entropy: cross-entropy and focal loss over [N, V] logits, forward and backward fused per row.
//
// For row i with label t, l = x_t - lse(x) is the label's log-probability and p = exp(l):
//
//   cross-entropy    f(l) = -l
//   focal (gamma)    f(l) = -alpha (1 - p)^gamma l               (Lin et al. 2017, eq. 5; gamma = 0: CE)
//
//   df/dx_j = -f'(l) (s_j - [j = t])                             s = softmax(x), s_j = exp(x_j - lse)
//   f'(l)   = -alpha ((1 - p)^gamma - gamma (1 - p)^(gamma - 1) p l)
//
// The forward pass reads each row twice (its max, then the sum of exponentials, while the row is still in
// L2) and keeps only lse[N]; the backward pass reads the row once more and writes the gradient. Neither
// materialises log_softmax, which F.cross_entropy writes out in full ([N, V] floats) and reads back in its
// backward. bfloat16 and float16 logits are read as they are, without a float32 copy of the whole tensor.
// Rows whose label is `ignore_index` get loss 0 and gradient 0.
#include <swiftk/plugin.h>

#include <ATen/Dispatch.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cfloat>
#include <cmath>
#include <map>
#include <string>
#include <vector>

SWIFTK_PLUGIN("native_cross_entropy", "loss");

namespace {

using Vec = at::vec::Vectorized<float>;

// float32, bfloat16 and float16 logits (the dtypes a model's head produces).
#define DISPATCH(TYPE, NAME, ...)                                                                           \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                                 \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))
using Hyper = std::map<std::string, double>;

std::map<std::string, double> defaults() { return {{"gamma", 0.0}, {"alpha", 1.0}, {"ignore_index", -100.0}}; }

// A row as float32: the logits themselves, or widened into `buffer`.
template <typename T>
const float* row_as_float(const T* row, int64_t V, std::vector<float>& buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
    buffer.resize(V);
    for (int64_t j = 0; j < V; ++j) buffer[j] = float(row[j]);
    return buffer.data();
  }
}

float log_sum_exp(const float* x, int64_t V) {
  const float max = at::vec::reduce_all<float>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, x, V);
  const Vec shift(max);
  const float sum = at::vec::map_reduce_all<float>([&](Vec a) { return (a - shift).exp_u20(); },
                                                    [](Vec a, Vec b) { return a + b; }, x, V);
  return max + std::log(sum);
}

struct Focal {
  double gamma, alpha;
  float loss(float l) const {  // l = log p_t
    if (gamma == 0.0) return float(-alpha * l);
    const double one_minus_p = std::max(-std::expm1(double(l)), double(FLT_MIN));
    return float(-alpha * std::pow(one_minus_p, gamma) * l);
  }
  float slope(float l) const {  // f'(l)
    if (gamma == 0.0) return float(-alpha);
    const double p = std::exp(double(l)), one_minus_p = -std::expm1(double(l));
    const double w = std::pow(std::max(one_minus_p, double(FLT_MIN)), gamma);
    const double dw = one_minus_p > FLT_MIN ? -gamma * std::pow(one_minus_p, gamma - 1.0) * p : 0.0;
    return float(-alpha * (w + l * dw));
  }
};

void check_inputs(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.device().is_cpu() && labels.device().is_cpu(),
              "native_cross_entropy runs on CPU tensors; use loss_type = \"cross_entropy\" on CUDA");
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "native_cross_entropy: logits must be a contiguous "
              "[N, V] tensor, got ", logits.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0) && labels.scalar_type() == at::kLong,
              "native_cross_entropy: labels must be int64 [N] with N = ", logits.size(0), ", got ",
              labels.scalar_type(), " ", labels.sizes());
}

int64_t grain(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

std::vector<at::Tensor> forward(const at::Tensor& logits, const at::Tensor& labels_, const Hyper& h) {
  check_inputs(logits, labels_);
  const at::Tensor labels = labels_.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  const Focal focal{swiftk::hyper(h, "gamma"), swiftk::hyper(h, "alpha")};
  const int64_t ignore = int64_t(swiftk::hyper(h, "ignore_index"));
  auto losses = at::zeros({N}, logits.options().dtype(at::kFloat));
  auto lse = at::zeros({N}, logits.options().dtype(at::kFloat));
  const int64_t* label = labels.data_ptr<int64_t>();
  float* loss_out = losses.data_ptr<float>();
  float* lse_out = lse.data_ptr<float>();
  DISPATCH(logits.scalar_type(), "native_ce_forward", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain(V), [&](int64_t begin, int64_t end) {
      std::vector<float> buffer;
      for (int64_t i = begin; i < end; ++i) {
        if (label[i] == ignore) continue;
        TORCH_CHECK(label[i] >= 0 && label[i] < V, "native_cross_entropy: label ", label[i], " at row ", i,
                    " is outside [0, ", V, ")");
        const float* row = row_as_float(x + i * V, V, buffer);
        lse_out[i] = log_sum_exp(row, V);
        loss_out[i] = focal.loss(row[label[i]] - lse_out[i]);
      }
    });
  });
  return {losses, lse};
}

at::Tensor backward(const at::Tensor& grad_losses, const at::Tensor& logits, const at::Tensor& labels_,
                    const std::vector<at::Tensor>& saved, const Hyper& h) {
  check_inputs(logits, labels_);
  TORCH_CHECK(saved.size() == 1, "native_cross_entropy backward: expected the saved lse");
  const at::Tensor labels = labels_.contiguous();
  const at::Tensor grad = grad_losses.to(at::kFloat).contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  const Focal focal{swiftk::hyper(h, "gamma"), swiftk::hyper(h, "alpha")};
  const int64_t ignore = int64_t(swiftk::hyper(h, "ignore_index"));
  auto grad_logits = at::empty_like(logits);
  const int64_t* label = labels.data_ptr<int64_t>();
  const float* lse = saved[0].data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  DISPATCH(logits.scalar_type(), "native_ce_backward", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    scalar_t* out = grad_logits.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain(V), [&](int64_t begin, int64_t end) {
      std::vector<float> buffer, wide;
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* o = out + i * V;
        if (label[i] == ignore || g[i] == 0.f) {
          std::fill(o, o + V, scalar_t(0));
          continue;
        }
        const float* row = row_as_float(x + i * V, V, buffer);
        const float c = -focal.slope(row[label[i]] - lse[i]) * g[i];
        const Vec shift(lse[i]), scale(c);
        const auto softmax_times_c = [&](Vec a) { return (a - shift).exp_u20() * scale; };
        if constexpr (std::is_same_v<scalar_t, float>) {
          at::vec::map(softmax_times_c, o, row, V);
          o[label[i]] -= c;
        } else {
          wide.resize(V);
          at::vec::map(softmax_times_c, wide.data(), row, V);
          wide[label[i]] -= c;
          for (int64_t j = 0; j < V; ++j) o[j] = scalar_t(wide[j]);
        }
      }
    });
  });
  return grad_logits;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  swiftk::export_info(m);
  m.def("defaults", &defaults, "hyperparameters and their defaults");
  m.def("forward", &forward, "per-row losses [N] and the saved lse [N]",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("backward", &backward, "the gradient w.r.t. the logits",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
