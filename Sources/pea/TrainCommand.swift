#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import PEADiffusion

let trainUsage = """
Usage: pea train --model DIR --text-encoder DIR --data SPEC [--data SPEC …] --output DIR --steps N [options]

Trains a PEA adapter by knowledge distillation through a frozen English SD1.x/SD2.x pipeline (PEA-Diffusion,
arXiv 2311.17086): the student is UNet(adapter(language-specific encoder(text))), the teacher the same UNet
with the English CLIP encoder on text_en; losses: task ε-MSE + output KD MSE + 0.1 × feature KD MSE over every
down, mid and up block. Only the adapter learns (AdamW, warmup then polynomial decay).

Data (--data, repeatable):
  a .jsonl manifest, one object per line: "image" (path relative to the manifest), "text" (target language),
  "text_en" (English), optional "language_specific" (bool, for --hybrid); or webdataset tar shards
  (KEY.jpg/.png + KEY.json with the same fields, or KEY.txt), brace patterns allowed
  (data/shard-{000000..000099}.tar), several joined by '::'. Corrupt images and records without a caption
  are skipped and counted in the log.

Options:
  --model DIR               diffusers SD1.x/SD2.x pipeline folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)
  --text-encoder DIR        the language-specific encoder (Chinese-CLIP/BERT or XLM-R folder with its tokenizer)
  --max-length N            its token length (default 52 for Chinese-CLIP, 77 for XLM-R)
  --output DIR              checkpoints: DIR/checkpoint-STEP/ every --save-every steps, and the final adapter in
                            DIR/adapter.safetensors (+ DIR/optimizer.safetensors for resuming)
  --steps N                 optimiser steps (required)
  --batch-size B            samples per step (default 4)
  --lr LR                   peak learning rate (default 1e-5, the released scripts')
  --min-lr LR               learning rate at the end of the decay (default 5e-8)
  --warmup-steps N          linear warmup steps (default 100, or steps/10 when that is smaller)
  --weight-decay W          AdamW weight decay, not applied to the layer norm (default 0.1)
  --max-grad-norm G         clip the global gradient norm to G (default: no clipping)
  --resolution R            square training resolution; images are resized (shorter side) and center-cropped
                            (default 512)
  --hybrid                  hybrid training: the task loss on language-specific records, the KD losses on
                            parallel ones
  --uncond-prob P           probability that a sample trains on the empty prompt on both sides (default 0.1)
  --feature-weight W        weight of the feature KD term (default 0.1)
  --task-weight W           weight of the task term, MSE against the true noise (default 1, as the official
                            scripts; 0 trains on the KD terms alone, as the toy world's adapter was trained)
  --timestep-bias-strategy S  none (default), later (the noisiest timesteps), earlier or range: those timesteps
                            are drawn --timestep-bias-multiplier times as often (diffusers' SDXL script's flags)
  --timestep-bias-multiplier M  (default 1)
  --timestep-bias-portion P  the fraction of timesteps that later/earlier bias (default 0.25)
  --timestep-bias-begin N, --timestep-bias-end N  the range that range biases (default 0, 1000)
  --seed N                  seed for data order, noise, timesteps and dropout (default 0); step k's Gaussian
                            values (latent samples, then noise) are torch.randn draws from a CPU generator
                            seeded with a function of (N, k) documented in PEATrainer.swift
  --save-every N            checkpoint every N steps (default 0: only at the end)
  --resume DIR              continue from a checkpoint folder (DIR/checkpoint-STEP or the --output DIR)
  --latent-cache DIR        keep each image's VAE latent distribution there, so it is encoded once
  --init-adapter PATH       start from this adapter checkpoint (its shape is read from its tensors)
  --adapter-hidden H        hidden width of a new adapter (default 2048)
  --adapter-layers N        linear layers of a new adapter (default 3, as the training script)
\(BackendOptions.help)

Validation (samples from the adapter as it trains):
  --validation-prompt TEXT  a prompt in the encoder's language (repeatable; one grid row each)
  --validation-every N      validate after every N-th step and after the last one (required with a prompt)
  --validation-seeds K      images per prompt, seeds 0..K-1 (default 2; one grid column each)
  --validation-steps S      denoising steps (default 30)
  --validation-guidance G   classifier-free guidance scale (default 7.5; ≤ 1 turns guidance off)
  Each image is what `pea generate --model DIR --text-encoder ENC --adapter <the adapter at that step> --seed C
  --width R --height R --steps S --guidance G` makes (the folder's scheduler, no negative prompt) at the training
  resolution R, drawn with the models already loaded; the training itself is unchanged by it. The grid (rows =
  prompts, columns = seeds, 2 white pixels between images) is written to OUTPUT/validation/step-000500.png
  (the step, 6 digits) and its path printed on stderr.

Metrics: OUTPUT/metrics.jsonl gets one JSON object per step, flushed as it is written:
  {"grad_norm", "loss", "loss_features", "loss_logits", "loss_task", "lr", "seconds", "step"}, plus
  "validation" (the grid's path) on steps that wrote one; grad_norm is the norm before clipping, seconds the
  step's time without validation, and a value that is not finite (a skipped f16 update's norm) is null. A new
  run starts the file afresh; --resume keeps only its lines up to the resumed step.

Progress (loss terms, learning rate, step time, ETA) goes to stderr; the final adapter's path to stdout.
"""

