#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import PEADiffusion

/// `pea train`'s options, declared once for its parser and its help.
enum TrainOptions {
    static let model = CommandOption.value(
        "--model", "DIR|FILE", help: "the teacher: a diffusers SD1.x/SD2.x pipeline folder (unet/, vae/, text_encoder/, tokenizer/, "
            + "scheduler/), or SDXL (also text_encoder_2/, tokenizer_2/); or a single-file SD1.x/SD2.x/SDXL checkpoint "
            + "(.safetensors or .ckpt, e.g. a community fine-tune), read as `pea generate --model FILE` reads it, with "
            + "--config/--tokenizer/--prediction-type (--prediction-type also sets the training target)")
    static let lora = CommandOption.repeatable(
        "--lora", "FILE[:SCALE]",
        help: "merge a LoRA into the teacher as it loads, as `pea generate --lora` does (diffusers' load_lora_weights + "
            + "fuse_lora(lora_scale=SCALE); SCALE defaults to 1.0; repeatable): its UNet part into the UNet that both "
            + "sides share, its text-encoder part into the teacher's English encoder(s); the language encoder and the "
            + "adapter get none. A tensor that matches no module is an error")
    static let textEncoder = CommandOption.value(
        "--text-encoder", "DIR", help: "the language-specific encoder (Chinese-CLIP/BERT or XLM-R folder with its tokenizer)")
    static let data = CommandOption.repeatable("--data", "SPEC", help: nil)   // described above the options
    static let maxLength = CommandOption.value(
        "--max-length", "N", help: "its token length (default 52 for Chinese-CLIP, 77 for XLM-R)")
    static let output = CommandOption.value(
        "--output", "DIR", help: "checkpoints: DIR/checkpoint-STEP/ every --save-every steps, and the final adapter in "
            + "DIR/adapter.safetensors (+ DIR/optimizer.safetensors for resuming)")
    static let steps = CommandOption.value("--steps", "N", .range(1...100_000_000), help: "optimiser steps (required)")
    static let batchSize = CommandOption.value(
        "--batch-size", "B", default: "4", .range(1...4096),
        help: "samples per step and process: under mpirun or srun, per rank (the global batch is ranks × B)")
    static let lr = CommandOption.value("--lr", "LR", default: "1e-5", help: "peak learning rate",
                                        defaultNote: ", the released scripts'")
    static let minLR = CommandOption.value("--min-lr", "LR", default: "5e-8", help: "learning rate at the end of the decay")
    static let warmupSteps = CommandOption.value(
        "--warmup-steps", "N", .range(0...100_000_000),
        help: "linear warmup steps (default 100, or steps/10 when that is smaller)")
    static let weightDecay = CommandOption.value(
        "--weight-decay", "W", default: "0.1", help: "AdamW weight decay, not applied to the layer norm")
    static let maxGradNorm = CommandOption.value(
        "--max-grad-norm", "G", help: "clip the global gradient norm to G (default: no clipping)")
    static let resolution = CommandOption.value(
        "--resolution", "R", default: "512", .range(1...AspectBuckets.maxSide),
        help: "square training resolution; images are resized (shorter side) and center-cropped. A multiple of the VAE's "
            + "factor (8); also the validation images' size (with --buckets, give it to choose that size)")
    static let buckets = CommandOption.value(
        "--buckets", "LIST",
        help: "aspect-ratio buckets instead of the square: 'sdxl' (the authors' nine, 448x896 … 896x448) or WIDTHxHEIGHT,… "
            + "(multiples of the VAE's factor). Each image goes to the bucket nearest its aspect ratio, is resized to cover "
            + "it and cropped; a batch holds one bucket, and an epoch's leftovers are dropped")
    static let crop = CommandOption.value(
        "--crop", "MODE", default: CropMode.random.rawValue, .choices(CropMode.allCases.map(\.rawValue)),
        help: "where a bucket crop lies: random (the authors'; drawn once per image from its bytes and --seed) or center")
    static let noiseOffset = CommandOption.value(
        "--noise-offset", "O", default: "0",
        help: "offset noise: noise += O · randn(B, C, 1, 1) (the SDXL script's --noise_offset; e.g. 0.05)")
    static let gradientCheckpointing = CommandOption.flag(
        "--gradient-checkpointing",
        help: "keep only the inputs of the student UNet's resnets and transformer blocks and run them again in the backward "
            + "pass: the same gradients for much less activation memory, at the cost of a second forward pass of them")
    static let hybrid = CommandOption.flag(
        "--hybrid", help: "hybrid training: the task loss on language-specific records, the KD losses on parallel ones")
    static let uncondProb = CommandOption.value(
        "--uncond-prob", "P", default: "0.1", help: "probability that a sample trains on the empty prompt on both sides")
    static let featureWeight = CommandOption.value("--feature-weight", "W", default: "0.1", help: "weight of the feature KD term")
    static let taskWeight = CommandOption.value(
        "--task-weight", "W", default: "1", help: "weight of the task term, MSE against the true noise",
        defaultNote: ", as the official scripts; 0 trains on the KD terms alone, as the toy world's adapter was trained")
    static let biasStrategy = CommandOption.value(
        "--timestep-bias-strategy", "S", default: TimestepBias.Strategy.none.rawValue,
        .choices(TimestepBias.Strategy.allCases.map(\.rawValue)),
        help: "none, later (the noisiest timesteps), earlier or range: those timesteps are drawn "
            + "--timestep-bias-multiplier times as often (diffusers' SDXL script's flags)")
    static let biasMultiplier = CommandOption.value(
        "--timestep-bias-multiplier", "M", default: "1", help: "how many times as often the biased timesteps are drawn")
    static let biasPortion = CommandOption.value(
        "--timestep-bias-portion", "P", default: "0.25", help: "the fraction of timesteps that later/earlier bias")
    static let biasBegin = CommandOption.value(
        "--timestep-bias-begin", "N", default: "0", .range(0...1_000_000), help: "the range that range biases",
        defaultNote: ", \(biasEnd.defaultValue!)",
        label: "--timestep-bias-begin N, --timestep-bias-end N")
    static let biasEnd = CommandOption.value("--timestep-bias-end", "N", default: "1000", .range(0...1_000_000), help: nil)
    static let seed = CommandOption.value(
        "--seed", "N", default: "0", .range(0...Int.max),
        help: "seed for data order, noise, timesteps and dropout; step k's Gaussian values (latent samples, then noise) "
            + "are torch.randn draws from a CPU generator seeded with a function of (N, k) documented in PEATrainer.swift")
    static let saveEvery = CommandOption.value(
        "--save-every", "N", default: "0", .range(0...100_000_000), help: "checkpoint every N steps",
        defaultNote: ": only at the end")
    static let collective = CommandOption.value(
        "--collective", "auto|nccl|mpi", default: "auto", .choices(["auto", "nccl", "mpi"]),
        help: "under mpirun or srun, how the ranks sum their gradients: nccl on the GPUs (the CUDA backend; NCCL's "
            + "libnccl.so.2, e.g. from the nvidia-nccl-cu12 wheel, loaded at run time, or PEA_NCCL_LIB), mpi through the "
            + "host (MPI_Allreduce); auto: nccl on the CUDA backend when NCCL loads, else mpi")
    static let resume = CommandOption.value(
        "--resume", "DIR", help: "continue from a checkpoint folder (DIR/checkpoint-STEP or the --output DIR)")
    static let latentCache = CommandOption.value(
        "--latent-cache", "DIR",
        help: "keep each image's VAE latent distribution there, so it is encoded once (apart for each --model and --vae)")
    static let initAdapter = CommandOption.value(
        "--init-adapter", "PATH", help: "start from this adapter checkpoint (its shape is read from its tensors)")
    static let adapterHidden = CommandOption.value(
        "--adapter-hidden", "H", default: "2048", .range(1...65536), help: "hidden width of a new adapter")
    static let adapterLayers = CommandOption.value(
        "--adapter-layers", "N", default: "3", .range(1...64), help: "linear layers of a new adapter",
        defaultNote: ", as the training script")

