// The emulator's runtime: fibers and their scheduler, launches, the shadow state behind the detectors, the
// instrumentation entry points, the emulated runtime API and the PTX twins. Built once, WITHOUT
// -fsanitize=thread: its own memory accesses are not the kernels'. See cuda_emulation.h for the model.
#include "cuda_emulation.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>
#include <unordered_map>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace pk::emu {
namespace {

// ------------------------------------------------------------------------------------------ context switching

#if defined(__x86_64__)
extern "C" void pk_emu_switch_context(void** save_sp, void* load_sp);
extern "C" void pk_emu_fiber_trampoline();
// Saves the callee-saved registers and the SSE/x87 control words of the System V ABI on the current stack,
// then resumes the other stack where its own switch left it.
asm(R"(
  .text
  .globl pk_emu_switch_context
  .type pk_emu_switch_context, @function
pk_emu_switch_context:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size pk_emu_switch_context, .-pk_emu_switch_context
  .globl pk_emu_fiber_trampoline
  .type pk_emu_fiber_trampoline, @function
pk_emu_fiber_trampoline:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size pk_emu_fiber_trampoline, .-pk_emu_fiber_trampoline
)");

struct Context {
  void* sp = nullptr;
};

void switch_context(Context& from, Context& to) { pk_emu_switch_context(&from.sp, to.sp); }

// A fresh stack that the first switch enters at entry(arg) through the trampoline (r12 = arg, r13 = entry).
void make_context(Context& c, char* stack, size_t size, void (*entry)(void*), void* arg) {
  auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15);
  auto* slot = reinterpret_cast<uint64_t*>(top - 80);
  uint32_t mxcsr;
  uint16_t fpu;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpu));
  slot[0] = mxcsr | (uint64_t(fpu) << 32);
  slot[1] = slot[2] = 0;                                  // r15, r14
  slot[3] = reinterpret_cast<uint64_t>(entry);            // r13
  slot[4] = reinterpret_cast<uint64_t>(arg);              // r12
  slot[5] = slot[6] = 0;                                  // rbx, rbp
  slot[7] = reinterpret_cast<uint64_t>(&pk_emu_fiber_trampoline);
  c.sp = slot;
}
#else
struct Context {
  ucontext_t uc;
};

void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

void make_context(Context& c, char* stack, size_t size, void (*entry)(void*), void* arg) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, reinterpret_cast<void (*)()>(entry), 1, arg);
}
#endif

// ------------------------------------------------------------------------------------------ state

constexpr size_t kDefaultSharedBytes = 48 * 1024;
constexpr size_t kMaxDynamicShared = 227 * 1024;
constexpr size_t kSharedRedzone = 64 * 1024;
constexpr size_t kDeviceArenaBytes = size_t(16) << 30;
constexpr size_t kDeviceRedzone = 512;
constexpr int kMaxFindingsPerLaunch = 20;

enum class Wait { kNone, kBarrier, kWarp, kExited };

struct Fiber {
  Context context;
  char* stack = nullptr;
  Coordinates coords{};
  int tid = 0;
  Wait wait = Wait::kNone;
  const char* file = nullptr;
  int line = 0;
  const char* op = nullptr;
  unsigned mask = 0;
  const void* in = nullptr;
  size_t in_bytes = 0;
  void* out = nullptr;
  size_t out_bytes = 0;
  WarpCompute compute = nullptr;
  const void* arg = nullptr;
};

struct Warp {
  uint32_t seq = 0, full_seq = 0;
  uint32_t joint[32][32];
  unsigned present = 0;
  std::vector<unsigned char> ins, outs;
};

// One access remembered per shared/global byte. Valid only for the launch (global) or block (shared) it
// names; older entries read as "never accessed".
struct Access {
  uint32_t launch = 0, block = 0, thread = 0, epoch = 0, wseq = 0;
  const void* pc = nullptr;
};
struct ShadowCell {
  Access write, read[2];
};
constexpr size_t kShadowPage = 4096;

struct Allocation {
  size_t bytes;
  bool live;
  bool arena;
};

enum class Region { kNone, kDynamicShared, kStaticShared, kGlobal };

struct State {
  std::mutex launch_mutex;
  // Launches per kernel (mangled name, as the real build's cuobjdump lists it), for the coverage record.
  std::map<std::string, uint64_t> launches;
  std::atomic<int> arch{90};
  size_t stack_bytes = 256 * 1024;
  double timeout_s = 60;

  std::vector<Fiber> fibers;
  std::vector<char*> stacks;
  std::vector<Warp> warps;
  Context scheduler;
  Fiber* current = nullptr;

  const LaunchConfig* config = nullptr;
  std::string kernel_name;
  void (*body)(void*) = nullptr;
  void* body_ctx = nullptr;
  dim3 block_idx;
  uint32_t launch_serial = 0, block_serial = 0, block_linear = 0, epoch = 0;
  bool aborted = false;
  size_t dynamic_bytes = 0;
  uint64_t accesses = 0;
  std::chrono::steady_clock::time_point block_start;

  unsigned char* shared_arena = nullptr;  // redzone | dynamic shared memory | redzone
  std::vector<std::pair<uintptr_t, uintptr_t>> static_ranges;

  unsigned char* device_arena = nullptr;
  size_t device_used = 0;
  std::map<uintptr_t, Allocation> allocations;
  std::map<uintptr_t, int> registrations;  // register_device_buffer calls not yet undone, per buffer

  std::unordered_map<uintptr_t, std::unique_ptr<ShadowCell[]>> shadow;
  uintptr_t shadow_cached_page = ~uintptr_t(0);
  ShadowCell* shadow_cached = nullptr;

  std::unordered_map<const void*, int> max_dynamic_shared;
  std::vector<Finding> findings;
  int launch_findings = 0;
  bool launch_timed_out = false, launch_illegal = false;
  std::set<std::pair<std::string, const void*>> reported;
};

// As CUDA's runtime keeps it, per host thread: the last error, and the emulator's report behind it.
thread_local cudaError_t t_last_error = cudaSuccess;
thread_local std::string t_last_report;

State& state() {
  static State* s = [] {
    auto* st = new State;
    if (const char* a = std::getenv("PK_EMU_ARCH")) st->arch = std::atoi(a) == 80 ? 80 : 90;
    if (const char* k = std::getenv("PK_EMU_STACK_KB")) st->stack_bytes = size_t(std::atoi(k)) * 1024;
    if (const char* t = std::getenv("PK_EMU_TIMEOUT_S")) st->timeout_s = std::atof(t);
    return st;
  }();
  return *s;
}

