// The benchmark's shared state: the stream, the measured ceilings, the JSON document and the
// table rows. Each section adds its figures and the document is rewritten after each section,
// so a run cut short by the time limit still returns what it measured.
#pragma once
#include "common.cuh"

namespace fkbench {

struct Bench {
  cudaStream_t stream = nullptr;
  std::string out_path;
  Json json = Json::Obj();
  std::vector<Row> rows;
  // ceilings measured in section 1 (defaults: the figures measured earlier, README)
  double pcie_gbs = 55.4, hbm_gbs = 4300, gemm_tflops = 790;
  double deadline = 0;  // wall-clock second after which remaining sections are skipped
  bool quick = false;   // smaller sizes (smoke run)

  void AddRow(Row r) { rows.push_back(std::move(r)); }
  bool TimeLeft(double need_s) const { return deadline == 0 || WallSeconds() + need_s < deadline; }
  void Save() const;
};

void RunCeilings(Bench& B);
void RunRecall(Bench& B);
void RunAttention(Bench& B);
void RunPrefill(Bench& B);
void RunSelection(Bench& B);
void RunHostStore(Bench& B);

}  // namespace fkbench
