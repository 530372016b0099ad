// The process-wide switch of programmatic dependent launch (programmatic_launch.cuh). Plain C++
// so the CPU-only build has it too (there it changes nothing).
#include "common/programmatic_launch.h"

#include <atomic>

namespace toyllm {
namespace {
std::atomic<bool> enabled{true};
}  // namespace

bool programmatic_launch_enabled() { return enabled.load(std::memory_order_relaxed); }
void set_programmatic_launch(bool on) { enabled.store(on, std::memory_order_relaxed); }

}  // namespace toyllm
