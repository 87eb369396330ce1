#include "serve/engine.h"

#include <algorithm>

#include "inference/text_stream.h"
#include "model/lora.h"
#include "utils/logging.h"

namespace dsopen::serve {

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::Stop: return "stop";
    case FinishReason::Length: return "length";
    case FinishReason::Cancelled: return "cancelled";
    case FinishReason::Error: return "error";
    case FinishReason::None: break;
  }
  return "";
}

void Channel::push(Event e) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    events_.push_back(std::move(e));
  }
  cv_.notify_all();
}

bool Channel::pop(Event& e, std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lk(mu_);
  if (!cv_.wait_for(lk, timeout, [&] { return !events_.empty(); })) return false;
  e = std::move(events_.front());
  events_.pop_front();
  return true;
}

// A sequence from submission to its last event. Touched by the scheduler thread only once queued.
struct Engine::Sequence {
  Sequence(GenerationParams params, const data::Tokenizer& tok, std::shared_ptr<Channel> ch, size_t i)
      : p(std::move(params)), channel(std::move(ch)), index(i), sampler(p.sampling), stream(tok, p.prompt),
        context(p.prompt) {}

  GenerationParams p;
  std::shared_ptr<Channel> channel;
  size_t index;
  inference::Sampler sampler;
  inference::TextStream stream;
  std::vector<int32_t> context;    // prompt + generated (what the repetition penalty sees)
  std::vector<int32_t> generated;
  size_t emitted = 0;              // bytes of stream.current() handed out so far
  std::vector<TokenLogprob> logprobs;  // generated since the last event
  int64_t row = -1;                // KV-cache row while running
  int64_t prefilled = 0;           // prompt tokens in the cache
  int32_t next_input = -1;         // the last sampled token: the next decode step's input
  FinishReason finished = FinishReason::None;

  bool decoding() const { return finished == FinishReason::None && next_input >= 0; }
};

namespace {
int64_t default_capacity(const model::CausalLM& m, const EngineOptions& o) {
  return o.capacity > 0 ? o.capacity : m->config().context_length();
}
}  // namespace

Engine::Engine(model::CausalLM model, std::shared_ptr<const data::Tokenizer> tok, const EngineOptions& options)
    : model_(std::move(model)), tok_(std::move(tok)), options_(options),
      slots_(model_, options.slots, default_capacity(model_, options), options.cache_dtype),
      device_(model_->model->embed_tokens->weight.device()) {
  stats_.kv_positions_total = slots_.slots() * slots_.capacity();
  thread_ = std::thread([this] { run(); });
}

Engine::~Engine() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    admitting_ = false;
    stopping_ = true;
    for (auto& s : waiting_) s->channel->cancel();
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Engine::submit(std::vector<GenerationParams> params, const std::vector<size_t>& indices,
                    const std::shared_ptr<Channel>& channel) {
  {  // refused before anything is built for it
    std::lock_guard<std::mutex> lk(mu_);
    if (!admitting_) throw NotAdmitting("the server is shutting down");
    if (!waiting_.empty() && static_cast<int64_t>(waiting_.size() + params.size()) > options_.max_waiting)
      throw QueueFull(std::to_string(waiting_.size()) + " sequences are waiting (the limit is " +
                      std::to_string(options_.max_waiting) + ")");
  }
  std::vector<std::unique_ptr<Sequence>> seqs;
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(!params[i].prompt.empty() && static_cast<int64_t>(params[i].prompt.size()) < slots_.capacity(),
                "serve: a prompt must have 1 .. capacity - 1 tokens");
    seqs.push_back(std::make_unique<Sequence>(std::move(params[i]), *tok_, channel, indices[i]));  // may throw
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (!admitting_) throw NotAdmitting("the server is shutting down");
    // A request of more sequences than the limit (n > max_waiting) still gets in when nothing else waits.
    if (!waiting_.empty() && static_cast<int64_t>(waiting_.size() + seqs.size()) > options_.max_waiting)
      throw QueueFull(std::to_string(waiting_.size()) + " sequences are waiting (the limit is " +
                      std::to_string(options_.max_waiting) + ")");
    for (auto& s : seqs) waiting_.push_back(std::move(s));
    stats_.waiting = static_cast<int64_t>(waiting_.size());
  }
  cv_.notify_all();
}

void Engine::drain(std::chrono::milliseconds bound) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    admitting_ = false;
  }
  const auto deadline = std::chrono::steady_clock::now() + bound;
  auto idle = [&] {
    std::lock_guard<std::mutex> lk(mu_);
    return waiting_.empty() && stats_.running == 0;
  };
  while (!idle() && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  if (idle()) return;
  {  // past the bound: cancel what is left (the scheduler finishes them as Cancelled)
    std::lock_guard<std::mutex> lk(mu_);
    for (auto& s : waiting_) s->channel->cancel();
    cancel_all_ = true;
  }
  cv_.notify_all();
  while (!idle()) std::this_thread::sleep_for(std::chrono::milliseconds(10));
}