func runTrain(_ arguments: [String]) throws {
    if arguments.contains("--help") || arguments.contains("-h") { print(trainUsage); return }
    var spec = BackendOptions.spec
    for key in ["--model", "--text-encoder", "--max-length", "--output", "--steps", "--batch-size", "--lr", "--min-lr",
                "--warmup-steps", "--weight-decay", "--max-grad-norm", "--resolution", "--uncond-prob", "--feature-weight",
                "--task-weight", "--timestep-bias-strategy", "--timestep-bias-multiplier", "--timestep-bias-portion",
                "--timestep-bias-begin", "--timestep-bias-end", "--seed", "--save-every", "--resume", "--latent-cache",
                "--init-adapter", "--adapter-hidden", "--adapter-layers",
                "--validation-every", "--validation-seeds", "--validation-steps", "--validation-guidance"] {
        spec[key] = .value
    }
    spec["--data"] = .repeatable
    spec["--validation-prompt"] = .repeatable
    spec["--hybrid"] = .flag
    let command = "train"
    let options = try Arguments(arguments, command: command, spec: spec)
    let model = try options.requiredString("--model")
    let encoderFolder = try options.requiredString("--text-encoder")
    let output = try options.requiredString("--output")
    let dataSpecs = options.strings("--data")
    guard !dataSpecs.isEmpty else { throw PEAError.usage("train: option '--data' is required") }
    guard options.has("--steps") else { throw PEAError.usage("train: option '--steps' is required") }

    var settings = TrainingOptions(steps: try options.int("--steps", default: 0, range: 1...100_000_000),
                                   batchSize: try options.int("--batch-size", default: 4, range: 1...4096))
    func positive(_ name: String, _ fallback: Float) throws -> Float {
        let value = try options.double(name).map(Float.init) ?? fallback
        guard value > 0 else { throw PEAError.usage("train: option '\(name)' must be positive, got \(value)") }
        return value
    }
    settings.learningRate = Double(try positive("--lr", 1e-5))
    settings.minLearningRate = try options.double("--min-lr") ?? 5e-8
    guard settings.minLearningRate >= 0, settings.minLearningRate < settings.learningRate else {
        throw PEAError.usage("train: --min-lr must be at least 0 and below --lr (\(settings.learningRate))")
    }
    settings.warmupSteps = try options.int("--warmup-steps", default: min(100, settings.steps / 10), range: 0...100_000_000)
    settings.weightDecay = try options.double("--weight-decay").map(Float.init) ?? 0.1
    settings.maxGradientNorm = try options.has("--max-grad-norm") ? positive("--max-grad-norm", 1) : nil
    settings.resolution = try options.int("--resolution", default: 512, range: 8...8192)
    guard settings.resolution % 8 == 0 else {
        throw PEAError.usage("train: --resolution must be a multiple of 8 (the VAE's factor), got \(settings.resolution)")
    }
    settings.hybrid = options.has("--hybrid")
    settings.uncondProbability = try options.double("--uncond-prob").map(Float.init) ?? 0.1
    guard (0...1).contains(settings.uncondProbability) else { throw PEAError.usage("train: --uncond-prob must be in [0, 1]") }
    settings.featureWeight = try options.double("--feature-weight").map(Float.init) ?? 0.1
    settings.taskWeight = try options.double("--task-weight").map(Float.init) ?? 1
    guard settings.featureWeight >= 0, settings.taskWeight >= 0,
          settings.featureWeight.isFinite, settings.taskWeight.isFinite else {
        throw PEAError.usage("train: --feature-weight and --task-weight must be at least 0 and finite in f32")
    }
    settings.timestepBias = try timestepBias(options)
    settings.seed = UInt64(try options.int("--seed", default: 0, range: 0...Int.max))
    settings.saveEvery = try options.int("--save-every", default: 0, range: 0...100_000_000)
    let validation = try validationOptions(options)

    let backendOptions = try BackendOptions(options, command: command)
    let backend = backendOptions.backend, dtype = backendOptions.precision
    let teacher = try DistillationTeacher.load(folder: model, backend: backend, dtype: dtype)
    let student = try LanguageEncoders.load(folder: encoderFolder, backend: backend, maxLength: options.int("--max-length"))
    let adapter: PEAAdapter
    if let initial = options.string("--init-adapter") {
        adapter = try PEAAdapter.load(path: initial, backend: backend)
    } else {
        let hidden = try options.int("--adapter-hidden", default: 2048, range: 1...65536)
        let layers = try options.int("--adapter-layers", default: 3, range: 1...64)
        let widths = [student.hiddenSize] + Array(repeating: hidden, count: layers - 1) + [teacher.unet.config.crossAttentionDim[0]]
        adapter = try PEAAdapter.initialized(widths: widths, backend: backend, seed: settings.seed)
    }
    let dataset = try TrainingDataset(source: TrainingDataSource.parse(dataSpecs), resolution: settings.resolution, seed: settings.seed)
    var shownSkips = 0
    dataset.onSkip = { skip in
        shownSkips += 1
        if shownSkips <= 10 { fputs("pea train: skipped \(skip.id): \(skip.message)\n", stderr) }
        if shownSkips == 10 { fputs("pea train: (further skips are counted, not shown)\n", stderr) }
    }
    let cache = try options.string("--latent-cache").map { try LatentCache(folder: $0, namespace: model) }
    let trainer = try PEATrainer(teacher: teacher, student: student, adapter: adapter, dataset: dataset,
                                 options: settings, backend: backend, latentCache: cache)
    let validator = try validation.map {
        try TrainingValidator(teacher: teacher, student: student, options: $0, resolution: settings.resolution, backend: backend)
    }
    if let resume = options.string("--resume") {
        try trainer.resume(from: resume)
        fputs("pea train: resumed at step \(trainer.step) from \(resume)\n", stderr)
    }
    fputs("pea train: adapter \(trainer.adapter.widths.map(String.init).joined(separator: "→")) (\(trainer.adapter.parameterCount) parameters), "
          + "\(settings.steps) steps of \(settings.batchSize) at \(settings.resolution)², \(backend.name)\n", stderr)
    let metrics = try TrainingMetricsLog(path: joinPath(output, "metrics.jsonl"), startingAfter: trainer.step)

    var times: [Double] = []
    while trainer.step < settings.steps {
        let report = try trainer.trainStep()
        times.append(report.seconds)
        let recent = times.suffix(10)
        let perStep = recent.reduce(0, +) / Double(recent.count)
        let losses = report.losses
        var line = "step \(report.step)/\(settings.steps)  loss \(short(losses.total)) (task \(short(losses.task)), "
            + "logits \(short(losses.logits)), features \(short(losses.features)))  lr \(short(report.learningRate))  "
            + "\(short(Float(report.seconds))) s/step  ETA \(clock(perStep * Double(settings.steps - report.step)))"
        if report.overflowSkipped { line += "  (f16 overflow: update skipped, loss scale \(trainer.lossScale))" }
        if report.skipped.total > 0 { line += "  skipped records: \(report.skipped)" }
        fputs(line + "\n", stderr)
        var grid: String?
        if let validator, validator.options.isDue(step: report.step, totalSteps: settings.steps) {
            let start = monotonicSeconds()
            grid = try validator.write(adapter: trainer.adapter, step: report.step, output: output)
            fputs("pea train: validation \(grid!) (\(short(Float(monotonicSeconds() - start))) s)\n", stderr)
        }
        try metrics.append(report, validation: grid)
        if settings.saveEvery > 0, report.step % settings.saveEvery == 0, report.step < settings.steps {
            let folder = joinPath(output, "checkpoint-\(report.step)")
            try trainer.saveCheckpoint(to: folder)
            fputs("pea train: saved \(folder)\n", stderr)
        }
    }
    try trainer.saveCheckpoint(to: output)
    print(joinPath(output, "adapter.safetensors"))
}

