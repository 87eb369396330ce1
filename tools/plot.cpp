// dsopen-plot: training curves of one or more runs in one PNG (loss and eval loss overlaid, learning rate,
// tokens/s, MoE load imbalance per layer over steps), drawn by gnuplot.
//   dsopen-plot runs/tiny runs/tiny-dense --out loss.png
#include <iostream>

#include "train/plot.h"
#include "utils/cli.h"
#include "utils/env.h"
#include "utils/errors.h"

using namespace dsopen;

static int run(int argc, char** argv) {
  cxxopts::Options options("dsopen-plot", "Draw the training curves of runs (their metrics.jsonl) into a PNG");
  options.add_options()("runs", "Run directories (run.output_dir)", cxxopts::value<std::vector<std::string>>())(
      "out", "PNG file to write", cxxopts::value<std::string>()->default_value("loss.png"))(
      "width", "Pixels", cxxopts::value<int>()->default_value("1400"))(
      "height", "Pixels", cxxopts::value<int>()->default_value("1000"));
  options.parse_positional({"runs"});
  options.positional_help("RUN_DIR [RUN_DIR ...]");
  options.show_positional_help();
  cli::add_common(options);
  auto args = cli::parse(options, argc, argv);
  if (cli::handle_common(options, args)) return 0;
  if (!args.count("runs")) throw usage_error("RUN_DIR", "no run directory given", "dsopen-plot RUN_DIR ... --out loss.png");
  train::PlotOptions o;
  o.width = args["width"].as<int>();
  o.height = args["height"].as<int>();
  if (o.width < 200 || o.width > 10000) throw usage_error("--width", "must be in 200..10000");
  if (o.height < 200 || o.height > 10000) throw usage_error("--height", "must be in 200..10000");
  const auto runs = args["runs"].as<std::vector<std::string>>();
  const std::string out = args["out"].as<std::string>();
  std::vector<std::string> inputs;
  for (const auto& r : runs) inputs.push_back(r + "/metrics.jsonl"), inputs.push_back(r + "/expert_load.jsonl");
  env::check_output_path(out, env::OutputKind::File, inputs, "--out");
  train::plot_runs(runs, out, o);
  std::cout << "wrote " << out << std::endl;
  return 0;
}

int main(int argc, char** argv) { return run_main("dsopen-plot", run, argc, argv); }
