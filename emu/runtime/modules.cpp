// Modules: the emulated builds of kernels/*.cu (one shared object each, in
// the `kernels/` folder beside libcuda.so.1), and the checks that tie a PTX
// module, as a program loads it, to them.
//
// cuModuleLoadData receives PTX text. Every `.entry` in it must have a twin
// in the emulated build with the same parameter count and byte sizes as the
// C++ signature, or the load is refused (as a driver refuses a bad module):
// a stale or mismatched build cannot run silently. From the PTX also come
// each entry's `.maxntid` (enforced at launch) and the bytes of `.shared`
// variables it references (its static shared memory, checked against the
// 48 KiB limit together with the dynamic bytes of a launch).
#include <dirent.h>
#include <dlfcn.h>
#include <link.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <set>
#include <sstream>

#include "runtime.h"

namespace kemu {

struct EmuModule {
    std::string path;
    void* handle = nullptr;
    const ModuleTable* table = nullptr;
    size_t tls_size = 0;
};

namespace {

std::mutex g_m;
std::vector<std::unique_ptr<EmuModule>> g_modules;
bool g_scanned = false;
std::string g_scan_error;

std::string own_dir() {
    Dl_info info;
    if (dladdr((void*)&own_dir, &info) == 0 || !info.dli_fname) return ".";
    std::string p = info.dli_fname;
    auto slash = p.rfind('/');
    return slash == std::string::npos ? "." : p.substr(0, slash);
}

struct TlsQuery {
    void* base;
    size_t size;
};

int find_tls(struct dl_phdr_info* info, size_t, void* data) {
    auto* q = static_cast<TlsQuery*>(data);
    if ((void*)info->dlpi_addr != q->base) return 0;
    for (int i = 0; i < info->dlpi_phnum; ++i)
        if (info->dlpi_phdr[i].p_type == PT_TLS) q->size = info->dlpi_phdr[i].p_memsz;
    return 1;
}

void scan_dir(const std::string& dir);

// Loads every kernels/lib*.so beside this library, and those of the folders
// in KEMU_EXTRA_MODULES (colon-separated; the self-test's module), once.
void scan_modules() {
    if (g_scanned) return;
    g_scanned = true;
    scan_dir(own_dir() + "/kernels");
    if (const char* extra = getenv("KEMU_EXTRA_MODULES")) {
        std::string list = extra;
        size_t start = 0;
        while (start <= list.size()) {
            size_t end = list.find(':', start);
            if (end == std::string::npos) end = list.size();
            if (end > start) scan_dir(list.substr(start, end - start));
            start = end + 1;
        }
    }
}

void scan_dir(const std::string& dir) {
    DIR* d = opendir(dir.c_str());
    if (!d) {
        g_scan_error += "no emulated kernel modules: " + dir + " does not exist (build them with emu/build)";
        return;
    }
    std::vector<std::string> names;
    while (dirent* e = readdir(d)) {
        std::string n = e->d_name;
        if (n.size() > 3 && n.compare(n.size() - 3, 3, ".so") == 0) names.push_back(n);
    }
    closedir(d);
    std::sort(names.begin(), names.end());
    for (const auto& n : names) {
        auto m = std::make_unique<EmuModule>();
        m->path = dir + "/" + n;
        m->handle = dlopen(m->path.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (!m->handle) {
            g_scan_error += std::string("cannot load ") + m->path + ": " + dlerror() + "\n";
            continue;
        }
        auto get = (const ModuleTable* (*)())dlsym(m->handle, "kemu_module_table");
        if (!get) {
            g_scan_error += m->path + " has no kemu_module_table\n";
            continue;
        }
        m->table = get();
        if (m->table->abi_version != MODULE_ABI_VERSION) {
            g_scan_error += m->path + " was built for another emulator version\n";
            continue;
        }
        struct link_map* lm = nullptr;
        if (dlinfo(m->handle, RTLD_DI_LINKMAP, &lm) == 0 && lm) {
            TlsQuery q{(void*)lm->l_addr, 0};
            dl_iterate_phdr(find_tls, &q);
            m->tls_size = q.size;
        }
        g_modules.push_back(std::move(m));
    }
}

// ---- a small PTX reader ---------------------------------------------------------

size_t scalar_size(const std::string& t) {
    // .u8 .s16 .b32 .f64 ... : the digits are the bit width.
    size_t i = 0;
    while (i < t.size() && !isdigit((unsigned char)t[i])) ++i;
    if (i == t.size()) return t == ".pred" ? 1 : 0;
    return (size_t)std::stoul(t.substr(i)) / 8;
}

// One `.param ...` declaration of an entry.
bool parse_param(const std::string& decl, PtxParam* out) {
    std::istringstream in(decl);
    std::string tok;
    size_t align = 0, size = 0;
    std::string type;
    while (in >> tok) {
        if (tok == ".param" || tok == ".ptr" || tok == ".global" || tok == ".shared" || tok == ".const" ||
            tok == ".local")
            continue;
        if (tok == ".align") {
            in >> tok;
            align = (size_t)std::stoul(tok);
            continue;
        }
        if (tok[0] == '.') {
            type = tok;
            continue;
        }
        // The name, possibly with an array extent.
        size = scalar_size(type);
        auto lb = tok.find('[');
        if (lb != std::string::npos) size *= (size_t)std::stoul(tok.substr(lb + 1));
    }
    if (size == 0) return false;
    out->size = size;
    out->align = align ? align : scalar_size(type);
    return true;
}

struct PtxEntry {
    std::string name;
    std::vector<PtxParam> params;
    unsigned max_threads = 0;
    size_t static_shared = 0;
};

std::string strip_comments(const char* ptx) {
    std::string s;
    for (const char* p = ptx; *p;) {
        if (p[0] == '/' && p[1] == '/') {
            while (*p && *p != '\n') ++p;
        } else if (p[0] == '/' && p[1] == '*') {
            p += 2;
            while (*p && !(p[0] == '*' && p[1] == '/')) ++p;
            if (*p) p += 2;
        } else {
            s += *p++;
        }
    }
    return s;
}

bool is_ident(char c) { return isalnum((unsigned char)c) || c == '_' || c == '$' || c == '.'; }

bool parse_ptx(const char* text, std::vector<PtxEntry>* entries, std::string* err) {
    const std::string s = strip_comments(text);
    if (s.find(".version") == std::string::npos || s.find(".target") == std::string::npos) {
        *err = "the image is not PTX text (no .version/.target): the emulated device loads PTX only";
        return false;
    }
    // Module-scope .shared variables and their sizes.
    std::map<std::string, size_t> shared;
    {
        size_t pos = 0;
        while ((pos = s.find(".shared", pos)) != std::string::npos) {
            const size_t at = pos;
            pos += 7;
            // A declaration starts a statement; `ld.shared`, `st.shared` and
            // `cvta.shared` are instructions.
            if (at > 0 && !isspace((unsigned char)s[at - 1])) continue;
            size_t end = s.find(';', at);
            if (end == std::string::npos) break;
            std::string decl = s.substr(at, end - at);
            std::istringstream in(decl);
            std::string tok, type, name;
            size_t count = 1;
            while (in >> tok) {
                if (tok == ".shared" || tok == ".extern") continue;
                if (tok == ".align") {
                    in >> tok;
                    continue;
                }
                if (tok[0] == '.') {
                    type = tok;
                    continue;
                }
                name = tok;
            }
            auto lb = name.find('[');
            if (lb != std::string::npos) {
                const std::string n = name.substr(lb + 1, name.find(']') - lb - 1);
                count = n.empty() ? 0 : (size_t)std::stoul(n);
                name = name.substr(0, lb);
            }
            if (!name.empty()) shared[name] = scalar_size(type) * count;
        }
    }
    size_t pos = 0;
    while ((pos = s.find(".entry", pos)) != std::string::npos) {
        pos += 6;
        size_t lp = s.find('(', pos);
        if (lp == std::string::npos) break;
        PtxEntry e;
        std::string name = s.substr(pos, lp - pos);
        name.erase(std::remove_if(name.begin(), name.end(), [](char c) { return isspace((unsigned char)c); }),
                   name.end());
        e.name = name;
        size_t rp = s.find(')', lp);
        if (rp == std::string::npos) break;
        std::string list = s.substr(lp + 1, rp - lp - 1);
        std::istringstream in(list);
        std::string decl;
        while (std::getline(in, decl, ',')) {
            if (decl.find(".param") == std::string::npos) continue;
            PtxParam p;
            if (!parse_param(decl, &p)) {
                *err = "entry " + e.name + ": cannot read the parameter `" + decl + "`";
                return false;
            }
            e.params.push_back(p);
        }
        size_t body = s.find('{', rp);
        if (body == std::string::npos) break;
        const std::string directives = s.substr(rp + 1, body - rp - 1);
        size_t mx = directives.find(".maxntid");
        if (mx != std::string::npos) {
            std::istringstream d(directives.substr(mx + 8));
            unsigned x = 1, y = 1, z = 1;
            char comma;
            d >> x;
            if (d >> comma && comma == ',') d >> y;
            if (d >> comma && comma == ',') d >> z;
            e.max_threads = x * y * z;
        }
        // The body ends at the matching brace.
        int depth = 0;
        size_t i = body;
        for (; i < s.size(); ++i) {
            if (s[i] == '{') ++depth;
            if (s[i] == '}' && --depth == 0) break;
        }
        std::set<std::string> used;
        for (size_t j = body; j < i;) {
            if (is_ident(s[j]) && s[j] != '.') {
                size_t k = j;
                while (k < i && is_ident(s[k]) && s[k] != '.') ++k;
                const std::string id = s.substr(j, k - j);
                if (shared.count(id)) used.insert(id);
                j = k;
            } else {
                ++j;
            }
        }
        for (const auto& u : used) e.static_shared += shared[u];
        entries->push_back(std::move(e));
        pos = i;
    }
    return true;
}

std::string sizes(const std::vector<size_t>& v) {
    std::ostringstream o;
    o << "[";
    for (size_t i = 0; i < v.size(); ++i) o << (i ? ", " : "") << v[i];
    o << "]";
    return o.str();
}

}  // namespace

Result module_load_ptx(const char* ptx, Module** out) {
    if (!ptx || !out) return fail(ERR_INVALID_VALUE, "cuModuleLoadData: null image or module pointer");
    std::vector<PtxEntry> entries;
    std::string err;
    if (!parse_ptx(ptx, &entries, &err)) return fail(ERR_INVALID_IMAGE, "cuModuleLoadData: " + err);
    std::lock_guard<std::mutex> g(g_m);
    scan_modules();
    auto m = std::make_unique<Module>();
    for (auto& e : entries) {
        const EntryInfo* twin = nullptr;
        const EmuModule* home = nullptr;
        for (const auto& em : g_modules) {
            for (unsigned i = 0; i < em->table->entry_count; ++i)
                if (e.name == em->table->entries[i].name) {
                    twin = &em->table->entries[i];
                    home = em.get();
                }
            if (twin) break;
        }
        if (!twin)
            return fail(ERR_INVALID_PTX, "cuModuleLoadData: PTX entry " + e.name +
                                             " has no twin in the emulated build (rebuild it from kernels/*.cu: "
                                             "emu/build)" +
                                             (g_scan_error.empty() ? "" : "; " + g_scan_error));
        if (m->emu && m->emu != home)
            return fail(ERR_INVALID_PTX, "cuModuleLoadData: PTX entries come from two emulated modules (" +
                                             std::string(m->emu->table->source) + " and " + home->table->source +
                                             ")");
        m->emu = home;
        std::vector<size_t> ptx_sizes, cpp_sizes;
        for (auto& p : e.params) ptx_sizes.push_back(p.size);
        for (unsigned i = 0; i < twin->param_count; ++i) cpp_sizes.push_back(twin->params[i].size);
        if (ptx_sizes != cpp_sizes)
            return fail(ERR_INVALID_PTX, "cuModuleLoadData: entry " + e.name + " takes parameters of " +
                                             sizes(ptx_sizes) + " bytes in the PTX but " + sizes(cpp_sizes) +
                                             " bytes in the emulated build of " + home->table->source +
                                             ": the PTX is stale (ci/ptx) or the build is");
        auto f = std::make_unique<Function>();
        f->name = e.name;
        f->entry = twin;
        f->params = e.params;
        f->max_threads = e.max_threads ? e.max_threads : 1024;
        f->static_shared = e.static_shared;
        if (f->static_shared > 48 * 1024)
            return fail(ERR_INVALID_PTX, "cuModuleLoadData: entry " + e.name + " declares " +
                                             std::to_string(f->static_shared) +
                                             " bytes of static shared memory; the limit is 48 KiB");
        // Without the opt-in attribute, static and dynamic together stay
        // within 48 KiB.
        f->max_dynamic_shared = (int)(48 * 1024 - f->static_shared);
        f->module = m.get();
        m->functions[e.name] = std::move(f);
    }
    if (!m->emu) return fail(ERR_INVALID_PTX, "cuModuleLoadData: the PTX has no .entry");
    *out = m.release();
    return OK;
}

void module_unload(Module* m) { delete m; }

const ModuleTable* module_table(const EmuModule* m) { return m->table; }

void tls_block(const EmuModule* m, unsigned char** base, size_t* size) {
    thread_local std::map<const EmuModule*, std::pair<unsigned char*, size_t>> cache;
    auto it = cache.find(m);
    if (it == cache.end()) {
        m->table->touch_tls();
        void* p = nullptr;
        if (dlinfo(m->handle, RTLD_DI_TLS_DATA, &p) != 0) p = nullptr;
        it = cache.emplace(m, std::make_pair((unsigned char*)p, p ? m->tls_size : 0)).first;
    }
    *base = it->second.first;
    *size = it->second.second;
}

}  // namespace kemu
