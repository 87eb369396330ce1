// Greedy decoding in llama.cpp from given prompt token ids, for scripts/bench_llamacpp.sh: pure argmax at every step
// (no sampler chain, EOS not suppressed, as dsopen-generate --temperature 0 --ignore-eos), printing one JSON line with
// the generated ids and, per step, the gap between the best and second-best logit (a near-tie explains a divergence).
// Built against the llama.cpp tools by scripts/build_llamacpp.sh.
//   llamacpp_greedy MODEL.gguf N_NEW THREADS ID [ID ...]
#include <llama.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s MODEL.gguf N_NEW THREADS ID [ID ...]\n", argv[0]);
    return 2;
  }
  llama_log_set([](ggml_log_level, const char*, void*) {}, nullptr);
  llama_backend_init();
  llama_model* model = llama_model_load_from_file(argv[1], llama_model_default_params());
  if (!model) {
    std::fprintf(stderr, "error: %s: llama.cpp could not load it\n", argv[1]);
    return 1;
  }
  const int n_new = std::atoi(argv[2]), threads = std::atoi(argv[3]);
  std::vector<llama_token> ids;
  for (int i = 4; i < argc; ++i) ids.push_back(std::atoi(argv[i]));
  llama_context_params cp = llama_context_default_params();
  cp.n_ctx = static_cast<uint32_t>(ids.size() + n_new + 8);
  cp.n_batch = cp.n_ctx;
  cp.n_threads = cp.n_threads_batch = threads;
  llama_context* ctx = llama_init_from_model(model, cp);
  const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
  std::vector<llama_token> out;
  std::vector<float> gaps;
  llama_batch batch = llama_batch_get_one(ids.data(), static_cast<int32_t>(ids.size()));
  for (int step = 0; step < n_new; ++step) {
    if (llama_decode(ctx, batch) != 0) {
      std::fprintf(stderr, "error: llama_decode failed at step %d\n", step);
      return 1;
    }
    const float* logits = llama_get_logits_ith(ctx, -1);
    int best = 0, second = -1;
    for (int v = 1; v < n_vocab; ++v) {
      if (logits[v] > logits[best]) second = best, best = v;
      else if (second < 0 || logits[v] > logits[second]) second = v;
    }
    out.push_back(best);
    gaps.push_back(logits[best] - logits[second]);
    batch = llama_batch_get_one(&out.back(), 1);
  }
  std::printf("{\"tokens\": [");
  for (size_t i = 0; i < out.size(); ++i) std::printf("%s%d", i ? ", " : "", out[i]);
  std::printf("], \"gaps\": [");
  for (size_t i = 0; i < gaps.size(); ++i) std::printf("%s%.6g", i ? ", " : "", gaps[i]);
  std::printf("]}\n");
  llama_free(ctx);
  llama_model_free(model);
  return 0;
}
