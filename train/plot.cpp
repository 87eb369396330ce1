#include "train/plot.h"

#include <unistd.h>

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
};

// Blank-free gnuplot strings: a run name goes into titles.
std::string gp_string(const std::string& s) {
  std::string q = "\"";
  for (char c : s) q += (c == '"' || c == '\\') ? std::string("\\") + c : std::string(1, c);
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
  // The heat map: layers (rows) x steps (columns) of the first MoE run.
  std::string heat;
  for (const auto& r : runs) {
    if (r.imbalance.empty()) continue;
    const std::string h = (tmp / "imbalance.dat").string();
    std::ofstream f(h);
    int row = 0;
    std::string labels;
    for (const auto& [block, lines] : r.imbalance) {
      std::istringstream in(lines);
      for (std::string l; std::getline(in, l);) f << l.substr(0, l.find(' ')) << " " << row << " " << l.substr(l.find(' ') + 1) << "\n";
      f << "\n";
      // "model.layers.12.mlp" -> "12": the layer number is what a reader looks for.
      std::string label = block;
      if (label.rfind("model.layers.", 0) == 0) label = label.substr(13, label.find('.', 13) - 13);
      labels += (row ? ", " : "") + gp_string(label) + " " + std::to_string(row);
      ++row;
    }
    heat = "set title " + gp_string("MoE load imbalance (max / mean expert load) - " + r.name) +
           "\nset xlabel 'step'\nset ytics (" + labels + ")\nset ylabel 'layer'\nset cblabel 'imbalance'\n"
           "set yrange [-0.5:" + std::to_string(row) + "-0.5]\nunset key\nunset grid\n"
           "plot " + gp_string(h) + " using 1:2:3 with image\n";
    break;
  }
  const fs::path target = fs::absolute(out_png);
  const fs::path partial = target.parent_path() / ("." + target.filename().string() + ".partial-" + std::to_string(::getpid()));
  std::string script = "set terminal pngcairo size " + std::to_string(o.width) + "," + std::to_string(o.height) +
                       " font ',10'\nset output " + gp_string(partial.string()) + "\nset grid\nset key top right\n";
  script += std::string("set multiplot layout 2,2\n") + "set title 'loss'\nset xlabel 'step'\nplot " + train_plot +
            "\nset title 'learning rate'\nplot " + lr_plot + "\nset title 'tokens / s'\nplot " + tps_plot + "\n";
  script += heat.empty() ? "set title 'MoE load imbalance: no MoE layers'\nunset key\nplot [0:1][0:1] NaN notitle\n"
                         : heat;
  script += "unset multiplot\nset output\n";
  const std::string script_path = (tmp / "plot.gp").string();
  std::ofstream(script_path) << script;
  const std::string log = (tmp / "gnuplot.log").string();
  const int rc = std::system(("gnuplot " + gp_string(script_path) + " > " + gp_string(log) + " 2>&1").c_str());
  if (rc != 0) {
    std::error_code ec;
    fs::remove(partial, ec);
    std::string first;
    std::ifstream l(log);
    std::getline(l, first);
    throw runtime_error(out_png, "gnuplot failed: " + first, "check the metrics.jsonl files");
  }
  fs::rename(partial, target);
}

}  // namespace dsopen::train
