// native_projected_adamw: AdamW whose update of each targeted matrix lives in a low-rank subspace of its
// gradient, refreshed every K steps (GaLore, Zhao et al. 2024, Algorithm 1 with decoupled weight decay).
//
// For a weight W [m, n] with gradient G_t, rank r <= min(m, n), refresh interval K, scale alpha:
//
//   if (t - 1) mod K == 0:   U, S, V^T = svd(G_t)
//                            m <= n:  P = U[:, :r]        [m, r]    (project from the left)
//                            m >  n:  Q = V[:, :r]        [n, r]    (project from the right)
//   R_t = P^T G_t  [r, n]     or     R_t = G_t Q  [m, r]             the projected gradient
//   M_t = beta1 M_{t-1} + (1 - beta1) R_t                            moments of R, in the subspace:
//   V_t = beta2 V_{t-1} + (1 - beta2) R_t^2                          O(r max(m, n)) state instead of O(m n)
//   D_t = (lr / bc1) M_t / (sqrt(V_t) / sqrt(bc2) + eps)             bc_k = 1 - beta_k^t
//   W_t = (1 - lr wd) W_{t-1} - alpha (P D_t)    or    - alpha (D_t Q^T)
//
// The moments are kept across a refresh (as GaLore does): they are reinterpreted in the new basis. Vectors,
// and matrices the caller does not target (rank 0 in their group), get plain AdamW (swiftk/adam.h) in one
// parallel pass; projected matrices go through torch's SVD and BLAS (at::linalg_svd, at::addmm_), which are
// multithreaded themselves, and the Adam direction of R is computed in place by the same vectorised kernel.
// The Python reference used by the tests is swiftk.plugins.optimizers.projected_adamw.reference_step.
#include <swiftk/plugin.h>
#include <swiftk/adam.h>

#include <ATen/ops/linalg_svd.h>

#include <map>
#include <string>
#include <vector>

SWIFTK_PLUGIN("native_projected_adamw", "optimizer");

namespace {

using State = std::map<std::string, std::vector<at::Tensor>>;
using Hyper = std::map<std::string, double>;

std::map<std::string, double> defaults() {
  return {{"lr", 1e-3}, {"beta1", 0.9}, {"beta2", 0.999}, {"eps", 1e-8}, {"weight_decay", 0.0},
          {"rank", 0.0}, {"update_proj_gap", 200.0}, {"scale", 0.25}};
}

// Projected iff the group's rank is positive and the parameter is a matrix.
int64_t rank_of(const at::Tensor& param, const Hyper& h) {
  const auto rank = int64_t(swiftk::hyper(h, "rank"));
  if (rank <= 0 || param.dim() != 2) return 0;
  return std::min({rank, param.size(0), param.size(1)});
}

std::map<std::string, at::Tensor> init_state(const at::Tensor& param, const Hyper& h) {
  auto options = param.options().dtype(at::kFloat);
  const int64_t r = rank_of(param, h);
  if (r == 0) {
    return {{"exp_avg", at::zeros(param.sizes(), options)}, {"exp_avg_sq", at::zeros(param.sizes(), options)},
            {"proj", at::empty({0}, options)}};
  }
  const int64_t m = param.size(0), n = param.size(1);
  const bool left = m <= n;
  const std::vector<int64_t> moments = left ? std::vector<int64_t>{r, n} : std::vector<int64_t>{m, r};
  return {{"exp_avg", at::zeros(moments, options)}, {"exp_avg_sq", at::zeros(moments, options)},
          {"proj", at::zeros({left ? m : n, r}, options)}};
}

void project_and_update(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                        at::Tensor& proj, double step, const swiftk::AdamScalars& s, const Hyper& h) {
  const at::Tensor G = grad.to(at::kFloat);
  const int64_t m = param.size(0), n = param.size(1), r = proj.size(1);
  const bool left = m <= n;
  const auto gap = std::max<int64_t>(1, int64_t(swiftk::hyper(h, "update_proj_gap")));
  if ((int64_t(step) - 1) % gap == 0) {
    auto [U, S, Vh] = at::linalg_svd(G, /*full_matrices=*/false);
    proj.copy_(left ? U.narrow(1, 0, r) : Vh.narrow(0, 0, r).t());
  }
  at::Tensor R = left ? at::mm(proj.t(), G) : at::mm(G, proj);  // [r, n] or [m, r], contiguous
  swiftk::adam_direction_inplace(R, exp_avg, exp_avg_sq, s);     // R <- D
  const double scale = swiftk::hyper(h, "scale");
  if (param.scalar_type() == at::kFloat) {
    left ? param.addmm_(proj, R, s.decay, -scale) : param.addmm_(R, proj.t(), s.decay, -scale);
  } else {
    const at::Tensor update = left ? at::mm(proj, R) : at::mm(R, proj.t());
    param.copy_(param.to(at::kFloat).mul_(s.decay).sub_(update, scale));
  }
}

void step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads, const State& state,
          const std::vector<double>& steps, const Hyper& h) {
  const size_t n = params.size();
  const auto& exp_avg = state.at("exp_avg");
  const auto& exp_avg_sq = state.at("exp_avg_sq");
  const auto& proj = state.at("proj");
  TORCH_CHECK(grads.size() == n && steps.size() == n && exp_avg.size() == n && exp_avg_sq.size() == n &&
                  proj.size() == n, "native_projected_adamw: ", n, " parameters but mismatched gradient/state lists");
  std::vector<at::Tensor> p, g, m, v;
  std::vector<swiftk::AdamScalars> dense;
  for (size_t i = 0; i < n; ++i) {
    const auto dtype = params[i].scalar_type();
    TORCH_CHECK(params[i].device().is_cpu(), "native_projected_adamw runs on CPU tensors (parameter ", i, " is on ",
                params[i].device(), ")");
    TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && grads[i].scalar_type() == dtype &&
                    params[i].is_contiguous() && grads[i].is_contiguous(),
                "native_projected_adamw: parameter ", i, " and its gradient must be contiguous float32 or bfloat16");
    const swiftk::AdamScalars s(swiftk::hyper(h, "lr"), swiftk::hyper(h, "beta1"), swiftk::hyper(h, "beta2"),
                                swiftk::hyper(h, "eps"), swiftk::hyper(h, "weight_decay"), steps[i], false, false);
    if (proj[i].numel() == 0) {
      p.push_back(params[i]), g.push_back(grads[i]), m.push_back(exp_avg[i]), v.push_back(exp_avg_sq[i]);
      dense.push_back(s);
    } else {
      at::Tensor param = params[i], avg = exp_avg[i], avg_sq = exp_avg_sq[i], basis = proj[i];
      project_and_update(param, grads[i], avg, avg_sq, basis, steps[i], s, h);
    }
  }
  swiftk::adam_update_all(p, g, m, v, nullptr, dense);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  swiftk::export_info(m);
  m.def("defaults", &defaults, "hyperparameters and their defaults");
  m.def("init_state", &init_state, "moments (and the projection basis) for one parameter");
  m.def("step", &step, "update every parameter in place", pybind11::call_guard<pybind11::gil_scoped_release>());
}
