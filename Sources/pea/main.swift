#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import PEADiffusion

let usage = """
pea — text-to-image diffusion with Stable Diffusion models and the PEA multilingual adapter

Usage:
  pea bench gemm --m M --n N --k K [--threads T] [--repeats R] [--transa] [--transb] [--kernel K] [--json]
                                  time our CPU GEMM and print GFLOP/s
  pea bench unet --config FILE [--latent HxW] [--batch B] [--repeats R] [--json]
                                  time a full UNet of that architecture (random weights) and its peak memory
  pea bench kernels [--backend cuda|cpu] [--precision P] [--scale full|small] [--json]
                                  time each kernel at SD1.5 shapes (GB/s, TFLOP/s)
  pea generate [--model DIR] --prompt TEXT [--negative-prompt TEXT] [--steps 30] [--guidance 7.5] [--seed N]
               [--scheduler NAME] [--width W --height H] [--batch N] [--output PATH.png]
               [--text-encoder DIR --adapter PATH]
  pea generate [--model DIR] --prompts FILE --output-dir OUT [--batch-size N] [--format png|tar] [--shard K/N|auto]
                                  text to image with a diffusers SD1.x/SD2.x/SDXL folder, or without
                                  --model the bundled toy world; a prompt file as a resumable, shardable
                                  job (see 'pea generate --help')
  pea serve --model DIR [--text-encoder DIR --adapter PATH] [--host 127.0.0.1] [--port 7860] [--max-batch N]
            [--max-queue N] [--api-key KEY]
                                  serve text-to-image over HTTP (A1111 and OpenAI images API subsets), model
                                  loaded once, concurrent requests batched (see 'pea serve --help')
  pea eval unet|vae-decode|vae-encode --model DIR --inputs IN.safetensors --output OUT.safetensors
  pea eval text-encoder --model DIR --prompt TEXT [--prompt TEXT …] [--max-length N] --output OUT.safetensors
  pea eval kd-step --unet DIR --adapter PATH --inputs IN.safetensors --output OUT.safetensors
                                  run one model component (or one distillation step) on saved tensors
                                  (see 'pea eval --help')
  pea train --model DIR --text-encoder DIR --data SPEC --output DIR --steps N [options]
                                  train a PEA adapter by distillation through the frozen UNet (see 'pea train --help')
  pea inspect PATH [--json]       what a model file or folder is: family, prediction type, dtypes, size, LoRA
                                  ranks and targets, adapter form (see 'pea inspect --help')
  pea selftest [--backend cpu|cuda] check the backend's ops: CPU fast paths against plain references, CUDA
                                  against the CPU (see 'pea selftest --help')
  pea toyworld corpus|classify|grid|draw  the toy world's corpus, classifier and grids (see 'pea toyworld --help')
  pea help | --help               this text
"""

func printError(_ message: String) {
    var stderrStream = StandardError()
    print("pea: error: \(message)", to: &stderrStream)
}

struct StandardError: TextOutputStream {
    mutating func write(_ string: String) { fputs(string, stderr) }
}

let commands = Subcommands(command: "", usage: usage, table: [
    "generate": runGenerate, "serve": runServe, "eval": runEval, "train": runTrain, "bench": runBench, "selftest": runSelftest,
    "toyworld": runToyWorld, "inspect": runInspect,
])

// A write past the file-size limit (RLIMIT_FSIZE) fails with EFBIG, an error that removes the partial file,
// instead of killing the process with SIGXFSZ and leaving it behind.
signal(SIGXFSZ, SIG_IGN)

do {
    try commands.run(Array(CommandLine.arguments.dropFirst()))
} catch let error as PEAError {
    printError(error.description)
    exit(error.isUsage ? 2 : 1)
} catch {
    printError("\(error)")
    exit(1)
}
