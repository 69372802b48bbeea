// What the kernels (.cu, CUDA toolkit only) and the torch-facing glue (.cpp) share: the element
// types and the launcher convention. Each family declares its launchers and their plain
// argument structs in csrc/cuda/<family>.h, which includes only this header, so both sides
// compile it: nvcc without torch, the host compiler without device code.
//
// Launcher convention: `cudaError_t launch_<op>(const <Op>Args&, cudaStream_t)`: it enqueues
// its kernels on the given stream (torch's current one), never synchronizes the host, and
// returns cudaGetLastError() after its last launch; the glue raises a failure with the op's
// name. Sizes and offsets are int64_t throughout: N x V tensors exceed 2^31 elements.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace rlengine::cuda {

// The floating element types of the kernels' tensors. The glue maps at::ScalarType onto these.
enum class DType : int { kFloat32, kFloat64, kBFloat16, kFloat16 };

}  // namespace rlengine::cuda
