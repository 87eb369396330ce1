// The serving engine: continuous batching of text generation requests over one model. One scheduler thread owns
// the model. At every step it admits waiting requests into free KV-cache rows (serve/kv_slots.h), prefills their
// prompts in chunks (a bounded number of prompt tokens per step, so running sequences keep decoding while a long
// prompt arrives), decodes one token for every running sequence in a single batched forward (each row at its own
// length: model::ForwardInput::row_lengths), retires finished and cancelled requests and frees their rows at once.
//
// Results never depend on the batch for greedy requests: a row attends only its own keys at its own positions,
// exactly as when generated alone (dsopen-generate); each request samples from its own seeded generator.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "data/tokenizer.h"
#include "inference/sampler.h"
#include "model/transformer.h"
#include "serve/kv_slots.h"

namespace dsopen::serve {

// One sequence to generate: what the OpenAI layer (serve/openai_api.h) turns a request into.
struct GenerationParams {
  std::vector<int32_t> prompt;       // token ids, shorter than the KV row capacity
  inference::SamplingOptions sampling;
  int64_t max_tokens = 16;           // new tokens at most (the row's capacity may end the sequence earlier)
  std::vector<std::string> stop;     // stop strings: the text ends before the first one
  std::vector<int32_t> eos_ids;      // any of them ends the sequence (not part of its text); empty: none
  int top_logprobs = -1;             // -1: no log-probabilities; 0..20: the chosen token's and that many best
  int64_t adapter = 0;               // served LoRA adapter (model/lora.h add_served_adapter); 0: the base model
  int64_t min_tokens = 0;            // EOS is not sampled before this many tokens (vLLM's min_tokens)
};

// The log-probability (natural log, of the model's distribution before penalties and temperature) of one
// generated token and of the `top_logprobs` most likely tokens at that position.
struct TokenLogprob {
  int32_t token = 0;
  double logprob = 0;
  std::vector<std::pair<int32_t, double>> top;
};

enum class FinishReason { None, Stop, Length, Cancelled, Error };
const char* finish_reason_name(FinishReason r);  // "stop", "length", "cancelled", "error"

// What a sequence produced since its previous event, in order. The texts of a sequence's events add up to its
// whole text; the last event has `finish` set.
struct Event {
  size_t index = 0;                    // the choice this event belongs to (Channel users number their sequences)
  std::string text;                    // new visible text (may be empty)
  std::vector<TokenLogprob> logprobs;  // the tokens generated since the previous event (with top_logprobs >= 0)
  FinishReason finish = FinishReason::None;
  std::string error;                   // finish == Error: why
  int64_t prompt_tokens = 0, completion_tokens = 0;  // set on the last event
};

// Where the events of one HTTP request's sequences arrive (one or more choices), read by the request's thread.
class Channel {
public:
  void push(Event e);
  // The next event, waiting up to `timeout`; false when none arrived.
  bool pop(Event& e, std::chrono::milliseconds timeout);
  // Asks the engine to stop every sequence of this channel (the client went away); they finish as Cancelled.
  void cancel() { cancelled_ = true; }
  bool cancelled() const { return cancelled_; }

private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Event> events_;
  std::atomic<bool> cancelled_{false};
};

struct EngineOptions {
  int64_t slots = 8;               // sequences decoding at once (KV-cache rows)
  int64_t capacity = 0;            // positions per row; 0: the model's context length
  torch::Dtype cache_dtype = torch::kFloat32;
  int64_t max_waiting = 256;       // sequences waiting for a row; more are refused (QueueFull), but a request is
                                   // always taken when none waits
  int64_t prefill_chunk = 512;     // prompt tokens prefilled per scheduler step (a longer prompt takes several)
};

// Counters and gauges for /metrics (monotonic counters since start, gauges now).
struct EngineStats {
  int64_t requests_finished = 0, requests_cancelled = 0, requests_failed = 0;
  int64_t prompt_tokens = 0, generated_tokens = 0;
  int64_t waiting = 0, running = 0;
  int64_t kv_positions_used = 0, kv_positions_total = 0;
  int64_t decode_steps = 0;
  // Scheduler time by phase (seconds): prefill forwards, decode forwards, sampling + text (the per-token host work).
  double prefill_s = 0, decode_forward_s = 0, sample_s = 0;
  double generated_tokens_per_s = 0;  // over the last ~10 s
};

// Refusals of submit(): the waiting queue is full (HTTP 429), or the engine no longer admits (503, shutting down).
struct QueueFull : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct NotAdmitting : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Engine {
public:
  Engine(model::CausalLM model, std::shared_ptr<const data::Tokenizer> tok, const EngineOptions& options);
  ~Engine();  // cancels what is left and joins the scheduler
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Queues sequences whose events go to `channel` (Event::index = indices[i]); all or none are queued.
  void submit(std::vector<GenerationParams> params, const std::vector<size_t>& indices,
              const std::shared_ptr<Channel>& channel);
  // Stops admitting (submit throws NotAdmitting), lets running and waiting sequences finish for up to `bound`,
  // then cancels the rest; returns once none is left.
  void drain(std::chrono::milliseconds bound);

  int64_t capacity() const { return slots_.capacity(); }
  const model::ModelConfig& config() const { return model_->config(); }
  const data::Tokenizer& tokenizer() const { return *tok_; }
  EngineStats stats() const;

private:
  struct Sequence;
  void run();
  void admit();
  void prefill_step();
  void decode_step();
  // Samples the sequence's next token from `logits` [V] and emits the text it adds (or finishes the sequence).
  void advance(Sequence& s, const torch::Tensor& logits);
  void finish(Sequence& s, FinishReason reason, const std::string& error = "");
  void retire_finished();

  model::CausalLM model_;
  std::shared_ptr<const data::Tokenizer> tok_;
  EngineOptions options_;
  KVSlots slots_;
  torch::Device device_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::unique_ptr<Sequence>> waiting_;  // guarded by mu_
  bool admitting_ = true;                          // guarded by mu_
  std::atomic<bool> stopping_{false};              // the destructor runs: cancel everything and stop
  std::atomic<bool> cancel_all_{false};            // drain() ran past its bound
  std::vector<std::unique_ptr<Sequence>> running_; // scheduler thread only
  EngineStats stats_;                              // guarded by mu_
  std::deque<std::pair<std::chrono::steady_clock::time_point, int64_t>> recent_;  // (time, tokens), guarded by mu_
  std::thread thread_;
};

}  // namespace dsopen::serve
