#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import PEADiffusion

/// `pea generate --prompts FILE --output-dir OUT`: the file's items (this process's shard of them) that OUT does
/// not yet hold, denoised --batch-size images at a time, each image written and recorded as its batch finishes.
func runGenerateJob(_ file: String, _ options: ParsedOptions) throws {
    typealias O = GenerateOptions
    guard let folder = try options.optionalString(O.outputDir) else {
        throw PEAError.usage("generate: a prompt file is a job: give --output-dir OUT for its images and results")
    }
    let settings = try GenerateSettings(options)
    let format = JobOutput.Format(rawValue: try options.string(O.format))!
    let shard = try jobShard(options)

    // Everything a mistake could be in is checked before minutes of loading: the file, the folder's job.
    let manifestPath = joinPath(folder, "job.json")
    let existing = isDirectory(folder) ? try JobManifest.read(path: manifestPath) : nil
    let overwrite = options.has(O.overwrite)
    // Without --seed a re-run resumes with the base seed the folder's job was started with.
    let baseSeed = settings.seed ?? (overwrite ? nil : existing?.baseSeed) ?? GenerateSettings.randomSeed()
    // Sizes left at 0 are the model's native size, filled in once it is loaded.
    var defaults = JobDefaults(negativePrompt: settings.negativePrompt, baseSeed: baseSeed, width: settings.width ?? 0,
                               height: settings.height ?? 0, steps: settings.steps, guidance: settings.guidance,
                               scheduler: settings.scheduler, batch: settings.batch, strength: try strengthOption(options))
    if options.has(GenerateOptions.strength) { defaults.inpaintStrength = defaults.strength }
    defaults.maskBlur = try maskBlurOption(options)
    let controls = try ControlOptions(options)
    let items = try sizedByControlImages(sizedByInitImages(PromptFile.read(path: file, defaults: defaults), file: file),
                                         file: file, controlnets: controls.folders.count)
    if baseSeed > 1 << 53 || UInt64(items.count - 1) > (1 << 53) - baseSeed {
        throw PEAError.usage("generate: --seed \(baseSeed) + the item index must stay within 0...2^53 (results.jsonl keeps seeds as JSON numbers)")
    }
    let model = try ModelChoice(options, prompts: items.map(\.prompt))
    // The rest of what can be refused at once comes before OUT is touched: its job.json names the model.
    try model.requireModel()
    let requestedBatchSize = try options.optionalInt(O.batchSize)
    // Under mpirun/srun each process takes the GPU of its rank on the node (--device overrides).
    let selection = try BackendOptions.select(options, defaultDevice: try LaunchEnvironment.currentJob()?.device())
    var manifestSettings = ["model": model.folder, "text_encoder": model.pea?.encoder ?? "", "adapter": model.pea?.adapter ?? "",
                            "clip_skip": String(settings.clipSkip), "format": format.rawValue]
    for option in [O.variant, O.maxLength, BackendOptions.precision] {
        manifestSettings[String(option.name.dropFirst(2).map { $0 == "-" ? "_" : $0 })] = try options.optionalString(option) ?? ""
    }
    // What makes other images from the same --model; recorded only when given, so jobs that predate them still resume.
    for option in [O.config, O.tokenizer, O.predictionType, O.vae, BackendOptions.weights] where options.has(option) {
        manifestSettings[String(option.name.dropFirst(2).map { $0 == "-" ? "_" : $0 })] = try options.optionalString(option) ?? ""
    }
    if options.has(O.vaeTiling) { manifestSettings["vae_tiling"] = "yes" }
    // The LoRAs as given (FILE:SCALE, in order; the files' contents are not hashed).
    if options.has(O.lora) { manifestSettings["lora"] = options.strings(O.lora).joined(separator: "\n") }
    // The ControlNets as given (folders in order; their contents are not hashed), only with --controlnet.
    if !controls.folders.isEmpty {
        manifestSettings["controlnet"] = controls.folders.joined(separator: "\n")
        manifestSettings["control_scale"] = controls.scales.map { "\($0)" }.joined(separator: ",")
        manifestSettings["control_window"] = "\(controls.start)-\(controls.end)"
    }
    let manifest = JobManifest(items: items, baseSeed: baseSeed, settings: manifestSettings)
    let output = try JobOutput(folder: folder, manifest: manifest, items: items, shard: shard, format: format, overwrite: overwrite,
                               tarShardSize: jobTarShardSize)
    let mine = items.filter(shard.contains)
    let totalImages = mine.reduce(0) { $0 + $1.batch }
    let pending = mine.filter { !output.finishedItems.contains($0.index) }
    let shardNote = shard.count == 1 ? "" : " (shard \(shard))"
    guard !pending.isEmpty else {
        fputs("pea generate: nothing to do: all \(totalImages) images of \(file)\(shardNote) are in \(folder)\n", stderr)
        return
    }
    if output.imagesRecorded > 0 {
        fputs("pea generate: resuming: \(output.imagesRecorded) of \(totalImages) images\(shardNote) are already in \(folder)\n", stderr)
    }

    let pipeline = try model.load(options, scheduler: settings.scheduler, clipSkip: settings.clipSkip, selection: selection)
    let todo = try pending.map { item in
        var item = item
        if item.width == 0 { item.width = pipeline.defaultSize }
        if item.height == 0 { item.height = pipeline.defaultSize }
        let multiple = pipeline.sizeMultiple
        guard item.width % multiple == 0, item.height % multiple == 0 else {
            throw PEAError.invalidFile(path: file, reason: "line \(item.line): width and height must be multiples of \(multiple) for this model, got \(item.width)×\(item.height)")
        }
        return item
    }
    let controlnets = try controls.load(options, pipeline: pipeline)
    let batchSize = requestedBatchSize ?? defaultBatchSize(pipeline, items: todo)
    let batches = JobBatches.plan(todo, size: batchSize)

    // One scheduler per name: the folder's, or one of `SchedulerName` built from the folder's config.
    var schedulers: [String: any Scheduler] = [:]
    func scheduler(_ name: String?) throws -> any Scheduler {
        guard let name, name != settings.scheduler else { return pipeline.scheduler }
        if let made = schedulers[name] { return made }
        let made = try makeScheduler(name: name, config: pipeline.schedulerConfig)
        schedulers[name] = made
        return made
    }

    StopRequest.install()
    let progress = JobProgress(total: totalImages, done: output.imagesRecorded, batches: batches.count)
    let usesAdapter = model.pea != nil
    for (number, batch) in batches.enumerated() {
        let start = monotonicSeconds()
        let imageCount = batch.reduce(0) { $0 + $1.batch }
        let requests = try batch.map { item in
            var request = try item.loadedRequest()
            request.controls = controls.inputs(controlnets, images: try item.controlImages.map { try ImageDecoder.decodeRGB(path: $0) })
            return request
        }
        let images = try pipeline.generate(requests, scheduler: scheduler(batch[0].scheduler),
                                           progress: { progress.step(batch: number + 1, images: imageCount, $0, $1) }, warn: { printWarning($0) })
        let seconds = (monotonicSeconds() - start) / Double(imageCount)
        for ((item, request), itemImages) in zip(zip(batch, requests), images) {
            let sampler = a1111SamplerName(item.scheduler.flatMap(SchedulerName.init(rawValue:)), className: try scheduler(item.scheduler).className)
            let parameters = a1111Parameters(request, sampler: sampler, model: model.folder, family: pipeline.family)
            func record(_ image: Int) -> [String: JSONValue] {
                var json = JobOutput.itemJSON(item).objectValue!
                json["image"] = .number(Double(image))
                json["key"] = .string(item.imageKey(image))
                json["parameters"] = .string(parameters)
                json["seconds"] = .number((seconds * 1000).rounded() / 1000)
                return json
            }
            let completedShard = try output.write(item, images: itemImages, parameters: parameters, record: record, tarJSON: { image in
                // The captions `pea train --data` reads: text (the item's caption, else the prompt) and text_en
                // (the prompt, when it went through the English encoder).
                var json = record(image)
                json["text"] = .string(item.text ?? item.prompt)
                if !usesAdapter { json["text_en"] = .string(item.prompt) }
                return json
            })
            if format == .png { for image in 1...item.batch { print(joinPath(folder, item.imageKey(image) + ".png")) } }
            if let completedShard { print(completedShard) }
        }
        progress.finished(images: imageCount)
        if let signal = StopRequest.received {
            try finishTar(output)
            progress.end()
            fputs("pea generate: stopped by \(signal == SIGINT ? "SIGINT" : "SIGTERM") after batch \(number + 1) of \(batches.count): "
                  + "\(output.imagesRecorded) of \(totalImages) images\(shardNote) are in \(folder); run the same command again to go on\n", stderr)
            exit(128 + signal)   // the shell's status for a process that a signal stopped
        }
    }
    try finishTar(output)
    progress.end()
    fputs("pea generate: \(output.imagesRecorded) of \(totalImages) images\(shardNote) are in \(folder) (\(output.resultsPath))\n", stderr)
}