EngineStats Engine::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  EngineStats s = stats_;
  const auto now = std::chrono::steady_clock::now();
  int64_t tokens = 0;
  for (const auto& [t, n] : recent_)
    if (now - t <= std::chrono::seconds(10)) tokens += n;
  s.generated_tokens_per_s = static_cast<double>(tokens) / 10.0;
  return s;
}

void Engine::run() {
  torch::NoGradGuard no_grad;
  while (true) {
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stopping_ || cancel_all_ || !waiting_.empty() || !running_.empty(); });
      if (stopping_) {  // the destructor: cancel everything, hand out the last events, stop
        for (auto& s : waiting_) running_.push_back(std::move(s));
        waiting_.clear();
      }
    }
    admit();
    for (auto& s : running_) {
      const bool cancel = s->channel->cancelled() || stopping_ || cancel_all_;
      if (cancel && s->finished == FinishReason::None) finish(*s, FinishReason::Cancelled);
    }
    retire_finished();
    if (running_.empty()) {
      std::lock_guard<std::mutex> lk(mu_);
      if (stopping_) return;
      if (cancel_all_ && waiting_.empty()) cancel_all_ = false;
      continue;
    }
    try {
      prefill_step();
      decode_step();
    } catch (const std::exception& e) {
      spdlog::error("serving step failed: {}", e.what());
      for (auto& s : running_)
        if (s->finished == FinishReason::None) finish(*s, FinishReason::Error, e.what());
    }
    retire_finished();
  }
}

void Engine::admit() {
  std::lock_guard<std::mutex> lk(mu_);
  while (!waiting_.empty()) {
    // A request cancelled while waiting needs no row.
    if (!waiting_.front()->channel->cancelled() && !stopping_) {
      const int64_t row = slots_.acquire();
      if (row < 0) break;
      waiting_.front()->row = row;
    }
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
  }
  stats_.waiting = static_cast<int64_t>(waiting_.size());
  stats_.running = static_cast<int64_t>(running_.size());
}

