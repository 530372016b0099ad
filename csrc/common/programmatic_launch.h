// The process-wide switch of programmatic dependent launch (see programmatic_launch.cuh); no
// CUDA here, so the CPU-only build and the Python bindings can include it.
#pragma once

namespace toyllm {

// Default: on. Off, launch_kernel launches in plain stream order.
bool programmatic_launch_enabled();
void set_programmatic_launch(bool enabled);

}  // namespace toyllm
