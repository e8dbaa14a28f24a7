// loramix's native CPU kernels (loramix.native loads them with ctypes):
// - FBGEMM's fp16-weight product (fp32 activations, fp32 accumulation) on several threads. torch calls FBGEMM's
//   cblas_gemm_compute on one thread; FBGEMM itself splits a product's output columns over threads (thread_id of
//   num_threads), each column computed by the same kernel as on one thread.
// - The small operators of a Llama decode step, each one pass over its data (loramix.native_step): torch spends
//   ~5 us of dispatch on each of its ~1,500 operators a step; these are one call each.
// All tensors are fp32, contiguous, row-major. Built with -ffp-contract=off: each product and sum is rounded on
// its own, as torch's elementwise operators do.
#include <fbgemm/FbgemmFP16.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

using Packed = fbgemm::PackedGemmMatrixFP16;
constexpr long PARALLEL_WORK = 1 << 14;  // values from which the small operators are shared among threads

extern "C" {

// weight: [n, k] fp32, row-major (a torch Linear's), packed as fp16 for x @ weight^T
void* loramix_half_pack(int k, int n, const float* weight) {
  try {
    return new Packed(fbgemm::matrix_op_t::Transpose, k, n, 1.0f, weight);
  } catch (...) {
    return nullptr;
  }
}

void loramix_half_free(void* packed) { delete static_cast<Packed*>(packed); }

// c [m, n] = a [m, k] @ weight^T (+ bias [n]), on `threads` threads
void loramix_half_gemm(int m, const float* a, const void* packed, const float* bias, float* c, int threads) {
  const Packed& b = *static_cast<const Packed*>(packed);
  if (threads <= 1) {
    fbgemm::cblas_gemm_compute(fbgemm::matrix_op_t::NoTranspose, m, a, b, 0.0f, c, 0, 1);
  } else {
#pragma omp parallel num_threads(threads)
    fbgemm::cblas_gemm_compute(
        fbgemm::matrix_op_t::NoTranspose, m, a, b, 0.0f, c, omp_get_thread_num(), omp_get_num_threads());
  }
  if (bias != nullptr) {
    const int n = b.numCols();
    for (int i = 0; i < m; ++i) {
      for (int j = 0; j < n; ++j) c[i * n + j] += bias[j];
    }
  }
}

// h_out = h + delta (no delta: h), x = rms_norm(h_out) * weight, each [rows, d]; as transformers' LlamaRMSNorm:
// h * rsqrt(mean(h^2) + eps), then weight * that
void loramix_add_rms(int rows, int d, const float* h, const float* delta, const float* weight, float eps,
                     float* h_out, float* x) {
  for (int r = 0; r < rows; ++r) {
    const float* in = h + (long)r * d;
    float* sum_row = h_out + (long)r * d;
    float* normed = x + (long)r * d;
    if (delta != nullptr) {
      const float* add = delta + (long)r * d;
      for (int i = 0; i < d; ++i) sum_row[i] = in[i] + add[i];
    } else if (sum_row != in) {
      for (int i = 0; i < d; ++i) sum_row[i] = in[i];
    }
    float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
    for (int i = 0; i < d; ++i) squares += sum_row[i] * sum_row[i];
    const float inverse = 1.0f / std::sqrt(squares / d + eps);
    for (int i = 0; i < d; ++i) normed[i] = weight[i] * (sum_row[i] * inverse);
  }
}

// rotary embedding in place, x [rows, heads, dim] at each row's cos, sin [rows, dim]: x * cos + rotate_half(x) * sin
void loramix_rope(int rows, int heads, int dim, float* x, const float* cos, const float* sin) {
  const int half = dim / 2;
  for (int r = 0; r < rows; ++r) {
    const float* c = cos + (long)r * dim;
    const float* s = sin + (long)r * dim;
    for (int head = 0; head < heads; ++head) {
      float* v = x + ((long)r * heads + head) * dim;
      for (int i = 0; i < half; ++i) {
        const float first = v[i], second = v[i + half];
        v[i] = first * c[i] + (-second) * s[i];
        v[i + half] = second * c[i + half] + first * s[i + half];
      }
    }
  }
}

// gate = silu(gate) * up, in place, n values (on `threads` threads from PARALLEL_WORK values)
void loramix_silu_mul(long n, float* gate, const float* up, int threads) {
#pragma omp parallel for num_threads(threads) if (n >= PARALLEL_WORK)
  for (long i = 0; i < n; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

// the experts' exact mixture: y [rows, out] += ((x [rows, in] A^T) * scale [rows, rank]) B, A [rank, in],
// b_t = B^T [rank, out] (loramix.mixture's `exact` mode)
void loramix_lora(int rows, int in, int rank, int out, const float* x, const float* a, const float* scale,
                  const float* b_t, float* y, int threads) {
  std::vector<float> low((long)rows * rank);
  const bool parallel = (long)rows * rank * (in + out) >= 8 * PARALLEL_WORK;
  const int blocks = rows / 4;
#pragma omp parallel for num_threads(threads) if (parallel)
  for (int j = 0; j < rank; ++j) {
    const float* aj = a + (long)j * in;
    for (int block = 0; block < blocks; ++block) {  // four rows at a time: four independent sums
      const int r = 4 * block;
      const float *x0 = x + (long)r * in, *x1 = x0 + in, *x2 = x1 + in, *x3 = x2 + in;
      float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
      for (int i = 0; i < in; ++i) {
        d0 += x0[i] * aj[i];
        d1 += x1[i] * aj[i];
        d2 += x2[i] * aj[i];
        d3 += x3[i] * aj[i];
      }
      const float sums[4] = {d0, d1, d2, d3};
      for (int k = 0; k < 4; ++k) low[(long)(r + k) * rank + j] = sums[k] * scale[(long)(r + k) * rank + j];
    }
    for (int r = 4 * blocks; r < rows; ++r) {
      const float* xr = x + (long)r * in;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int i = 0; i < in; ++i) dot += xr[i] * aj[i];
      low[(long)r * rank + j] = dot * scale[(long)r * rank + j];
    }
  }
#pragma omp parallel for num_threads(threads) if (parallel)
  for (int r = 0; r < rows; ++r) {
    std::vector<float> delta(out, 0.0f);  // B's delta of a row, summed before it is added (as torch's y + hB)
    for (int j = 0; j < rank; ++j) {
      const float coefficient = low[(long)r * rank + j];
      const float* bj = b_t + (long)j * out;
#pragma omp simd
      for (int o = 0; o < out; ++o) delta[o] += coefficient * bj[o];
    }
    float* yr = y + (long)r * out;
    for (int o = 0; o < out; ++o) yr[o] += delta[o];
  }
}

// attention of `queries` new tokens a row (1 in a decode step; a prompt or a chunk of one in a prefill):
// q [rows, queries, heads, dim], keys and values [rows, kv_heads, length, dim] whose last `queries` positions are
// these tokens' (each position's dim values contiguous; a row and a head `row_stride` and `head_stride` values
// apart: views of a cache with room after its length), mask [rows, length] (nonzero: attend; null: all), out
// [rows, queries, heads, dim]. Query j sees keys up to its own position (causal); query head h reads key head
// h / (heads / kv_heads), as transformers' repeat_kv; a query that sees no key (left padding) gets zeros.
// (rows, queries, heads) are shared among `threads` threads from PARALLEL_WORK products.
void loramix_attend(int rows, int queries, int heads, int kv_heads, int length, int dim, float scaling,
                    const float* q, const float* keys, const float* values, long row_stride, long head_stride,
                    const unsigned char* mask, float* out, int threads) {
  const int group = heads / kv_heads;
  const long tasks = (long)rows * queries * heads;
  const bool parallel = tasks * length * dim >= PARALLEL_WORK;
#pragma omp parallel for num_threads(threads) if (parallel)
  for (long task = 0; task < tasks; ++task) {
    const int head = task % heads, j = (task / heads) % queries, r = task / ((long)heads * queries);
    const int seen = length - queries + j + 1;  // causal: this query's own position and those before it
    const unsigned char* allowed = mask == nullptr ? nullptr : mask + (long)r * length;
    std::vector<float> weights(seen);
    const long kv = (long)r * row_stride + (long)(head / group) * head_stride;
    const float* k = keys + kv;
    const float* v = values + kv;
    const float* query = q + task * dim;
    float top = -std::numeric_limits<float>::infinity();
    for (int t = 0; t < seen; ++t) {
      if (allowed != nullptr && !allowed[t]) continue;
      const float* kt = k + (long)t * dim;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int i = 0; i < dim; ++i) dot += query[i] * kt[i];
      weights[t] = dot * scaling;
      top = std::max(top, weights[t]);
    }
    float total = 0.0f;
    for (int t = 0; t < seen; ++t) {
      weights[t] = (allowed != nullptr && !allowed[t]) ? 0.0f : std::exp(weights[t] - top);
      total += weights[t];
    }
    float* o = out + task * dim;
    for (int i = 0; i < dim; ++i) o[i] = 0.0f;
    if (total == 0.0f) continue;  // every key masked: a padding position, whose output nothing reads
    for (int t = 0; t < seen; ++t) {
      if (weights[t] == 0.0f) continue;
      const float share = weights[t] / total;
      const float* vt = v + (long)t * dim;
      for (int i = 0; i < dim; ++i) o[i] += share * vt[i];
    }
  }
}

// one position of a cache with room: room [rows, heads, capacity, dim] (rows and heads `row_stride` and
// `head_stride` values apart) at position `at` <- fresh [rows, heads, dim]
void loramix_append(int rows, int heads, int dim, long row_stride, long head_stride, int at, const float* fresh,
                    float* room) {
  for (int r = 0; r < rows; ++r) {
    for (int head = 0; head < heads; ++head) {
      const float* from = fresh + ((long)r * heads + head) * dim;
      float* to = room + (long)r * row_stride + (long)head * head_stride + (long)at * dim;
      for (int i = 0; i < dim; ++i) to[i] = from[i];
    }
  }
}

}  // extern "C"
