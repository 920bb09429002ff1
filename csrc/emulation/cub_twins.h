// Host twins of the cub device-wide algorithms the engine calls, with cub's two-phase contract: a call with
// d_temp_storage == nullptr only writes the scratch size it needs; a real call fails with
// cudaErrorInvalidValue if given less. The twins really use the scratch, so a workspace that overlaps the
// data shows up as wrong results here too.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>

namespace pk::emu {
cudaError_t check_temp_storage(void* temp, size_t& bytes, size_t needed);
}  // namespace pk::emu

namespace cub {

struct DeviceScan {
  template <typename In, typename Out, typename NumItems>
  static cudaError_t InclusiveSum(void* d_temp_storage, size_t& temp_storage_bytes, In d_in, Out d_out,
                                  NumItems num_items, cudaStream_t = nullptr) {
    using V = std::remove_cv_t<std::remove_reference_t<decltype(*d_in)>>;
    const size_t n = static_cast<size_t>(num_items);
    if (const cudaError_t err = pk::emu::check_temp_storage(d_temp_storage, temp_storage_bytes, n * sizeof(V) + 1);
        err != cudaSuccess || !d_temp_storage)
      return err;
    // In place is allowed (d_out == d_in): read everything into the scratch first.
    V* scratch = static_cast<V*>(d_temp_storage);
    for (size_t i = 0; i < n; ++i) scratch[i] = d_in[i];
    V sum{};
    for (size_t i = 0; i < n; ++i) d_out[i] = sum = static_cast<V>(sum + scratch[i]);
    return cudaSuccess;
  }
};

struct DeviceRadixSort {
  // Stable sort of (key, value) pairs by bits [begin_bit, end_bit) of the keys, signed keys ordered as cub
  // orders them (the sign bit flipped before the bits are taken).
  template <typename K, typename V, typename NumItems>
  static cudaError_t SortPairs(void* d_temp_storage, size_t& temp_storage_bytes, const K* d_keys_in, K* d_keys_out,
                               const V* d_values_in, V* d_values_out, NumItems num_items, int begin_bit = 0,
                               int end_bit = sizeof(K) * 8, cudaStream_t = nullptr) {
    static_assert(std::is_integral_v<K>, "the twin sorts integer keys");
    using U = std::make_unsigned_t<K>;
    const size_t n = static_cast<size_t>(num_items);
    if (const cudaError_t err =
            pk::emu::check_temp_storage(d_temp_storage, temp_storage_bytes, n * (sizeof(size_t) + sizeof(U)) + 1);
        err != cudaSuccess || !d_temp_storage)
      return err;
    if (begin_bit < 0 || end_bit > static_cast<int>(sizeof(K) * 8) || begin_bit >= end_bit)
      return cudaErrorInvalidValue;
    auto* order = static_cast<size_t*>(d_temp_storage);
    auto* digits = reinterpret_cast<U*>(order + n);
    const U sign = std::is_signed_v<K> ? U(U(1) << (sizeof(K) * 8 - 1)) : U(0);
    const int width = end_bit - begin_bit;
    const U field = width == static_cast<int>(sizeof(U) * 8) ? U(~U(0)) : U((U(1) << width) - 1);
    for (size_t i = 0; i < n; ++i) {
      digits[i] = U((static_cast<U>(d_keys_in[i]) ^ sign) >> begin_bit) & field;
      order[i] = i;
    }
    std::stable_sort(order, order + n, [&](size_t a, size_t b) { return digits[a] < digits[b]; });
    // Gather through fresh copies: the outputs may not alias the inputs, but nothing else is assumed.
    for (size_t i = 0; i < n; ++i) digits[i] = static_cast<U>(d_keys_in[order[i]]);
    for (size_t i = 0; i < n; ++i) d_keys_out[i] = static_cast<K>(digits[i]);
    for (size_t i = 0; i < n; ++i) d_values_out[i] = d_values_in[order[i]];
    return cudaSuccess;
  }
};

}  // namespace cub
