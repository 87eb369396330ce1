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
  if (e.status == 401) res.set_header("WWW-Authenticate", "Bearer");
  if (e.status == 429) res.set_header("Retry-After", "1");
  res.set_content(dump(error_body(e)), "application/json");
}

// "Authorization: Bearer <key>" (the scheme in any case, RFC 7235) when the server has a key.
void check_api_key(const httplib::Request& req, const std::string& key) {
  if (key.empty()) return;
  const std::string h = req.get_header_value("Authorization");
  const bool bearer = h.size() > 7 && (h.compare(0, 7, "Bearer ") == 0 || h.compare(0, 7, "bearer ") == 0 ||
                                       h.compare(0, 7, "BEARER ") == 0);
  if (!bearer || h.substr(7) != key)
    throw ApiError(401, "invalid API key: send 'Authorization: Bearer <key>' with the server's --api-key", "",
                   "invalid_api_key");
}

// The request body, at most `limit` bytes whether its length was announced or sent in chunks: 413 past it, 400
// when the body cannot be read.
std::string read_body(const httplib::ContentReader& reader, const httplib::Response& res, size_t limit) {
  std::string body;
  bool too_large = false;
  const bool ok = reader([&](const char* data, size_t n) {
    if (body.size() + n > limit) return !(too_large = true);
    body.append(data, n);
    return true;
  });
  if (too_large || res.status == 413)
    throw ApiError(413, "the request body is larger than " + std::to_string(limit) + " bytes (--max-body-mb)");
  if (!ok) throw ApiError(400, "the request body could not be read");
  return body;
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
  http_->set_default_headers({{"Access-Control-Allow-Origin", "*"}});
  http_->new_task_queue = [threads] { return new httplib::ThreadPool(static_cast<size_t>(threads)); };
  http_->set_payload_max_length(options_.max_body_bytes);
  // httplib's default socket options add SO_REUSEPORT, with which a second server on a busy port starts and shares
  // it silently; SO_REUSEADDR alone lets a restart bind at once and a busy port fail.
  http_->set_socket_options([](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, reinterpret_cast<const void*>(&yes), sizeof(yes));
  });
  // Range requests apply to files, not to generated answers.
  http_->set_pre_routing_handler([](const httplib::Request& req, httplib::Response& res) {
    if (!req.has_header("Range")) return httplib::Server::HandlerResponse::Unhandled;
    send_error(res, ApiError(400, "Range requests are not supported", "", "invalid_request"));
    return httplib::Server::HandlerResponse::Handled;
  });
  routes();
}

HttpServer::~HttpServer() = default;

int HttpServer::bind() {
  const int port = options_.port == 0 ? http_->bind_to_any_port(options_.host)
                                      : (http_->bind_to_port(options_.host, options_.port) ? options_.port : -1);
  if (port <= 0)
    throw usage_error("--host/--port", "cannot listen on " + options_.host + ":" + std::to_string(options_.port),
                      "the port is in use or the host is not an address of this machine: choose another --port (0: any "
                      "free port) or --host (127.0.0.1, 0.0.0.0 for every interface)");
  return port;
}

void HttpServer::serve() { http_->listen_after_bind(); }

void HttpServer::shutdown() {
  draining_ = true;
  engine_.drain(options_.shutdown_grace);
  // stop() waits for every connection thread; one held by a client that trickles its request would keep the
  // process alive: 10 s more at most, then exit regardless.
  std::thread watchdog([] {
    std::this_thread::sleep_for(std::chrono::seconds(10));
    spdlog::warn("connections still open 10 s after shutdown: exiting");
    spdlog::default_logger()->flush();
    std::_Exit(0);
  });
  watchdog.detach();
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
      check_api_key(req, options_.api_key);
      res.set_content(dump(models_body(model_)), "application/json");
    } catch (const ApiError& e) {
      send_error(res, e);
    }
  });
  http.Get(R"(/v1/models/(.+))", [this](const httplib::Request& req, httplib::Response& res) {
    try {
      check_api_key(req, options_.api_key);
      for (const auto& m : models_body(model_)["data"])
        if (m["id"] == req.matches[1].str()) return res.set_content(dump(m), "application/json");
      throw ApiError(404, "the model '" + req.matches[1].str() + "' does not exist", "model", "model_not_found");
    } catch (const ApiError& e) {
      send_error(res, e);
    }
  });
  // Browser front ends on other origins (CORS): the preflight of any /v1 route.
  http.Options(R"(/v1/.*)", [](const httplib::Request&, httplib::Response& res) {
    res.status = 204;
    res.set_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS");
    res.set_header("Access-Control-Allow-Headers", "Authorization, Content-Type");
    res.set_header("Access-Control-Max-Age", "86400");
  });
  // The body is read here, whatever its Content-Type: curl -d sends JSON as a form, which httplib would cap at 8 KiB.
  auto post = [this](Endpoint endpoint) {
    return [this, endpoint](const httplib::Request& req, httplib::Response& res, const httplib::ContentReader& r) {
      std::string body;
      try {
        check_api_key(req, options_.api_key);
        body = read_body(r, res, options_.max_body_bytes);
      } catch (const ApiError& e) {
        return send_error(res, e);
      }
      generation(endpoint, body, res);
    };
  };
  http.Post("/v1/completions", post(Endpoint::Completions));
  http.Post("/v1/chat/completions", post(Endpoint::ChatCompletions));
}

