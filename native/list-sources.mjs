// Lists an addon's C++ sources for binding.gyp, so each module adds files without editing it.
//   node list-sources.mjs        the full addon (freekv.node): every .cpp under src but addon_shm.cpp
//   node list-sources.mjs shm    freekv_shm.node: shm/, the contract files of engine/ and the per-environment class registry
import { readdirSync, statSync } from "node:fs";
import { join, relative } from "node:path";
const here = new URL(".", import.meta.url).pathname;
const walk = (d) => readdirSync(d).flatMap((f) => (statSync(join(d, f)).isDirectory() ? walk(join(d, f)) : [join(d, f)]));
const SHM_ENTRY = "src/addon_shm.cpp";
const CONTRACT = ["src/engine/AddonContract.cpp", "src/engine/Layout.cpp", "src/engine/Manifest.cpp", "src/engine/Validate.cpp", "src/AddonClasses.cpp"];
const all = walk(join(here, "src")).filter((f) => f.endsWith(".cpp")).map((f) => relative(here, f));
const files = process.argv[2] === "shm" ? all.filter((f) => f.startsWith("src/shm/") || CONTRACT.includes(f) || f === SHM_ENTRY) : all.filter((f) => f !== SHM_ENTRY);
console.log(files.sort().join(" "));