    static let validationPrompt = CommandOption.repeatable(
        "--validation-prompt", "TEXT", help: "a prompt in the encoder's language (repeatable; one grid row each)")
    static let validationEvery = CommandOption.value(
        "--validation-every", "N", .range(1...100_000_000),
        help: "validate after every N-th step and after the last one (required with a prompt)")
    static let validationSeeds = CommandOption.value(
        "--validation-seeds", "K", default: "2", .range(1...64), help: "images per prompt, seeds 0..K-1",
        defaultNote: "; one grid column each")
    static let validationSteps = CommandOption.value(
        "--validation-steps", "S", default: "30", .range(1...1000), help: "denoising steps")
    static let validationGuidance = CommandOption.value(
        "--validation-guidance", "G", default: "7.5", help: "classifier-free guidance scale",
        defaultNote: "; ≤ 1 turns guidance off")

    static let spec = CommandSpec(
        name: "train",
        usage: ["pea train --model DIR|FILE --text-encoder DIR --data SPEC [--data SPEC …] --output DIR --steps N [options]"],
        description: """
            Trains a PEA adapter by knowledge distillation through a frozen English SD1.x/SD2.x or SDXL pipeline
            (PEA-Diffusion, arXiv 2311.17086): the student is UNet(adapter(language-specific encoder(text))), the teacher
            the same UNet with the English CLIP encoder(s) on text_en; losses: task ε-MSE + output KD MSE + 0.1 × feature
            KD MSE over every down, mid and up block. Only the adapter learns (AdamW, warmup then polynomial decay).
            The teacher may be a fine-tuned single-file checkpoint (--model FILE) with LoRAs merged (--lora), and its VAE,
            which encodes the training images' latents, swapped (--vae FILE): the model `pea generate` loads from the same
            options.

            SDXL (a folder with text_encoder_2/ and tokenizer_2/, as the authors' train_sdxl_zh): the adapter has the SDXL
            form (a stack to the pooled width 1280, then an fc head to 2048, with bias; pooled = mean over tokens); the
            teacher is conditioned on both encoders' penultimate states (768 + 1280) with text_encoder_2's pooled vector,
            both UNets on time_ids = (original size, crop top-left, target size) of each image. Use --buckets sdxl (the
            authors' nine aspect buckets) and optionally --noise-offset; with --precision fp16 the VAE encodes in fp32
            (SDXL's VAE overflows fp16). Memory: the frozen UNet's weights (SDXL: 10.3 GB in fp32, 5.1 GB in fp16) plus
            the activations the student's backward pass keeps, which grow with batch × bucket area (0.87 MB per latent
            position in fp32, measured on the CPU; a third of that with --gradient-checkpointing).
              pea train --model sdxl-base --text-encoder chinese-clip --data 'shards/{000..099}.tar' --buckets sdxl \\
                --batch-size 4 --gradient-checkpointing --backend cuda --precision fp16 --noise-offset 0.05 \\
                --steps 100000 --output runs/sdxl-zh

            Data (--data, repeatable):
              a .jsonl manifest, one object per line: "image" (path relative to the manifest), "text" (target language),
              "text_en" (English), optional "language_specific" (bool, for --hybrid); or webdataset tar shards
              (KEY.jpg/.png + KEY.json with the same fields, or KEY.txt), brace patterns allowed
              (data/shard-{000000..000099}.tar), several joined by '::'. Corrupt images and records without a caption
              are skipped and counted in the log.
            """,
        groups: [
            .init("Options", [model, textEncoder, data, maxLength, output, steps, batchSize, lr, minLR, warmupSteps, weightDecay,
                              maxGradNorm, resolution, buckets, crop, noiseOffset, gradientCheckpointing, hybrid, uncondProb, featureWeight, taskWeight, biasStrategy,
                              biasMultiplier, biasPortion, biasBegin, biasEnd, seed, saveEvery, collective, resume, latentCache,
                              initAdapter, adapterHidden, adapterLayers, GenerateOptions.config, GenerateOptions.tokenizer,
                              GenerateOptions.predictionType, GenerateOptions.vae, lora] + BackendOptions.all),
            .init("Validation (samples from the adapter as it trains)",
                  [validationPrompt, validationEvery, validationSeeds, validationSteps, validationGuidance], note: """
                    Each image is what `pea generate --model DIR|FILE --text-encoder ENC --adapter <the adapter at that step> --seed C
                    --width W --height H --steps S --guidance G` makes, with this command's --config, --tokenizer,
                    --prediction-type, --vae and --lora (the model's scheduler, no negative prompt) at W = H = the
                    training resolution R (with --buckets and no --resolution: the bucket nearest a square, 640x640 of sdxl's),
                    drawn with the models already loaded; the training itself is unchanged by it. The grid (rows =
                    prompts, columns = seeds, 2 white pixels between images) is written to OUTPUT/validation/step-000500.png
                    (the step, 6 digits) and its path printed on stderr.
                  """),
        ],
        epilogue: """
            Metrics: OUTPUT/metrics.jsonl gets one JSON object per step, flushed as it is written:
              {"grad_norm", "loss", "loss_features", "loss_logits", "loss_task", "lr", "seconds", "step"}, plus
              "validation" (the grid's path) on steps that wrote one; grad_norm is the norm before clipping, seconds the
              step's time without validation, and a value that is not finite (a skipped f16 update's norm) is null. A new
              run starts the file afresh; --resume keeps only its lines up to the resumed step.

            Progress (loss terms, learning rate, step time, ETA) goes to stderr; the final adapter's path to stdout.

            Stopping: on SIGINT (Ctrl-C) or SIGTERM the step in progress finishes, a checkpoint is saved to
            OUTPUT/checkpoint-STEP and pea exits with status 128 + the signal's number; a second signal stops it at once.
            Checkpoint folders appear whole or not at all, and a run removes the temporaries that killed runs left in OUTPUT.

            Several processes (GPUs, machines): mpirun -np N pea train … or srun pea train … (the MPI shim: make mpi,
            or PEA_MPI_LIB) trains data-parallel: --batch-size is per rank, rank r trains on its rows of each global
            batch of N × B (the same random values as one process with batch N × B), gradients are averaged across
            ranks (NCCL or MPI: --collective) before clipping and AdamW, each rank uses the GPU of its local rank
            (modulo those CUDA_VISIBLE_DEVICES leaves it) unless --device is given, and rank 0 alone prints and
            writes OUTPUT. A rank that fails ends the job (MPI_Abort) naming itself; --resume may use another rank
            count. OUTPUT must be on a filesystem every rank sees. See examples/slurm-train.sh.
            """)
}

