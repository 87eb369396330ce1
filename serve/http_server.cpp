#include "serve/http_server.h"

#include <httplib.h>

#include <map>
#include <sstream>

#include "serve/webui.h"
#include "utils/errors.h"
#include "utils/logging.h"

namespace dsopen::serve {

using nlohmann::ordered_json;

// HTTP responses by status, for /metrics.
struct HttpServer::Counters {
  mutable std::mutex mu;
  std::map<int, int64_t> by_status;
};

namespace {
// Bytes of a JSON document with invalid UTF-8 (in generated text, or quoted from a bad request) replaced by U+FFFD.
std::string dump(const ordered_json& j) { return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace); }

void send_error(httplib::Response& res, const ApiError& e) {
  res.status = e.status;
  res.set_content(dump(error_body(e)), "application/json");
}

// What a streaming response keeps between calls of its content provider.
struct Stream {
  ApiRequest request;
  std::unique_ptr<ResponseWriter> writer;
  std::shared_ptr<Channel> channel;
  bool started = false;
};
}  // namespace

HttpServer::HttpServer(Engine& engine, ServedModel model, ServerOptions options)
    : engine_(engine), model_(std::move(model)), options_(std::move(options)), http_(std::make_unique<httplib::Server>()),
      counters_(std::make_unique<Counters>()) {
  const int threads = options_.http_threads;
  http_->new_task_queue = [threads] { return new httplib::ThreadPool(static_cast<size_t>(threads)); };
  http_->set_payload_max_length(options_.max_body_bytes);
  routes();
}

HttpServer::~HttpServer() = default;

int HttpServer::bind() {
  const int port = options_.port == 0 ? http_->bind_to_any_port(options_.host)
                                      : (http_->bind_to_port(options_.host, options_.port) ? options_.port : -1);
  if (port <= 0)
    throw usage_error("--host/--port", "cannot listen on " + options_.host + ":" + std::to_string(options_.port),
                      "the port may be in use: choose another with --port (0: any free port)");
  return port;
}

void HttpServer::serve() { http_->listen_after_bind(); }

void HttpServer::shutdown() {
  draining_ = true;
  engine_.drain(options_.shutdown_grace);
  http_->stop();
}

void HttpServer::routes() {
  auto& http = *http_;
  http.set_logger([this](const httplib::Request&, const httplib::Response& res) {
    std::lock_guard<std::mutex> lk(counters_->mu);
    ++counters_->by_status[res.status];
  });
  // Errors httplib answers itself (unknown route, body over the limit, a malformed request line) get the same
  // error object as ours.
  http.set_error_handler([this](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    std::string message = "HTTP " + std::to_string(res.status);
    if (res.status == 404) message = "no route " + req.method + " " + req.path;
    if (res.status == 413)
      message = "the request body is larger than " + std::to_string(options_.max_body_bytes) + " bytes";
    if (res.status == 405) message = req.method + " is not allowed on " + req.path;
    send_error(res, ApiError(res.status, message));
  });
  http.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string what = "internal error";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    spdlog::error("request failed: {}", what);
    send_error(res, ApiError(500, what));
  });

  http.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    res.status = draining_ ? 503 : 200;
    res.set_content(draining_ ? R"({"status":"shutting down"})" : R"({"status":"ok"})", "application/json");
  });
  http.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(metrics_text(), "text/plain; version=0.0.4");
  });
  http.Get("/", [](const httplib::Request&, httplib::Response& res) { res.set_content(webui_html(), "text/html; charset=utf-8"); });
  http.Get("/v1/models", [this](const httplib::Request& req, httplib::Response& res) {
    try {
      if (!options_.api_key.empty() && req.get_header_value("Authorization") != "Bearer " + options_.api_key)
        throw ApiError(401, "invalid API key: send 'Authorization: Bearer <key>' with the server's --api-key", "",
                       "invalid_api_key");
      res.set_content(dump(models_body(model_)), "application/json");
    } catch (const ApiError& e) {
      send_error(res, e);
    }
  });
  http.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) {
    generation(Endpoint::Completions, req, res);
  });
  http.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) {
    generation(Endpoint::ChatCompletions, req, res);
  });
}

