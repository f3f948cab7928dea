// Builds the native addon. CPU backend always; the CUDA backend too when nvcc is found
// (FREEKV_CUDA=0 turns it off, FREEKV_CUDA=1 makes a missing nvcc an error).
//   1. nvcc compiles every .cu under native/src (src/cuda, src/engine/cuda, src/model/cuda;
//      sm_90a + PTX) into build/cuda/libfreekv_cuda.a
//   2. node-gyp builds build/Release/freekv.node, linking that archive and libcudart_static, and
//      build/Release/freekv_shm.node (shm segments + the contract functions: what the kvstore loads).
import { execFileSync, spawnSync } from "node:child_process";
import { existsSync, mkdirSync, readdirSync, rmSync, statSync, utimesSync } from "node:fs";
import { join, relative } from "node:path";
import { createRequire } from "node:module";

const here = new URL(".", import.meta.url).pathname;
const require = createRequire(import.meta.url);
const want = process.env.FREEKV_CUDA ?? "auto";
const cudaHome = process.env.CUDA_HOME ?? "/usr/local/cuda";
const nvcc = [join(cudaHome, "bin", "nvcc"), "nvcc"].find((c) => spawnSync(c, ["--version"]).status === 0);
const useCuda = want !== "0" && !!nvcc && existsSync(join(cudaHome, "lib64", "libcudart_static.a"));
if (want === "1" && !useCuda) {
  console.error("FREEKV_CUDA=1 but nvcc or libcudart_static.a was not found under " + cudaHome);
  process.exit(1);
}
const log = (m) => console.log(`[native] ${m}`);

if (useCuda) {
  const outDir = join(here, "build", "cuda");
  mkdirSync(outDir, { recursive: true });
  const srcDir = join(here, "src");
  const files = walk(srcDir);
  const sources = files.filter((f) => f.endsWith(".cu"));
  const headersAt = Math.max(0, ...files.filter((f) => /\.(cuh|h)$/.test(f)).map((f) => statSync(f).mtimeMs));
  const objs = [];
  let rebuilt = false;
  for (const src of sources) {
    const f = relative(srcDir, src);
    const obj = join(outDir, f.replace(/\.cu$/, ".o").replaceAll("/", "_"));
    objs.push(obj);
    if (existsSync(obj) && statSync(obj).mtimeMs > Math.max(headersAt, statSync(src).mtimeMs)) continue;
    log(`nvcc ${f}`);
    rebuilt = true;
    const started = new Date();
    execFileSync(nvcc, ["-std=c++17", "-O3", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr",
      "-gencode", "arch=compute_90a,code=sm_90a", "-gencode", "arch=compute_90,code=compute_90",
      "-I", srcDir, "-c", src, "-o", obj], { stdio: "inherit" });
    // Dated when the compile began: a source or header edited while it ran is newer than the
    // object, which the next build then compiles again (an object built from the old header
    // once linked against the new one, with mismatched struct layouts).
    utimesSync(obj, started, started);
  }
  const lib = join(outDir, "libfreekv_cuda.a");
  if (rebuilt || !existsSync(lib)) {
    rmSync(lib, { force: true });
    execFileSync("ar", ["rcs", lib, ...objs], { stdio: "inherit" });
  }
  // make does not track the archive: when it is newer than the linked addon, remove the addon so
  // it is linked again.
  const addon = join(here, "build", "Release", "freekv.node");
  if (existsSync(addon) && statSync(lib).mtimeMs >= statSync(addon).mtimeMs)
    for (const f of ["Release/freekv.node", "Release/obj.target/freekv.node"]) rmSync(join(here, "build", f), { force: true });
  log(`CUDA backend: ${sources.length} kernel files`);
} else {
  log(want === "0" ? "CUDA backend off (FREEKV_CUDA=0)" : "nvcc not found: CPU backend only");
}

const gyp = join(require.resolve("node-gyp/package.json"), "..", "bin", "node-gyp.js");
// configure regenerates the Makefile (source list, CUDA switch); build is incremental.
// Build against the local Node headers when they are installed (no header download).
const nodedir = process.env.npm_config_nodedir || (existsSync("/usr/include/node/node_api.h") ? "/usr" : undefined);
const dirArgs = nodedir ? [`--nodedir=${nodedir}`] : [];
for (const step of [["configure", ...dirArgs, `--cuda=${useCuda ? 1 : 0}`, `--cuda_home=${cudaHome}`], ["build", "-j", "max"]]) {
  const r = spawnSync(process.execPath, [gyp, ...step], { cwd: here, stdio: "inherit" });
  if (r.status !== 0) process.exit(r.status ?? 1);
}
log("built native/build/Release/freekv.node" + (useCuda ? " (CPU + CUDA)" : " (CPU)") + " and freekv_shm.node");

function walk(d) {
  return readdirSync(d).flatMap((f) => (statSync(join(d, f)).isDirectory() ? walk(join(d, f)) : [join(d, f)]));
}
