// The Adam moment update, vectorised with at::vec and shared by native_adamw and native_projected_adamw.
//
//   m = beta1 m + (1 - beta1) g            v = beta2 v + (1 - beta2) g^2        (v_max = max(v_max, v))
//   d = (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)       bc_k = 1 - beta_k^t   (the bias corrections)
//
// `adam_update_all` then updates the parameters in place: p = p (1 - lr wd) - d (decoupled weight decay);
// `adam_direction_inplace` writes d over the gradient buffer instead, for a caller that projects it first.
// Moments are float32, or bfloat16 to halve their memory; bfloat16 parameters and moments are widened in small
// tiles, updated in float32 and rounded back: to nearest, or stochastically (`Rounding`), so that updates
// smaller than half a bfloat16 step still move the value on average instead of vanishing.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace swiftk {

struct AdamScalars {
  // Rounded from double to float once per tensor, in the same order as torch's AdamW, so that both produce
  // the same float32 results (not merely the same maths).
  float beta2, eps, lerp, sq_coef;
  float neg_step_size;  // -lr / bc1
  float bc2_sqrt;       // sqrt(bc2)
  float decay;          // 1 - lr * weight_decay
  bool amsgrad, maximize;

  AdamScalars(double lr, double b1, double b2, double eps_, double wd, double step, bool ams, bool max_)
      : beta2(float(b2)), eps(float(eps_)), lerp(float(1.0 - b1)), sq_coef(float(1.0 - b2)),
        neg_step_size(float(-(lr / (1.0 - std::pow(b1, step))))),
        bc2_sqrt(float(std::sqrt(1.0 - std::pow(b2, step)))),
        decay(wd != 0.0 ? float(1.0 - lr * wd) : 1.f), amsgrad(ams), maximize(max_) {}
};

// One element, in scalar arithmetic; the vector loop below computes the same expression tree.
//   m <- lerp(m, g, 1 - beta1), as m + w (g - m) for a small weight w and g - (g - m)(1 - w) otherwise
inline float lerp_moment(float m, float g, float w) {
  return w < 0.5f ? m + w * (g - m) : g - (g - m) * (1.f - w);
}

// Moments for n elements. `p` non-null: the parameter is updated in place. `p` null: the update direction
// (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps) is written to `out` (which may alias g) instead.
inline void adam_fp32(float* p, const float* g, float* m, float* v, float* vmax, float* out, int64_t n,
                      const AdamScalars& s) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t W = Vec::size();
  const bool small = s.lerp < 0.5f;
  const Vec coeff(small ? s.lerp : s.lerp - 1.f), beta2(s.beta2), sq_coef(s.sq_coef), eps(s.eps),
      neg_step(s.neg_step_size), bc2_sqrt(s.bc2_sqrt), decay(s.decay), zero(0.f);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    Vec gv = Vec::loadu(g + i);
    if (s.maximize) gv = zero - gv;
    const Vec m_old = Vec::loadu(m + i);
    const Vec mv = at::vec::fmadd(coeff, gv - m_old, small ? m_old : gv);
    Vec vv = Vec::loadu(v + i) * beta2 + sq_coef * gv * gv;
    mv.store(m + i);
    vv.store(v + i);
    if (s.amsgrad) {
      vv = at::vec::maximum(Vec::loadu(vmax + i), vv);
      vv.store(vmax + i);
    }
    const Vec denom = vv.sqrt() / bc2_sqrt + eps;
    if (p != nullptr) {
      (Vec::loadu(p + i) * decay + neg_step * mv / denom).store(p + i);
    } else {
      (zero - neg_step * mv / denom).store(out + i);
    }
  }
  for (; i < n; ++i) {
    const float gi = s.maximize ? -g[i] : g[i];
    const float mi = lerp_moment(m[i], gi, s.lerp);
    float vi = v[i] * s.beta2 + s.sq_coef * gi * gi;
    m[i] = mi;
    v[i] = vi;
    if (s.amsgrad) vi = vmax[i] = std::max(vmax[i], vi);
    const float denom = std::sqrt(vi) / s.bc2_sqrt + s.eps;
    if (p != nullptr) {
      p[i] = p[i] * s.decay + s.neg_step_size * mi / denom;
    } else {
      out[i] = -(s.neg_step_size * mi / denom);
    }
  }
}

// How bfloat16 results are stored. Stochastic rounding adds 16 random bits below the kept mantissa and
// truncates: x rounds up with probability equal to its distance from the value below, so E[round(x)] = x. The
// bits are a hash of (seed, step, tensor, stream, element): the same whatever the threads do, and a resumed
// run draws what an uninterrupted one would.
struct Rounding {
  bool stochastic = false;
  uint64_t key = 0;  // seed, step and tensor, mixed

  uint32_t bits(uint64_t stream, int64_t index) const {
    uint64_t x = key ^ (stream * 0x9E3779B97F4A7C15ULL) ^ (uint64_t(index) * 0xD1B54A32D192ED03ULL);
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return uint32_t(x);
  }

  c10::BFloat16 round(float f, uint64_t stream, int64_t index) const {
    if (!stochastic || !std::isfinite(f)) return c10::BFloat16(f);  // round to nearest even
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    const uint32_t up = (u + (bits(stream, index) & 0xFFFFu)) & 0xFFFF0000u;
    const uint32_t down = u & 0xFFFF0000u;
    const uint32_t kept = ((up >> 16) & 0x7F80u) == 0x7F80u ? down : up;  // never round a finite value to inf
    return c10::BFloat16(uint16_t(kept >> 16), c10::BFloat16::from_bits());
  }
};

