// freekv_gpu_bench: the GPU benchmark program (issue 5). Built here by bench/gpu/build.sh and run
// on the GPU machine by bench/gpu/run.sh. Sections, in order:
//   ceilings  pinned H2D, D2D copy, bf16 GEMM (cuBLASLt)
//   recall    recall GB/s per mode (gather from mapped pinned memory; per-page memcpy, double
//             buffered) vs the PCIe ceiling, after a byte-exact check of the recalled pages
//   attention paged decode attention GB/s vs HBM, after a float64 CPU reference check
//   prefill   tensor-core causal prefill attention: float64 check, then TFLOP/s vs the bf16 peak
//   selection page selection kernels (flat and hierarchical)
//   hoststore a fresh session's host store set-up: fallocate, cudaHostRegister from 1-16 threads
// The decode step is not timed here: bench/gpu/run.sh times the service's own step
// (scripts/gpu/runner-bench.ts: Model.decode with the CUDA engine) beside these figures.
// Usage: freekv_gpu_bench --out FILE [--sections ceilings,recall,attention,prefill,selection,hoststore] [--deadline-s N]
//        [--quick]
#include <ctime>
#include <fstream>
#include <iostream>

#include "bench.cuh"

#ifndef FKB_COMMIT
#define FKB_COMMIT "unknown"
#endif

namespace fkbench {

void Bench::Save() const {
  Json doc = json;
  Json table = Json::Arr();
  for (const Row& r : rows) {
    Json j = Json::Obj();
    j.Set("section", r.section).Set("name", r.name).Set("unit", r.unit).Set("value", r.value);
    j.Set("ceiling", r.ceiling > 0 ? Json::Num(r.ceiling) : Json::Null());
    j.Set("fraction_of_ceiling", r.ceiling > 0 ? Json::Num(r.value / r.ceiling) : Json::Null());
    if (!r.note.empty()) j.Set("note", r.note);
    table.Push(j);
  }
  doc.Set("table", table);
  std::ofstream f(out_path + ".tmp");
  f << doc.Dump() << "\n";
  f.close();
  std::rename((out_path + ".tmp").c_str(), out_path.c_str());
}

}  // namespace fkbench

using namespace fkbench;

int main(int argc, char** argv) {
  Bench B;
  std::string sections = "ceilings,recall,attention,prefill";
  double budget_s = 0;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) { std::cerr << a << " needs a value\n"; std::exit(2); }
      return argv[++i];
    };
    if (a == "--out") B.out_path = next();
    else if (a == "--sections") sections = next();
    else if (a == "--deadline-s") budget_s = std::stod(next());
    else if (a == "--quick") B.quick = true;
    else { std::cerr << "unknown argument " << a << "\n"; return 2; }
  }
  if (B.out_path.empty()) { std::cerr << "--out FILE is required\n"; return 2; }
  // The sections, in the order they run: the one list --sections is checked against.
  struct Sec { const char* name; void (*fn)(Bench&); double min_s; };
  Sec all[] = {{"ceilings", RunCeilings, 5}, {"recall", RunRecall, 10}, {"attention", RunAttention, 10},
               {"prefill", RunPrefill, 20}, {"selection", RunSelection, 10}, {"hoststore", RunHostStore, 10}};
  for (size_t a = 0; a <= sections.size();) {
    size_t b = sections.find(',', a);
    if (b == std::string::npos) b = sections.size();
    std::string name = sections.substr(a, b - a);
    bool known = false;
    std::string names;
    for (const Sec& sec : all) {
      known = known || name == sec.name;
      names += (names.empty() ? "" : ", ") + std::string(sec.name);
    }
    if (!known) {
      std::cerr << "--sections: unknown section '" << name << "' (" << names << ")\n";
      return 2;
    }
    a = b + 1;
  }
  double t0 = WallSeconds();
  if (budget_s > 0) B.deadline = t0 + budget_s;

  int rt = 0, drv = 0;
  cudaRuntimeGetVersion(&rt);
  cudaDriverGetVersion(&drv);
  cudaDeviceProp p{};
  if (cudaGetDeviceProperties(&p, 0) != cudaSuccess) { std::cerr << "no CUDA device\n"; return 1; }
  char date[64];
  std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  Json dev = Json::Obj();
  dev.Set("name", p.name).Set("sm_count", p.multiProcessorCount).Set("cc", std::to_string(p.major) + "." + std::to_string(p.minor));
  dev.Set("total_memory_GiB", p.totalGlobalMem / double(1 << 30)).Set("l2_MiB", p.l2CacheSize / double(1 << 20));
  dev.Set("cuda_runtime", std::to_string(rt / 1000) + "." + std::to_string(rt % 1000 / 10));
  dev.Set("cuda_driver_api", std::to_string(drv / 1000) + "." + std::to_string(drv % 1000 / 10));
  B.json.Set("benchmark", "freekv GPU benchmark (bench/gpu)").Set("git_commit", FKB_COMMIT).Set("date_utc", date);
  B.json.Set("device", dev).Set("sections_requested", sections).Set("quick", Json::Bool(B.quick));
  CK(cudaStreamCreateWithFlags(&B.stream, cudaStreamNonBlocking));
  std::cout << "[bench] " << p.name << ", CUDA " << rt << ", commit " << FKB_COMMIT << std::endl;

  Json status = Json::Obj();
  int failures = 0;
  for (const Sec& s : all) {
    if (("," + sections + ",").find("," + std::string(s.name) + ",") == std::string::npos) continue;
    if (!B.TimeLeft(s.min_s)) {
      status.Set(s.name, "skipped: out of time");
      std::cout << "[bench] " << s.name << ": skipped, out of time" << std::endl;
      continue;
    }
    double ts = WallSeconds();
    try {
      std::cout << "[bench] " << s.name << " ..." << std::endl;
      s.fn(B);
      status.Set(s.name, "ok");
    } catch (const std::exception& e) {
      ++failures;
      status.Set(s.name, std::string("failed: ") + e.what());
      std::cout << "[bench] " << s.name << " FAILED: " << e.what() << std::endl;
      cudaGetLastError();
      cudaDeviceSynchronize();  // a sticky error shows here; later sections then fail fast
      cudaGetLastError();
    }
    std::cout << "[bench] " << s.name << " took " << (WallSeconds() - ts) << " s" << std::endl;
    B.json.Set("section_status", status).Set("wall_s", WallSeconds() - t0);
    B.Save();
  }
  B.json.Set("section_status", status).Set("wall_s", WallSeconds() - t0);
  B.Save();
  return failures ? 1 : 0;
}
