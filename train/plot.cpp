#include "train/plot.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "utils/env.h"
#include "utils/errors.h"

namespace fs = std::filesystem;

namespace dsopen::train {

namespace {

struct RunSeries {
  std::string name;
  std::string train, eval;                      // gnuplot data: "step loss lr tokens_per_s" / "step eval_loss"
  std::map<std::string, std::string> imbalance;  // block -> "step imbalance" lines
  bool has_eval = false;
  // The last record of expert_load.jsonl: its step and each block's tokens per expert.
  int64_t expert_step = -1;
  std::map<std::string, std::vector<double>> expert_load;
  int64_t decoder_layers = -1;  // num_hidden_layers of the latest checkpoint: later blocks are MTP modules
};

// "12", or "4 (MTP)" for a block past the decoder layers.
std::string row_label(const std::string& label, int64_t decoder_layers) {
  const bool number = !label.empty() && label.size() < 10 && label.find_first_not_of("0123456789") == std::string::npos;
  return number && decoder_layers >= 0 && std::stoll(label) >= decoder_layers ? label + " (MTP)" : label;
}

// num_hidden_layers of <dir>/checkpoints/<latest>/config.json; -1 when there is none to read.
int64_t decoder_layers_of(const std::string& dir) {
  std::error_code ec;
  const fs::path ckpts = fs::path(dir) / "checkpoints";
  if (!fs::exists(ckpts / "latest", ec)) return -1;
  std::string latest;
  std::ifstream(ckpts / "latest") >> latest;
  try {
    const auto j = nlohmann::json::parse(env::read_file((ckpts / latest / "config.json").string()));
    return j.value("num_hidden_layers", int64_t(-1));
  } catch (const std::exception&) {
    return -1;  // a label less, not a failed plot
  }
}

// "model.layers.12.mlp" -> "12": the layer number is what a reader looks for.
std::string layer_label(const std::string& block) {
  if (block.rfind("model.layers.", 0) != 0) return block;
  return block.substr(13, block.find('.', 13) - 13);
}

// Blocks in layer order ("model.layers.10" after "model.layers.9"), not string order.
template <class Map>
std::vector<std::string> blocks_in_layer_order(const Map& m) {
  std::vector<std::string> v;
  for (const auto& kv : m) v.push_back(kv.first);
  std::stable_sort(v.begin(), v.end(), [](const std::string& a, const std::string& b) {
    const std::string la = layer_label(a), lb = layer_label(b);
    // Layer numbers compare as numbers (by length, then digits: no overflow for any length).
    const bool na = !la.empty() && la.find_first_not_of("0123456789") == std::string::npos;
    const bool nb = !lb.empty() && lb.find_first_not_of("0123456789") == std::string::npos;
    if (na && nb) return la.size() != lb.size() ? la.size() < lb.size() : la < lb;
    return na > nb;
  });
  return v;
}

// The last complete record of <dir>/expert_load.jsonl (written by the trainer for MoE models), when there is one.
void read_expert_load(const std::string& dir, RunSeries& r) {
  const std::string path = (fs::path(dir) / "expert_load.jsonl").string();
  std::error_code ec;
  if (!fs::exists(path, ec)) return;
  std::istringstream in(env::read_file(path));
  for (std::string line; std::getline(in, line);) {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception&) {
      continue;  // a line cut by a crash
    }
    if (!j.is_object() || !j.contains("step") || !j["step"].is_number_integer() || !j.contains("expert_load") ||
        !j["expert_load"].is_object())
      continue;
    std::map<std::string, std::vector<double>> loads;
    bool ok = true;
    for (const auto& [block, v] : j["expert_load"].items()) {
      if (!v.is_array() || v.empty()) ok = false;
      for (const auto& x : v) ok = ok && x.is_number();
      if (ok) loads[block] = v.get<std::vector<double>>();
    }
    if (ok && !loads.empty()) r.expert_step = j["step"].get<int64_t>(), r.expert_load = std::move(loads);
  }
}

// A gnuplot string literal: a run or block name goes into titles (quotes and backslashes escaped, line breaks and
// other control characters as spaces, so a name cannot end the script line).
std::string gp_string(const std::string& s) {
  std::string q = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') q += std::string("\\") + c;
    else q += static_cast<unsigned char>(c) < 0x20 ? ' ' : c;
  }
  return q + "\"";
}

