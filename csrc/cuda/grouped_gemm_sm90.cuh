// CUTLASS 4.x grouped (pointer-array) GEMMs on sm_90a for the MoE expert layers:
//   bf16:  out[rows of g] = a[rows of g] @ b[g].T, and its two backward products
//          (grad_a = grad @ b[g], grad_b[g] = grad.T @ a, see GroupedProduct)
//   FP8:   the same with e4m3 operands and DeepSeek's block scales (1x128 for a, 128x128 for
//          b), applied per 128-wide k-block to an fp32 accumulator (the mainloop of fp8_gemm,
//          MainloopSm90ArrayTmaGmmaWarpSpecializedBlockwise in its pointer-array form).
//
// Both use the Hopper warp-specialised cooperative persistent kernel with TMA loads whose
// descriptors the kernel re-targets in place whenever a CTA moves on to another group, and
// CUTLASS's grouped tile scheduler. The group sizes stay on the device: build_group_args_kernel
// turns `offs` into per-group problem shapes, pointers and strides in the workspace, and the
// kernel is given host_problem_shapes = nullptr, so that it launches one CTA per SM and the
// scheduler reads the shapes from device memory (empty groups contribute no tiles).
//
// Include from exactly one translation unit per instantiation: each costs about a minute and
// 4 GB of compiler memory.
#pragma once

#include "cuda/grouped_gemm_sm90.h"

#include <cstdint>
#include <type_traits>

#include <cuda_runtime_api.h>

#include "cutlass/cutlass.h"
#include "cutlass/arch/config.h"

// CUTLASS_ARCH_MMA_SM90_SUPPORTED: the toolkit can build sm_90 GMMA kernels (the kernel body
// itself is compiled only for sm_90a); CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED: it can
// modify TMA descriptors on the device (CUDA >= 12.3), which the grouped kernels need.
#if defined(CUTLASS_ARCH_MMA_SM90_SUPPORTED) && \
    defined(CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED)
#define R1X_GROUPED_SM90 1

#include "cute/tensor.hpp"
#include "cutlass/detail/blockwise_scale_layout.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/dispatch_policy.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

#endif

namespace r1x::cuda::sm90 {

// CTA tile, thread-block cluster. Cooperative schedule: the two consumer warp groups split one
// tile along M.
template <int kTileM, int kTileN, int kTileK, int kClusterM, int kClusterN>
struct GroupedTileConfig {
  static constexpr int tile_m = kTileM;
  static constexpr int tile_n = kTileN;
  static constexpr int tile_k = kTileK;
  static constexpr int cluster_m = kClusterM;
  static constexpr int cluster_n = kClusterN;
};

// Which product a kernel computes, in terms of the op's operands (grouped_gemm_sm90.h):
//   kForward: out[rows of g] = a[rows of g] @ b[g].T        CUTLASS (M, N, K) = (rows_g, n, k)
//   kGradA:   out[rows of g] = grad[rows of g] @ b[g]       CUTLASS (M, N, K) = (rows_g, k, n)
//   kGradB:   out[g] = grad[rows of g].T @ a[rows of g]     CUTLASS (M, N, K) = (n, k, rows_g)
enum class GroupedProduct { kForward, kGradA, kGradB };

// bf16: 128x256x64 tiles (64x256 fp32 accumulators per consumer warp group), a 1x2 cluster
// sharing the A tile by TMA multicast. The cluster runs along N so that a small group (few rows,
// the common case for MoE experts) does not leave half of a cluster idle.
using Bf16GroupedConfig = GroupedTileConfig<128, 256, 64, 1, 2>;
// FP8: fp8_gemm's configuration (128x128x128, cluster 1x2): each consumer warp group holds
// 64x128 fp32 accumulators plus as many for the per-k-block partial sums.
using Fp8GroupedConfig = GroupedTileConfig<128, 128, 128, 1, 2>;

constexpr int kFp8GroupedScaleBlock = 128;

#if defined(R1X_GROUPED_SM90)

using GroupedProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;

// ---- the two kernels ------------------------------------------------------------------------

template <class Config, GroupedProduct kProduct>
struct Bf16GroupedKernel {
  static constexpr bool kBlockScaled = false;
  static constexpr GroupedProduct product = kProduct;
  using ElementA = cutlass::bfloat16_t;
  using ElementB = cutlass::bfloat16_t;
  using ElementD = cutlass::bfloat16_t;
  using ElementAccumulator = float;
  using ElementCompute = float;
  using ElementC = void;  // no source operand: D = acc

