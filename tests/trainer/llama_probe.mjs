// Reads a GGUF file with llama.cpp (node-llama-cpp, scripts/llama-runtime.sh) and
// prints JSON: the file's architecture, the token ids of each text in TEXTS (a
// JSON list; special tokens in the text read as such) and the greedy
// continuation of PROMPT_IDS (a JSON list of ids).
//   LLAMA_RUNTIME=DIR TEXTS='["hi"]' PROMPT_IDS='[1,2]' node llama_probe.mjs FILE N
const { getLlama } = await import(
  `${process.env.LLAMA_RUNTIME}/node_modules/node-llama-cpp/dist/index.js`
);
const [file, n] = process.argv.slice(2);
const llama = await getLlama({ gpu: false, build: "never", progressLogs: false });
const model = await llama.loadModel({ modelPath: file });
const context = await model.createContext({ contextSize: 256 });
const sequence = context.getSequence();
const generated = [];
const prompt = JSON.parse(process.env.PROMPT_IDS);
for await (const token of sequence.evaluate(prompt, { temperature: 0 })) {
  generated.push(token);
  if (generated.length >= Number(n)) break;
}
const texts = JSON.parse(process.env.TEXTS);
console.log(
  JSON.stringify({
    architecture: model.fileInfo.metadata.general.architecture,
    tokens: texts.map((t) => model.tokenize(t, true)), // special tokens parsed, as transformers does,
    generated,
  }),
);
await context.dispose();
await model.dispose();
await llama.dispose();