void HttpServer::generation(Endpoint endpoint, const std::string& body,
                            httplib::Response& res) {
  auto stream = std::make_shared<Stream>();
  try {
    if (draining_) throw ApiError(503, "the server is shutting down", "", "shutting_down");
    stream->request = parse_request(endpoint, body, model_);
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

  // Sequences cut short by a shutdown past its grace period: an error, not a reply.
  const ApiError cut_short(503, "the server shut down before the request finished", "", "shutting_down");
  if (!stream->request.stream) {
    // Most requests finish within a couple of seconds: answered whole, errors with their status.
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    Event e;
    while (!stream->writer->done() && std::chrono::steady_clock::now() < until) {
      if (!stream->channel->pop(e, std::chrono::milliseconds(100))) continue;
      if (e.finish == FinishReason::Error || e.finish == FinishReason::Cancelled) {
        stream->channel->cancel();
        return send_error(res, e.finish == FinishReason::Error
                                   ? ApiError(500, "generation failed: " + e.error, "", "generation_error")
                                   : cut_short);
      }
      stream->writer->collect(e);
    }
    if (stream->writer->done()) return res.set_content(dump(stream->writer->body()), "application/json");
    // Longer ones: the object is written at the end and until then a space (JSON allows leading whitespace) every
    // second, whether tokens are arriving or not, so that a client that went away is noticed and its sequences
    // cancelled. The status is sent first, so a failure from here on cannot be a status: the error object is
    // written and the connection closed before the chunked body ends, so that clients see a failed transfer,
    // not a reply.
    res.set_chunked_content_provider(
        "application/json",
        [stream, cut_short](size_t, httplib::DataSink& sink) {
          Event e;
          auto waited = std::chrono::steady_clock::now();
          while (!stream->writer->done()) {
            const bool got = stream->channel->pop(e, std::chrono::milliseconds(200));
            if (std::chrono::steady_clock::now() - waited > std::chrono::seconds(1)) {
              if (!sink.write(" ", 1)) return false;  // the releaser cancels
              waited = std::chrono::steady_clock::now();
            }
            if (!got) continue;
            if (e.finish == FinishReason::Error || e.finish == FinishReason::Cancelled) {
              stream->channel->cancel();
              const ApiError err = e.finish == FinishReason::Error
                                       ? ApiError(500, "generation failed: " + e.error, "", "generation_error")
                                       : cut_short;
              const std::string text = dump(error_body(err));
              sink.write(text.data(), text.size());
              return false;  // no last chunk: the transfer fails
            }
            stream->writer->collect(e);
          }
          const std::string text = dump(stream->writer->body());
          if (!sink.write(text.data(), text.size())) return false;
          sink.done();
          return true;
        },
        [stream](bool success) {
          if (!success || !stream->writer->done()) stream->channel->cancel();
        });
    return;
  }

  res.set_header("Cache-Control", "no-cache");
  res.set_chunked_content_provider(
      "text/event-stream",
      [stream, cut_short](size_t, httplib::DataSink& sink) {
        auto write = [&](const std::string& s) { return s.empty() || sink.write(s.data(), s.size()); };
        if (!stream->started) {
          stream->started = true;
          if (!write(stream->writer->stream_start())) return false;
        }
        Event e;
        while (!stream->channel->pop(e, std::chrono::milliseconds(250)))
          if (!sink.is_writable()) return false;  // the releaser cancels
        if (e.finish == FinishReason::Error || e.finish == FinishReason::Cancelled) {
          stream->channel->cancel();
          write(ResponseWriter::stream_error(e.finish == FinishReason::Error
                                                 ? ApiError(500, "generation failed: " + e.error, "", "generation_error")
                                                 : cut_short));
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
