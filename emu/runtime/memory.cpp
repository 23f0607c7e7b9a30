// Device memory: host heap blocks, 256-byte aligned like cuMemAlloc's, each
// allocated at its exact size (so that AddressSanitizer's redzones sit right
// after the last byte), filled with 0xff bytes (NaN in f32 and f64) because
// real device memory is not zeroed, and registered so that copies and frees
// can be checked against the live allocations.
#include <cstdlib>
#include <cstring>

#include "runtime.h"

namespace kemu {
namespace {
std::mutex g_m;
std::map<uint64_t, size_t> g_allocs;  // start -> bytes
size_t g_in_use = 0;
}  // namespace

uint64_t mem_alloc(size_t bytes, Result* err) {
    if (bytes == 0) {
        *err = fail(ERR_INVALID_VALUE, "cuMemAlloc: 0 bytes requested (the driver refuses empty allocations)");
        return 0;
    }
    {
        std::lock_guard<std::mutex> g(g_m);
        if (bytes > config().memory_bytes - g_in_use) {
            *err = fail(ERR_OUT_OF_MEMORY, "cuMemAlloc: " + std::to_string(bytes) + " bytes requested, " +
                                               std::to_string(config().memory_bytes - g_in_use) +
                                               " bytes of emulated device memory free");
            return 0;
        }
        g_in_use += bytes;
    }
    void* p = nullptr;
    if (posix_memalign(&p, 256, bytes) != 0) {
        std::lock_guard<std::mutex> g(g_m);
        g_in_use -= bytes;
        *err = fail(ERR_OUT_OF_MEMORY, "cuMemAlloc: the host could not provide " + std::to_string(bytes) + " bytes");
        return 0;
    }
    std::memset(p, 0xff, bytes);
    std::lock_guard<std::mutex> g(g_m);
    g_allocs[(uint64_t)p] = bytes;
    *err = OK;
    return (uint64_t)p;
}

Result mem_free(uint64_t ptr) {
    if (ptr == 0) return OK;
    size_t bytes;
    {
        std::lock_guard<std::mutex> g(g_m);
        auto it = g_allocs.find(ptr);
        if (it == g_allocs.end())
            return fail(ERR_INVALID_VALUE, "cuMemFree: 0x" + std::to_string(ptr) + " is not a live allocation");
        bytes = it->second;
        g_allocs.erase(it);
        g_in_use -= bytes;
    }
    std::free((void*)ptr);
    return OK;
}

bool mem_valid(uint64_t ptr, size_t bytes) {
    std::lock_guard<std::mutex> g(g_m);
    auto it = g_allocs.upper_bound(ptr);
    if (it == g_allocs.begin()) return false;
    --it;
    return ptr >= it->first && ptr - it->first <= it->second && bytes <= it->second - (ptr - it->first);
}

void mem_info(size_t* free_bytes, size_t* total_bytes) {
    std::lock_guard<std::mutex> g(g_m);
    *total_bytes = config().memory_bytes;
    *free_bytes = config().memory_bytes - g_in_use;
}

}  // namespace kemu