inline float widen(float x) { return x; }
inline float widen(c10::BFloat16 x) { return float(x); }

// A parameter or moment of type T that is not float32 is widened in tiles and stored back by `rounding`.
// `P` the parameter's (and gradient's) type, `M` the moments'.
template <typename P, typename M>
inline void adam_tiled(P* p, const P* g, M* m, M* v, float* vmax, int64_t n, int64_t offset, const AdamScalars& s,
                       const Rounding& rounding) {
  constexpr int64_t TILE = 1024;
  float pf[TILE], gf[TILE], mf[TILE], vf[TILE];
  for (int64_t start = 0; start < n; start += TILE) {
    const int64_t len = std::min(TILE, n - start);
    for (int64_t j = 0; j < len; ++j) {
      pf[j] = widen(p[start + j]);
      gf[j] = widen(g[start + j]);
      mf[j] = widen(m[start + j]);
      vf[j] = widen(v[start + j]);
    }
    adam_fp32(pf, gf, mf, vf, vmax ? vmax + start : nullptr, nullptr, len, s);
    for (int64_t j = 0; j < len; ++j) {
      const int64_t at = offset + start + j;
      if constexpr (std::is_same_v<P, float>) p[start + j] = pf[j];
      else p[start + j] = rounding.round(pf[j], 0, at);
      if constexpr (std::is_same_v<M, float>) {
        m[start + j] = mf[j];
        v[start + j] = vf[j];
      } else {
        m[start + j] = rounding.round(mf[j], 1, at);
        v[start + j] = rounding.round(vf[j], 2, at);
      }
    }
  }
}

constexpr int64_t CHUNK = 1 << 15;  // elements per work item: 128 KiB of float32, a few per L2

// Adam-update every tensor i (p[i] -= ..., moments m[i], v[i], and vmax[i] when amsgrad) in one parallel
// region: each tensor is cut into CHUNK-element pieces and at::parallel_for runs over the pieces of all of
// them, so small tensors (norms, biases) cost no thread start-up of their own and the threads stay busy to
// the end. `p` float32 or bfloat16 (its gradient the same); moments float32 or bfloat16 (vmax float32); all
// contiguous (checked by the caller). `rounding[i]` stores tensor i's bfloat16 results (empty: to nearest).
inline void adam_update_all(const std::vector<at::Tensor>& p, const std::vector<at::Tensor>& g,
                            const std::vector<at::Tensor>& m, const std::vector<at::Tensor>& v,
                            const std::vector<at::Tensor>* vmax, const std::vector<AdamScalars>& s,
                            const std::vector<Rounding>& rounding = {}) {
  std::vector<std::pair<size_t, int64_t>> chunks;  // (tensor, first element)
  for (size_t i = 0; i < p.size(); ++i) {
    for (int64_t start = 0; start < p[i].numel(); start += CHUNK) chunks.emplace_back(i, start);
  }
  const Rounding nearest;
  at::parallel_for(0, int64_t(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const auto [i, start] = chunks[c];
      const int64_t len = std::min(CHUNK, p[i].numel() - start);
      float* vmaxi = vmax ? (*vmax)[i].data_ptr<float>() + start : nullptr;
      const Rounding& r = rounding.empty() ? nearest : rounding[i];
      const bool fp32_p = p[i].scalar_type() == at::kFloat, fp32_m = m[i].scalar_type() == at::kFloat;
      if (fp32_p && fp32_m) {  // the common case, vectorised in place
        adam_fp32(p[i].data_ptr<float>() + start, g[i].data_ptr<float>() + start, m[i].data_ptr<float>() + start,
                  v[i].data_ptr<float>() + start, vmaxi, nullptr, len, s[i]);
      } else if (fp32_p) {
        adam_tiled(p[i].data_ptr<float>() + start, g[i].data_ptr<float>() + start,
                   m[i].data_ptr<c10::BFloat16>() + start, v[i].data_ptr<c10::BFloat16>() + start, vmaxi, len,
                   start, s[i], r);
      } else if (fp32_m) {
        adam_tiled(p[i].data_ptr<c10::BFloat16>() + start, g[i].data_ptr<c10::BFloat16>() + start,
                   m[i].data_ptr<float>() + start, v[i].data_ptr<float>() + start, vmaxi, len, start, s[i], r);
      } else {
        adam_tiled(p[i].data_ptr<c10::BFloat16>() + start, g[i].data_ptr<c10::BFloat16>() + start,
                   m[i].data_ptr<c10::BFloat16>() + start, v[i].data_ptr<c10::BFloat16>() + start, vmaxi, len,
                   start, s[i], r);
      }
    }
  });
}

// The Adam direction of a float32 tensor `g` (overwritten with it), moments updated, in parallel chunks.
inline void adam_direction_inplace(at::Tensor& g, at::Tensor& m, at::Tensor& v, const AdamScalars& s) {
  const int64_t n = g.numel();
  at::parallel_for(0, (n + CHUNK - 1) / CHUNK, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t start = c * CHUNK, len = std::min(CHUNK, n - start);
      float* gi = g.data_ptr<float>() + start;
      adam_fp32(nullptr, gi, m.data_ptr<float>() + start, v.data_ptr<float>() + start, nullptr, gi, len, s);
    }
  });
}

}  // namespace swiftk
