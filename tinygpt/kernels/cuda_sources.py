"""The CUDA sources of kernels/cuda.py: plain strings, so they can be read (and compile-checked
by tests/test_kernels.py) without CuPy. Each kernel's math is that of the plain op of the same
name in tinygpt.functional; cuda.py builds the CuPy kernel objects on first use."""
from __future__ import annotations

from typing import NamedTuple

from tinygpt.functional.activations import GELU_CUBIC, SQRT_2_OVER_PI

# the GELU constants as CUDA literals of the kernel's type T
SQRT_2_OVER_PI_T = f"T({SQRT_2_OVER_PI!r})"
GELU_CUBIC_T = f"T({GELU_CUBIC!r})"
THREE_GELU_CUBIC_T = f"T({3 * GELU_CUBIC!r})"


class ElementwiseSource(NamedTuple):
    """The arguments of cupy.ElementwiseKernel. `T` is the dtype of the array arguments;
    Python scalars passed for a `T` parameter take that dtype."""
    in_params: str
    out_params: str
    operation: str
    name: str


class ReductionSource(NamedTuple):
    """The arguments of cupy.ReductionKernel (`a`, `b`: the partial results being combined)."""
    in_params: str
    out_params: str
    map_expr: str
    reduce_expr: str
    post_map_expr: str
    identity: str
    name: str


# ============================================================================ elementwise

GELU_FORWARD = ElementwiseSource("T x", "T y", f"""
    // y = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
    const T u = {SQRT_2_OVER_PI_T} * (x + {GELU_CUBIC_T} * x * x * x);
    y = T(0.5) * x * (T(1) + tanh(u));
""", "gelu_forward")

GELU_BACKWARD = ElementwiseSource("T x, T g", "T dx", f"""
    // t = tanh(u):  dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    const T t = tanh({SQRT_2_OVER_PI_T} * (x + {GELU_CUBIC_T} * x * x * x));
    const T du_dx = {SQRT_2_OVER_PI_T} * (T(1) + {THREE_GELU_CUBIC_T} * x * x);
    dx = g * (T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * du_dx);
""", "gelu_backward")

SWIGLU_FORWARD = ElementwiseSource("T a, T b", "T y", """
    // y = silu(a) b = a sigmoid(a) b;  sigmoid from exp(-|a|), which never overflows
    const T e = exp(-fabs(a));
    const T s = (a >= T(0) ? T(1) : e) / (T(1) + e);
    y = a * s * b;
""", "swiglu_forward")

SWIGLU_BACKWARD = ElementwiseSource("T a, T b, T g", "T da, T db", """
    // s = sigmoid(a), silu = a s:  dL/da = g b (s + silu (1 - s)),  dL/db = g silu
    const T e = exp(-fabs(a));
    const T s = (a >= T(0) ? T(1) : e) / (T(1) + e);
    const T silu = a * s;
    da = g * b * (s + silu * (T(1) - s));
    db = g * silu;
""", "swiglu_backward")

CROSS_ENTROPY_BACKWARD = ElementwiseSource("T z, T lse, int64 t, T w, int64 V", "T dz", """
    // dz = (softmax(z) - onehot(t)) * w,  softmax(z) = exp(z - logsumexp(z));
    // element i of the [N, V] output sits in column i % V
    dz = (exp(z - lse) - (i % V == t ? T(1) : T(0))) * w;
""", "cross_entropy_backward")

ADAMW_STEP = ElementwiseSource("T g, T decay, T b1, T b2, T eps, T step_size, T rsqrt_correction", "T w, T m, T v", """
    // decay = 1 - lr * weight_decay,  step_size = lr / (1 - b1^t),  rsqrt_correction = 1 / sqrt(1 - b2^t)
    w *= decay;
    m = b1 * m + (T(1) - b1) * g;
    v = b2 * v + (T(1) - b2) * g * g;
    w -= step_size * (m / (sqrt(v) * rsqrt_correction + eps));
""", "adamw_step")

LAYER_NORM_GRAD_SCALE = ReductionSource(
    "T g, T xhat", "T grad_scale", "g * xhat", "a + b", "grad_scale = a", "0", "layer_norm_grad_scale")


# ============================================================================ row kernels

ROW_KERNEL_NAMES = ("layer_norm_forward", "layer_norm_backward", "attention_softmax", "softmax_backward",
                    "logsumexp_rows")