  // CUTLASS's D[M, N] = A[M, K] * B[K, N]; "RowMajor" A(m, k) sits at m * lda + k, and
  // "ColumnMajor" B(k, n) at n * ldb + k, "RowMajor" B(k, n) at k * ldb + n. So:
  //   forward: A = a rows (RowMajor), B = b[g] [n, k] (ColumnMajor)
  //   grad_a:  A = grad rows (RowMajor), B = b[g] [n, k] read as (k = n, n = k) (RowMajor)
  //   grad_b:  A(i, r) = grad[r, i] (ColumnMajor), B(r, j) = a[r, j] (RowMajor)
  // (16-bit GMMA reads MN-major operands from shared memory as well.) Pointer tags: one layout
  // (stride) per group.
  using LayoutA = std::conditional_t<kProduct == GroupedProduct::kGradB,
                                     cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  using LayoutB = std::conditional_t<kProduct == GroupedProduct::kForward,
                                     cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  using LayoutC = cutlass::layout::RowMajor;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignmentA = 128 / cutlass::sizeof_bits<ElementA>::value;
  static constexpr int kAlignmentB = 128 / cutlass::sizeof_bits<ElementB>::value;
  static constexpr int kAlignmentD = 128 / cutlass::sizeof_bits<ElementD>::value;

  using TileShape = cute::Shape<cute::Int<Config::tile_m>, cute::Int<Config::tile_n>,
                                cute::Int<Config::tile_k>>;
  using ClusterShape =
      cute::Shape<cute::Int<Config::cluster_m>, cute::Int<Config::cluster_n>, cute::_1>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAccumulator, ElementCompute,
      ElementC, LayoutC*, kAlignmentD, ElementD, LayoutD*, kAlignmentD,
      cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinearCombination<ElementD, ElementCompute, ElementC,
                                                   ElementCompute>>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, LayoutA*, kAlignmentA,
      ElementB, LayoutB*, kAlignmentB, ElementAccumulator, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;

  using GemmKernel =
      cutlass::gemm::kernel::GemmUniversal<GroupedProblemShape, CollectiveMainloop,
                                           CollectiveEpilogue>;
};

template <class ElementOut, class Config>
struct Fp8GroupedKernel {
  static constexpr bool kBlockScaled = true;
  static constexpr GroupedProduct product = GroupedProduct::kForward;
  using ElementA = cutlass::float_e4m3_t;
  using ElementB = cutlass::float_e4m3_t;
  using ElementD = ElementOut;
  using ElementAccumulator = float;
  using ElementCompute = float;
  using ElementC = void;

  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;
  using LayoutC = cutlass::layout::RowMajor;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignmentA = 128 / cutlass::sizeof_bits<ElementA>::value;
  static constexpr int kAlignmentB = 128 / cutlass::sizeof_bits<ElementB>::value;
  static constexpr int kAlignmentD = 128 / cutlass::sizeof_bits<ElementD>::value;

  static_assert(Config::tile_k == kFp8GroupedScaleBlock, "one k-tile per scale block");
  static_assert(Config::tile_n % kFp8GroupedScaleBlock == 0,
                "B's 128-row scale blocks must not straddle tiles");
  using TileShape = cute::Shape<cute::Int<Config::tile_m>, cute::Int<Config::tile_n>,
                                cute::Int<Config::tile_k>>;
  using ClusterShape =
      cute::Shape<cute::Int<Config::cluster_m>, cute::Int<Config::cluster_n>, cute::_1>;