/// The --validation-* options (nil without --validation-prompt); every mistake is a usage error, found before
/// anything is loaded or written.
private func validationOptions(_ options: Arguments) throws -> ValidationOptions? {
    let prompts = options.strings("--validation-prompt")
    guard !prompts.isEmpty else {
        for flag in ["--validation-every", "--validation-seeds", "--validation-steps", "--validation-guidance"] where options.has(flag) {
            throw PEAError.usage("train: \(flag) needs at least one --validation-prompt")
        }
        return nil
    }
    guard options.has("--validation-every") else {
        throw PEAError.usage("train: --validation-prompt needs --validation-every N (validate every N steps)")
    }
    var validation = ValidationOptions(prompts: prompts, every: try options.int("--validation-every", default: 1, range: 1...100_000_000))
    validation.seeds = try options.int("--validation-seeds", default: 2, range: 1...64)
    validation.steps = try options.int("--validation-steps", default: 30, range: 1...1000)
    validation.guidance = Float(try options.double("--validation-guidance") ?? 7.5)
    return validation
}

private func short(_ value: Float) -> String {
    let magnitude = abs(value)
    return printfFormatted(magnitude != 0 && (magnitude < 1e-3 || magnitude >= 1e5) ? "%.3e" : "%.4f", Double(value))
}

