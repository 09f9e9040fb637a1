// Fused CPU steps of LARS/TVLARS and LAMB (lars.optim._fused loads this file with
// torch.utils.cpp_extension). Each step makes the fewest passes over a tensor's memory that its
// norms allow (equations: lars/optim/_lars_rules.py and _lamb_rules.py):
//
//   LARS, TVLARS: pass 1 reads w and g once for ||w|| and ||g|| (barlowtwins: ||g + wd w||);
//                 pass 2 reads w, g, v and writes v and w once. (SGD's fused kernel: pass 2 only.)
//   LAMB:         pass 1 reads w, g, mo, ve, writes mo and ve and sums ||w||^2 and ||u||^2 of
//                 the direction u without storing it; pass 2 reads w, mo, ve, recomputes u
//                 (the same operations, so the same values) and writes w. (AdamW: one pass.)
//
// Every tensor is cut into fixed chunks of kChunk elements; one at::parallel_for runs over the
// chunks of all tensors in each pass, so two parallel regions per step, whatever the number of
// tensors. Squared norms are summed per chunk and the chunk sums added in a fixed order, so the
// result does not depend on the thread count. Built with -fopenmp: at::parallel_for
// runs on torch's OpenMP threads only when _OPENMP is defined (serially otherwise), and "omp simd"
// states that the element loops' operands do not overlap (so they vectorise) and lets the
// reductions keep several partial sums (one running sum would be bound by the latency of an add). All operands of a tensor must be
// dense with the same strides (the caller checks; flat indexing is then valid for each).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kChunk = 1 << 14;
// Squares are summed in the tensor's dtype over blocks of kBlock elements (kBlock / 8 per SIMD
// lane for float32 with AVX2), then in double: vector-wide sums without conversions, and float32
// sums of at most 32 terms before they move to double.
constexpr int64_t kBlock = 256;

struct Chunk {
  int64_t tensor, begin, end;
};

std::vector<Chunk> chunks_of(const std::vector<at::Tensor>& ts) {
  std::vector<Chunk> out;
  for (int64_t i = 0; i < static_cast<int64_t>(ts.size()); ++i) {
    const int64_t n = ts[i].numel();
    for (int64_t b = 0; b < n; b += kChunk) out.push_back({i, b, std::min(n, b + kChunk)});
  }
  return out;
}

void check_lists(const std::vector<std::vector<at::Tensor>*>& lists) {
  const auto& first = *lists[0];
  for (const auto* list : lists) TORCH_CHECK(list->size() == first.size(), "list sizes differ");
  for (size_t i = 0; i < first.size(); ++i) {
    const at::Tensor& p = first[i];
    TORCH_CHECK(p.device().is_cpu() && p.is_non_overlapping_and_dense(), "dense CPU tensors only");
    TORCH_CHECK(p.scalar_type() == first[0].scalar_type(), "one dtype per call");
    for (const auto* list : lists) {
      const at::Tensor& t = (*list)[i];
      TORCH_CHECK(t.scalar_type() == p.scalar_type() && t.strides() == p.strides() &&
                      t.sizes() == p.sizes(),
                  "every operand needs its parameter's dtype, shape and strides");
    }
  }
}

// Per tensor, sum over its chunks (in chunk order) of the two per-chunk partial sums.
std::vector<double> per_tensor_sums(const std::vector<Chunk>& cs, const std::vector<double>& part,
                                    size_t n_tensors) {
  std::vector<double> sums(2 * n_tensors, 0.0);
  for (size_t c = 0; c < cs.size(); ++c) {
    sums[2 * cs[c].tensor] += part[2 * c];
    sums[2 * cs[c].tensor + 1] += part[2 * c + 1];
  }
  return sums;
}

template <typename F>
void for_chunks(const std::vector<Chunk>& cs, const F& body) {
  at::parallel_for(0, static_cast<int64_t>(cs.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) body(c, cs[c]);
  });
}

// ---------------------------------------------------------------------------------- LARS ----

enum LarsRule { kYou2017 = 0, kNus = 1, kBarlow = 2 };

struct LarsHyper {
  int rule;
  double lr, momentum, wd, eta, eps;
  bool nesterov, adapted;
  double trust_clip, update_clip, norm_clip;  // inf: no clamp
};