// The hooks run for every instrumented access of any thread; only the one running a block looks further.
thread_local bool t_in_block __attribute__((tls_model("initial-exec"))) = false;

size_t arch_shared_limit() { return (state().arch == 80 ? 163 : 227) * 1024; }

// ------------------------------------------------------------------------------------------ symbols and lines

struct Module {
  std::string path;
  uintptr_t base = 0;
};

// The main program's own path: "/proc/self/exe" would name addr2line's executable once handed to it.
std::string executable_path() {
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  return n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string("/proc/self/exe");
}

bool module_of(const void* addr, Module& out) {
  struct Query {
    uintptr_t addr;
    Module* out;
    bool found;
  } q{reinterpret_cast<uintptr_t>(addr), &out, false};
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* data) {
        auto* q = static_cast<Query*>(data);
        for (int i = 0; i < info->dlpi_phnum; ++i) {
          const ElfW(Phdr)& ph = info->dlpi_phdr[i];
          const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
          if (ph.p_type == PT_LOAD && q->addr >= lo && q->addr < lo + ph.p_memsz) {
            q->out->path = info->dlpi_name && *info->dlpi_name ? info->dlpi_name : executable_path();
            q->out->base = info->dlpi_addr;
            q->found = true;
            return 1;
          }
        }
        return 0;
      },
      &q);
  return q.found;
}

// Writable segments of the module holding `addr`: where its function-static __shared__ arrays live.
std::vector<std::pair<uintptr_t, uintptr_t>> writable_segments(const void* addr) {
  struct Query {
    uintptr_t addr;
    std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  } q{reinterpret_cast<uintptr_t>(addr), {}};
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* data) {
        auto* q = static_cast<Query*>(data);
        bool mine = false;
        for (int i = 0; i < info->dlpi_phnum; ++i) {
          const ElfW(Phdr)& ph = info->dlpi_phdr[i];
          const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
          if (ph.p_type == PT_LOAD && q->addr >= lo && q->addr < lo + ph.p_memsz) mine = true;
        }
        if (!mine) return 0;
        for (int i = 0; i < info->dlpi_phnum; ++i) {
          const ElfW(Phdr)& ph = info->dlpi_phdr[i];
          if (ph.p_type == PT_LOAD && (ph.p_flags & PF_W))
            q->ranges.emplace_back(info->dlpi_addr + ph.p_vaddr, info->dlpi_addr + ph.p_vaddr + ph.p_memsz);
        }
        return 1;
      },
      &q);
  return q.ranges;
}

std::string demangle(const char* name) {
  int status = 0;
  char* out = abi::__cxa_demangle(name, nullptr, nullptr, &status);
  std::string result = status == 0 && out ? out : name;
  std::free(out);
  return result;
}

// The (mangled) function symbol covering addr, from the module's full symbol table (kernels in anonymous namespaces
// are local symbols, absent from what dladdr sees).
std::string function_symbol(const void* addr) {
  Module m;
  if (!module_of(addr, m)) return {};
  const int fd = open(m.path.c_str(), O_RDONLY);
  if (fd < 0) return {};
  struct stat st;
  std::string found;
  if (fstat(fd, &st) == 0) {
    void* map = mmap(nullptr, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map != MAP_FAILED) {
      const auto* base = static_cast<const unsigned char*>(map);
      const auto* eh = reinterpret_cast<const ElfW(Ehdr)*>(base);
      const auto* sections = reinterpret_cast<const ElfW(Shdr)*>(base + eh->e_shoff);
      const uintptr_t target = reinterpret_cast<uintptr_t>(addr) - m.base;
      for (int i = 0; i < eh->e_shnum && found.empty(); ++i) {
        if (sections[i].sh_type != SHT_SYMTAB) continue;
        const auto* syms = reinterpret_cast<const ElfW(Sym)*>(base + sections[i].sh_offset);
        const char* names = reinterpret_cast<const char*>(base + sections[sections[i].sh_link].sh_offset);
        for (size_t k = 0; k < sections[i].sh_size / sizeof(ElfW(Sym)); ++k)
          if (ELF64_ST_TYPE(syms[k].st_info) == STT_FUNC && target >= syms[k].st_value &&
              target < syms[k].st_value + std::max<ElfW(Xword)>(syms[k].st_size, 1)) {
            found = names + syms[k].st_name;
            break;
          }
      }
      munmap(map, st.st_size);
    }
  }
  close(fd);
  return found;
}

// file:line of a code address, through addr2line (only on findings, so its cost does not matter).
std::string source_line(const void* pc) {
  static std::unordered_map<const void*, std::string> cache;
  if (auto it = cache.find(pc); it != cache.end()) return it->second;
  Module m;
  std::string result;
  if (module_of(pc, m)) {
    char cmd[1024];
    std::snprintf(cmd, sizeof cmd, "addr2line -C -i -p -f -e '%s' 0x%lx 2>/dev/null", m.path.c_str(),
                  static_cast<unsigned long>(reinterpret_cast<uintptr_t>(pc) - m.base - 1));
    if (FILE* p = popen(cmd, "r")) {
      char buf[512];
      // -i prints the inlining chain innermost first; the innermost line is where the access is.
      if (std::fgets(buf, sizeof buf, p)) result = buf;
      pclose(p);
    }
    while (!result.empty() && (result.back() == '\n' || result.back() == ' ')) result.pop_back();
    if (auto at = result.rfind(" at "); at != std::string::npos) result = result.substr(at + 4);
    if (result.empty() || result.find("??") != std::string::npos) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "+0x%lx", static_cast<unsigned long>(reinterpret_cast<uintptr_t>(pc) - m.base));
      result = m.path + buf;
    }
  }
  cache.emplace(pc, result);
  return result;
}

// ------------------------------------------------------------------------------------------ findings

std::string thread_text(uint32_t tid) {
  const dim3 b = state().config->block;
  char buf[64];
  std::snprintf(buf, sizeof buf, "(%u,%u,%u)", tid % b.x, tid / b.x % b.y, tid / (b.x * b.y));
  return buf;
}

std::string block_text(uint32_t linear) {
  const dim3 g = state().config->grid;
  char buf[64];
  std::snprintf(buf, sizeof buf, "(%u,%u,%u)", linear % g.x, linear / g.x % g.y, linear / (g.x * g.y));
  return buf;
}

std::string launch_site() {
  const LaunchConfig& c = *state().config;
  return std::string(c.file) + ":" + std::to_string(c.line);
}

[[noreturn]] void abort_block();

