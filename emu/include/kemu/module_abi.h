// The contract between an emulated kernel module (one shared object per
// kernels/<name>.cu, built by emu/build) and the emulator's runtime
// (libcuda.so.1). The module exports one table of its entry points, each with
// its C++ parameter sizes (checked against the PTX at module load) and an
// invoker that unpacks cuLaunchKernel's argument array for the running fiber.
#pragma once

#include <cstddef>
#include <utility>

namespace kemu {

constexpr unsigned MODULE_ABI_VERSION = 1;

struct ParamInfo {
    std::size_t size;
    std::size_t align;
};

struct EntryInfo {
    const char* name;
    void (*invoke)(void** args);  // runs the kernel body for the current fiber
    unsigned param_count;
    const ParamInfo* params;
};

// A dynamic shared memory array (`extern __shared__ T name[];`): its storage
// for the calling OS thread, of `capacity` bytes.
struct DynamicShared {
    const char* name;
    void* (*storage)();
    std::size_t capacity;
};

struct ModuleTable {
    unsigned abi_version;
    const char* source;  // e.g. "kernels/gemm.cu"
    unsigned entry_count;
    const EntryInfo* entries;
    unsigned dynamic_shared_count;
    const DynamicShared* dynamic_shared;
    // Touches the module's thread-local storage so that the calling thread's
    // copy (its blocks' __shared__ memory) exists and can be located.
    void (*touch_tls)();
};

template <class F>
struct Signature;

template <class... A>
struct Signature<void (*)(A...)> {
    static constexpr unsigned count = sizeof...(A);
    static constexpr ParamInfo params[count + 1] = {{sizeof(A), alignof(A)}..., {0, 0}};
    template <void (*F)(A...), std::size_t... I>
    static void call(void** args, std::index_sequence<I...>) {
        (void)args;
        F(*static_cast<typename std::decay<A>::type*>(args[I])...);
    }
};

template <auto F>
void invoke(void** args) {
    using S = Signature<decltype(F)>;
    S::template call<F>(args, std::make_index_sequence<S::count>{});
}

template <auto F>
constexpr EntryInfo entry(const char* name) {
    using S = Signature<decltype(F)>;
    return EntryInfo{name, &invoke<F>, S::count, S::params};
}

}  // namespace kemu

extern "C" const kemu::ModuleTable* kemu_module_table(void);
