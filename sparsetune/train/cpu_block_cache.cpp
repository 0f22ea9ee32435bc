// A CPU allocator for torch that keeps freed large blocks for reuse at the same size (sparsetune/train/heap.py).
//
// Why hand-written: torch has a caching allocator for CUDA but none for CPU tensors on desktop builds (its
// CPUCachingAllocator is the mobile one), and glibc keeps freed 4-20 MB activations in a fragmented heap. A training
// step allocates the same shapes block after block, so an exact-size cache serves nearly every large allocation
// from a block freed earlier: no page faults, and no heap for them to fragment. Blocks of at least `min_bytes` are
// anonymous mappings of their own; smaller ones go to c10's own alloc_cpu/free_cpu as before.
//
// Plain C entry points (ctypes), no Python module: install, release the cached blocks, read the counters.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <sys/mman.h>

#include <cstddef>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

namespace {

constexpr std::size_t kPage = 4096;

std::size_t page_round(std::size_t n) {
  return (n + kPage - 1) / kPage * kPage;
}

struct Cache {
  std::mutex mutex;
  std::atomic<std::size_t> min_bytes{0};  // read without the lock: small allocations never take it
  std::unordered_map<std::size_t, std::vector<void*>> free_blocks;  // mapped size -> cached blocks
  std::unordered_map<void*, std::size_t> live;  // blocks handed out -> mapped size
  std::size_t cached_bytes = 0;
  std::size_t mapped_bytes = 0;  // live and cached
  std::uint64_t hits = 0;
  std::uint64_t misses = 0;
};

Cache& cache() {
  static Cache* instance = new Cache();  // never destroyed: tensors may outlive any static destructor order
  return *instance;
}

void release(void* ptr) {
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> guard(c.mutex);
    auto it = c.live.find(ptr);
    if (it != c.live.end()) {
      std::size_t size = it->second;
      c.live.erase(it);
      if (c.min_bytes.load() != 0) {
        c.free_blocks[size].push_back(ptr);
        c.cached_bytes += size;
        return;
      }
      c.mapped_bytes -= size;  // stopped: blocks still live when it stopped are unmapped as they are freed
      munmap(ptr, size);
      return;
    }
  }
  c10::free_cpu(ptr);  // a raw allocation of a small block
}

bool cached_size(std::size_t nbytes) {
  std::size_t min_bytes = cache().min_bytes.load();
  return min_bytes != 0 && nbytes >= min_bytes;
}

void* acquire(std::size_t nbytes) {
  Cache& c = cache();
  std::size_t size = page_round(nbytes);
  {
    std::lock_guard<std::mutex> guard(c.mutex);
    auto it = c.free_blocks.find(size);
    if (it != c.free_blocks.end() && !it->second.empty()) {
      void* ptr = it->second.back();
      it->second.pop_back();
      c.cached_bytes -= size;
      c.live.emplace(ptr, size);
      ++c.hits;
      return ptr;
    }
    ++c.misses;
  }
  void* ptr = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (ptr == MAP_FAILED) {
    throw std::bad_alloc();
  }
  std::lock_guard<std::mutex> guard(c.mutex);
  c.live.emplace(ptr, size);
  c.mapped_bytes += size;
  return ptr;
}

void raw_delete(void* ptr) {
  release(ptr);
}

struct BlockCacheAllocator final : public c10::Allocator {
  c10::DataPtr allocate(std::size_t nbytes) override {
    if (nbytes == 0 || !cached_size(nbytes)) {  // small: c10's own allocation and deleter, as without the cache
      void* ptr = nbytes == 0 ? nullptr : c10::alloc_cpu(nbytes);
      return {ptr, ptr, &c10::free_cpu, c10::Device(c10::DeviceType::CPU)};
    }
    void* ptr = acquire(nbytes);
    return {ptr, ptr, &raw_delete, c10::Device(c10::DeviceType::CPU)};
  }
  // raw_allocate's blocks (either kind) come back through raw_delete, which tells cached blocks from small ones
  c10::DeleterFnPtr raw_deleter() const override {
    return &raw_delete;
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

BlockCacheAllocator* allocator() {
  static BlockCacheAllocator* instance = new BlockCacheAllocator();
  return instance;
}

}  // namespace

extern "C" {

// Make the cache torch's CPU allocator; blocks of at least min_bytes are cached. 0 stops caching: new allocations
// go to c10's alloc_cpu, and the blocks still live are unmapped when freed (call release for the cached ones).
int sparsetune_block_cache_install(std::size_t min_bytes) {
  cache().min_bytes.store(min_bytes);
  c10::SetCPUAllocator(allocator(), /*priority=*/10);
  return c10::GetCPUAllocator() == allocator() ? 1 : 0;
}

// Unmap every cached (free) block; returns the bytes handed back.
std::size_t sparsetune_block_cache_release() {
  Cache& c = cache();
  std::vector<std::pair<void*, std::size_t>> blocks;
  {
    std::lock_guard<std::mutex> guard(c.mutex);
    for (auto& [size, ptrs] : c.free_blocks) {
      for (void* p : ptrs) {
        blocks.emplace_back(p, size);
      }
    }
    c.free_blocks.clear();
    c.cached_bytes = 0;
  }
  std::size_t total = 0;
  for (auto& [p, size] : blocks) {
    munmap(p, size);
    total += size;
  }
  std::lock_guard<std::mutex> guard(c.mutex);
  c.mapped_bytes -= total;
  return total;
}

// Counters: hits, misses, cached bytes, mapped bytes (live and cached), min_bytes.
void sparsetune_block_cache_stats(std::uint64_t* out) {
  Cache& c = cache();
  std::lock_guard<std::mutex> guard(c.mutex);
  out[0] = c.hits;
  out[1] = c.misses;
  out[2] = c.cached_bytes;
  out[3] = c.mapped_bytes;
  out[4] = c.min_bytes.load();
}

}  // extern "C"