// Records a finding of this launch; `key` (a kind and a code address) is reported once per launch.
void report(const std::string& kind, const std::string& what, const void* key = nullptr, bool fatal = false) {
  State& s = state();
  if (key && !s.reported.emplace(kind, key).second && !fatal) return;
  if (s.launch_findings < kMaxFindingsPerLaunch) {
    std::string msg = kind + " in kernel " + s.kernel_name + " (launched at " + launch_site() + "): " + what;
    if (s.current)
      msg += " [block " + block_text(s.block_linear) + ", thread " + thread_text(s.current->tid) + "]";
    if (std::getenv("PK_EMU_VERBOSE")) std::fprintf(stderr, "pk::emu: %s\n", msg.c_str());
    s.findings.push_back({kind, s.kernel_name, msg});
    if (t_last_report.empty()) t_last_report = msg;
  }
  ++s.launch_findings;
  s.launch_timed_out |= kind == "timeout";
  s.launch_illegal |= kind == "out-of-bounds";
  if (fatal) abort_block();
}

// ------------------------------------------------------------------------------------------ scheduler

Fiber& current() { return *state().current; }
int lane_of(const Fiber& f) { return f.tid % 32; }

void yield_to_scheduler() {
  State& s = state();
  Fiber& f = *s.current;
  switch_context(f.context, s.scheduler);
}

[[noreturn]] void abort_block() {
  State& s = state();
  s.aborted = true;
  yield_to_scheduler();
  std::abort();  // an aborted fiber is never resumed
}

void check_timeout() {
  State& s = state();
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - s.block_start).count();
  if (elapsed > s.timeout_s)
    report("timeout",
           "block still running after " + std::to_string(static_cast<int>(elapsed)) +
               " s (PK_EMU_TIMEOUT_S): a spin-wait on another thread, or an endless loop",
           nullptr, true);
}

// check_timeout runs where a thread accesses memory or waits at a barrier. A block stuck in a loop that does
// neither never comes back to it, and no fiber that never yields can be unwound: the watchdog thread then ends
// the process, naming the kernel and block, rather than leaving the run hung. It waits twice the launch timeout,
// so that a block that does reach check_timeout gets its ordinary timeout finding first.
struct Watchdog {
  std::mutex mutex;
  bool running = false;
  std::string kernel;
  dim3 block;
  std::chrono::steady_clock::time_point since;
  double limit_s = 0;
  // The process whose watchdog thread runs: a forked child (the fuzz's workers) has none until it starts its own.
  pid_t watched_pid = 0;
};

Watchdog& watchdog() {
  // Never destroyed: its thread outlives static destruction. A fork holds the mutex, so that a child never
  // inherits it locked by the watchdog thread, which the child does not have.
  static Watchdog* w = [] {
    auto* created = new Watchdog;
    pthread_atfork([] { watchdog().mutex.lock(); }, [] { watchdog().mutex.unlock(); },
                   [] { watchdog().mutex.unlock(); });
    return created;
  }();
  return *w;
}

[[noreturn]] void watch_blocks() {
  Watchdog& w = watchdog();
  for (;;) {
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
    std::lock_guard<std::mutex> lock(w.mutex);
    if (!w.running) continue;
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - w.since).count();
    if (elapsed <= w.limit_s) continue;
    std::fprintf(stderr,
                 "pykernels CUDA emulator: kernel %s, block (%u,%u,%u), has run %.0f s without a memory access or a "
                 "barrier, where the launch timeout (PK_EMU_TIMEOUT_S) is checked: an endless loop. Ending the "
                 "process.\n",
                 w.kernel.c_str(), w.block.x, w.block.y, w.block.z, elapsed);
    std::fflush(stderr);
    std::abort();
  }
}

void watch_block(bool running) {
  State& s = state();
  Watchdog& w = watchdog();
  std::lock_guard<std::mutex> lock(w.mutex);
  if (w.watched_pid != getpid()) {
    w.watched_pid = getpid();
    std::thread(watch_blocks).detach();
  }
  w.running = running;
  if (running) {
    w.kernel = s.kernel_name;
    w.block = s.block_idx;
    w.since = s.block_start;
    w.limit_s = 2 * s.timeout_s;
  }
}

std::string site(const char* file, int line) { return std::string(file) + ":" + std::to_string(line); }

// Releases the block barrier once every thread that has not exited waits at it.
void try_release_barrier() {
  State& s = state();
  int exited = 0;
  const Fiber* first = nullptr;
  for (const Fiber& f : s.fibers) {
    if (f.wait == Wait::kExited) {
      ++exited;
      continue;
    }
    if (f.wait != Wait::kBarrier) return;
    if (!first) first = &f;
  }
  if (!first) return;
  for (const Fiber& f : s.fibers)
    if (f.wait == Wait::kBarrier && (f.line != first->line || std::strcmp(f.file, first->file) != 0))
      report("barrier",
             "threads wait at different __syncthreads: thread " + thread_text(first->tid) + " at " +
                 site(first->file, first->line) + ", thread " + thread_text(f.tid) + " at " + site(f.file, f.line),
             nullptr, true);
  if (exited)
    report("barrier",
           "__syncthreads at " + site(first->file, first->line) + " reached while " + std::to_string(exited) +
               " thread(s) of the block have exited (a barrier in divergent code)",
           first->file);
  ++s.epoch;
  for (Fiber& f : s.fibers)
    if (f.wait == Wait::kBarrier) f.wait = Wait::kNone;
}

std::string mask_text(unsigned mask) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", mask);
  return buf;
}

// Completes the rendezvous of `mask` in warp w if every lane of it has arrived at the same intrinsic.
bool try_complete_warp(int w, unsigned mask) {
  State& s = state();
  Warp& warp = s.warps[w];
  const Fiber* caller = s.current;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    const Fiber& f = s.fibers[w * 32 + l];
    if (f.wait != Wait::kWarp) return false;
    if (f.mask != mask || std::strcmp(f.op, caller->op) != 0)
      report("warp-mask",
             "lanes of one warp rendezvous disagree: lane " + std::to_string(lane_of(*caller)) + " at " +
                 caller->op + "(mask " + mask_text(caller->mask) + ") " + site(caller->file, caller->line) +
                 ", lane " + std::to_string(l) + " at " + f.op + "(mask " + mask_text(f.mask) + ") " +
                 site(f.file, f.line),
             nullptr, true);
  }
  const size_t in_bytes = caller->in_bytes, out_bytes = caller->out_bytes;
  warp.ins.assign(32 * in_bytes, 0);
  warp.outs.assign(32 * out_bytes, 0);
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1u) std::memcpy(warp.ins.data() + l * in_bytes, s.fibers[w * 32 + l].in, in_bytes);
  caller->compute(warp.ins.data(), warp.outs.data(), mask, caller->arg);
  const uint32_t seq = ++warp.seq;
  if (mask == warp.present) {
    warp.full_seq = seq;
  } else {
    for (int a = 0; a < 32; ++a)
      if (mask >> a & 1u)
        for (int b = 0; b < 32; ++b)
          if (mask >> b & 1u) warp.joint[a][b] = seq;
  }
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    Fiber& f = s.fibers[w * 32 + l];
    std::memcpy(f.out, warp.outs.data() + l * out_bytes, out_bytes);
    f.wait = Wait::kNone;
  }
  return true;
}