func runTrain(_ arguments: [String]) throws {
    if CommandSpec.asksForHelp(arguments) { print(TrainOptions.spec.help); return }
    // Under a launcher every rank runs the same command; a rank that fails names itself and ends the whole job
    // (MPI_Abort), since the others would wait for it in the next all-reduce.
    let group = try ProcessGroup.join()
    do {
        try train(arguments, group: group)
    } catch let error where group.size > 1 {
        fputs("pea train: \(group.name) failed: \(error)\n", stderr)
        group.abort((error as? PEAError)?.isUsage == true ? 2 : 1)
    }
    try group.finish()
}

/// `pea train` as one rank of `group` (the whole job when it is `single`): rank 0 alone writes logs, checkpoints,
/// validation images and the final adapter.
private func train(_ arguments: [String], group: ProcessGroup) throws {
    typealias O = TrainOptions
    /// Progress for the terminal: rank 0's alone, the others' would repeat it.
    func say(_ line: String) { if group.isRoot { fputs(line + "\n", stderr) } }
    let options = try O.spec.parse(arguments)
    let model = try options.string(O.model)
    let encoderFolder = try options.string(O.textEncoder)
    let output = try options.string(O.output)
    let dataSpecs = options.strings(O.data)
    guard !dataSpecs.isEmpty else { throw PEAError.usage("train: option '--data' is required") }

    var settings = TrainingOptions(steps: try options.int(O.steps), batchSize: try options.int(O.batchSize))
    func positive(_ option: CommandOption) throws -> Float {
        let value = try options.float(option)
        guard value > 0 else { throw PEAError.usage("train: option '\(option.name)' must be positive, got \(value)") }
        return value
    }
    settings.learningRate = Double(try positive(O.lr))
    settings.minLearningRate = try options.double(O.minLR)
    guard settings.minLearningRate >= 0, settings.minLearningRate < settings.learningRate else {
        throw PEAError.usage("train: --min-lr must be at least 0 and below --lr (\(settings.learningRate))")
    }
    settings.warmupSteps = try options.optionalInt(O.warmupSteps) ?? min(100, settings.steps / 10)
    settings.weightDecay = try options.float(O.weightDecay)
    settings.maxGradientNorm = try options.has(O.maxGradNorm) ? positive(O.maxGradNorm) : nil
    settings.resolution = try options.int(O.resolution)
    settings.buckets = try options.optionalString(O.buckets).map {
        do { return try AspectBuckets.parse($0) } catch PEAError.usage(let message) { throw PEAError.usage("train: --buckets: \(message)") }
    }
    settings.crop = CropMode(rawValue: try options.string(O.crop))!
    if options.has(O.crop) && settings.buckets == nil { throw PEAError.usage("train: --crop chooses bucket crops; it needs --buckets") }
    settings.noiseOffset = try options.float(O.noiseOffset)
    guard settings.noiseOffset >= 0 else { throw PEAError.usage("train: --noise-offset must be at least 0") }
    settings.hybrid = options.has(O.hybrid)
    settings.gradientCheckpointing = options.has(O.gradientCheckpointing)
    settings.uncondProbability = try options.float(O.uncondProb)
    guard (0...1).contains(settings.uncondProbability) else { throw PEAError.usage("train: --uncond-prob must be in [0, 1]") }
    settings.featureWeight = try options.float(O.featureWeight)
    settings.taskWeight = try options.float(O.taskWeight)
    guard settings.featureWeight >= 0, settings.taskWeight >= 0 else {   // finite as floats: options.float
        throw PEAError.usage("train: --feature-weight and --task-weight must be at least 0")
    }
    settings.timestepBias = try timestepBias(options)
    settings.seed = UInt64(try options.int(O.seed))
    settings.saveEvery = try options.int(O.saveEvery)
    let validation = try validationOptions(options)

    let selection = try BackendOptions.select(options, defaultDevice: group.launch?.device())
    let backend = selection.backend
    // The teacher is the English pipeline `pea generate` loads from the same --model/--lora/--vae/--config options.
    let teacher = try DistillationTeacher(
        pipeline: ModelChoice(model: model).load(options, scheduler: nil, clipSkip: 0, selection: selection))
    let factor = teacher.vae.downsamplingFactor
    guard settings.resolution % factor == 0 else {
        throw PEAError.usage("train: --resolution must be a multiple of the VAE's factor \(factor), got \(settings.resolution)")
    }
    for size in settings.buckets?.sizes ?? [] where size.width % factor != 0 || size.height % factor != 0 {
        throw PEAError.usage("train: --buckets: \(size.width)x\(size.height) is not a multiple of the VAE's factor \(factor)")
    }
    let maxLength = try options.optionalInt(O.maxLength)
    let student = try naming(O.maxLength, in: options, when: maxLength != nil) {
        try LanguageEncoders.load(folder: encoderFolder, backend: backend, maxLength: maxLength)
    }
    let adapter: PEAAdapter
    if let initial = try options.optionalString(O.initAdapter) {
        adapter = try PEAAdapter.load(path: initial, backend: backend)
    } else {
        let hidden = try options.int(O.adapterHidden)
        let layers = try options.int(O.adapterLayers)
        // SD1.x/SD2.x: a stack to cross_attention_dim. SDXL: a stack to the pooled width, then the fc head to
        // cross_attention_dim.
        let cross = teacher.unet.config.crossAttentionDim[0]
        let widths = [student.hiddenSize] + Array(repeating: hidden, count: layers - 1) + [teacher.pooledDim ?? cross]
        let head = teacher.pooledDim.map { _ in cross }
        // Each f32 parameter is held four times while training: the value, its gradient and AdamW's two moments.
        let layerWidths: [Int] = widths + (head.map { [$0] } ?? [])
        var parameters = 0.0
        for (input, output) in zip(layerWidths, layerWidths.dropFirst()) { parameters += Double(input + 1) * Double(output) }
        let shape = widths.map(String.init).joined(separator: "→") + (head.map { " + fc→\($0)" } ?? "")
        try MemoryBudget.require(parameters * 4 * 4, on: backend, for: "an adapter of widths \(shape)") {
            PEAError.usage("\($0); lower --adapter-hidden or --adapter-layers")
        }
        adapter = try PEAAdapter.initialized(widths: widths, fcOutput: head, backend: backend, seed: settings.seed)
    }
    let source = try naming(O.data, in: options) { try TrainingDataSource.parse(dataSpecs) }
    let dataset = try TrainingDataset(source: source, shape: settings.imageShape, seed: settings.seed)
    var shownSkips = 0
    dataset.onSkip = { skip in
        shownSkips += 1
        if shownSkips <= 10 { say("pea train: skipped \(skip.id): \(skip.message)") }
        if shownSkips == 10 { say("pea train: (further skips are counted, not shown)") }
    }
    // Latents are the VAE's: a --vae swap is another cache namespace (LoRAs and --config do not touch the VAE's weights).
    let vaeFile = try options.optionalString(GenerateOptions.vae)
    let namespace = model + (vaeFile.map { "\u{0}--vae \($0)" } ?? "")
    let cache = try options.optionalString(O.latentCache).map { try LatentCache(folder: $0, namespace: namespace) }
    let trainer = try PEATrainer(teacher: teacher, student: student, adapter: adapter, dataset: dataset,
                                 options: settings, backend: backend, latentCache: cache, group: group)
    try chooseCollective(try options.string(O.collective), trainer: trainer, group: group, say: say)
    let validator = try (group.isRoot ? validation : nil).map {
        // With buckets and no --resolution: a trained size, the bucket nearest a square (640x640 of sdxl's).
        let size = options.has(O.resolution) ? nil : settings.buckets.map { $0.sizes[$0.nearest(width: 1, height: 1)] }
        return try TrainingValidator(teacher: teacher, student: student, options: $0, width: size?.width ?? settings.resolution,
                                     height: size?.height ?? settings.resolution, backend: backend)
    }
    if let resume = try options.optionalString(O.resume) {
        try trainer.resume(from: resume)
        say("pea train: resumed at step \(trainer.step) from \(resume)")
    }
    let head = trainer.adapter.isSDXL ? " + fc→\(trainer.adapter.outputDim)" : ""
    let sizes = settings.buckets.map { "in buckets \($0)" } ?? "at \(settings.resolution)²"
    let ranks = group.size > 1 ? " on each of \(group.size) ranks (global batch \(group.size * settings.batchSize))" : ""
    say("pea train: adapter \(trainer.adapter.widths.map(String.init).joined(separator: "→"))\(head) (\(trainer.adapter.parameterCount) parameters), "
        + "\(settings.steps) steps of \(settings.batchSize)\(ranks) \(sizes), \(backend.name)")
    let metrics = group.isRoot ? try TrainingMetricsLog(path: joinPath(output, "metrics.jsonl"), startingAfter: trainer.step) : nil
    if group.isRoot {
        for path in removeStaleTemporaries(in: output) { say("pea train: removed \(path), left by a killed run") }
    }

    /// Rank 0 writes it (after the step's all-reduce: every rank holds the same adapter); every rank gets its path.
    func saveCheckpoint() throws -> String {
        let folder = joinPath(output, "checkpoint-\(trainer.step)")
        guard group.isRoot else { return folder }
        try trainer.saveCheckpoint(to: folder)
        say("pea train: saved \(folder)")
        return folder
    }
    let fault = try TrainingFault.fromEnvironment(group: group)
    StopRequest.install()
    var times: [Double] = []
    while trainer.step < settings.steps {
        try fault?.strike(beforeStep: trainer.step + 1, rank: group.rank)
        let report: TrainingStepReport
        // Under a launcher the ranks agree in the step's all-reduce whether one was signalled.
        do { report = try trainer.trainStep(requestingStop: StopRequest.received != nil) } catch PEAError.backend(let message, let kind) {
            throw PEAError.backend("pea train: \(message)", kind: kind)   // the library's error, in the command's context
        }
        times.append(report.seconds)
        let recent = times.suffix(10)
        let perStep = recent.reduce(0, +) / Double(recent.count)
        let losses = report.losses
        var line = "step \(report.step)/\(settings.steps)  loss \(short(losses.total)) (task \(short(losses.task)), "
            + "logits \(short(losses.logits)), features \(short(losses.features)))  lr \(short(report.learningRate))  "
            + "\(short(Float(report.seconds))) s/step  ETA \(clock(perStep * Double(settings.steps - report.step)))"
        if report.overflowSkipped { line += "  (f16 overflow: update skipped, loss scale \(trainer.lossScale))" }
        if report.skipped.total > 0 { line += "  skipped records: \(report.skipped)" }
        say(line)
        var grid: String?
        if let validator, validator.options.isDue(step: report.step, totalSteps: settings.steps) {
            let start = monotonicSeconds()
            grid = try validator.write(adapter: trainer.adapter, step: report.step, output: output)
            say("pea train: validation \(grid!) (\(short(Float(monotonicSeconds() - start))) s)")
        }
        try metrics?.append(report, validation: grid)
        guard report.step < settings.steps else { break }   // the last step: the final save follows
        var saved: String?
        if settings.saveEvery > 0, report.step % settings.saveEvery == 0 { saved = try saveCheckpoint() }
        if report.stopRequested || (group.size == 1 && StopRequest.received != nil) {
            let signal = StopRequest.received ?? SIGTERM   // a rank that was not signalled itself stops with its peers
            let folder = try saved ?? saveCheckpoint()
            say("pea train: stopped by \(signal == SIGINT ? "SIGINT" : "SIGTERM") after step \(report.step) of \(settings.steps); "
                + "continue with --resume \(folder)")
            try group.finish()
            exit(128 + signal)   // the shell's status for a process that a signal stopped
        }
    }
    guard group.isRoot else { return }
    // The output folder holds more than the checkpoint, so its two files are replaced one by one (the step in
    // both tells a torn pair).
    try trainer.writeCheckpointFiles(into: output)
    print(joinPath(output, "adapter.safetensors"))
}