  // Scale granularity (M, N, K) = (1, 128, 128), both MN-major (as in fp8_gemm: the layout the
  // example and tests of this collective use; the A scales of a 128-row tile are then one
  // contiguous 512-byte run per k-block).
  using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<
      1, kFp8GroupedScaleBlock, kFp8GroupedScaleBlock, cute::GMMA::Major::MN,
      cute::GMMA::Major::MN>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAccumulator, ElementCompute,
      ElementC, LayoutC*, kAlignmentD, ElementD, LayoutD*, kAlignmentD,
      cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinearCombination<ElementD, ElementCompute, ElementC,
                                                   ElementCompute>>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA,
      cute::tuple<LayoutA*, LayoutSFA*>, kAlignmentA, ElementB, cute::tuple<LayoutB*, LayoutSFB*>,
      kAlignmentB, ElementAccumulator, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise>::CollectiveOp;

  using GemmKernel =
      cutlass::gemm::kernel::GemmUniversal<GroupedProblemShape, CollectiveMainloop,
                                           CollectiveEpilogue>;
};

// ---- per-group arguments on the device ------------------------------------------------------

// Where the per-group argument arrays live (filled by build_group_args_kernel).
template <class K>
struct GroupArgArrays {
  using GemmKernel = typename K::GemmKernel;
  using Shape = typename GroupedProblemShape::UnderlyingProblemShape;
  using StrideA = typename GemmKernel::InternalStrideA;
  using StrideB = typename GemmKernel::InternalStrideB;
  using StrideD = typename GemmKernel::InternalStrideD;