void fiber_exit_checks(Fiber& done) {
  State& s = state();
  const int w = done.tid / 32;
  for (int l = 0; l < 32 && w * 32 + l < static_cast<int>(s.fibers.size()); ++l) {
    const Fiber& f = s.fibers[w * 32 + l];
    if (f.wait == Wait::kWarp && (f.mask >> lane_of(done) & 1u))
      report("warp-mask",
             std::string(f.op) + "(mask " + mask_text(f.mask) + ") at " + site(f.file, f.line) + " by lane " +
                 std::to_string(l) + " waits for lane " + std::to_string(lane_of(done)) + ", which has exited",
             nullptr, true);
  }
  try_release_barrier();
}

void fiber_main(void* arg) {
  State& s = state();
  Fiber& f = *static_cast<Fiber*>(arg);
  s.body(s.body_ctx);
  f.wait = Wait::kExited;
  fiber_exit_checks(f);
  switch_context(f.context, s.scheduler);
  std::abort();
}

// Who waits where, one entry per distinct rendezvous (threads of a block mostly wait in a few places).
std::string describe_waits() {
  State& s = state();
  std::map<std::string, std::pair<int, int>> places;  // place -> (count, first thread)
  int exited = 0;
  for (const Fiber& f : s.fibers) {
    if (f.wait == Wait::kExited) {
      ++exited;
      continue;
    }
    const std::string place = f.wait == Wait::kBarrier
                                  ? "__syncthreads " + site(f.file, f.line)
                                  : std::string(f.op) + "(mask " + mask_text(f.mask) + ") " + site(f.file, f.line);
    auto [it, fresh] = places.emplace(place, std::make_pair(0, f.tid));
    ++it->second.first;
  }
  std::ostringstream out;
  for (const auto& [place, who] : places)
    out << " " << who.first << " thread(s) from " << thread_text(who.second) << " wait at " << place << ";";
  out << " " << exited << " exited";
  return out.str();
}

void run_block() {
  State& s = state();
  ++s.block_serial;
  s.epoch = 0;
  s.aborted = false;
  s.block_start = std::chrono::steady_clock::now();
  std::memset(s.shared_arena + kSharedRedzone, 0xff, s.dynamic_bytes);
  for (Warp& w : s.warps) {
    w.seq = w.full_seq = 0;
    std::memset(w.joint, 0, sizeof w.joint);
  }
  for (Fiber& f : s.fibers) {
    f.coords.block_idx = {s.block_idx.x, s.block_idx.y, s.block_idx.z};
    f.wait = Wait::kNone;
    make_context(f.context, f.stack, s.stack_bytes, &fiber_main, &f);
  }
  watch_block(true);
  t_in_block = true;
  for (;;) {
    bool progress = false, live = false;
    for (Fiber& f : s.fibers) {
      if (f.wait == Wait::kExited) continue;
      live = true;
      if (f.wait != Wait::kNone) continue;
      s.current = &f;
      switch_context(s.scheduler, f.context);
      s.current = nullptr;
      progress = true;
      if (s.aborted) break;
    }
    if (s.aborted || !live) break;
    if (!progress) {
      s.current = nullptr;
      s.aborted = true;
      report("deadlock", "no thread can proceed:" + describe_waits());
      break;
    }
  }
  t_in_block = false;
  watch_block(false);
}

void ensure_fibers(size_t threads) {
  State& s = state();
  while (s.stacks.size() < threads) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* mem = mmap(nullptr, s.stack_bytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
    if (mem == MAP_FAILED) throw std::bad_alloc();
    mprotect(mem, page, PROT_NONE);  // a stack overflow faults instead of corrupting the next stack
    s.stacks.push_back(static_cast<char*>(mem) + page);
  }
  s.fibers.assign(threads, Fiber{});
  for (size_t i = 0; i < threads; ++i) s.fibers[i].stack = s.stacks[i];
  s.warps.resize((threads + 31) / 32);
  for (size_t w = 0; w < s.warps.size(); ++w) {
    const size_t lanes = std::min<size_t>(32, threads - w * 32);
    s.warps[w].present = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
  }
  if (!s.shared_arena) {
    void* mem = mmap(nullptr, 2 * kSharedRedzone + kMaxDynamicShared, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) throw std::bad_alloc();
    s.shared_arena = static_cast<unsigned char*>(mem);
  }
}

// ------------------------------------------------------------------------------------------ shadow state

ShadowCell* shadow_cell(uintptr_t addr) {
  State& s = state();
  const uintptr_t page = addr / kShadowPage;
  if (page != s.shadow_cached_page) {
    auto& cells = s.shadow[page];
    if (!cells) cells = std::make_unique<ShadowCell[]>(kShadowPage);
    s.shadow_cached_page = page;
    s.shadow_cached = cells.get();
  }
  return s.shadow_cached + addr % kShadowPage;
}

bool is_live(const Access& a, bool shared) {
  const State& s = state();
  return a.launch == s.launch_serial && (!shared || a.block == s.block_linear) && a.launch != 0;
}

// Whether `prev` happens before the current thread's access: same thread, an earlier barrier interval, or
// a later rendezvous of the warp that included both lanes.
bool happens_before(const Access& prev, uint32_t tid) {
  const State& s = state();
  if (prev.block != s.block_linear) return false;
  if (prev.thread == tid || prev.epoch != s.epoch) return true;
  if (prev.thread / 32 != tid / 32) return false;
  const Warp& w = s.warps[tid / 32];
  return std::max(w.full_seq, w.joint[prev.thread % 32][tid % 32]) > prev.wseq;
}

std::string region_text(Region r, uintptr_t addr) {
  const State& s = state();
  char buf[128];
  if (r == Region::kDynamicShared)
    std::snprintf(buf, sizeof buf, "dynamic shared memory + %ld",
                  static_cast<long>(addr - reinterpret_cast<uintptr_t>(s.shared_arena + kSharedRedzone)));
  else if (r == Region::kStaticShared)
    std::snprintf(buf, sizeof buf, "static __shared__ memory at %p", reinterpret_cast<void*>(addr));
  else
    std::snprintf(buf, sizeof buf, "global memory at %p", reinterpret_cast<void*>(addr));
  return buf;
}

