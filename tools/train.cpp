// dsopen-train: pretraining or SFT of a model described by a YAML config.
//   dsopen-train --config configs/tiny.yaml [--set train.max_steps=100 ...] [--check | --plan]
#include <spdlog/spdlog.h>

#include <iostream>
#include <sstream>

#include "train/memory_plan.h"
#include "train/options.h"
#include "train/process_group.h"
#include "train/trainer.h"
#include "utils/cli.h"
#include "utils/config.h"
#include "utils/errors.h"
#include "utils/logging.h"

using namespace dsopen;

namespace {
// What the run did and what to do with it next: the user should not have to read the docs to find the checkpoint
// and the commands that take it.
// `bin`: how this binary was invoked minus its name ("build/bin/", or "" from PATH), so the commands paste as they are.
void print_closing(const train::JobConfig& job, const train::TrainResult& r, const std::string& bin) {
  if (r.losses.empty()) {
    if (!r.interrupted)
      spdlog::info("nothing to do: the run already finished at step {} (train.max_steps {}); raise train.max_steps "
                   "to train further, or give another run.output_dir to start afresh",
                   r.final_step, job.train.max_steps);
    return;
  }
  const std::string ckpt = r.last_checkpoint;
  std::string head = fmt::format("{} at step {}/{} | loss {:.4f} -> {:.4f}", r.interrupted ? "stopped" : "done",
                                 r.final_step, job.train.max_steps, r.losses.front(), r.losses.back());
  if (r.eval_loss >= 0) head += fmt::format(" | eval loss {:.4f}", r.eval_loss);
  spdlog::info("{}", head);
  if (ckpt.empty()) return;
  spdlog::info("checkpoint {}{}", ckpt, r.interrupted ? " (run the same command again to resume)" : "");
  spdlog::info("curves: {}/loss.png{}", job.run.output_dir,
               job.run.tensorboard ? " | tensorboard --logdir " + job.run.output_dir + "/tb" : "");
  const bool adapter = job.lora.enabled;
  const std::string model = adapter ? job.model.pretrained + " --adapter " + ckpt : ckpt;
  spdlog::info("next: {}dsopen-generate --model {} --prompt \"...\"{}", bin, model,
               job.data.format == data::DataOptions::Format::Sft ? " --chat" : "");
  if (job.data.format == data::DataOptions::Format::Pretrain && !job.data.train.empty())
    spdlog::info("      {}dsopen-eval --model {} --data '{}' --ppl --batches 50", bin, model, job.data.train.front());
  spdlog::info("      {}dsopen-convert --model {} --out exported/{}   (a HuggingFace directory; --format gguf "
               "--out exported/{}.gguf for llama.cpp)", bin, model, job.run.name, job.run.name);
  if (!adapter) spdlog::info("      lora: model.pretrained: {}   (fine-tune it with LoRA, configs/lora.yaml)", ckpt);
}
}  // namespace

static int run(int argc, char** argv) {
  cxxopts::Options options("dsopen-train", "Train a DeepSeek-family model from a YAML config");
  options.add_options()("c,config", "Run config (YAML)", cxxopts::value<std::string>())(
      "set", "Override a config key: --set train.lr=1e-3 (repeatable)", cxxopts::value<std::vector<std::string>>())(
      "check", "Validate the config, print the resolved YAML and exit")(
      "plan", "Print the memory plan per rank (and layouts that fit when it does not) and exit");
  cli::add_common(options);
  auto args = cli::parse(options, argc, argv);
  if (cli::handle_common(options, args)) return 0;
  if (!args.count("config")) throw usage_error("--config", "is required", "see --help");
  config::Document doc = config::Document::load(args["config"].as<std::string>());
  if (args.count("set"))
    for (const auto& s : cli::values_of(argc, argv, "set")) doc.apply_set(s);  // unsplit: {a: 1, b: 2} has commas
  train::JobConfig job = train::decode_job(doc);
  if (args.count("check")) {
    std::cout << doc.dump();
    return 0;
  }
  const train::DistEnv dist = train::read_dist_env();  // RANK/WORLD_SIZE from scripts/launch.sh or Slurm
  if (args.count("plan")) {
    const auto plan = train::plan_job(job, dist.world_size, dist.local_world_size);
    std::cout << train::plan_text(plan);
    if (!plan.fits())
      for (const auto& fix : train::layouts_that_fit(job, dist.world_size, dist.local_world_size))
        std::cout << "  fits with: --set " << fix << "\n";
    return 0;
  }
  // Before any allocation or output: a job that cannot fit is refused with its plan.
  train::refuse_if_it_cannot_fit(job, dist.world_size, dist.local_world_size);
  logging::setup_run(job.run.output_dir, dist.rank, job.run.log_level);
  {
    std::istringstream plan(train::plan_text(train::plan_job(job, dist.world_size, dist.local_world_size)));
    for (std::string line; std::getline(plan, line);) spdlog::info("{}", line);
  }
  train::install_stop_handlers();
  train::Trainer trainer(job, doc.dump());
  // Written once the job has passed every check the trainer makes while starting: a refused run leaves the
  // directory's previous record alone.
  if (dist.rank == 0) doc.save_resolved(job.run.output_dir);
  const auto result = trainer.run();
  const std::string self = argv[0];
  if (dist.rank == 0) print_closing(job, result, self.find('/') == std::string::npos ? "" : self.substr(0, self.rfind('/') + 1));
  return 0;
}

int main(int argc, char** argv) {
  return run_main("dsopen-train", run, argc, argv);
}