  Shape* shapes = nullptr;
  const typename K::ElementA** ptr_a = nullptr;
  const typename K::ElementB** ptr_b = nullptr;
  typename K::ElementD** ptr_d = nullptr;
  StrideA* stride_a = nullptr;
  StrideB* stride_b = nullptr;
  StrideD* stride_d = nullptr;
  // FP8 only
  const float** ptr_sfa = nullptr;
  const float** ptr_sfb = nullptr;
  void* layout_sfa = nullptr;
  void* layout_sfb = nullptr;
};

// A packed row-major stride (m, k, l) -> (ld, 1, 0) or column-major -> (1, ld, 0), whichever
// mode of S is dynamic.
template <class S>
CUTE_HOST_DEVICE S stride_with_ld(int64_t ld) {
  S s{};
  if constexpr (cute::is_static<std::remove_reference_t<decltype(cute::get<0>(s))>>::value) {
    cute::get<1>(s) = ld;
  } else {
    cute::get<0>(s) = ld;
  }
  return s;
}

// Leading dimensions (elements) of the three operands, per product.
struct GroupedLds {
  int64_t a, b, d;
};

template <class K>
CUTE_HOST_DEVICE GroupedLds grouped_lds(const GroupedGemmSm90Problem& p) {
  if constexpr (K::product == GroupedProduct::kForward) return {p.k, p.k, p.ldo};
  if constexpr (K::product == GroupedProduct::kGradA) return {p.n, p.k, p.ldo};
  return {p.n, p.k, p.ldo};  // kGradB
}

template <class K>
__global__ void build_group_args_kernel(GroupedGemmSm90Problem p, GroupArgArrays<K> d) {
  const int g = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (g >= p.groups) return;
  // Clamped into [0, m] and nondecreasing: a bad offset can never send a pointer out of bounds.
  const int64_t m = p.m;
  int64_t start = g == 0 ? 0 : static_cast<int64_t>(p.offs[g - 1]);
  start = start < 0 ? 0 : (start > m ? m : start);
  int64_t end = p.offs[g];
  end = end < start ? start : (end > m ? m : end);
  const int rows = static_cast<int>(end - start);
  const int64_t n = p.n, k = p.k;
  const GroupedLds ld = grouped_lds<K>(p);
  using ElementA = typename K::ElementA;
  using ElementB = typename K::ElementB;
  using ElementD = typename K::ElementD;

  if constexpr (K::product == GroupedProduct::kForward) {
    d.shapes[g] = cute::make_shape(rows, p.n, p.k);
    d.ptr_a[g] = static_cast<const ElementA*>(p.a) + start * k;
    d.ptr_b[g] = static_cast<const ElementB*>(p.b) + g * n * k;
    d.ptr_d[g] = static_cast<ElementD*>(p.out) + start * p.ldo;
  } else if constexpr (K::product == GroupedProduct::kGradA) {
    // p.a = grad [m, n], p.b = b [groups, n, k], out [m, ldo]
    d.shapes[g] = cute::make_shape(rows, p.k, p.n);
    d.ptr_a[g] = static_cast<const ElementA*>(p.a) + start * n;
    d.ptr_b[g] = static_cast<const ElementB*>(p.b) + g * n * k;
    d.ptr_d[g] = static_cast<ElementD*>(p.out) + start * p.ldo;
  } else {
    // p.a = grad [m, n], p.b = a [m, k], out [groups, n, ldo]. An empty group gets no tiles
    // (M = 0; the dispatcher zeroes its output).
    d.shapes[g] = cute::make_shape(rows > 0 ? p.n : 0, p.k, rows);
    d.ptr_a[g] = static_cast<const ElementA*>(p.a) + start * n;
    d.ptr_b[g] = static_cast<const ElementB*>(p.b) + start * k;
    d.ptr_d[g] = static_cast<ElementD*>(p.out) + g * n * p.ldo;
  }
  d.stride_a[g] = stride_with_ld<typename GroupArgArrays<K>::StrideA>(ld.a);
  d.stride_b[g] = stride_with_ld<typename GroupArgArrays<K>::StrideB>(ld.b);
  d.stride_d[g] = stride_with_ld<typename GroupArgArrays<K>::StrideD>(ld.d);
  if constexpr (K::kBlockScaled) {
    const int64_t kb = k / kFp8GroupedScaleBlock;
    const int64_t nb = (n + kFp8GroupedScaleBlock - 1) / kFp8GroupedScaleBlock;
    d.ptr_sfa[g] = p.sfa + start * kb;
    d.ptr_sfb[g] = p.sfb + g * kb * nb;
    // (The mainloop derives these from the problem shape itself; kept for completeness.)
    static_cast<typename K::LayoutSFA*>(d.layout_sfa)[g] =
        K::ScaleConfig::tile_atom_to_shape_SFA(cute::make_shape(rows, p.n, p.k, 1));
    static_cast<typename K::LayoutSFB*>(d.layout_sfb)[g] =
        K::ScaleConfig::tile_atom_to_shape_SFB(cute::make_shape(rows, p.n, p.k, 1));
  }
}

// ---- host side ------------------------------------------------------------------------------

template <class K>
struct GroupedGemmRunner {
  using GemmKernel = typename K::GemmKernel;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
  using Arguments = typename Gemm::Arguments;
  using Arrays = GroupArgArrays<K>;
  using ElementD = typename K::ElementD;

  static constexpr size_t kAlign = 256;
  static size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

  struct Plan {
    size_t shapes = 0, ptr_a = 0, ptr_b = 0, ptr_d = 0, stride_a = 0, stride_b = 0,
           stride_d = 0, ptr_sfa = 0, ptr_sfb = 0, layout_sfa = 0, layout_sfb = 0;
    size_t cutlass_offset = 0;
    size_t cutlass_bytes = 0;
    size_t total = 0;
  };

  static size_t array_bytes(size_t elem, int groups) {
    return align_up(elem * static_cast<size_t>(groups));
  }

  static cudaError_t current_device(int* device, int* sm_count) {
    cudaError_t err = cudaGetDevice(device);
    if (err == cudaSuccess) {
      err = cudaDeviceGetAttribute(sm_count, cudaDevAttrMultiProcessorCount, *device);
    }
    if (err != cudaSuccess) (void)cudaGetLastError();
    return err;
  }