// trust (before lr) from the two norms, as lars/optim/_lars_rules.py computes it.
double lars_trust(const LarsHyper& h, double wn, double xn, double scale) {
  if (!h.adapted) return 1.0;
  if (h.rule == kBarlow) {  // s eta min(||w||, c) / min(||d||, c), 1 on a zero norm
    const double r = std::min(wn, h.norm_clip) * h.eta * scale / std::min(xn, h.norm_clip);
    return (wn > 0.0 && xn > 0.0) ? r : 1.0;
  }
  double r = h.eta * wn / (xn + h.wd * wn + h.eps);
  if (h.rule == kNus) r = std::min(std::max(r, 0.0), h.trust_clip);
  return ((wn > 0.0 && xn > 0.0) ? r : 1.0) * scale;
}

template <typename T>
void lars_sums(const LarsHyper& h, const T* w, const T* g, int64_t n, double* out) {
  const T wd = static_cast<T>(h.rule == kBarlow ? h.wd : 0.0);
  double sw = 0.0, sx = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    T bw = 0, bx = 0;
#pragma omp simd reduction(+ : bw, bx)
    for (int64_t i = b; i < e; ++i) {
      const T x = g[i] + wd * w[i];
      bw += w[i] * w[i];
      bx += x * x;
    }
    sw += bw;
    sx += bx;
  }
  out[0] = sw;
  out[1] = sx;
}

// One chunk of the update; s = lr * trust (you2017), trust (barlowtwins) or lr * trust (nus).
template <typename T>
void lars_update(const LarsHyper& h, T* w, const T* g, T* v, int64_t n, double trust) {
  const T m = static_cast<T>(h.momentum);
  const bool decay = h.rule == kYou2017 ? h.wd != 0.0 : (h.adapted && h.wd != 0.0);
  const T wd = static_cast<T>(decay ? h.wd : 0.0);
  if (h.rule == kYou2017) {
    const T s = static_cast<T>(h.lr * trust);
    if (v == nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) w[i] -= s * (g[i] + wd * w[i]);
    } else if (h.nesterov) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const T d = s * (g[i] + wd * w[i]);
        v[i] = m * v[i] + d;
        w[i] -= m * v[i] + d;
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        v[i] = m * v[i] + s * (g[i] + wd * w[i]);
        w[i] -= v[i];
      }
    }
  } else if (h.rule == kNus) {  // d = clamp(g [+ wd w]); buf = m buf + d; w -= lr trust buf
    const T s = static_cast<T>(h.lr * trust), c = static_cast<T>(h.update_clip);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      T d = std::min(std::max(g[i] + wd * w[i], -c), c);
      if (v != nullptr) d = v[i] = m * v[i] + d;
      w[i] -= s * d;
    }
  } else {  // barlowtwins: mu = m mu + trust d; w -= lr mu
    const T t = static_cast<T>(trust), lr = static_cast<T>(h.lr);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      T d = t * (g[i] + wd * w[i]);
      if (v != nullptr) d = v[i] = m * v[i] + d;
      w[i] -= lr * d;
    }
  }
}

}  // namespace

// Returns the trust ratio applied to each tensor (1-D, the parameters' dtype); ``scales`` holds
// TVLARS's phi per tensor or is empty. ``bufs`` is empty when momentum is 0.
at::Tensor lars_step(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                     std::vector<at::Tensor> bufs, at::Tensor scales, int64_t rule, double lr,
                     double momentum, double wd, double eta, double eps, bool nesterov,
                     bool adapted, double trust_clip, double update_clip, double norm_clip) {
  const LarsHyper h{static_cast<int>(rule), lr, momentum, wd, eta, eps, nesterov, adapted,
                    trust_clip, update_clip, norm_clip};
  const bool has_buf = !bufs.empty();
  std::vector<std::vector<at::Tensor>*> lists{&params, &grads};
  if (has_buf) lists.push_back(&bufs);
  check_lists(lists);
  const size_t n = params.size();
  const bool has_scale = scales.numel() > 0;
  TORCH_CHECK(!has_scale || (scales.numel() == static_cast<int64_t>(n) &&
                             scales.scalar_type() == at::kDouble && scales.is_contiguous()),
              "scales: one float64 value per tensor");
  const auto cs = chunks_of(params);
  std::vector<double> trust(n, 1.0);
  AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "lars_step", [&] {
    if (adapted) {
      std::vector<double> part(2 * cs.size());
      for_chunks(cs, [&](int64_t c, const Chunk& k) {
        lars_sums<scalar_t>(h, params[k.tensor].data_ptr<scalar_t>() + k.begin,
                            grads[k.tensor].data_ptr<scalar_t>() + k.begin, k.end - k.begin,
                            &part[2 * c]);
      });
      const auto sums = per_tensor_sums(cs, part, n);
      const double* sc = has_scale ? scales.data_ptr<double>() : nullptr;
      for (size_t i = 0; i < n; ++i)
        trust[i] = lars_trust(h, std::sqrt(sums[2 * i]), std::sqrt(sums[2 * i + 1]),
                              sc ? sc[i] : 1.0);
    }
    for_chunks(cs, [&](int64_t, const Chunk& k) {
      scalar_t* v = has_buf ? bufs[k.tensor].data_ptr<scalar_t>() + k.begin : nullptr;
      lars_update<scalar_t>(h, params[k.tensor].data_ptr<scalar_t>() + k.begin,
                            grads[k.tensor].data_ptr<scalar_t>() + k.begin, v, k.end - k.begin,
                            trust[k.tensor]);
    });
  });
  return at::tensor(trust, at::kDouble).to(params[0].scalar_type());
}