/// --collective: NCCL on the device for the CUDA backend's ranks when asked (or, with auto, when it loads), else
/// MPI through the host; nothing for a single process.
private func chooseCollective(_ choice: String, trainer: PEATrainer, group: ProcessGroup, say: (String) -> Void) throws {
    guard group.size > 1, choice != "mpi" else { return }
    guard let cuda = trainer.backend as? CUDABackend else {
        if choice == "nccl" { throw PEAError.usage("train: --collective nccl needs the CUDA backend (this run uses \(trainer.backend.name))") }
        return
    }
    var reason = ""
    if try cuda.joinNCCL(group, reason: &reason) {
        trainer.deviceAllReduce = { try cuda.allReduceSumInPlace($0) }
        say("pea train: the ranks' gradients are summed by NCCL on the GPUs")
    } else if choice == "nccl" {
        throw PEAError.backend("train: --collective nccl: \(reason)", kind: .unavailable)
    } else {
        say("pea train: no NCCL (\(reason)); the ranks' gradients are summed by MPI through the host")
    }
}

/// A fault on purpose, FOR TESTS ONLY (DistributedTrainingTests): PEA_TEST_FAULT=RANK:STEP:throw makes that rank
/// throw an error before that step, RANK:STEP:kill makes it SIGKILL itself there, RANK:STEP:term sends it SIGTERM
/// there — how the tests check that one failing or dying rank ends the whole job and leaves the last checkpoint
/// whole, and that a signal to one rank stops every rank after the same step. Unset in every real run.
private struct TrainingFault {
    enum Kind: String { case `throw`, kill, term }
    let rank: Int, step: Int, kind: Kind