  static Arguments make_arguments(int groups, const Arrays& d, int device, int sm_count) {
    Arguments args{};
    args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
    // No host copy of the shapes: the scheduler reads them on the device.
    args.problem_shape = {groups, d.shapes, nullptr};
    args.mainloop.ptr_A = d.ptr_a;
    args.mainloop.dA = d.stride_a;
    args.mainloop.ptr_B = d.ptr_b;
    args.mainloop.dB = d.stride_b;
    if constexpr (K::kBlockScaled) {
      args.mainloop.ptr_SFA = d.ptr_sfa;
      args.mainloop.layout_SFA = static_cast<typename K::LayoutSFA*>(d.layout_sfa);
      args.mainloop.ptr_SFB = d.ptr_sfb;
      args.mainloop.layout_SFB = static_cast<typename K::LayoutSFB*>(d.layout_sfb);
    }
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    args.epilogue.ptr_C = nullptr;
    args.epilogue.dC = nullptr;
    args.epilogue.ptr_D = d.ptr_d;
    args.epilogue.dD = d.stride_d;
    args.hw_info.device_id = device;
    args.hw_info.sm_count = sm_count;
    // Walk a group's tiles along N first: the CTAs in flight then share a few A row-panels and
    // sweep the group's B, which (unlike a whole group's A) fits in L2.
    using RasterOrder = decltype(args.scheduler.raster_order);
    args.scheduler.raster_order = RasterOrder::AlongN;
    return args;
  }

  static Plan plan(int groups, int device, int sm_count) {
    Plan p;
    size_t off = 0;
    auto take = [&](size_t bytes) {
      const size_t at = off;
      off += align_up(bytes);
      return at;
    };
    p.shapes = take(sizeof(typename Arrays::Shape) * groups);
    p.ptr_a = take(sizeof(void*) * groups);
    p.ptr_b = take(sizeof(void*) * groups);
    p.ptr_d = take(sizeof(void*) * groups);
    p.stride_a = take(sizeof(typename Arrays::StrideA) * groups);
    p.stride_b = take(sizeof(typename Arrays::StrideB) * groups);
    p.stride_d = take(sizeof(typename Arrays::StrideD) * groups);
    if constexpr (K::kBlockScaled) {
      p.ptr_sfa = take(sizeof(void*) * groups);
      p.ptr_sfb = take(sizeof(void*) * groups);
      p.layout_sfa = take(sizeof(typename K::LayoutSFA) * groups);
      p.layout_sfb = take(sizeof(typename K::LayoutSFB) * groups);
    }
    p.cutlass_offset = off;
    // CUTLASS's scratch depends on the SM count only (TMA descriptors per SM).
    p.cutlass_bytes = Gemm::get_workspace_size(make_arguments(groups, Arrays{}, device, sm_count));
    p.total = p.cutlass_offset + align_up(p.cutlass_bytes);
    return p;
  }

  static Arrays carve(const Plan& p, void* workspace) {
    auto* base = static_cast<uint8_t*>(workspace);
    Arrays d;
    d.shapes = reinterpret_cast<typename Arrays::Shape*>(base + p.shapes);
    d.ptr_a = reinterpret_cast<const typename K::ElementA**>(base + p.ptr_a);
    d.ptr_b = reinterpret_cast<const typename K::ElementB**>(base + p.ptr_b);
    d.ptr_d = reinterpret_cast<ElementD**>(base + p.ptr_d);
    d.stride_a = reinterpret_cast<typename Arrays::StrideA*>(base + p.stride_a);
    d.stride_b = reinterpret_cast<typename Arrays::StrideB*>(base + p.stride_b);
    d.stride_d = reinterpret_cast<typename Arrays::StrideD*>(base + p.stride_d);
    if constexpr (K::kBlockScaled) {
      d.ptr_sfa = reinterpret_cast<const float**>(base + p.ptr_sfa);
      d.ptr_sfb = reinterpret_cast<const float**>(base + p.ptr_sfb);
      d.layout_sfa = base + p.layout_sfa;
      d.layout_sfb = base + p.layout_sfb;
    }
    return d;
  }