RunSeries read_run(const std::string& dir) {
  const std::string path = (fs::path(dir) / "metrics.jsonl").string();
  std::error_code ec;
  if (!fs::exists(path, ec)) throw runtime_error(path, "not found", "give a run directory (run.output_dir) that has trained");
  RunSeries r;
  r.name = fs::path(dir).lexically_normal().filename().string();
  if (r.name.empty() || r.name == ".") r.name = fs::absolute(dir).lexically_normal().parent_path().filename().string();
  std::istringstream in(env::read_file(path));
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (line.empty()) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception&) {
      continue;  // a line cut by a crash: the others still plot
    }
    if (!j.is_object() || !j.contains("step") || !j["step"].is_number()) continue;
    const auto step = j["step"].get<int64_t>();
    auto num = [&](const char* k) { return j.contains(k) && j[k].is_number() ? j[k].dump() : std::string("NaN"); };
    if (j.contains("loss")) r.train += std::to_string(step) + " " + num("loss") + " " + num("lr") + " " + num("tokens_per_s") + "\n";
    if (j.contains("eval_loss") && j["eval_loss"].is_number()) {
      r.eval += std::to_string(step) + " " + num("eval_loss") + "\n";
      r.has_eval = true;
    }
    if (j.contains("moe_imbalance_per_block") && j["moe_imbalance_per_block"].is_object())
      for (const auto& [block, v] : j["moe_imbalance_per_block"].items())
        if (v.is_number()) r.imbalance[block] += std::to_string(step) + " " + v.dump() + "\n";
  }
  if (r.train.empty()) throw runtime_error(path, "no training records", "let the run log a step first");
  read_expert_load(dir, r);
  r.decoder_layers = decoder_layers_of(dir);
  return r;
}

}  // namespace

bool gnuplot_available() {
  static const bool available = std::system("gnuplot --version > /dev/null 2>&1") == 0;
  return available;
}

