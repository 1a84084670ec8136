#pragma once
#include <torch/extension.h>

#include <cstdint>
#if defined(__linux__)
#include <sys/mman.h>
#endif

// Ask Linux to back the storage of a freshly allocated, not yet touched output with 2 MiB pages.
//
// A large CPU tensor comes straight from mmap, so writing it first faults in every 4 KiB
// page: for a 64 MiB output that costs several times the kernel's own work. With
// MADV_HUGEPAGE (honoured when transparent huge pages are in "madvise" or "always" mode) the
// 2 MiB-aligned interior faults in 512 times fewer pieces. Advice only: a no-op where it is
// not supported, and never a change in results.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    constexpr uintptr_t kHuge = uintptr_t(2) << 20;
    // The whole storage: an output may be a strided view of a larger buffer.
    const uintptr_t begin = reinterpret_cast<uintptr_t>(t.storage().data());
    const uintptr_t end = begin + static_cast<uintptr_t>(t.storage().nbytes());
    const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t last = end & ~(kHuge - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
    (void)t;
#endif
}