  static size_t workspace_bytes(int groups) {
    if (groups <= 0) return 0;
    int device = 0, sm_count = 0;
    if (current_device(&device, &sm_count) != cudaSuccess) return 0;
    return plan(groups, device, sm_count).total;
  }

  static cudaError_t to_cuda_error(cutlass::Status s) {
    switch (s) {
      case cutlass::Status::kSuccess: return cudaSuccess;
      case cutlass::Status::kErrorArchMismatch: return cudaErrorNoKernelImageForDevice;
      case cutlass::Status::kErrorInsufficientDriver: return cudaErrorInsufficientDriver;
      case cutlass::Status::kErrorMemoryAllocation: return cudaErrorMemoryAllocation;
      // The adapter has already consumed the real CUDA error with cudaGetLastError().
      case cutlass::Status::kErrorInternal: return cudaErrorUnknown;
      default: return cudaErrorInvalidValue;
    }
  }

  // What the TMA descriptors need (CUTLASS's can_implement sees no shapes without host copies,
  // and a descriptor that fails to encode on the device is not reported at all).
  static bool tma_compatible(const GroupedGemmSm90Problem& p) {
    auto aligned16 = [](const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; };
    auto pitch16 = [](int64_t ld, size_t elem) {
      return (ld * static_cast<int64_t>(elem)) % 16 == 0;
    };
    const GroupedLds ld = grouped_lds<K>(p);
    const int64_t out_cols = K::product == GroupedProduct::kForward ? p.n : p.k;
    bool ok = p.m > 0 && p.n > 0 && p.k > 0 && p.groups > 0 && p.a && p.b && p.out && p.offs &&
              aligned16(p.a) && aligned16(p.b) && aligned16(p.out) && p.ldo >= out_cols &&
              pitch16(ld.a, sizeof(typename K::ElementA)) &&
              pitch16(ld.b, sizeof(typename K::ElementB)) && pitch16(ld.d, sizeof(ElementD));
    if constexpr (K::kBlockScaled) {
      ok = ok && p.k % kFp8GroupedScaleBlock == 0 && p.sfa && p.sfb;
    }
    return ok;
  }

  static cudaError_t run(const GroupedGemmSm90Problem& p, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream) {
    if (!tma_compatible(p)) return cudaErrorInvalidValue;
    int device = 0, sm_count = 0;
    cudaError_t err = current_device(&device, &sm_count);
    if (err != cudaSuccess) return err;
    {
      // Surface "no sm_90a image for this GPU" as the CUDA error it is.
      cudaFuncAttributes attr;
      err = cudaFuncGetAttributes(&attr, cutlass::device_kernel<GemmKernel>);
      if (err != cudaSuccess) {
        (void)cudaGetLastError();
        return err;
      }
    }
    const Plan plan_ = plan(p.groups, device, sm_count);
    if (workspace == nullptr || workspace_bytes < plan_.total ||
        (reinterpret_cast<uintptr_t>(workspace) & (kAlign - 1)) != 0) {
      return cudaErrorInvalidValue;
    }
    const Arrays d = carve(plan_, workspace);

    constexpr int kThreads = 128;
    build_group_args_kernel<K><<<(p.groups + kThreads - 1) / kThreads, kThreads, 0, stream>>>(p, d);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;

    const Arguments args = make_arguments(p.groups, d, device, sm_count);
    if (Gemm::can_implement(args) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
    void* cutlass_ws =
        plan_.cutlass_bytes > 0 ? static_cast<uint8_t*>(workspace) + plan_.cutlass_offset : nullptr;
    Gemm gemm;
    cutlass::Status status = gemm.initialize(args, cutlass_ws, stream);
    if (status != cutlass::Status::kSuccess) return to_cuda_error(status);
    status = gemm.run(stream);
    if (status != cutlass::Status::kSuccess) return to_cuda_error(status);
    return cudaGetLastError();
  }
};

#endif  // R1X_GROUPED_SM90

}  // namespace r1x::cuda::sm90