ROW_KERNEL_SOURCE = r"""
struct Sum { template <typename T> __device__ T operator()(T a, T b) const { return a + b; } };
struct Max { template <typename T> __device__ T operator()(T a, T b) const { return a > b ? a : b; } };

// op over the values v of every thread in the block (blockDim.x a multiple of 32, at most
// 1024); every thread gets the result. Every thread of the block must call it.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op) {
    __shared__ T warp_results[32];
    for (int offset = 16; offset > 0; offset /= 2)  // within each warp, by exchanging registers
        v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
    __syncthreads();  // the previous call's readers are done with warp_results
    if (threadIdx.x % 32 == 0) warp_results[threadIdx.x / 32] = v;
    __syncthreads();
    T result = warp_results[0];
    const int warps = blockDim.x / 32;
    for (int w = 1; w < warps; ++w) result = op(result, warp_results[w]);
    return result;
}

// y = xhat * scale + shift,  xhat = (x - mean) * rstd,  rstd = 1 / sqrt(var + eps),
// mean and biased var over the C values of row blockIdx.x of x [N, C].
template <typename T>
__global__ void layer_norm_forward(const T* x, const T* scale, const T* shift, T* y, T* xhat, T* rstd,
                                   long long C, T eps) {
    const long long row = blockIdx.x * C;
    T sum = 0;
    for (long long j = threadIdx.x; j < C; j += blockDim.x) sum += x[row + j];
    const T mean = block_reduce(sum, Sum()) / T(C);
    T sum_sq = 0;
    for (long long j = threadIdx.x; j < C; j += blockDim.x) {
        const T d = x[row + j] - mean;
        sum_sq += d * d;
    }
    const T r = T(1) / sqrt(block_reduce(sum_sq, Sum()) / T(C) + eps);
    for (long long j = threadIdx.x; j < C; j += blockDim.x) {
        const T h = (x[row + j] - mean) * r;
        xhat[row + j] = h;
        y[row + j] = h * scale[j] + shift[j];
    }
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
}

// dxhat = g * scale,  dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  per row.
template <typename T>
__global__ void layer_norm_backward(const T* g, const T* xhat, const T* rstd, const T* scale, T* dx,
                                    long long C) {
    const long long row = blockIdx.x * C;
    T sum_dxhat = 0, sum_dxhat_xhat = 0;
    for (long long j = threadIdx.x; j < C; j += blockDim.x) {
        const T dxhat = g[row + j] * scale[j];
        sum_dxhat += dxhat;
        sum_dxhat_xhat += dxhat * xhat[row + j];
    }
    const T mean_dxhat = block_reduce(sum_dxhat, Sum()) / T(C);
    const T mean_dxhat_xhat = block_reduce(sum_dxhat_xhat, Sum()) / T(C);
    for (long long j = threadIdx.x; j < C; j += blockDim.x)
        dx[row + j] = rstd[blockIdx.x] * (g[row + j] * scale[j] - mean_dxhat - xhat[row + j] * mean_dxhat_xhat);
}

// In place on one row s of scores [..., Tq, Tk]: s = softmax(s * scale) over the keys query i
// may see: all Tk, or when causal those j <= i + (Tk - Tq) (query i sits at position
// Tk - Tq + i); the hidden ones get probability 0. Key 0 is always visible, so s[0] starts
// the max.
template <typename T>
__global__ void attention_softmax(T* p, long long Tq, long long Tk, T scale, int causal) {
    T* s = p + blockIdx.x * Tk;
    const long long visible = causal ? blockIdx.x % Tq + (Tk - Tq) + 1 : Tk;
    T m = s[0] * scale;
    for (long long j = threadIdx.x; j < visible; j += blockDim.x) m = Max()(m, s[j] * scale);
    m = block_reduce(m, Max());
    T sum = 0;
    for (long long j = threadIdx.x; j < visible; j += blockDim.x) {
        s[j] = exp(s[j] * scale - m);
        sum += s[j];
    }
    sum = block_reduce(sum, Sum());
    for (long long j = threadIdx.x; j < Tk; j += blockDim.x) s[j] = j < visible ? s[j] / sum : T(0);
}

// In place on one row of dp [..., Tk]: dp = p * (dp - sum_j dp_j p_j) * scale
// (softmax backward, times the 1/sqrt(D) the scores were scaled by).
template <typename T>
__global__ void softmax_backward(T* dp, const T* p, long long Tk, T scale) {
    const long long row = blockIdx.x * Tk;
    T dot = 0;
    for (long long j = threadIdx.x; j < Tk; j += blockDim.x) dot += dp[row + j] * p[row + j];
    dot = block_reduce(dot, Sum());
    for (long long j = threadIdx.x; j < Tk; j += blockDim.x) dp[row + j] = (dp[row + j] - dot) * p[row + j] * scale;
}

// lse = m + log sum_j exp(z_j - m),  m = max_j z_j,  for row blockIdx.x of z [N, V]:
// exp never sees a positive argument, so it cannot overflow.
template <typename T>
__global__ void logsumexp_rows(const T* z, T* lse, long long V) {
    const T* row = z + blockIdx.x * V;
    T m = row[0];
    for (long long j = threadIdx.x; j < V; j += blockDim.x) m = Max()(m, row[j]);
    m = block_reduce(m, Max());
    T sum = 0;
    for (long long j = threadIdx.x; j < V; j += blockDim.x) sum += exp(row[j] - m);
    sum = block_reduce(sum, Sum());
    if (threadIdx.x == 0) lse[blockIdx.x] = m + log(sum);
}
"""
