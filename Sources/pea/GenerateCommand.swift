#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import PEADiffusion

/// `pea generate`'s options, declared once for its parser and its help.
enum GenerateOptions {
    static let model = CommandOption.value(
        "--model", "DIR",
        help: "diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, …); without it, the bundled toy "
            + "world (models/toyworld: 64×64 coloured shapes, \"a red circle\"), and for Chinese prompts (\"一个红色的圆形\") "
            + "its Chinese encoder and the PEA adapter trained by `pea train` (models/toyworld-zh); found above the pea "
            + "executable, in ./models, or where $PEA_MODELS points")
    static let prompt = CommandOption.value("--prompt", "TEXT", help: "what to draw")
    static let prompts = CommandOption.value(
        "--prompts", "FILE",
        help: "one prompt per line (empty lines skipped); each is generated as its own call with the same seed")
    static let negativePrompt = CommandOption.value(
        "--negative-prompt", "TEXT", help: "what to steer away from (omitted: diffusers' negative_prompt=None)")
    static let steps = CommandOption.value("--steps", "N", default: "30", .range(1...1000), help: "denoising steps")
    static let guidance = CommandOption.value("--guidance", "G", default: "7.5", help: "classifier-free guidance scale",
                                              defaultNote: "; ≤ 1 turns guidance off")
    static let scheduler = CommandOption.value(
        "--scheduler", "NAME", .choices(SchedulerName.allCases.map(\.rawValue)),
        help: SchedulerName.allCases.map(\.rawValue).joined(separator: " | ") + " (default: the folder's)")
    static let seed = CommandOption.value(
        "--seed", "N", help: "seed of the CPU generator (default: a random seed, printed in the parameters)")
    static let width = CommandOption.value(
        "--width", "W", help: "image size in pixels, multiples of 8 (default: the model's native size)",
        label: "--width W --height H")
    static let height = CommandOption.value("--height", "H", help: nil)   // in --width's row
    static let batch = CommandOption.value("--batch", "N", default: "1", .range(1...64), help: "images per prompt")
    static let clipSkip = CommandOption.value("--clip-skip", "K", default: "0", .range(0...64),
                                              help: "use the text encoder's output K layers before the last")
    static let output = CommandOption.value(
        "--output", "PATH.png", help: "where to write (default pea-SEED.png); with several images, PATH-1.png, PATH-2.png, …")
    static let variant = CommandOption.value("--variant", "NAME", help: "read weights of that variant when present (e.g. fp16)")
    static let textEncoder = CommandOption.value(
        "--text-encoder", "DIR",
        help: "PEA: a language-specific text encoder folder (Chinese-CLIP or multilingual CLIP XLM-R, transformers "
            + "format, tokenizer files inside or in tokenizer/) …")
    static let adapter = CommandOption.value(
        "--adapter", "PATH",
        help: "… and its PEA adapter (safetensors, or pytorch_model.bin as the authors release it); together they "
            + "replace the folder's English text encoder(s), for the prompt and the negative/empty prompt alike")
    static let maxLength = CommandOption.value(
        "--max-length", "N", help: "PEA: tokens per prompt (default 52 for Chinese-CLIP, 77 for XLM-R)")

    static let spec = CommandSpec(
        name: "generate",
        usage: ["pea generate [--model DIR] --prompt TEXT [options]", "pea generate [--model DIR] --prompts FILE [options]"],
        description: """
            Generates images from text with a diffusers Stable Diffusion pipeline folder (SD1.x, SD2.x or SDXL, detected
            from the folder), the same images diffusers makes from the same folder, prompt, seed and settings with a CPU
            generator (`generator=torch.Generator("cpu").manual_seed(seed)`); no safety checker is run.
            """,
        groups: [.init("Options", [model, prompt, prompts, negativePrompt, steps, guidance, scheduler, seed, width, height,
                                   batch, clipSkip, output, variant, textEncoder, adapter, maxLength] + BackendOptions.all)],
        epilogue: """
            Each PNG carries its generation parameters in a `parameters` text chunk (A1111's format). The written paths
            go to stdout; progress goes to stderr.
            """)
}