    static func fromEnvironment(group: ProcessGroup) throws -> TrainingFault? {
        guard let variable = getenv("PEA_TEST_FAULT") else { return nil }
        let text = String(cString: variable)
        let parts = text.split(separator: ":").map(String.init)
        guard parts.count == 3, let rank = Int(parts[0]), let step = Int(parts[1]), let kind = Kind(rawValue: parts[2]) else {
            throw PEAError.usage("train: PEA_TEST_FAULT (a test hook) must be RANK:STEP:throw, RANK:STEP:kill or RANK:STEP:term, got '\(text)'")
        }
        return TrainingFault(rank: rank, step: step, kind: kind)
    }

    func strike(beforeStep next: Int, rank current: Int) throws {
        guard current == rank, next == step else { return }
        switch kind {
        case .kill: raise(SIGKILL)
        case .term: raise(SIGTERM)   // StopRequest's handler records it; the step goes on
        case .throw: throw PEAError.backend("PEA_TEST_FAULT: rank \(rank) fails before step \(step), as the test asked")
        }
    }
}

/// The --validation-* options (nil without --validation-prompt); every mistake is a usage error, found before
/// anything is loaded or written.
private func validationOptions(_ options: ParsedOptions) throws -> ValidationOptions? {
    typealias O = TrainOptions
    let prompts = options.strings(O.validationPrompt)
    guard !prompts.isEmpty else {
        for option in [O.validationEvery, O.validationSeeds, O.validationSteps, O.validationGuidance] where options.has(option) {
            throw PEAError.usage("train: \(option.name) needs at least one --validation-prompt")
        }
        return nil
    }
    guard options.has(O.validationEvery) else {
        throw PEAError.usage("train: --validation-prompt needs --validation-every N (validate every N steps)")
    }
    var validation = ValidationOptions(prompts: prompts, every: try options.int(O.validationEvery))
    validation.seeds = try options.int(O.validationSeeds)
    validation.steps = try options.int(O.validationSteps)
    validation.guidance = try options.float(O.validationGuidance)
    return validation
}

private func short(_ value: Float) -> String {
    let magnitude = abs(value)
    return printfFormatted(magnitude != 0 && (magnitude < 1e-3 || magnitude >= 1e5) ? "%.3e" : "%.4f", Double(value))
}

/// diffusers' --timestep_bias_* flags.
private func timestepBias(_ options: ParsedOptions) throws -> TimestepBias {
    typealias O = TrainOptions
    var bias = TimestepBias()
    bias.strategy = TimestepBias.Strategy(rawValue: try options.string(O.biasStrategy))!
    bias.multiplier = try options.double(O.biasMultiplier)
    guard bias.multiplier > 0, bias.multiplier.isFinite else { throw PEAError.usage("train: --timestep-bias-multiplier must be above 0") }
    bias.portion = try options.double(O.biasPortion)
    guard (0...1).contains(bias.portion) else { throw PEAError.usage("train: --timestep-bias-portion must be in [0, 1]") }
    bias.begin = try options.int(O.biasBegin)
    bias.end = try options.int(O.biasEnd)
    guard bias.begin < bias.end else { throw PEAError.usage("train: --timestep-bias-begin must be below --timestep-bias-end") }
    return bias
}