/// Img2img items without a width or height (their own or --width/--height) take their init image's, rounded
/// down to multiples of 8 as diffusers does. The images are read now, so that a missing or unreadable image or
/// mask fails the job before anything is written; the pipeline resizes them when the item runs.
private func sizedByInitImages(_ items: [JobItem], file: String) throws -> [JobItem] {
    try items.map { item in
        guard let path = item.initImage else { return item }
        var item = item
        let image = try ImageDecoder.decodeRGB(path: path)
        do {
            (item.width, item.height) = try VaeImageProcessor.outputSize(of: image, named: path, width: item.width == 0 ? nil : item.width,
                                                                         height: item.height == 0 ? nil : item.height)
        } catch PEAError.invalidFile(let image, let reason) {
            throw PEAError.invalidFile(path: file, reason: "line \(item.line): init image \(image): \(reason)")
        }
        if let maskPath = item.mask { _ = try ImageDecoder.decodeRGB(path: maskPath) }
        return item
    }
}

/// With --controlnet every item gives one control_image per ControlNet, and takes its size from the first as init
/// images set theirs (read now, so that a missing or unreadable image fails the job before anything is written; the
/// pipeline resizes them when the item runs); without it, no item may give one.
private func sizedByControlImages(_ items: [JobItem], file: String, controlnets: Int) throws -> [JobItem] {
    try items.map { item in
        func fail(_ reason: String) -> PEAError { .invalidFile(path: file, reason: "line \(item.line): \(reason)") }
        guard item.controlImages.count == controlnets else {
            throw fail(controlnets == 0 ? "'control_image' needs --controlnet DIR on the command line"
                : "\(item.controlImages.count) control_image(s) for \(controlnets) --controlnet (give one per ControlNet, in their order)")
        }
        guard controlnets > 0 else { return item }
        var item = item
        (item.width, item.height) = try ControlOptions.readImages(item.controlImages, width: item.width == 0 ? nil : item.width,
                                                                  height: item.height == 0 ? nil : item.height, fail: fail).size
        return item
    }
}