std::string access_text(const char* verb, uint32_t tid, uint32_t block, const void* pc) {
  std::string t = std::string(verb) + " by thread " + thread_text(tid);
  if (block != state().block_linear) t += " of block " + block_text(block);
  return t + " at " + (pc ? source_line(pc) : std::string("an intrinsic"));
}

void check_bytes(Region region, uintptr_t addr, size_t size, bool write, const void* pc) {
  State& s = state();
  const bool shared = region != Region::kGlobal;
  const uint32_t tid = static_cast<uint32_t>(s.current->tid);
  const uint32_t wseq = s.warps[tid / 32].seq;
  const Access mine{s.launch_serial, s.block_linear, tid, s.epoch, wseq, pc};
  for (size_t i = 0; i < size; ++i) {
    ShadowCell& c = *shadow_cell(addr + i);
    const bool written = is_live(c.write, shared);
    if (shared && !write && !written) {
      report("uninitialised",
             std::to_string(size) + "-byte read of " + region_text(region, addr) + " at " + source_line(pc) +
                 ": byte " + std::to_string(i) + " was not written by any thread of this block",
             pc);
      return;
    }
    auto conflict = [&](const Access& prev, const char* prev_verb) {
      report("race",
             std::string(write ? "write" : "read") + " of " + std::to_string(size) + " bytes of " +
                 region_text(region, addr) + " at " + source_line(pc) + " conflicts with the " +
                 access_text(prev_verb, prev.thread, prev.block, prev.pc) +
                 (prev.block == s.block_linear ? " with no __syncthreads (or warp sync) between them"
                                               : " in the same launch"),
             pc);
    };
    if (written && !happens_before(c.write, tid)) return conflict(c.write, "write");
    if (write) {
      for (const Access& r : c.read)
        if (is_live(r, shared) && !happens_before(r, tid)) return conflict(r, "read");
      c.write = mine;
      c.read[0] = c.read[1] = Access{};
    } else if (is_live(c.read[0], shared) && c.read[0].thread == tid && c.read[0].block == s.block_linear) {
      c.read[0] = mine;
    } else {
      c.read[1] = c.read[0];
      c.read[0] = mine;
    }
  }
}

Region classify(uintptr_t addr, size_t size, const void* pc) {
  State& s = state();
  const auto arena = reinterpret_cast<uintptr_t>(s.shared_arena);
  if (addr >= arena && addr < arena + 2 * kSharedRedzone + kMaxDynamicShared) {
    const uintptr_t begin = arena + kSharedRedzone;
    if (addr < begin || addr + size > begin + s.dynamic_bytes)
      report("out-of-bounds",
             std::to_string(size) + "-byte access at dynamic shared memory + " +
                 std::to_string(static_cast<long>(addr - begin)) + ", outside the launch's " +
                 std::to_string(s.dynamic_bytes) + " bytes, at " + source_line(pc),
             pc, true);
    return Region::kDynamicShared;
  }
  for (const auto& [lo, hi] : s.static_ranges)
    if (addr >= lo && addr < hi) return Region::kStaticShared;
  if (s.allocations.empty()) return Region::kNone;
  auto it = s.allocations.upper_bound(addr);
  if (it != s.allocations.begin()) {
    --it;
    if (addr >= it->first && addr + size <= it->first + it->second.bytes) {
      if (it->second.live) return Region::kGlobal;
      report("out-of-bounds",
             std::to_string(size) + "-byte access to freed device memory at " + source_line(pc), pc, true);
    }
  }
  const auto dev = reinterpret_cast<uintptr_t>(s.device_arena);
  if (s.device_arena && addr >= dev && addr < dev + kDeviceArenaBytes) {
    std::string where;
    if (it != s.allocations.end() && addr >= it->first) {
      where = std::to_string(static_cast<long>(addr - it->first - it->second.bytes)) + " bytes past the end of a " +
              std::to_string(it->second.bytes) + "-byte allocation";
    } else {
      where = "outside every allocation";
    }
    report("out-of-bounds", std::to_string(size) + "-byte access to global memory " + where + " at " + source_line(pc),
           pc, true);
  }
  return Region::kNone;
}

void on_access(const void* p, size_t size, bool write, const void* pc) {
  if (!t_in_block) return;
  State& s = state();
  if (!s.current) return;
  if ((++s.accesses & 0xffff) == 0) check_timeout();
  const auto addr = reinterpret_cast<uintptr_t>(p);
  const Region r = classify(addr, size, pc);
  if (r != Region::kNone) check_bytes(r, addr, size, write, pc);
}

// ------------------------------------------------------------------------------------------ launches

struct KernelNames {
  std::string mangled, readable;
};

const KernelNames& kernel_names_of(const LaunchConfig& c) {
  static std::unordered_map<const void*, KernelNames> cache;
  auto it = cache.find(c.kernel);
  if (it == cache.end()) {
    const std::string mangled = function_symbol(c.kernel);
    const std::string name = mangled.empty() ? std::string(c.source_name) : mangled;
    it = cache.emplace(c.kernel, KernelNames{name, mangled.empty() ? name : demangle(name.c_str())}).first;
  }
  return it->second;
}

cudaError_t launch_error(cudaError_t err, const std::string& why) {
  report("launch", why);
  t_last_error = err;
  return err;
}

cudaError_t validate(const LaunchConfig& c) {
  const dim3 g = c.grid, b = c.block;
  const uint64_t threads = uint64_t(b.x) * b.y * b.z;
  auto dims = [](dim3 d) {
    return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
  };
  if (g.x == 0 || g.y == 0 || g.z == 0 || threads == 0)
    return launch_error(cudaErrorInvalidConfiguration, "zero-sized launch: grid " + dims(g) + ", block " + dims(b));
  if (threads > 1024 || b.z > 64)
    return launch_error(cudaErrorInvalidConfiguration, "block " + dims(b) + " exceeds 1024 threads (z <= 64)");
  if (g.x > 2147483647u || g.y > 65535 || g.z > 65535)
    return launch_error(cudaErrorInvalidConfiguration,
                        "grid " + dims(g) + " exceeds the limits (x < 2^31, y and z <= 65535)");
  const size_t limit = arch_shared_limit();
  if (c.dynamic_smem > limit)
    return launch_error(cudaErrorInvalidValue, std::to_string(c.dynamic_smem) +
                                                   " bytes of dynamic shared memory exceed sm_" +
                                                   std::to_string(state().arch.load()) + "'s " + std::to_string(limit));
  if (c.dynamic_smem > kDefaultSharedBytes) {
    auto it = state().max_dynamic_shared.find(c.kernel);
    const size_t opted = it == state().max_dynamic_shared.end() ? kDefaultSharedBytes : size_t(it->second);
    if (c.dynamic_smem > opted)
      return launch_error(cudaErrorInvalidValue,
                          std::to_string(c.dynamic_smem) + " bytes of dynamic shared memory without an opt-in "
                              "(cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize) allows " +
                              std::to_string(opted) + ")");
  }
  return cudaSuccess;
}

}  // namespace

