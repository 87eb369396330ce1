// dsopen-serve's HTTP side (cpp-httplib): the OpenAI routes over the engine, /health, /metrics (Prometheus text)
// and the WebUI at /. Each connection is served by a pool thread that parses the request, queues its sequences in
// the engine and then waits on their events: written as they come (server-sent events) or as one object at the
// end. A streaming client that goes away cancels its sequences at the next token.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <string>

#include "serve/engine.h"
#include "serve/openai_api.h"

namespace httplib {
class Server;
struct Request;
struct Response;
}  // namespace httplib

namespace dsopen::serve {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8000;                      // 0: any free port (listening() says which)
  std::string api_key;                  // non-empty: /v1/* need "Authorization: Bearer <key>"
  size_t max_body_bytes = 4u << 20;     // larger bodies get 413
  int http_threads = 64;                // connections served at once (a streaming client holds one)
  std::chrono::milliseconds shutdown_grace{10000};  // how long running requests may finish after SIGINT/SIGTERM
};

class HttpServer {
public:
  HttpServer(Engine& engine, ServedModel model, ServerOptions options);
  ~HttpServer();

  // Binds the port (a usage error naming --host/--port when it cannot); returns the port bound.
  int bind();
  // Serves until shutdown() (blocking).
  void serve();
  // Stops admitting requests, lets the running ones finish within the grace period, then stops serving.
  void shutdown();

private:
  void routes();
  // An authorized request's body -> its response (streamed or whole).
  void generation(Endpoint endpoint, const std::string& body, httplib::Response& res);
  std::string metrics_text() const;

  Engine& engine_;
  ServedModel model_;
  ServerOptions options_;
  std::unique_ptr<httplib::Server> http_;
  std::atomic<bool> draining_{false};
  struct Counters;
  std::unique_ptr<Counters> counters_;
};

}  // namespace dsopen::serve