func runGenerate(_ arguments: [String]) throws {
    typealias O = GenerateOptions
    if CommandSpec.asksForHelp(arguments) { print(O.spec.help); return }
    let options = try O.spec.parse(arguments)
    guard options.has(O.textEncoder) == options.has(O.adapter) else {
        throw PEAError.usage("generate: --text-encoder and --adapter go together (PEA: a language-specific encoder and its adapter)")
    }

    // Prompts first, so a usage mistake is reported before minutes of loading.
    var prompts: [String]
    switch (try options.optionalString(O.prompt), try options.optionalString(O.prompts)) {
    case (let prompt?, nil): prompts = [prompt]
    case (nil, let file?): prompts = try readPromptFile(file)
    case (nil, nil): throw PEAError.usage("generate: give --prompt TEXT or --prompts FILE")
    default: throw PEAError.usage("generate: give either --prompt or --prompts, not both")
    }
    let steps = try options.int(O.steps)
    let guidance = try options.float(O.guidance)
    let batch = try options.int(O.batch)
    let clipSkip = try options.int(O.clipSkip)
    let seed: UInt64
    if let text = try options.optionalString(O.seed) {
        guard let value = UInt64(text) else { throw PEAError.usage("generate: --seed expects a non-negative integer, got '\(text)'") }
        seed = value
    } else {
        var random = SplitMix64(seed: UInt64(UInt(bitPattern: time(nil))) ^ UInt64(getpid()) << 32)
        seed = random.next() >> 32
    }
    let width = try options.optionalInt(O.width), height = try options.optionalInt(O.height)
    for (name, value) in [("--width", width), ("--height", height)] {
        if let value, value <= 0 || value % 8 != 0 {
            throw PEAError.usage("generate: \(name) must be a positive multiple of 8, got \(value)")
        }
    }
    let schedulerName = try options.optionalString(O.scheduler)
    let output = try options.optionalString(O.output) ?? "pea-\(seed).png"
    guard output.hasSuffix(".png") else { throw PEAError.usage("generate: --output must end in .png, got '\(output)'") }
    let selection = try BackendOptions.select(options)
    let backend = selection.backend, dtype = selection.dtype

    // Without --model: the bundled toy world; a Chinese prompt goes through its Chinese encoder and adapter.
    var pea = try options.optionalString(O.textEncoder).flatMap { encoder in try options.optionalString(O.adapter).map { (encoder, $0) } }
    let modelFolder: String
    if let model = try options.optionalString(O.model) {
        modelFolder = model
    } else {
        let bundled: BundledModels
        do { bundled = try BundledModels.locate() } catch PEAError.invalidFile(let path, let reason) {
            throw PEAError.invalidFile(path: path, reason: "no --model given and \(reason); or pass --model DIR")
        }
        modelFolder = bundled.teacher
        let chinese = pea == nil && prompts.contains(where: BundledModels.isChinese)
        if chinese {
            guard prompts.allSatisfy(BundledModels.isChinese) else {
                throw PEAError.usage("generate: without --model, the prompts must be all Chinese or all English (the bundled world reads each language through its own encoder)")
            }
            pea = (bundled.chineseEncoder, bundled.chineseAdapter)
        }
        fputs("pea: no --model: the bundled toy world \(modelFolder)"
              + (chinese ? ", Chinese prompt through its Chinese-CLIP encoder and PEA adapter (\(parentFolder(bundled.chineseAdapter)))" : "")
              + "\n", stderr)
    }
    var conditioner: (any TextConditioner)?
    if let (encoderFolder, adapterPath) = pea {
        // PEA: the language-specific encoder and the adapter replace the folder's English text encoder(s).
        let maxLength = try options.optionalInt(O.maxLength)
        let encoder = try naming(O.maxLength, in: options, when: maxLength != nil) {
            try LanguageEncoders.load(folder: encoderFolder, backend: backend, maxLength: maxLength, dtype: dtype)
        }
        conditioner = try PEAConditioner(encoder: encoder, adapter: PEAAdapter.load(path: adapterPath, backend: backend, dtype: dtype))
    }
    let variant = try options.optionalString(O.variant)
    let pipeline = try naming(O.clipSkip, in: options, when: clipSkip != 0) {
        try StableDiffusionPipeline.load(folder: modelFolder, backend: backend, scheduler: schedulerName, clipSkip: clipSkip,
                                         variant: variant, conditioner: conditioner, dtype: dtype)
    }
    let negativePrompt = try options.optionalString(O.negativePrompt)
    let total = prompts.count * batch
    var written = 0
    for prompt in prompts {
        var request = GenerationRequest(prompt: prompt, negativePrompt: negativePrompt,
                                        width: width ?? pipeline.defaultSize, height: height ?? pipeline.defaultSize)
        request.steps = steps
        request.guidance = guidance
        request.seed = seed
        request.imagesPerPrompt = batch
        let reporter = ProgressReporter(label: total > 1 ? "image \(written + 1)-\(written + batch)/\(total)" : "image")
        let images = try pipeline.generate(request, progress: reporter.update, warn: { printWarning($0) })
        reporter.finish()
        let sampler = a1111SamplerName(schedulerName.flatMap(SchedulerName.init(rawValue:)), className: pipeline.scheduler.className)
        let parameters = a1111Parameters(request, sampler: sampler, model: modelFolder, family: pipeline.family)
        for image in images {
            written += 1
            let path = total == 1 ? output : "\(output.dropLast(4))-\(written).png"
            try PNGWriter.write(rgb: image.pixels, width: image.width, height: image.height,
                                textChunks: [("parameters", parameters)], to: path)
            print(path)
        }
    }
}