// ------------------------------------------------------------------------------------------ public API

const Coordinates& coordinates() { return state().current->coords; }

unsigned char* dynamic_shared_memory() { return state().shared_arena + kSharedRedzone; }

void syncthreads(const char* file, int line) {
  Fiber& f = current();
  f.wait = Wait::kBarrier;
  f.file = file;
  f.line = line;
  try_release_barrier();
  if (f.wait == Wait::kBarrier) yield_to_scheduler();
  check_timeout();
}

void warp_collective(const char* op, unsigned mask, const void* in, size_t in_bytes, void* out, size_t out_bytes,
                     WarpCompute compute, const void* arg, const char* file, int line) {
  State& s = state();
  Fiber& f = current();
  const int lane = lane_of(f), w = f.tid / 32;
  f.file = file;
  f.line = line;
  f.op = op;
  f.mask = mask;
  const std::string where = std::string(op) + "(mask " + mask_text(mask) + ") at " + site(file, line);
  if (!(mask >> lane & 1u))
    report("warp-mask", where + " is called by lane " + std::to_string(lane) + ", which its mask leaves out",
           nullptr, true);
  if (mask & ~s.warps[w].present)
    report("warp-mask", where + " names lanes the block does not have (warp " + std::to_string(w) + " has " +
                            mask_text(s.warps[w].present) + ")",
           nullptr, true);
  for (int l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && s.fibers[w * 32 + l].wait == Wait::kExited)
      report("warp-mask", where + " names lane " + std::to_string(l) + ", which has exited", nullptr, true);
  f.in = in;
  f.in_bytes = in_bytes;
  f.out = out;
  f.out_bytes = out_bytes;
  f.compute = compute;
  f.arg = arg;
  f.wait = Wait::kWarp;
  if (!try_complete_warp(w, mask)) yield_to_scheduler();
}

void syncwarp(const char* file, int line, unsigned mask) {
  warp_collective(
      "__syncwarp", mask, nullptr, 0, nullptr, 0, [](const unsigned char*, unsigned char*, unsigned, const void*) {},
      nullptr, file, line);
}

void check_warp_source(const char* op, unsigned mask, int lane, int src) {
  if (!(mask >> src & 1u))
    report("warp-mask",
           std::string(op) + "(mask " + mask_text(mask) + ") at " + site(current().file, current().line) + ": lane " +
               std::to_string(lane) + " reads lane " + std::to_string(src) + ", outside the mask",
           nullptr);
}

void note_atomic(const void* addr, size_t bytes) {
  if (!t_in_block || !state().current) return;
  classify(reinterpret_cast<uintptr_t>(addr), bytes, __builtin_return_address(0));
}

cudaError_t run_launch(const LaunchConfig& config, void (*body)(void*), void* ctx) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.launch_mutex);
  s.config = &config;
  const KernelNames& names = kernel_names_of(config);
  s.kernel_name = names.readable;
  ++s.launches[names.mangled];
  s.launch_findings = 0;
  s.launch_timed_out = s.launch_illegal = false;
  s.reported.clear();
  t_last_report.clear();
  if (const cudaError_t err = validate(config); err != cudaSuccess) return err;
  const dim3 b = config.block, g = config.grid;
  const size_t threads = size_t(b.x) * b.y * b.z;
  ensure_fibers(threads);
  for (size_t t = 0; t < threads; ++t) {
    Fiber& f = s.fibers[t];
    f.tid = static_cast<int>(t);
    f.coords.thread_idx = {static_cast<unsigned>(t % b.x), static_cast<unsigned>(t / b.x % b.y),
                           static_cast<unsigned>(t / (size_t(b.x) * b.y))};
    f.coords.block_dim = b;
    f.coords.grid_dim = g;
  }
  s.static_ranges = writable_segments(config.kernel);
  s.body = body;
  s.body_ctx = ctx;
  s.dynamic_bytes = config.dynamic_smem;
  ++s.launch_serial;
  for (unsigned z = 0; z < g.z && !s.aborted; ++z)
    for (unsigned y = 0; y < g.y && !s.aborted; ++y)
      for (unsigned x = 0; x < g.x && !s.aborted; ++x) {
        s.block_idx = dim3(x, y, z);
        s.block_linear = x + g.x * (y + g.y * z);
        run_block();
      }
  s.aborted = false;
  t_last_error = s.launch_findings == 0 ? cudaSuccess
                 : s.launch_timed_out  ? cudaErrorLaunchTimeout
                 : s.launch_illegal    ? cudaErrorIllegalAddress
                                       : cudaErrorLaunchFailure;
  if (s.launch_findings > kMaxFindingsPerLaunch)
    t_last_report += " (and " + std::to_string(s.launch_findings - kMaxFindingsPerLaunch) + " more findings)";
  return t_last_error;
}

cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  State& s = state();
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || size_t(value) > arch_shared_limit()) {
    t_last_error = cudaErrorInvalidValue;
    t_last_report = "cudaFuncSetAttribute: " + std::to_string(value) + " bytes of dynamic shared memory exceed sm_" +
                    std::to_string(s.arch.load()) + "'s " + std::to_string(arch_shared_limit());
    return cudaErrorInvalidValue;
  }
  // Launches on other threads read the map.
  std::lock_guard<std::mutex> lock(s.launch_mutex);
  s.max_dynamic_shared[kernel] = value;
  return cudaSuccess;
}

// The allocation table is shared by every thread that calls the engine, and launches read it: its writers take the
// launch lock, so no thread changes it while another's kernel runs or another writer is midway.
void* device_alloc(size_t bytes) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.launch_mutex);
  if (!s.device_arena) {
    void* mem = mmap(nullptr, kDeviceArenaBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
    if (mem == MAP_FAILED) return nullptr;
    s.device_arena = static_cast<unsigned char*>(mem);
  }
  const size_t offset = (s.device_used + kDeviceRedzone + 255) / 256 * 256;
  if (offset + bytes + kDeviceRedzone > kDeviceArenaBytes) return nullptr;
  s.device_used = offset + bytes;
  unsigned char* p = s.device_arena + offset;
  s.allocations[reinterpret_cast<uintptr_t>(p)] = {bytes, true, true};
  return p;
}

