// libFuzzer target: arbitrary bytes as a safetensors file. The header parser must either accept them with every
// range inside the buffer or throw dsopen::Error — never crash, hang or read out of bounds (ASan/UBSan watch).
#include <cstddef>
#include <cstdint>

#include "model/safetensors_header.h"
#include "utils/errors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const auto h = dsopen::model::parse_safetensors_header(data, size, "fuzz-input");
    // Touch every accepted byte range: out-of-bounds ranges would be caught by ASan here.
    volatile uint8_t sink = 0;
    for (const auto& [name, t] : h.tensors)
      for (size_t i = t.begin; i < t.end; i += 4096) sink ^= data[h.data_offset + i];
    (void)sink;
  } catch (const dsopen::Error&) {
  }
  return 0;
}
