// Precompiled header shared by every target: LibTorch and the heavy third-party headers.
// Parsing <torch/torch.h> alone takes ~10 s per translation unit; this pays it once per build.
#pragma once

#include <torch/torch.h>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>
