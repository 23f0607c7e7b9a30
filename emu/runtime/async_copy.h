// One emulated CUDA thread's asynchronous copies (cp.async, sm_80+), with
// the semantics of the PTX ISA ("cp.async", "cp.async.commit_group",
// "cp.async.wait_group"): copies are issued in order, commit_group closes
// the not yet committed ones into a group (an empty group when there are
// none), and wait_group N completes every committed group except the N most
// recent; copies issued after the last commit belong to no group and no
// wait_group completes them.
//
// A copy is performed only when a wait completes its group, the latest
// moment the ISA allows: a kernel that reads a destination before the
// matching wait (or before the barrier that publishes it) reads the stale
// contents, and its result differs from the CPU reference. Copies still
// pending when the thread exits are dropped: their shared-memory
// destination dies with the block, and a thread that left one for others to
// read without waiting for it is the bug this is built to show.
#pragma once

#include <cstddef>
#include <cstring>
#include <vector>

namespace kemu {

class AsyncCopies {
   public:
    struct Copy {
        unsigned char* dst;
        const unsigned char* src;
        unsigned size;      // cp-size: 4, 8 or 16
        unsigned src_size;  // bytes read from src; the rest of dst becomes 0
    };

    void reset() {
        copies_.clear();
        group_ends_.clear();
    }
    void issue(const Copy& c) { copies_.push_back(c); }
    void commit() { group_ends_.push_back(copies_.size()); }
    // cp.async.wait_group n.
    void wait(unsigned n) {
        if (group_ends_.size() <= n) return;
        const size_t groups = group_ends_.size() - n;
        const size_t upto = group_ends_[groups - 1];
        for (size_t i = 0; i < upto; ++i) perform(copies_[i]);
        copies_.erase(copies_.begin(), copies_.begin() + (std::ptrdiff_t)upto);
        group_ends_.erase(group_ends_.begin(), group_ends_.begin() + (std::ptrdiff_t)groups);
        for (size_t& e : group_ends_) e -= upto;
    }
    size_t pending() const { return copies_.size(); }

   private:
    static void perform(const Copy& c) {
        std::memcpy(c.dst, c.src, c.src_size);
        std::memset(c.dst + c.src_size, 0, c.size - c.src_size);
    }
    std::vector<Copy> copies_;       // issued and not completed, in issue order
    std::vector<size_t> group_ends_;  // per committed group: one past its last copy
};

}  // namespace kemu
