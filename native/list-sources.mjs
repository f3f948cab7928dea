// Lists the addon's C++ sources for binding.gyp, so each module adds files without editing it.
import { readdirSync, statSync } from "node:fs";
import { join, relative } from "node:path";
const here = new URL(".", import.meta.url).pathname;
const walk = (d) => readdirSync(d).flatMap((f) => (statSync(join(d, f)).isDirectory() ? walk(join(d, f)) : [join(d, f)]));
console.log(walk(join(here, "src")).filter((f) => f.endsWith(".cpp")).map((f) => relative(here, f)).sort().join(" "));