/// Completes the tar shard in progress and prints its path.
private func finishTar(_ output: JobOutput) throws {
    if let path = try output.finishTarShard() { print(path) }
}

/// --shard K/N, or auto from the job scheduler's environment; the whole file without it.
private func jobShard(_ options: ParsedOptions) throws -> JobShard {
    typealias O = GenerateOptions
    let shards = try options.optionalInt(O.shards)
    guard let text = try options.optionalString(O.shard) else {
        if shards != nil { throw PEAError.usage("generate: --shards goes with --shard auto") }
        return .whole
    }
    if text == "auto" {
        var environment = LaunchEnvironment.processEnvironment()
        for name in ["SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT", "JOB_COMPLETION_INDEX"] {
            if let value = getenv(name) { environment[name] = String(cString: value) }
        }
        return try JobShard.automatic(environment: environment, shards: shards)
    }
    if shards != nil { throw PEAError.usage("generate: --shards goes with --shard auto; --shard K/N gives the count itself") }
    return try JobShard.parse(text)
}

/// The batch size when none is given: 1 on the CPU (a batch is no faster there); on a GPU as many images as the
/// VAE decoder's largest buffers fit in half the device's memory, at most 8.
private func defaultBatchSize(_ pipeline: StableDiffusionPipeline, items: [JobItem]) -> Int {
    guard let memory = pipeline.backend.deviceMemoryBytes else { return 1 }
    let pixels = items.map { Double($0.width) * Double($0.height) }.max() ?? 1
    let perImage = StableDiffusionPipeline.decodeBytesPerPixel(pipeline.vae) * pixels
    return max(1, min(8, Int(memory / 2 / perImage)))
}

/// One progress line on stderr for the whole job: images done of the total, images/s of this run, ETA, and the
/// batch's step; redrawn in place on a terminal, printed every 5 s otherwise.
final class JobProgress {
    let total: Int
    let batches: Int
    let doneBefore: Int
    private(set) var done: Int
    let start = monotonicSeconds()
    let live = isatty(STDERR_FILENO) != 0
    private var lastPrinted = -Double.infinity
    private var stepText = ""
    /// The images of the batch in progress, counted by the share of its steps done: the rate and ETA move
    /// with every step, not only when a batch ends.
    private var inBatch = 0.0

    init(total: Int, done: Int, batches: Int) {
        self.total = total
        self.done = done
        doneBefore = done
        self.batches = batches
    }

    /// Step `step` of `steps` of batch `batch`, which makes `images` images.
    func step(batch: Int, images: Int, _ step: Int, _ steps: Int) {
        stepText = "batch \(batch)/\(batches) step \(step)/\(steps)"
        inBatch = Double(images) * Double(step) / Double(max(steps, 1))
        draw(force: false)
    }

    func finished(images: Int) {
        done += images
        inBatch = 0
        draw(force: false)
    }

    func end() {
        stepText = ""
        draw(force: true)
        if live { fputs("\n", stderr) }
    }

    var line: String {
        let elapsed = monotonicSeconds() - start
        let made = Double(done - doneBefore) + inBatch
        let rate = made / max(elapsed, 1e-9)
        // Slow jobs (a CPU, big images) read better as seconds per image.
        let speed = made == 0 ? "" : rate >= 1 ? "  \(formatted(rate)) images/s" : "  \(formatted(1 / rate)) s/image"
        let eta = made > 0 ? clock((Double(total - done) - inBatch) / rate) : "?"
        return "job: \(done)/\(total) images\(speed)  ETA \(eta)" + (stepText.isEmpty ? "" : "  (\(stepText))")
    }

    private func draw(force: Bool) {
        let now = monotonicSeconds()
        if live {
            fputs("\r\(line)\u{1B}[K", stderr)
        } else if force || now - lastPrinted >= 5 {
            fputs(line + "\n", stderr)
            lastPrinted = now
        }
    }
}