void device_free(void* ptr) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.launch_mutex);
  auto it = s.allocations.find(reinterpret_cast<uintptr_t>(ptr));
  if (it == s.allocations.end() || !it->second.arena) return;
  it->second.live = false;
  // Addresses are never reused, so a later access through a stale pointer is reported, not aliased.
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t lo = (it->first + page - 1) / page * page, hi = (it->first + it->second.bytes) / page * page;
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
}

// Counted across threads: threads calling ops on the same tensor register its storage once each, and it stays
// known until the last of them is done.
void register_device_buffer(const void* ptr, size_t bytes) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.launch_mutex);
  const auto key = reinterpret_cast<uintptr_t>(ptr);
  if (s.registrations[key]++ == 0) s.allocations[key] = {bytes, true, false};
}

void unregister_device_buffer(const void* ptr) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.launch_mutex);
  const auto key = reinterpret_cast<uintptr_t>(ptr);
  auto it = s.registrations.find(key);
  if (it == s.registrations.end() || --it->second > 0) return;
  s.registrations.erase(it);
  s.allocations.erase(key);
}

std::map<std::string, uint64_t> launch_counts() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.launch_mutex);
  return s.launches;
}

void set_arch(int sm) { state().arch = sm == 80 ? 80 : 90; }
int arch() { return state().arch; }

std::vector<Finding> take_findings() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.launch_mutex);
  return std::exchange(s.findings, {});
}

// ------------------------------------------------------------------------------------------ PTX twins

namespace {

uint16_t lo16(uint32_t r) { return static_cast<uint16_t>(r & 0xffffu); }
uint16_t hi16(uint32_t r) { return static_cast<uint16_t>(r >> 16); }

struct MmaIn {
  uint32_t a[4], b[2];
  float c[4];
};

// PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type" (.f16/.bf16 A and B, .f32 C/D).
// groupID = %laneid >> 2, threadID_in_group = %laneid % 4; register r of A holds a_{2r} (low half) and
// a_{2r+1}, likewise for B.
//   A (16 x 16): row = groupID for a_i with i < 2 or 4 <= i < 6, groupID + 8 otherwise;
//                col = threadID_in_group * 2 + (i & 1) for i < 4, + 8 for i >= 4.
//   B (16 x 8):  row = threadID_in_group * 2 + (i & 1) for i < 2, + 8 for i >= 2;  col = groupID.
//   C, D (16 x 8): row = groupID for c_i with i < 2, groupID + 8 otherwise; col = threadID_in_group * 2 + (i & 1).
int a_row(int lane, int i) { return (lane >> 2) + ((i < 2 || (i >= 4 && i < 6)) ? 0 : 8); }
int a_col(int lane, int i) { return (lane % 4) * 2 + (i & 1) + (i >= 4 ? 8 : 0); }
int b_row(int lane, int i) { return (lane % 4) * 2 + (i & 1) + (i >= 2 ? 8 : 0); }
int b_col(int lane, int) { return lane >> 2; }
int c_row(int lane, int i) { return (lane >> 2) + (i >= 2 ? 8 : 0); }
int c_col(int lane, int i) { return (lane % 4) * 2 + (i & 1); }

// The products of b16 inputs are exact in double and the k = 16 sum rounds once to float: the hardware
// guarantees at least fp32 accumulation in an unspecified order, so results may differ in the last bit.
template <float (*ToFloat)(uint16_t)>
void mma_compute(const unsigned char* ins, unsigned char* outs, unsigned, const void*) {
  float a[16][16], b[16][8], c[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    MmaIn in;
    std::memcpy(&in, ins + lane * sizeof(MmaIn), sizeof in);
    for (int i = 0; i < 8; ++i) {
      const uint32_t reg = in.a[i / 2];
      a[a_row(lane, i)][a_col(lane, i)] = ToFloat(i % 2 ? hi16(reg) : lo16(reg));
    }
    for (int i = 0; i < 4; ++i) {
      const uint32_t reg = in.b[i / 2];
      b[b_row(lane, i)][b_col(lane, i)] = ToFloat(i % 2 ? hi16(reg) : lo16(reg));
    }
    for (int i = 0; i < 4; ++i) c[c_row(lane, i)][c_col(lane, i)] = in.c[i];
  }
  for (int lane = 0; lane < 32; ++lane) {
    float d[4];
    for (int i = 0; i < 4; ++i) {
      const int r = c_row(lane, i), n = c_col(lane, i);
      double sum = c[r][n];
      for (int k = 0; k < 16; ++k) sum += double(a[r][k]) * double(b[k][n]);
      d[i] = static_cast<float>(sum);
    }
    std::memcpy(outs + lane * sizeof d, d, sizeof d);
  }
}

// PTX ISA, "ldmatrix": for .m8n8.x4.b16, threads 8j .. 8j + 7 supply the addresses of rows 0..7 of matrix j
// and destination register j of every thread receives a fragment of matrix j. In a fragment thread %laneid
// holds row %laneid / 4, elements (%laneid % 4) * 2 and + 1 (low half first); with .trans the matrix is read
// column-major, so those are elements [(%laneid % 4) * 2 + i][%laneid / 4] of the rows as stored.
void ldmatrix_x4_trans_compute(const unsigned char* ins, unsigned char* outs, unsigned, const void*) {
  for (int lane = 0; lane < 32; ++lane) {
    uint32_t r[4];
    for (int j = 0; j < 4; ++j) {
      uint16_t e[2];
      for (int i = 0; i < 2; ++i) {
        const int stored_row = (lane % 4) * 2 + i, stored_col = lane / 4;
        std::memcpy(&e[i], ins + (8 * j + stored_row) * 16 + stored_col * 2, 2);
      }
      r[j] = uint32_t(e[0]) | (uint32_t(e[1]) << 16);
    }
    std::memcpy(outs + lane * sizeof r, r, sizeof r);
  }
}

float f16_bits_to_float(uint16_t h) { return half_to_float(h); }
float bf16_bits_to_float(uint16_t b) { return bf16_to_float(b); }

}  // namespace

void mma_m16n8k16(MmaType type, float (&acc)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, const char* file,
                  int line) {
  MmaIn in{{a[0], a[1], a[2], a[3]}, {b0, b1}, {acc[0], acc[1], acc[2], acc[3]}};
  const bool f16 = type == MmaType::kF16;
  warp_collective(f16 ? "mma.sync.m16n8k16.f32.f16" : "mma.sync.m16n8k16.f32.bf16", 0xffffffffu, &in, sizeof in, acc,
                  sizeof acc, f16 ? &mma_compute<f16_bits_to_float> : &mma_compute<bf16_bits_to_float>, nullptr,
                  file, line);
}