namespace {

// ---------------------------------------------------------------------------------- LAMB ----

// One tensor's constants of u = (mo / bc1) / (sqrt(ve / bc2) + eps) + wd w, bc1 = 1 - b1^t and
// bc2 = 1 - b2^t (both 1 without bias correction), computed as (c1 mo) / (sqrt(ve) + eps c2)
// with c2 = sqrt(bc2) and c1 = c2 / bc1: the same value, with one division and one square root
// per element (as torch's own Adam kernels). No branch in the element loops, so they vectorise:
// gscale is 1 without a gradient scale (x * 1 is exact) and tiny, the clamp of the denominator
// for eps = 0, is 0 otherwise (the denominator is then >= eps c2 > 0 already).
template <typename T>
struct LambOp {
  T b1, one_b1, b2, one_b2, eps_c2, tiny, wd, gscale, c1;

  inline T direction(T mo, T ve, T w) const {
    const T denom = std::max(std::sqrt(ve) + eps_c2, tiny);
    return (c1 * mo) / denom + wd * w;
  }
  inline void moments(T g, T& mo, T& ve) const {
    const T gi = g * gscale;
    mo = b1 * mo + one_b1 * gi;
    ve = b2 * ve + one_b2 * gi * gi;
  }
};

// The constants are computed in double and rounded once: 1 - b in float32 after rounding b
// (0.999) would be off by 5e-5 relative, a bias every step that the eager path (1 - b in Python
// floats) does not have.
template <typename T>
LambOp<T> lamb_op(double b1, double b2, double eps, double wd, double gscale, double bc1,
                  double bc2) {
  const T tiny = eps == 0.0 ? std::numeric_limits<T>::min() : T(0);
  const double c2 = std::sqrt(bc2);
  return LambOp<T>{static_cast<T>(b1), static_cast<T>(1.0 - b1), static_cast<T>(b2),
                   static_cast<T>(1.0 - b2), static_cast<T>(eps * c2), tiny, static_cast<T>(wd),
                   static_cast<T>(gscale), static_cast<T>(c2 / bc1)};
}

// Pass 1 over a chunk: moments updated in place; the squared norms of w and u in out[0], out[1].
template <typename T>
void lamb_moments(const LambOp<T>& op, const T* w, const T* g, T* mo, T* ve, int64_t n,
                  double* out) {
  double sw = 0.0, su = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    T bw = 0, bu = 0;
#pragma omp simd reduction(+ : bw, bu)
    for (int64_t i = b; i < e; ++i) {
      op.moments(g[i], mo[i], ve[i]);
      const T u = op.direction(mo[i], ve[i], w[i]);
      bw += w[i] * w[i];
      bu += u * u;
    }
    sw += bw;
    su += bu;
  }
  out[0] = sw;
  out[1] = su;
}

// The single pass where no trust ratio is needed: moments, then w -= lr u.
template <typename T>
void lamb_direct(const LambOp<T>& op, T* w, const T* g, T* mo, T* ve, int64_t n, T lr) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    op.moments(g[i], mo[i], ve[i]);
    w[i] -= lr * op.direction(mo[i], ve[i], w[i]);
  }
}

// Pass 2 over a chunk: w -= s u, with u recomputed from the updated moments.
template <typename T>
void lamb_apply(const LambOp<T>& op, T* w, const T* mo, const T* ve, int64_t n, T s) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) w[i] -= s * op.direction(mo[i], ve[i], w[i]);
}

}  // namespace

