// Named model flavors (torchtitan style): a config says `flavor: 7b` instead of spelling every key out.
#pragma once

#include <string>
#include <vector>

#include "model/config.h"

namespace dsopen::model {

// The flavor's config, or nullptr when `name` is not registered.
const ModelConfig* find_flavor(const std::string& name);
std::vector<std::string> flavor_names();

}  // namespace dsopen::model