void HttpServer::generation(Endpoint endpoint, const httplib::Request& req, httplib::Response& res) {
  auto stream = std::make_shared<Stream>();
  try {
    if (!options_.api_key.empty() && req.get_header_value("Authorization") != "Bearer " + options_.api_key)
      throw ApiError(401, "invalid API key: send 'Authorization: Bearer <key>' with the server's --api-key", "",
                     "invalid_api_key");
    if (draining_) throw ApiError(503, "the server is shutting down", "", "shutting_down");
    stream->request = parse_request(endpoint, req.body, model_);
    stream->writer = std::make_unique<ResponseWriter>(stream->request, model_);
    stream->channel = std::make_shared<Channel>();
    std::vector<size_t> indices;
    auto seqs = sequences_of(stream->request, indices);
    engine_.submit(std::move(seqs), indices, stream->channel);
  } catch (const ApiError& e) {
    return send_error(res, e);
  } catch (const QueueFull& e) {
    return send_error(res, ApiError(429, std::string("the server is busy: ") + e.what() + "; retry later", "",
                                    "queue_full"));
  } catch (const NotAdmitting& e) {
    return send_error(res, ApiError(503, e.what(), "", "shutting_down"));
  } catch (const Error& e) {  // a value the sampler refuses
    return send_error(res, ApiError(400, e.what(), "", "invalid_value"));
  }

  if (!stream->request.stream) {
    Event e;
    while (!stream->writer->done()) {
      if (!stream->channel->pop(e, std::chrono::milliseconds(200))) continue;
      if (e.finish == FinishReason::Error) {
        stream->channel->cancel();
        return send_error(res, ApiError(500, "generation failed: " + e.error, "", "generation_error"));
      }
      stream->writer->collect(e);
    }
    res.set_content(dump(stream->writer->body()), "application/json");
    return;
  }

  res.set_header("Cache-Control", "no-cache");
  res.set_chunked_content_provider(
      "text/event-stream",
      [stream](size_t, httplib::DataSink& sink) {
        auto write = [&](const std::string& s) { return s.empty() || sink.write(s.data(), s.size()); };
        if (!stream->started) {
          stream->started = true;
          if (!write(stream->writer->stream_start())) return false;
        }
        Event e;
        while (!stream->channel->pop(e, std::chrono::milliseconds(250)))
          if (!sink.is_writable()) return false;  // the releaser cancels
        if (e.finish == FinishReason::Error) {
          write(ResponseWriter::stream_error(ApiError(500, "generation failed: " + e.error, "", "generation_error")));
          write("data: [DONE]\n\n");
          sink.done();
          return true;
        }
        if (!write(stream->writer->stream_event(e))) return false;
        if (stream->writer->done()) {
          if (!write(stream->writer->stream_end())) return false;
          sink.done();
        }
        return true;
      },
      [stream](bool success) {
        if (!success || !stream->writer->done()) stream->channel->cancel();
      });
}

std::string HttpServer::metrics_text() const {
  const EngineStats s = engine_.stats();
  std::ostringstream o;
  auto metric = [&](const char* name, const char* type, const char* help) {
    o << "# HELP " << name << ' ' << help << "\n# TYPE " << name << ' ' << type << '\n';
  };
  metric("dsopen_requests_total", "counter", "Generated sequences that ended, by outcome.");
  o << "dsopen_requests_total{outcome=\"finished\"} " << s.requests_finished << '\n'
    << "dsopen_requests_total{outcome=\"cancelled\"} " << s.requests_cancelled << '\n'
    << "dsopen_requests_total{outcome=\"failed\"} " << s.requests_failed << '\n';
  metric("dsopen_prompt_tokens_total", "counter", "Prompt tokens prefilled.");
  o << "dsopen_prompt_tokens_total " << s.prompt_tokens << '\n';
  metric("dsopen_generation_tokens_total", "counter", "Tokens generated.");
  o << "dsopen_generation_tokens_total " << s.generated_tokens << '\n';
  metric("dsopen_generation_tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.");
  o << "dsopen_generation_tokens_per_second " << s.generated_tokens_per_s << '\n';
  metric("dsopen_requests_waiting", "gauge", "Sequences waiting for a KV-cache row.");
  o << "dsopen_requests_waiting " << s.waiting << '\n';
  metric("dsopen_requests_running", "gauge", "Sequences holding a KV-cache row (prefilling or decoding).");
  o << "dsopen_requests_running " << s.running << '\n';
  metric("dsopen_kv_cache_usage_ratio", "gauge", "Share of the KV cache's positions holding a running sequence's keys.");
  o << "dsopen_kv_cache_usage_ratio "
    << (s.kv_positions_total > 0 ? static_cast<double>(s.kv_positions_used) / static_cast<double>(s.kv_positions_total) : 0.0)
    << '\n';
  metric("dsopen_decode_steps_total", "counter", "Batched decode forwards.");
  o << "dsopen_decode_steps_total " << s.decode_steps << '\n';
  metric("dsopen_scheduler_seconds_total", "counter", "Scheduler time by phase.");
  o << "dsopen_scheduler_seconds_total{phase=\"prefill\"} " << s.prefill_s << '\n'
    << "dsopen_scheduler_seconds_total{phase=\"decode_forward\"} " << s.decode_forward_s << '\n'
    << "dsopen_scheduler_seconds_total{phase=\"sample\"} " << s.sample_s << '\n';
  metric("dsopen_http_responses_total", "counter", "HTTP responses by status code.");
  {
    std::lock_guard<std::mutex> lk(counters_->mu);
    for (const auto& [status, n] : counters_->by_status) o << "dsopen_http_responses_total{code=\"" << status << "\"} " << n << '\n';
  }
  return o.str();
}

}  // namespace dsopen::serve
