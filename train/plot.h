// Training curves as a picture: the metrics.jsonl of one or more runs drawn by gnuplot (Debian gnuplot-nox, pngcairo
// terminal) — loss with eval loss, learning rate, tokens/s, and for MoE runs two heat maps: the per-layer load
// imbalance over steps (layer x step, from metrics.jsonl) and each expert's load relative to the mean at the last
// recorded step (layer x expert, from expert_load.jsonl). dsopen-plot draws several runs overlaid; the trainer draws
// its own run into <output_dir>/loss.png at each checkpoint and at the end.
#pragma once

#include <string>
#include <vector>

namespace dsopen::train {

struct PlotOptions {
  int width = 1400, height = 1000;  // pixels
};

// Draws the runs (directories holding metrics.jsonl) into `out_png`, written atomically. Runtime errors: a run
// without metrics.jsonl or without any training record (naming it), gnuplot missing or failing (with its first error
// line).
void plot_runs(const std::vector<std::string>& run_dirs, const std::string& out_png, const PlotOptions& options = {});

// Whether gnuplot can be run (the trainer's own plot is skipped, with one warning, when it cannot).
bool gnuplot_available();

}  // namespace dsopen::train
