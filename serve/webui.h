// The chat WebUI dsopen-serve answers at / : serve/webui.html, compiled into the binary (no files to install, no
// CDN): a conversation list kept in the browser's localStorage, streamed replies over /v1/chat/completions, a stop
// button, sampling settings and the model choice from /v1/models.
#pragma once

#include <string>

namespace dsopen::serve {

const std::string& webui_html();

}  // namespace dsopen::serve