private func clock(_ seconds: Double) -> String {
    let s = Int(seconds.rounded())
    return "\(s / 3600):" + [s / 60 % 60, s % 60].map { $0 < 10 ? "0\($0)" : "\($0)" }.joined(separator: ":")
}

/// diffusers' --timestep_bias_* flags.
private func timestepBias(_ options: Arguments) throws -> TimestepBias {
    var bias = TimestepBias()
    if let name = options.string("--timestep-bias-strategy") {
        guard let strategy = TimestepBias.Strategy(rawValue: name) else {
            throw PEAError.usage("train: --timestep-bias-strategy must be one of \(TimestepBias.Strategy.allCases.map(\.rawValue).joined(separator: ", ")), got '\(name)'")
        }
        bias.strategy = strategy
    }
    bias.multiplier = try options.double("--timestep-bias-multiplier") ?? 1
    guard bias.multiplier > 0, bias.multiplier.isFinite else { throw PEAError.usage("train: --timestep-bias-multiplier must be above 0") }
    bias.portion = try options.double("--timestep-bias-portion") ?? 0.25
    guard (0...1).contains(bias.portion) else { throw PEAError.usage("train: --timestep-bias-portion must be in [0, 1]") }
    bias.begin = try options.int("--timestep-bias-begin", default: 0, range: 0...1_000_000)
    bias.end = try options.int("--timestep-bias-end", default: 1000, range: 0...1_000_000)
    guard bias.begin < bias.end else { throw PEAError.usage("train: --timestep-bias-begin must be below --timestep-bias-end") }
    return bias
}
