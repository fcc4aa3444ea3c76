// What the CPU ops tell the Python module (dwf_ops.cpp).
#pragma once

namespace dwf::cpu {

// The SIMD variant of the CPU kernels this process runs: "default", "avx2" or "avx512"
// (dwf_cpu_kernels.h), chosen once from ATen's CPU capability.
const char* selected_variant();

}  // namespace dwf::cpu
