// FBGEMM's fp16-weight product (fp32 activations, fp32 accumulation) on several threads, for loramix.native_fp16.
// torch calls FBGEMM's cblas_gemm_compute on one thread; FBGEMM itself splits a product's output columns over
// threads (thread_id of num_threads), each column computed by the same kernel as on one thread.
#include <fbgemm/FbgemmFP16.h>
#include <omp.h>

using Packed = fbgemm::PackedGemmMatrixFP16;

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

}  // extern "C"
