// The emulated CUDA device's runtime: shared declarations of the driver API
// surface (driver.cpp), device memory (memory.cpp), modules and PTX checks
// (modules.cpp) and the block scheduler (scheduler.cpp).
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "kemu/module_abi.h"
#include "kemu/thread_view.h"

#define KEMU_API extern "C" __attribute__((visibility("default")))

namespace kemu {

// The CUresult codes the emulator returns (values from cuda.h).
enum Result : int {
    OK = 0,
    ERR_INVALID_VALUE = 1,
    ERR_OUT_OF_MEMORY = 2,
    ERR_NOT_INITIALIZED = 3,
    ERR_NO_DEVICE = 100,
    ERR_INVALID_DEVICE = 101,
    ERR_INVALID_IMAGE = 200,
    ERR_INVALID_CONTEXT = 201,
    ERR_INVALID_PTX = 218,
    ERR_INVALID_HANDLE = 400,
    ERR_ILLEGAL_STATE = 401,
    ERR_NOT_FOUND = 500,
    ERR_NOT_READY = 600,
    ERR_ILLEGAL_ADDRESS = 700,
    ERR_LAUNCH_OUT_OF_RESOURCES = 701,
    ERR_ASSERT = 710,
    ERR_LAUNCH_FAILED = 719,
    ERR_NOT_SUPPORTED = 801,
    ERR_STREAM_CAPTURE_UNSUPPORTED = 900,
    ERR_STREAM_CAPTURE_INVALIDATED = 901,
    ERR_STREAM_CAPTURE_UNMATCHED = 903,
    ERR_STREAM_CAPTURE_ISOLATION = 905,
    ERR_STREAM_CAPTURE_WRONG_THREAD = 908,
};

// Fails the current driver call: remembers `msg` for this thread (so that
// cuGetErrorString can say what went wrong, not only the code's name),
// prints it once to stderr, and returns `code`.
Result fail(Result code, const std::string& msg);
const char* last_detail(int code);

// ---- configuration (environment, read once) ---------------------------------
enum class Order { Forward, Reverse, Random };
struct Config {
    Order order = Order::Forward;
    uint64_t seed = 1;
    int major = 9, minor = 0;
    int multiprocessors = 4;
    uint64_t memory_bytes = 8ull << 30;
    unsigned workers = 2;
    bool memcheck = false;  // built with AddressSanitizer
    bool quiet = false;
};
const Config& config();
const char* device_name();

// ---- memory ------------------------------------------------------------------
uint64_t mem_alloc(size_t bytes, Result* err);
Result mem_free(uint64_t ptr);
// Whether [ptr, ptr + bytes) lies inside one live allocation.
bool mem_valid(uint64_t ptr, size_t bytes);
void mem_info(size_t* free_bytes, size_t* total_bytes);

// ---- modules -----------------------------------------------------------------
struct PtxParam {
    size_t size;
    size_t align;
};

struct Function {
    std::string name;
    const EntryInfo* entry = nullptr;  // the emulated build's twin
    std::vector<PtxParam> params;      // as the PTX declares them
    unsigned max_threads = 1024;       // .maxntid, else the device limit
    size_t static_shared = 0;          // bytes of .shared the entry references
    int max_dynamic_shared = 48 * 1024;
    struct Module* module = nullptr;
};

struct EmuModule;  // one loaded kernel shared object

struct Module {
    const EmuModule* emu = nullptr;
    std::map<std::string, std::unique_ptr<Function>> functions;
};

Result module_load_ptx(const char* ptx, Module** out);
void module_unload(Module* m);
// The thread-local storage of `m`'s shared object for the calling thread
// (the __shared__ memory of the block running on it).
void tls_block(const EmuModule* m, unsigned char** base, size_t* size);
const ModuleTable* module_table(const EmuModule* m);

// ---- launches ----------------------------------------------------------------
struct LaunchShape {
    unsigned grid[3];
    unsigned block[3];
    unsigned dynamic_shared;
};
Result launch(Function* f, const LaunchShape& shape, void** args);

}  // namespace kemu
