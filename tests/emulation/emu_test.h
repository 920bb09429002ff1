// Helpers of the emulator's test drivers: device buffers the checks know, and a registry of named cases that
// main() runs one at a time (`driver CASE`) or all (`driver`), printing PASS/FAIL lines. A case declared with
// EMU_CASE_ALONE ends the process by design and runs only when named.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace emu_test {

template <typename T>
struct DeviceBuffer {
  T* ptr;
  size_t n;
  explicit DeviceBuffer(size_t count, T fill = T{})
      : ptr(static_cast<T*>(pk::emu::device_alloc(count * sizeof(T)))), n(count) {
    for (size_t i = 0; i < n; ++i) ptr[i] = fill;
  }
  DeviceBuffer(const std::vector<T>& values) : DeviceBuffer(values.size()) {
    for (size_t i = 0; i < n; ++i) ptr[i] = values[i];
  }
  ~DeviceBuffer() { pk::emu::device_free(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  std::vector<T> host() const { return std::vector<T>(ptr, ptr + n); }
};

// "file.cpp:LINE" of the first source line of `file` containing `snippet`, as the emulator's reports print it.
inline std::string where(const char* file, const std::string& snippet) {
  FILE* f = std::fopen(file, "r");
  if (!f) return "(cannot read " + std::string(file) + ")";
  char buf[1024];
  int line = 0;
  std::string found = "(no line with " + snippet + ")";
  while (std::fgets(buf, sizeof buf, f)) {
    ++line;
    if (std::string(buf).find(snippet) != std::string::npos) {
      const std::string path(file);
      found = path.substr(path.rfind('/') + 1) + ":" + std::to_string(line);
      break;
    }
  }
  std::fclose(f);
  return found;
}

struct Failure {
  std::string what;
};

inline void check(bool ok, const std::string& what) {
  if (!ok) throw Failure{what};
}

// Findings of the launches since the last call, as one text for the failure message.
inline std::string describe(const std::vector<pk::emu::Finding>& findings) {
  std::string out;
  for (const auto& f : findings) out += "\n    " + f.message;
  return out.empty() ? " (none)" : out;
}

// Exactly one kind of finding, with every `needles` text in one message.
inline void expect_finding(const std::string& kind, const std::vector<std::string>& needles) {
  const auto findings = pk::emu::take_findings();
  for (const auto& f : findings) {
    if (f.kind != kind) continue;
    bool all = true;
    for (const auto& n : needles) all &= f.message.find(n) != std::string::npos;
    if (all) return;
  }
  std::string want;
  for (const auto& n : needles) want += " '" + n + "'";
  throw Failure{"expected a " + kind + " finding containing" + want + "; got:" + describe(findings)};
}

inline void expect_clean() {
  const auto findings = pk::emu::take_findings();
  if (!findings.empty()) throw Failure{"expected no findings; got:" + describe(findings)};
}

struct Case {
  std::function<void()> fn;
  bool alone;
};

inline std::map<std::string, Case>& cases() {
  static std::map<std::string, Case> all;
  return all;
}

struct Register {
  Register(const char* name, std::function<void()> fn, bool alone = false) {
    cases().emplace(name, Case{std::move(fn), alone});
  }
};

inline int run_main(int argc, char** argv) {
  int failed = 0, ran = 0;
  for (const auto& [name, c] : cases()) {
    if (argc > 1 ? name != argv[1] : c.alone) continue;
    ++ran;
    try {
      pk::emu::take_findings();
      c.fn();
      std::printf("PASS %s\n", name.c_str());
    } catch (const Failure& f) {
      ++failed;
      std::printf("FAIL %s: %s\n", name.c_str(), f.what.c_str());
    }
  }
  if (ran == 0) {
    std::printf("no case named %s\n", argc > 1 ? argv[1] : "");
    return 2;
  }
  return failed ? 1 : 0;
}

}  // namespace emu_test

#define EMU_CASE(name)                                                   \
  static void name();                                                    \
  static const emu_test::Register register_##name(#name, &name);         \
  static void name()

#define EMU_CASE_ALONE(name)                                             \
  static void name();                                                    \
  static const emu_test::Register register_##name(#name, &name, true);   \
  static void name()

#define EMU_MAIN() \
  int main(int argc, char** argv) { return emu_test::run_main(argc, argv); }