void Engine::prefill_step() {
  // Prompts are cut at multiples of prefill_chunk whatever else runs, so a prompt's numbers never depend on the
  // batch; a step takes the first chunk it meets, then further chunks while they fit its budget.
  int64_t budget = options_.prefill_chunk;
  for (auto& sp : running_) {
    Sequence& s = *sp;
    const int64_t left = static_cast<int64_t>(s.p.prompt.size()) - s.prefilled;
    if (s.finished != FinishReason::None || s.row < 0 || left == 0) continue;
    const int64_t n = std::min(left, options_.prefill_chunk);
    if (n > budget && budget < options_.prefill_chunk) break;
    std::vector<int64_t> ids(s.p.prompt.begin() + s.prefilled, s.p.prompt.begin() + s.prefilled + n);
    model::KVCache view = slots_.row_view(s.row);
    model::ForwardInput in;
    in.input_ids = torch::tensor(ids, torch::kLong).view({1, n}).to(device_);
    in.cache = &view;
    in.last_logits = 1;
    const auto t0 = std::chrono::steady_clock::now();
    model::ServedAdapterRows adapter({s.p.adapter});
    auto logits = model_->forward(in).logits;  // [1, 1, V]
    slots_.length(s.row) += n;
    s.prefilled += n;
    budget -= n;
    {
      std::lock_guard<std::mutex> lk(mu_);
      stats_.prompt_tokens += n;
      stats_.prefill_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    if (s.prefilled == static_cast<int64_t>(s.p.prompt.size())) advance(s, logits[0][0]);
    if (budget <= 0) break;
  }
}

void Engine::decode_step() {
  const int64_t rows = slots_.rows_in_use();
  bool any = false;
  for (const auto& s : running_) any = any || s->decoding();
  if (!any || rows == 0) return;
  // Rows not decoding (free, or still prefilling) ride along with a dummy token written at their current length,
  // where their next prompt chunk overwrites it.
  std::vector<int64_t> ids(rows, 0), lengths(rows, 0), adapters(rows, 0);
  for (int64_t r = 0; r < rows; ++r) lengths[r] = slots_.length(r);
  for (const auto& s : running_)
    if (s->decoding()) ids[s->row] = s->next_input, adapters[s->row] = s->p.adapter;
  model::KVCache view = slots_.rows_view(rows);
  model::ForwardInput in;
  in.input_ids = torch::tensor(ids, torch::kLong).view({rows, 1}).to(device_);
  in.cache = &view;
  in.last_logits = 1;
  in.row_lengths = lengths;
  const auto t0 = std::chrono::steady_clock::now();
  model::ServedAdapterRows adapter_rows(adapters);
  auto logits = model_->forward(in).logits.select(1, 0).to(torch::kCPU);  // [rows, V]
  const auto t1 = std::chrono::steady_clock::now();
  int64_t tokens = 0;
  for (auto& s : running_)
    if (s->decoding()) {
      slots_.length(s->row) += 1;
      advance(*s, logits[s->row]);
      ++tokens;
    }
  const auto t2 = std::chrono::steady_clock::now();
  std::lock_guard<std::mutex> lk(mu_);
  ++stats_.decode_steps;
  stats_.decode_forward_s += std::chrono::duration<double>(t1 - t0).count();
  stats_.sample_s += std::chrono::duration<double>(t2 - t1).count();
  stats_.kv_positions_used = slots_.used_positions();
  const auto now = std::chrono::steady_clock::now();
  recent_.emplace_back(now, tokens);
  while (!recent_.empty() && now - recent_.front().first > std::chrono::seconds(10)) recent_.pop_front();
}

void Engine::advance(Sequence& s, const torch::Tensor& logits) {
  // Rows of a vocabulary padded beyond the tokenizer's decode to nothing: never sampled.
  const int64_t usable = std::min<int64_t>(tok_->vocab_size(), logits.size(0));
  auto row = logits.narrow(0, 0, usable);
  if (static_cast<int64_t>(s.generated.size()) < s.p.min_tokens && !s.p.eos_ids.empty()) {
    row = row.clone();
    for (int32_t id : s.p.eos_ids)
      if (id >= 0 && id < usable) row[id] = -std::numeric_limits<float>::infinity();
  }
  const int32_t token = static_cast<int32_t>(s.sampler.sample(row, s.context, s.p.prompt.size()));
  {
    std::lock_guard<std::mutex> lk(mu_);
    ++stats_.generated_tokens;
  }
  if (std::find(s.p.eos_ids.begin(), s.p.eos_ids.end(), token) != s.p.eos_ids.end()) {
    s.next_input = -1;
    finish(s, FinishReason::Stop);
    return;
  }
  if (s.p.top_logprobs >= 0) {
    const auto lp = torch::log_softmax(row.to(torch::kFloat32), 0);
    TokenLogprob t{token, lp[token].item<double>(), {}};
    if (s.p.top_logprobs > 0) {
      auto [values, ids] = lp.topk(std::min<int64_t>(s.p.top_logprobs, usable));
      for (int64_t i = 0; i < values.size(0); ++i)
        t.top.emplace_back(static_cast<int32_t>(ids[i].item<int64_t>()), values[i].item<double>());
    }
    s.logprobs.push_back(std::move(t));
  }
  s.generated.push_back(token);
  s.context.push_back(token);
  s.next_input = token;
  bool stopped = false;
  const size_t shown = s.stream.visible(s.generated, s.p.stop, /*final=*/false, stopped);
  if (stopped) return finish(s, FinishReason::Stop);
  const bool full = static_cast<int64_t>(s.generated.size()) >= s.p.max_tokens ||
                    static_cast<int64_t>(s.context.size()) >= slots_.capacity();
  if (full) return finish(s, FinishReason::Length);
  if (shown > s.emitted || !s.logprobs.empty()) {
    Event e;
    e.index = s.index;
    if (shown > s.emitted) {
      e.text = s.stream.current().substr(s.emitted, shown - s.emitted);
      s.emitted = shown;
    }
    e.logprobs = std::move(s.logprobs);
    s.logprobs.clear();
    s.channel->push(std::move(e));
  }
}

void Engine::finish(Sequence& s, FinishReason reason, const std::string& error) {
  Event e;
  e.index = s.index;
  if (reason == FinishReason::Stop || reason == FinishReason::Length) {
    bool stopped = false;
    const size_t shown = s.stream.visible(s.generated, s.p.stop, /*final=*/true, stopped);
    if (shown > s.emitted) e.text = s.stream.current().substr(s.emitted, shown - s.emitted);
    s.emitted = std::max(s.emitted, shown);
  }
  e.logprobs = std::move(s.logprobs);
  e.finish = reason;
  e.error = error;
  e.prompt_tokens = static_cast<int64_t>(s.p.prompt.size());
  e.completion_tokens = static_cast<int64_t>(s.generated.size());
  s.finished = reason;
  s.next_input = -1;
  s.channel->push(std::move(e));
}

void Engine::retire_finished() {
  int64_t done = 0, cancelled = 0, failed = 0;
  for (auto& s : running_) {
    if (s->finished == FinishReason::None) continue;
    if (s->row >= 0) slots_.release(s->row), s->row = -1;
    (s->finished == FinishReason::Cancelled ? cancelled : s->finished == FinishReason::Error ? failed : done) += 1;
  }
  running_.erase(std::remove_if(running_.begin(), running_.end(),
                                [](const auto& s) { return s->finished != FinishReason::None; }),
                 running_.end());
  std::lock_guard<std::mutex> lk(mu_);
  stats_.requests_finished += done;
  stats_.requests_cancelled += cancelled;
  stats_.requests_failed += failed;
  stats_.running = static_cast<int64_t>(running_.size());
  stats_.kv_positions_used = slots_.used_positions();
}

}  // namespace dsopen::serve
