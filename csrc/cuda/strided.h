// A tensor argument of the CUDA launchers read in place (gae.h, segments.h): no copy for sliced
// (values[:, :-1]), transposed or expanded (a gradient expanded from a scalar) inputs.
#pragma once

#include "cuda/types.h"

namespace rlengine::cuda {

// Its first element and the distance between rows and between positions, in elements.
struct StridedInput {
  const void* data = nullptr;  // null: an absent optional input (the kernels read it as 0)
  int64_t row_stride = 0;
  int64_t col_stride = 0;
};

}  // namespace rlengine::cuda