/// The prompts of a --prompts file: one per line, surrounding whitespace trimmed, empty lines skipped.
func readPromptFile(_ path: String) throws -> [String] {
    guard !isDirectory(path) else { throw PEAError.invalidFile(path: path, reason: "is a directory; --prompts expects a text file with one prompt per line") }
    let bytes = try readWholeFile(path)
    guard let text = String(validating: bytes, as: UTF8.self) else {
        throw PEAError.invalidFile(path: path, reason: "not UTF-8 text")
    }
    let prompts = text.split(whereSeparator: \.isNewline).map { String($0).trimmingWhitespace() }.filter { !$0.isEmpty }
    guard !prompts.isEmpty else { throw PEAError.invalidFile(path: path, reason: "no prompts (the file is empty)") }
    return prompts
}

/// The generation parameters as AUTOMATIC1111's web UI writes them into a PNG's `parameters` chunk.
func a1111Parameters(_ request: GenerationRequest, sampler: String, model: String, family: ModelFamily) -> String {
    var text = request.prompt
    if let negative = request.negativePrompt { text += "\nNegative prompt: \(negative)" }
    let modelName = model.split(separator: "/").last.map(String.init) ?? model
    text += "\nSteps: \(request.steps), Sampler: \(sampler), CFG scale: \(request.guidance), Seed: \(request.seed), "
        + "Size: \(request.width)x\(request.height), Model: \(modelName), Model family: \(family.rawValue), Generator: torch CPU (pea)"
    return text
}

/// The sampler as A1111 names it (PNDM without its Runge–Kutta warm-up is PLMS).
func a1111SamplerName(_ name: SchedulerName?, className: String) -> String {
    switch name {
    case .ddim?: return "DDIM"
    case .euler?: return "Euler"
    case .eulerAncestral?: return "Euler a"
    case .dpmpp2M?: return "DPM++ 2M"
    case .dpmpp2MKarras?: return "DPM++ 2M Karras"
    case .pndm?: return "PLMS"
    case nil:
        let names = ["DDIMScheduler": "DDIM", "EulerDiscreteScheduler": "Euler", "EulerAncestralDiscreteScheduler": "Euler a",
                     "DPMSolverMultistepScheduler": "DPM++ 2M", "PNDMScheduler": "PLMS"]
        return names[className] ?? className
    }
}

func printWarning(_ message: String) {
    fputs("pea: warning: \(message)\n", stderr)
}

/// Step progress on stderr: a live line (step, it/s, ETA) on a terminal, one plain line per image otherwise.
final class ProgressReporter {
    let label: String
    let start = monotonicSeconds()
    let live = isatty(STDERR_FILENO) != 0
    var steps = 0

    init(label: String) { self.label = label }

    func update(_ step: Int, _ total: Int) {
        steps = total
        guard live else { return }
        let elapsed = monotonicSeconds() - start
        let rate = Double(step) / max(elapsed, 1e-9)
        let eta = Double(total - step) / max(rate, 1e-9)
        fputs("\r\(label): step \(step)/\(total)  \(formatted(rate)) it/s  ETA \(formatted(eta)) s ", stderr)
    }

    func finish() {
        let elapsed = monotonicSeconds() - start
        if live { fputs("\n", stderr) }
        fputs("\(label): \(steps) steps in \(formatted(elapsed)) s\n", stderr)
    }
}

extension String {
    func trimmingWhitespace() -> String {
        var scalars = Substring(self)
        while let first = scalars.first, first.isWhitespace { scalars = scalars.dropFirst() }
        while let last = scalars.last, last.isWhitespace { scalars = scalars.dropLast() }
        return String(scalars)
    }
}