void ldmatrix_x4_trans_exchange(uint32_t (&r)[4], const void* row_bytes, const void* row_address, const char* file,
                                int line) {
  const auto addr = reinterpret_cast<uintptr_t>(row_address);
  const Region region = t_in_block ? classify(addr, 16, nullptr) : Region::kNone;
  if (region != Region::kDynamicShared && region != Region::kStaticShared)
    report("out-of-bounds", "ldmatrix at " + site(file, line) + " given an address outside shared memory", nullptr,
           true);
  if (addr % 16 != 0)
    report("out-of-bounds", "ldmatrix at " + site(file, line) + " given a row address not 16-byte aligned", nullptr,
           true);
  warp_collective("ldmatrix.sync.m8n8.x4.trans.b16", 0xffffffffu, row_bytes, 16, r, sizeof r,
                  &ldmatrix_x4_trans_compute, nullptr, file, line);
}

// ------------------------------------------------------------------------------------------ cub twins

cudaError_t check_temp_storage(void* temp, size_t& bytes, size_t needed) {
  if (!temp) {
    bytes = needed;
    return cudaSuccess;
  }
  return bytes >= needed ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace pk::emu

// ------------------------------------------------------------------------------------------ runtime API

using pk::emu::state;

cudaError_t cudaGetLastError() { return std::exchange(pk::emu::t_last_error, cudaSuccess); }
cudaError_t cudaPeekAtLastError() { return pk::emu::t_last_error; }

const char* cudaGetErrorName(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorLaunchTimeout: return "cudaErrorLaunchTimeout";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}

// The error's name, then the emulator's report of the launch that raised it: what launch checks print.
const char* cudaGetErrorString(cudaError_t err) {
  thread_local std::string text;
  text = std::string(cudaGetErrorName(err)) + " (emulated)";
  if (err != cudaSuccess && !pk::emu::t_last_report.empty()) text += ": " + pk::emu::t_last_report;
  return text.c_str();
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidValue; }

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxGridDimY: *value = 65535; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; break;
    case cudaDevAttrMultiProcessorCount: *value = state().arch == 80 ? 108 : 132; break;
    case cudaDevAttrComputeCapabilityMajor: *value = state().arch / 10; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(pk::emu::arch_shared_limit()); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

cudaError_t cudaMalloc(void** ptr, size_t bytes) {
  *ptr = pk::emu::device_alloc(bytes);
  return *ptr ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaFree(void* ptr) {
  pk::emu::device_free(ptr);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t) {
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* ptr, int value, size_t bytes) { return cudaMemsetAsync(ptr, value, bytes); }
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t) {
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  return cudaMemcpyAsync(dst, src, bytes, kind);
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

// ------------------------------------------------------------------------------------------ instrumentation

// The entry points GCC's -fsanitize=thread instrumentation calls; this emulator is their only definition.
extern "C" {
#define PK_EMU_TSAN_SIZE(n)                                                                                       \
  void __tsan_read##n(void* p) { pk::emu::on_access(p, n, false, __builtin_return_address(0)); }                 \
  void __tsan_write##n(void* p) { pk::emu::on_access(p, n, true, __builtin_return_address(0)); }                 \
  void __tsan_unaligned_read##n(void* p) { pk::emu::on_access(p, n, false, __builtin_return_address(0)); }       \
  void __tsan_unaligned_write##n(void* p) { pk::emu::on_access(p, n, true, __builtin_return_address(0)); }       \
  void __tsan_volatile_read##n(void* p) { pk::emu::on_access(p, n, false, __builtin_return_address(0)); }        \
  void __tsan_volatile_write##n(void* p) { pk::emu::on_access(p, n, true, __builtin_return_address(0)); }
PK_EMU_TSAN_SIZE(1)
PK_EMU_TSAN_SIZE(2)
PK_EMU_TSAN_SIZE(4)
PK_EMU_TSAN_SIZE(8)
PK_EMU_TSAN_SIZE(16)
#undef PK_EMU_TSAN_SIZE
void __tsan_read_range(void* p, unsigned long size) {
  pk::emu::on_access(p, size, false, __builtin_return_address(0));
}
void __tsan_write_range(void* p, unsigned long size) {
  pk::emu::on_access(p, size, true, __builtin_return_address(0));
}
// Atomics in instrumented host code (static-local guards, libstdc++ reference counts): performed as such.
#define PK_EMU_TSAN_ATOMIC(bits, type)                                                                           \
  type __tsan_atomic##bits##_load(const volatile type* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); } \
  void __tsan_atomic##bits##_store(volatile type* a, type v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); } \
  type __tsan_atomic##bits##_exchange(volatile type* a, type v, int) {                                          \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                                          \
  }                                                                                                              \
  type __tsan_atomic##bits##_fetch_add(volatile type* a, type v, int) {                                         \
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                                           \
  }                                                                                                              \
  type __tsan_atomic##bits##_fetch_sub(volatile type* a, type v, int) {                                         \
    return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                                           \
  }                                                                                                              \
  type __tsan_atomic##bits##_fetch_and(volatile type* a, type v, int) {                                         \
    return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST);                                                           \
  }                                                                                                              \
  type __tsan_atomic##bits##_fetch_or(volatile type* a, type v, int) {                                          \
    return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST);                                                            \
  }                                                                                                              \
  type __tsan_atomic##bits##_fetch_xor(volatile type* a, type v, int) {                                         \
    return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST);                                                           \
  }                                                                                                              \
  int __tsan_atomic##bits##_compare_exchange_strong(volatile type* a, type* expected, type v, int, int) {      \
    return __atomic_compare_exchange_n(a, expected, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);              \
  }                                                                                                              \
  int __tsan_atomic##bits##_compare_exchange_weak(volatile type* a, type* expected, type v, int, int) {        \
    return __atomic_compare_exchange_n(a, expected, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);               \
  }                                                                                                              \
  type __tsan_atomic##bits##_compare_exchange_val(volatile type* a, type expected, type v, int, int) {         \
    __atomic_compare_exchange_n(a, &expected, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                    \
    return expected;                                                                                             \
  }
PK_EMU_TSAN_ATOMIC(8, uint8_t)
PK_EMU_TSAN_ATOMIC(16, uint16_t)
PK_EMU_TSAN_ATOMIC(32, uint32_t)
PK_EMU_TSAN_ATOMIC(64, uint64_t)
#undef PK_EMU_TSAN_ATOMIC
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
}