// Returns the trust ratio of each tensor (1-D, the parameters' dtype; ones when not ``adapts``).
// ``steps``: float32 step counts, already incremented; ``grad_scale``: empty or one value.
at::Tensor lamb_step(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                     std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_sqs,
                     std::vector<at::Tensor> steps, at::Tensor grad_scale, double lr, double beta1,
                     double beta2, double eps, double wd, bool bias_correction, bool adapts,
                     double norm_clip) {
  check_lists({&params, &grads, &exp_avgs, &exp_avg_sqs});
  const size_t n = params.size();
  TORCH_CHECK(steps.size() == n, "one step count per tensor");
  const auto cs = chunks_of(params);
  std::vector<double> trust(n, 1.0);
  AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "lamb_step", [&] {
    using T = scalar_t;
    // The scale rounded to the parameters' dtype first, as the eager path's g * c.to(dtype).
    const double gscale =
        grad_scale.numel() > 0
            ? static_cast<double>(grad_scale.to(params[0].scalar_type()).data_ptr<T>()[0])
            : 1.0;
    std::vector<LambOp<T>> ops;
    for (size_t i = 0; i < n; ++i) {
      TORCH_CHECK(steps[i].scalar_type() == at::kFloat && steps[i].device().is_cpu(),
                  "float32 CPU step counts");
      const double t = steps[i].data_ptr<float>()[0];
      double bc1 = 1.0, bc2 = 1.0;
      if (bias_correction) {
        bc1 = 1.0 - std::pow(beta1, t);
        bc2 = 1.0 - std::pow(beta2, t);
      }
      ops.push_back(lamb_op<T>(beta1, beta2, eps, wd, gscale, bc1, bc2));
    }
    std::vector<double> part(2 * cs.size());
    for_chunks(cs, [&](int64_t c, const Chunk& k) {
      const int64_t i = k.tensor, len = k.end - k.begin;
      T* w = params[i].data_ptr<T>() + k.begin;
      const T* g = grads[i].data_ptr<T>() + k.begin;
      T* mo = exp_avgs[i].data_ptr<T>() + k.begin;
      T* ve = exp_avg_sqs[i].data_ptr<T>() + k.begin;
      if (adapts) {
        lamb_moments<T>(ops[i], w, g, mo, ve, len, &part[2 * c]);
      } else {
        lamb_direct<T>(ops[i], w, g, mo, ve, len, static_cast<T>(lr));
      }
    });
    if (!adapts) return;
    const auto sums = per_tensor_sums(cs, part, n);
    for (size_t i = 0; i < n; ++i) {
      const double wn = std::sqrt(sums[2 * i]), un = std::sqrt(sums[2 * i + 1]);
      trust[i] = (wn > 0.0 && un > 0.0) ? std::min(wn, norm_clip) / un : 1.0;
    }
    for_chunks(cs, [&](int64_t, const Chunk& k) {
      const int64_t i = k.tensor;
      lamb_apply<T>(ops[i], params[i].data_ptr<T>() + k.begin, exp_avgs[i].data_ptr<T>() + k.begin,
                    exp_avg_sqs[i].data_ptr<T>() + k.begin, k.end - k.begin,
                    static_cast<T>(lr * trust[i]));
    });
  });
  return at::tensor(trust, at::kDouble).to(params[0].scalar_type());
}

// sum of x^2 over all ``tensors`` (one dtype, dense CPU) as a 0-dim float64 tensor: LAMB nus's
// global gradient norm squared, in one parallel region over the chunks of all tensors.
at::Tensor sum_squares(std::vector<at::Tensor> tensors) {
  check_lists({&tensors});
  const auto cs = chunks_of(tensors);
  std::vector<double> part(2 * cs.size());
  AT_DISPATCH_FLOATING_TYPES(tensors[0].scalar_type(), "sum_squares", [&] {
    const LarsHyper h{kYou2017, 0, 0, 0, 0, 0, false, true, 0, 0, 0};  // sums of w only
    for_chunks(cs, [&](int64_t c, const Chunk& k) {
      const scalar_t* x = tensors[k.tensor].data_ptr<scalar_t>() + k.begin;
      lars_sums<scalar_t>(h, x, x, k.end - k.begin, &part[2 * c]);
    });
  });
  double total = 0.0;
  for (size_t c = 0; c < cs.size(); ++c) total += part[2 * c];
  return at::scalar_tensor(total, at::kDouble);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sum_squares", &sum_squares, "sum of squares over CPU tensors");
  m.def("lars_step", &lars_step, "fused LARS/TVLARS step over CPU tensors");
  m.def("lamb_step", &lamb_step, "fused LAMB step over CPU tensors");
}
