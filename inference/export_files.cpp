#include "inference/export_files.h"

#include "data/hf_tokenizer_files.h"
#include "inference/generation_setup.h"
#include "model/generation_config.h"

namespace dsopen::inference {

std::map<std::string, std::string> export_companion_files(const model::ModelDir& source, const model::ModelConfig& config,
                                                          const std::string& adapter) {
  const data::ChatTemplate tmpl = data::chat_template_of(adapter.empty() ? source.path() : adapter);
  auto files = data::hf_tokenizer_files(source.tokenizer_path(adapter), tmpl, config.context_length());
  const auto gen = source.generation_config();
  resolve_eos_ids(gen, config);  // an end-of-text id outside the vocabulary is refused here, not by the export's users
  files["generation_config.json"] = (gen ? gen->json : model::default_generation_json(config)).dump(2) + "\n";
  return files;
}

}  // namespace dsopen::inference
