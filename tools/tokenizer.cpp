// dsopen-tokenizer: train a SentencePiece tokenizer, or inspect one by encoding and decoding text.
//   dsopen-tokenizer train --input a.txt b.txt --vocab-size 8000 --model-type bpe --output tok.model
//   echo "你好 world" | dsopen-tokenizer encode --model tok.model
//   dsopen-tokenizer decode --model tok.model --ids "1 2 3"
//   dsopen-tokenizer encode --model tok.model --jsonl < texts.jsonl    (a JSON string per line -> a JSON id list)
//   dsopen-tokenizer chat --model MODEL_DIR --messages conv.json      (the prompt the model's chat template gives)
#include <iostream>
#include <iterator>
#include <sstream>

#include "data/chat_format.h"
#include "data/hf_tokenizer.h"
#include "inference/generation_setup.h"
#include "model/model_dir.h"
#include "utils/env.h"
#include "utils/json.h"
#include "utils/cli.h"
#include "utils/errors.h"
#include "utils/logging.h"

using namespace dsopen;

namespace {

cxxopts::Options make_options() {
  cxxopts::Options options("dsopen-tokenizer", "Train a SentencePiece tokenizer, or encode/decode with one, or render "
                                               "a conversation in a model's chat format.\n"
                                               "  dsopen-tokenizer train|encode|decode|chat [options]");
  options.add_options()("command", "train | encode | decode | chat", cxxopts::value<std::string>())(
      "input", "Training text files (one sentence per line)", cxxopts::value<std::vector<std::string>>())(
      "vocab-size", "Vocabulary size", cxxopts::value<int64_t>()->default_value("8000"))(
      "model-type", "bpe | unigram", cxxopts::value<std::string>()->default_value("bpe"))(
      "user-symbols", "Extra special tokens, comma separated", cxxopts::value<std::vector<std::string>>())(
      "character-coverage", "Share of characters with pieces of their own; the rest use byte fallback",
      cxxopts::value<double>()->default_value("0.9995"))(
      "no-strip-ansi", "Keep terminal escape sequences in the training text")(
      "output", "Where train writes the .model file", cxxopts::value<std::string>())(
      "model", "encode/decode: a tokenizer (.model file, tokenizer.json, or a directory holding one); chat: a model "
               "directory (checkpoint or HF)", cxxopts::value<std::string>())(
      "text", "Text to encode (default: standard input)", cxxopts::value<std::string>())(
      "ids", "Whitespace-separated ids to decode (default: standard input)", cxxopts::value<std::string>())(
      "pieces", "encode: also print the pieces")(
      "messages", "chat: a JSON file with the messages ([{\"role\": ..., \"content\": ...}, ...]; - for stdin)",
      cxxopts::value<std::string>())(
      "no-generation-prompt", "chat: do not open the assistant's turn at the end")(
      "json", "chat: print {\"text\", \"ids\", \"format\"} as JSON")(
      "jsonl", "Many at once: encode reads a JSON string per line of standard input and prints a JSON list of ids "
               "per line; decode reads id lists and prints JSON strings");
  options.parse_positional({"command", "input"});
  options.positional_help("train|encode|decode|chat [INPUT ...]");
  options.show_positional_help();
  cli::add_common(options);
  return options;
}

std::string read_stdin() { return std::string(std::istreambuf_iterator<char>(std::cin), {}); }

void train(const cxxopts::ParseResult& args) {
  data::SentencePieceTrainOptions o;
  if (args.count("input")) o.inputs = args["input"].as<std::vector<std::string>>();
  if (!args.count("output")) throw usage_error("--output", "train needs --output PATH.model");
  o.output = args["output"].as<std::string>();
  o.vocab_size = args["vocab-size"].as<int64_t>();
  o.model_type = args["model-type"].as<std::string>();
  if (args.count("user-symbols")) o.user_symbols = args["user-symbols"].as<std::vector<std::string>>();
  o.strip_ansi = !args.count("no-strip-ansi");
  o.character_coverage = args["character-coverage"].as<double>();
  data::SentencePieceTokenizer::train(o);
  auto tok = data::SentencePieceTokenizer::load(o.output);
  spdlog::info("wrote {} (vocab {}, hash {})", o.output, tok->vocab_size(), tok->hash());
}

// One JSON value per line of stdin: a string to encode, or a list of ids to decode; one JSON result per line.
void encode_decode_jsonl(const data::Tokenizer& tok, bool encode) {
  std::string line;
  for (int64_t n = 1; std::getline(std::cin, line); ++n) {
    const std::string where = "stdin:" + std::to_string(n);
    // One output line per input line: an empty line would silently shift every later answer.
    if (line.empty()) throw usage_error(where, "empty line", encode ? "give \"\" for the empty text" : "give [] for no ids");
    nlohmann::json j;
    try {
      j = json::parse(line, where);
    } catch (const nlohmann::json::exception& e) {
      throw usage_error(where, std::string("not valid JSON: ") + json::reason(e));
    }
    if (encode) {
      if (!j.is_string()) throw usage_error(where, "expected a JSON string");
      std::cout << nlohmann::json(tok.encode(j.get<std::string>())).dump() << "\n";
      continue;
    }
    if (!j.is_array()) throw usage_error(where, "expected a JSON list of token ids");
    std::vector<int32_t> ids;
    for (const auto& v : j) {
      const bool fits = v.is_number_unsigned() ? v.get<uint64_t>() <= INT32_MAX
                                               : v.is_number_integer() && v.get<int64_t>() >= 0 && v.get<int64_t>() <= INT32_MAX;
      if (!fits) throw usage_error(where, "expected a JSON list of token ids, got " + v.dump());
      if (v.get<int64_t>() >= tok.vocab_size())
        throw usage_error(where, "token id " + v.dump() + " is outside the vocabulary (size " +
                                     std::to_string(tok.vocab_size()) + ")");
      ids.push_back(static_cast<int32_t>(v.get<int64_t>()));
    }
    // Decoded bytes that are not UTF-8 (a character cut between tokens) become U+FFFD in JSON.
    std::cout << nlohmann::json(tok.decode(ids)).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
  }
  std::cout << std::flush;
}

void encode(const data::Tokenizer& tok, const cxxopts::ParseResult& args) {
  const std::string text = args.count("text") ? args["text"].as<std::string>() : read_stdin();
  auto ids = tok.encode(text);
  for (size_t i = 0; i < ids.size(); ++i) std::cout << (i ? " " : "") << ids[i];
  std::cout << "\n";
  if (args.count("pieces")) {
    for (size_t i = 0; i < ids.size(); ++i) std::cout << (i ? " | " : "") << tok.decode({ids[i]});
    std::cout << "\n";
  }
}

void decode(const data::Tokenizer& tok, const cxxopts::ParseResult& args) {
  std::istringstream in(args.count("ids") ? args["ids"].as<std::string>() : read_stdin());
  std::vector<int32_t> ids;
  std::string word;
  while (in >> word) {
    try {
      size_t used = 0;
      ids.push_back(std::stoi(word, &used));
      if (used != word.size()) throw std::invalid_argument(word);
    } catch (const std::exception&) {
      throw usage_error("--ids", "'" + word + "' is not a token id");
    }
  }
  std::cout << tok.decode(ids) << std::endl;
}

// The conversation in `--messages` as the model's chat format renders it (data/chat_format.h): what dsopen-generate
// --chat and dsopen-serve send the model.
void chat(const cxxopts::ParseResult& args) {
  if (!args.count("model")) throw usage_error("--model", "chat needs --model MODEL_DIR (a checkpoint or HF directory)");
  if (!args.count("messages")) throw usage_error("--messages", "chat needs --messages FILE.json (- for stdin)");
  const std::string dir = args["model"].as<std::string>(), file = args["messages"].as<std::string>();
  const std::string where = file == "-" ? "stdin" : file;
  nlohmann::json j;
  try {
    j = json::parse(file == "-" ? read_stdin() : env::read_file(file), where);
  } catch (const nlohmann::json::exception& e) {
    throw usage_error(where, std::string("not valid JSON: ") + json::reason(e));
  }
  if (j.is_object() && j.contains("messages")) j = j["messages"];
  data::Conversation conv;
  try {
    conv = data::conversation_from_messages(j);
  } catch (const data::MessageError& e) {
    throw usage_error(where, e.what());
  }
  const std::string tok_path = model::ModelDir(dir).tokenizer_path();
  auto tok = data::load_tokenizer(tok_path.empty() ? dir : tok_path);
  const auto format = inference::chat_format_for(dir, "", tok_path, *tok, true);
  const bool open_turn = !args.count("no-generation-prompt");
  const std::string text = format.render(conv, open_turn, *tok);
  if (args.count("json")) {
    nlohmann::json out = {{"text", text}, {"format", format.description()}};
    out["ids"] = format.ids(conv, open_turn, *tok);
    std::cout << out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << std::endl;
  } else {
    std::cout << text << std::endl;
  }
}

}  // namespace

static int run(int argc, char** argv) {
  auto options = make_options();
  auto args = cli::parse(options, argc, argv);
  if (cli::handle_common(options, args)) return 0;
  if (!args.count("command")) throw usage_error("command", "missing", "use train, encode, decode or chat");
  logging::setup_console("info");
  const std::string cmd = args["command"].as<std::string>();
  if (cmd == "train") {
    train(args);
    return 0;
  }
  if (cmd == "chat") {
    chat(args);
    return 0;
  }
  if (cmd != "encode" && cmd != "decode")
    throw usage_error("command", "unknown command '" + cmd + "'", "use train, encode, decode or chat");
  if (!args.count("model")) throw usage_error("--model", cmd + " needs --model PATH.model");
  auto tok = data::load_tokenizer(args["model"].as<std::string>());
  if (args.count("jsonl")) encode_decode_jsonl(*tok, cmd == "encode");
  else if (cmd == "encode") encode(*tok, args);
  else decode(*tok, args);
  return 0;
}

int main(int argc, char** argv) { return run_main("dsopen-tokenizer", run, argc, argv); }