void plot_runs(const std::vector<std::string>& run_dirs, const std::string& out_png, const PlotOptions& o) {
  if (run_dirs.empty()) throw usage_error("RUN_DIR", "no run given", "dsopen-plot RUN_DIR [RUN_DIR ...] --out loss.png");
  std::vector<RunSeries> runs;
  for (const auto& d : run_dirs) runs.push_back(read_run(d));
  if (!gnuplot_available())
    throw runtime_error("gnuplot", "not found", "install it: apt-get install gnuplot-nox (scripts/setup.sh does)");

  // Data files and the gnuplot script go to a private temporary directory; the PNG is written beside the target
  // and renamed into place.
  const fs::path tmp = fs::temp_directory_path() / ("dsopen-plot-" + std::to_string(::getpid()));
  fs::create_directories(tmp);
  struct Cleanup {
    fs::path p;
    ~Cleanup() {
      std::error_code ec;
      fs::remove_all(p, ec);
    }
  } cleanup{tmp};
  std::string train_plot, eval_plot, lr_plot, tps_plot;
  for (size_t i = 0; i < runs.size(); ++i) {
    const std::string t = (tmp / ("train_" + std::to_string(i) + ".dat")).string();
    std::ofstream(t) << runs[i].train;
    const std::string sep = i ? ", " : "";
    train_plot += sep + gp_string(t) + " using 1:2 with lines lw 2 title " + gp_string(runs[i].name + " train");
    lr_plot += sep + gp_string(t) + " using 1:3 with lines lw 2 title " + gp_string(runs[i].name);
    tps_plot += sep + gp_string(t) + " using 1:4 with linespoints pt 7 ps 0.4 title " + gp_string(runs[i].name);
    if (runs[i].has_eval) {
      const std::string e = (tmp / ("eval_" + std::to_string(i) + ".dat")).string();
      std::ofstream(e) << runs[i].eval;
      train_plot += ", " + gp_string(e) + " using 1:2 with linespoints pt 7 ps 0.8 title " + gp_string(runs[i].name + " eval");
    }
  }
  // Heat maps of the first MoE run: imbalance as layers (rows) x steps (columns), and each expert's load relative to
  // the mean (1 = balanced) as layers x experts at the last recorded step.
  std::string heat, expert_heat;
  for (const auto& r : runs) {
    if (r.imbalance.empty()) continue;
    const std::string h = (tmp / "imbalance.dat").string();
    std::ofstream f(h);
    int row = 0;
    std::string labels;
    for (const auto& block : blocks_in_layer_order(r.imbalance)) {
      std::istringstream in(r.imbalance.at(block));
      for (std::string l; std::getline(in, l);) f << l.substr(0, l.find(' ')) << " " << row << " " << l.substr(l.find(' ') + 1) << "\n";
      f << "\n";
      labels += (row ? ", " : "") + gp_string(row_label(layer_label(block), r.decoder_layers)) + " " + std::to_string(row);
      ++row;
    }
    heat = "set title " + gp_string("MoE load imbalance (max / mean expert load) - " + r.name +
                                    (runs.size() > 1 ? " (first MoE run)" : "")) +
           "\nset xlabel 'step'\nset ytics (" + labels + ")\nset ylabel 'layer'\nset cblabel 'imbalance'\n"
           "set yrange [-0.5:" + std::to_string(row) + "-0.5]\nset autoscale xfix\nunset key\nunset grid\n"
           "plot " + gp_string(h) + " using 1:2:3 with image\n";
    if (!r.expert_load.empty()) {
      const std::string e = (tmp / "expert_load.dat").string();
      std::ofstream g(e);
      int erow = 0;
      size_t experts = 0;
      std::string elabels;
      for (const auto& block : blocks_in_layer_order(r.expert_load)) {
        const auto& load = r.expert_load.at(block);
        double sum = 0;
        for (double x : load) sum += x;
        const double mean = sum / static_cast<double>(load.size());
        for (size_t k = 0; k < load.size(); ++k) g << k << " " << erow << " " << (mean > 0 ? load[k] / mean : 0.0) << "\n";
        g << "\n";
        elabels += (erow ? ", " : "") + gp_string(row_label(layer_label(block), r.decoder_layers)) + " " +
                   std::to_string(erow);
        experts = std::max(experts, load.size());
        ++erow;
      }
      expert_heat = "set title " + gp_string("expert load / mean at step " + std::to_string(r.expert_step) + " - " + r.name) +
                    "\nset xlabel 'expert'\nset ytics (" + elabels + ")\nset ylabel 'layer'\nset cblabel 'load / mean'\n"
                    "set xrange [-0.5:" + std::to_string(experts) + "-0.5]\nset yrange [-0.5:" + std::to_string(erow) +
                    "-0.5]\nunset key\nunset grid\nplot " + gp_string(e) + " using 1:2:3 with image\n";
    }
    break;
  }
  const fs::path target = fs::absolute(out_png);
  std::error_code mk;
  fs::create_directories(target.parent_path(), mk);  // as the exports create their directories
  const fs::path partial = target.parent_path() / ("." + target.filename().string() + ".partial-" + std::to_string(::getpid()));
  std::string script = "set terminal pngcairo size " + std::to_string(o.width) + "," + std::to_string(o.height) +
                       " font ',10'\nset output " + gp_string(partial.string()) + "\nset grid\nset key top right\n";
  script += expert_heat.empty() ? "set multiplot layout 2,2\n" : "set multiplot layout 2,3\n";
  script += "set title 'loss'\nset xlabel 'step'\nplot " + train_plot + "\n";
  script += "set title 'learning rate'\nplot " + lr_plot + "\n";
  script += "set title 'tokens / s'\nset key bottom right\nplot " + tps_plot + "\nset key top right\n";
  script += heat.empty() ? "set title 'MoE load imbalance: no MoE layers'\nunset key\nplot [0:1][0:1] NaN notitle\n"
                         : heat;
  script += expert_heat.empty() ? "" : "unset xrange\n" + expert_heat;
  script += "unset multiplot\nset output\n";
  const std::string script_path = (tmp / "plot.gp").string();
  std::ofstream(script_path) << script;
  const std::string log = (tmp / "gnuplot.log").string();
  const int rc = std::system(("gnuplot " + gp_string(script_path) + " > " + gp_string(log) + " 2>&1").c_str());
  if (rc != 0) {
    std::error_code ec;
    fs::remove(partial, ec);
    std::string first, line;
    std::ifstream l(log);
    while (first.empty() && std::getline(l, line)) first = line.find_first_not_of(" \t^") == std::string::npos ? "" : line;
    throw runtime_error(out_png, "gnuplot failed" + (first.empty() ? " (exit " + std::to_string(rc) + ")" : ": " + first),
                        "check that the output can be written and the metrics files are intact");
  }
  fs::rename(partial, target);
}

}  // namespace dsopen::train
