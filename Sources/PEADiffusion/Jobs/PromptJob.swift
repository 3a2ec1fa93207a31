// A prompt file read as a job (`pea generate --prompts FILE --output-dir OUT`): its items with every setting
// resolved, the share of them one process takes (`--shard K/N`), and how they are grouped into batches.

/// One generation of a job: a prompt and every setting, defaults filled in. An item makes `batch` images from
/// one generator seeded with `seed`, exactly as `pea generate --prompt P --seed S --batch B` does.
public struct JobItem: Equatable, Sendable {
    /// 0-based position among the file's items (its non-empty lines).
    public var index: Int
    /// The file's line number, for messages.
    public var line: Int
    public var id: String?
    public var prompt: String
    public var negativePrompt: String?
    public var seed: UInt64
    /// 0: the model's native size, filled in once the model is loaded.
    public var width: Int
    public var height: Int
    public var steps: Int
    public var guidance: Float
    /// A `SchedulerName`, or nil for the model folder's own scheduler.
    public var scheduler: String?
    public var batch: Int
    /// A caption (`text`) carried into the tar shards' JSON for `pea train --data`, e.g. the prompt in the
    /// target language; generation does not read it.
    public var text: String?
    /// Image-to-image (`init_image`): the init image's path, a relative one resolved against the prompt file's
    /// folder; it is resized to the item's size, which defaults to its own rounded down to multiples of 8. nil:
    /// text-to-image.
    public var initImage: String? = nil
    /// A server request's init image and mask, decoded from its body, the mask already blurred (`initImage` and
    /// `mask` are nil then).
    public var initPixels: RGBImage? = nil
    public var maskPixels: RGBImage? = nil
    /// diffusers' `strength` for an image-to-image item.
    public var strength = 0.8
    /// Inpainting (`mask`, with `init_image`): the mask's path, resolved as `initImage`'s. nil: no mask.
    public var mask: String? = nil
    /// The blur (`mask_blur`, diffusers' `mask_processor.blur`) of a `mask` read from its file; nil: none.
    public var maskBlur: Double? = nil
    /// ControlNet (`control_image`): one control image path per ControlNet of the job (`--controlnet`), in their
    /// order, resolved as `initImage`'s; its size is the item's. Empty: none.
    public var controlImages: [String] = []
    /// A server request's ControlNets, their images decoded from its body (`controlImages` is empty then).
    public var controls: [Control] = []

    /// One ControlNet of a server request: which of the server's ControlNets (`net`, its index), the image and
    /// diffusers' scale and guidance window, as a `ControlInput` without the model.
    public struct Control: Equatable, Sendable {
        public var net: Int
        public var image: RGBImage
        public var scale, start, end: Double

        public init(net: Int, image: RGBImage, scale: Double, start: Double, end: Double) {
            self.net = net
            self.image = image
            self.scale = scale
            self.start = start
            self.end = end
        }

        /// What items denoised together must share: the pipeline takes one image per item, but one set of
        /// ControlNets, scales and windows per batch.
        struct Key: Hashable {
            let net: Int
            let scale, start, end: Double
        }

        var key: Key { Key(net: net, scale: scale, start: start, end: end) }
    }

    /// Whether the item starts from an init image (`initImage` or `initPixels`).
    public var isImageToImage: Bool { initImage != nil || initPixels != nil }

    /// The name of the item's outputs: its id, or its index in six digits.
    public var key: String { id ?? JobItem.indexKey(index) }

    /// The name of image `image` (1-based) of the item: the key, with `-N` when the item makes several.
    public func imageKey(_ image: Int) -> String { batch == 1 ? key : "\(key)-\(image)" }

    static func indexKey(_ index: Int) -> String {
        let digits = String(index)
        return String(repeating: "0", count: max(0, 6 - digits.count)) + digits
    }

    /// The request for the pipeline, without an init image still in a file (`loadedRequest` reads it).
    public var request: GenerationRequest {
        var request = GenerationRequest(prompt: prompt, negativePrompt: negativePrompt, width: width, height: height)
        request.steps = steps
        request.guidance = guidance
        request.seed = seed
        request.imagesPerPrompt = batch
        request.strength = strength
        request.initImage = initPixels
        request.mask = maskPixels
        return request
    }

    /// `request` with the init image (and mask) of an img2img (inpainting) item decoded.
    public func loadedRequest() throws -> GenerationRequest {
        var request = self.request
        if let initImage { request.initImage = try ImageDecoder.decodeRGB(path: initImage) }
        if let mask { request.mask = VaeImageProcessor.blur(try ImageDecoder.decodeRGB(path: mask), radius: maskBlur ?? 0) }
        return request
    }

    /// Items that may be denoised together: same size, steps, guidance and scheduler, for img2img the same
    /// strength (nil: text-to-image) and the same kind (inpainting or not), and the same ControlNet settings.
    public struct BatchKey: Hashable {
        let width, height, steps: Int
        let guidance: Float
        let scheduler: String?
        var strength: Double? = nil
        var masked = false
        var controls: [Control.Key] = []
    }

    public var batchKey: BatchKey {
        BatchKey(width: width, height: height, steps: steps, guidance: guidance, scheduler: scheduler,
                 strength: isImageToImage ? strength : nil, masked: mask != nil || maskPixels != nil, controls: controls.map(\.key))
    }
}

/// The settings of the command line that items without their own take.
public struct JobDefaults: Equatable, Sendable {
    public var negativePrompt: String?
    /// Items without a seed get `baseSeed + index` (wrapping at 2⁶⁴).
    public var baseSeed: UInt64
    /// 0: the model's native size.
    public var width: Int
    public var height: Int
    public var steps: Int
    public var guidance: Float
    public var scheduler: String?
    public var batch: Int
    /// The strength of items with an `init_image` that give none.
    public var strength: Double
    /// The strength of items with a `mask` that give none: diffusers' inpainting default 1.0, unless the command
    /// line's --strength is set.
    public var inpaintStrength = GenerationRequest.inpaintingStrength
    /// The mask blur of items with a `mask` that give none (--mask-blur); nil: none.
    public var maskBlur: Double? = nil

    public init(negativePrompt: String?, baseSeed: UInt64, width: Int, height: Int, steps: Int, guidance: Float,
                scheduler: String?, batch: Int, strength: Double = 0.8) {
        self.strength = strength
        self.negativePrompt = negativePrompt
        self.baseSeed = baseSeed
        self.width = width
        self.height = height
        self.steps = steps
        self.guidance = guidance
        self.scheduler = scheduler
        self.batch = batch
    }
}

/// Reading a prompt file: `.jsonl` (one JSON object per line) or any other name as text (one prompt per line).
/// Empty lines are skipped in both; errors name the file and the line.
public enum PromptFile {
    /// The fields a `.jsonl` item may have.
    public static let fields = ["prompt", "id", "negative_prompt", "seed", "width", "height", "steps", "guidance",
                                "scheduler", "batch", "text", "init_image", "strength", "mask", "mask_blur", "control_image"]
    /// The longest id: ids name files and tar members (with a `-N` suffix and an extension).
    public static let maximumIDLength = 80
    /// The most images one item may ask for (as `--batch`).
    public static let maximumBatch = 64

    public static func read(path: String, defaults: JobDefaults) throws -> [JobItem] {
        guard !isDirectory(path) else {
            throw PEAError.invalidFile(path: path, reason: "is a directory; --prompts expects a .txt file (one prompt a line) or a .jsonl file")
        }
        let bytes = try readWholeFile(path)
        guard let text = String(validating: bytes, as: UTF8.self) else { throw PEAError.invalidFile(path: path, reason: "not UTF-8 text") }
        return try parse(text, path: path, jsonLines: path.lowercased().hasSuffix(".jsonl"), defaults: defaults)
    }

    public static func parse(_ text: String, path: String, jsonLines: Bool, defaults: JobDefaults) throws -> [JobItem] {
        var items: [JobItem] = [], ids: [String: Int] = [:]
        for (offset, rawLine) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = String(rawLine).trimmingWhitespace()
            guard !line.isEmpty else { continue }
            let number = offset + 1
            func fail(_ reason: String) -> PEAError { .invalidFile(path: path, reason: "line \(number): \(reason)") }
            var item = JobItem(index: items.count, line: number, id: nil, prompt: line, negativePrompt: defaults.negativePrompt,
                               seed: defaults.baseSeed &+ UInt64(items.count), width: defaults.width, height: defaults.height,
                               steps: defaults.steps, guidance: defaults.guidance, scheduler: defaults.scheduler,
                               batch: defaults.batch, text: nil, strength: defaults.strength)
            if jsonLines {
                let value: JSONValue
                do { value = try JSONValue.parse(line) } catch { throw fail("not JSON: \(error)") }
                guard let object = value.objectValue else { throw fail("expected a JSON object, got \(value.kindDescription)") }
                try apply(object, to: &item, defaults: defaults, fail: fail)
                if let image = item.initImage, !image.hasPrefix("/") { item.initImage = joinPath(parentFolder(path), image) }
                if let mask = item.mask, !mask.hasPrefix("/") { item.mask = joinPath(parentFolder(path), mask) }
                item.controlImages = item.controlImages.map { $0.hasPrefix("/") ? $0 : joinPath(parentFolder(path), $0) }
            }
            if let id = item.id {
                if let first = ids[id] { throw fail("id '\(id)' is already the id of line \(first)") }
                ids[id] = number
            }
            items.append(item)
        }
        guard !items.isEmpty else { throw PEAError.invalidFile(path: path, reason: "no prompts (the file is empty)") }
        return items
    }

    private static func apply(_ object: [String: JSONValue], to item: inout JobItem, defaults: JobDefaults,
                              fail: (String) -> PEAError) throws {
        if let unknown = object.keys.sorted().first(where: { !fields.contains($0) }) {
            throw fail("unknown field '\(unknown)'; an item may have \(fields.joined(separator: ", "))")
        }
        func string(_ key: String) throws -> String? {
            guard let value = object[key], !value.isNull else { return nil }
            guard let text = value.stringValue else { throw fail("'\(key)' must be a string, got \(value.kindDescription)") }
            return text
        }
        func integer(_ key: String, _ range: ClosedRange<Int>) throws -> Int? {
            guard let value = object[key], !value.isNull else { return nil }
            guard let number = value.doubleValue, number.rounded() == number, number >= Double(range.lowerBound),
                  number <= Double(range.upperBound) else {
                throw fail("'\(key)' must be an integer in \(range.lowerBound)...\(range.upperBound), got \(value.serialized())")
            }
            return Int(number)
        }
        guard let prompt = try string("prompt"), !prompt.isEmpty else { throw fail("'prompt' is missing or empty") }
        item.prompt = prompt
        if let id = try string("id") {
            let allowed = id.utf8.allSatisfy { ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x41 && $0 <= 0x5A) || ($0 >= 0x61 && $0 <= 0x7A) || $0 == 0x5F || $0 == 0x2D }
            guard !id.isEmpty, id.utf8.count <= maximumIDLength, allowed else {
                throw fail("'id' must be 1 to \(maximumIDLength) characters of A–Z, a–z, 0–9, '_' and '-' (it names files), got '\(id)'")
            }
            item.id = id
        }
        if object["negative_prompt"] != nil { item.negativePrompt = try string("negative_prompt") }
        if let seed = object["seed"], !seed.isNull {
            // JSON numbers are doubles here: integers up to 2⁵³ are exact.
            guard let number = seed.doubleValue, number.rounded() == number, number >= 0, number <= 9_007_199_254_740_992 else {
                throw fail("'seed' must be an integer in 0...2^53, got \(seed.serialized())")
            }
            item.seed = UInt64(number)
        }
        for (key, size) in [("width", \JobItem.width), ("height", \JobItem.height)] {
            guard let value = try integer(key, 8...16384) else { continue }
            guard value % 8 == 0 else { throw fail("'\(key)' must be a multiple of 8, got \(value)") }
            item[keyPath: size] = value
        }
        item.steps = try integer("steps", 1...1000) ?? item.steps
        item.batch = try integer("batch", 1...maximumBatch) ?? item.batch
        if let value = object["guidance"], !value.isNull {
            guard let guidance = value.doubleValue, guidance.isFinite, abs(guidance) <= 1e6 else {
                throw fail("'guidance' must be a finite number, got \(value.serialized())")
            }
            item.guidance = Float(guidance)
        }
        if let scheduler = try string("scheduler") {
            guard SchedulerName(rawValue: scheduler) != nil else {
                throw fail("unknown scheduler '\(scheduler)'; one of \(SchedulerName.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            item.scheduler = scheduler
        }
        item.text = try string("text")
        if object["init_image"] != nil {
            guard let image = try string("init_image"), !image.isEmpty else { throw fail("'init_image' must be a non-empty path") }
            item.initImage = image
        }
        if object["mask"] != nil {
            guard let mask = try string("mask"), !mask.isEmpty else { throw fail("'mask' must be a non-empty path") }
            guard item.initImage != nil else { throw fail("'mask' goes with 'init_image' (the image to inpaint)") }
            item.mask = mask
            item.strength = defaults.inpaintStrength
            item.maskBlur = defaults.maskBlur
        }
        if let value = object["mask_blur"], !value.isNull {
            guard item.mask != nil else { throw fail("'mask_blur' goes with 'mask'") }
            guard let blur = value.doubleValue else { throw fail("'mask_blur' must be a number, got \(value.serialized())") }
            do { item.maskBlur = try VaeImageProcessor.checkedBlur(blur, name: "'mask_blur'") } catch PEAError.usage(let reason) { throw fail(reason) }
        }
        if let value = object["strength"], !value.isNull {
            guard item.initImage != nil else { throw fail("'strength' goes with 'init_image'") }
            guard let strength = value.doubleValue, strength > 0, strength <= 1 else {
                throw fail("'strength' must be a number in (0, 1], got \(value.serialized())")
            }
            item.strength = strength
        }
        if let value = object["control_image"], !value.isNull {
            let paths: [String?]
            switch value {
            case .string(let path): paths = [path]
            case .array(let entries): paths = entries.map(\.stringValue)
            default: paths = []
            }
            guard !paths.isEmpty, paths.allSatisfy({ !($0 ?? "").isEmpty }) else {
                throw fail("'control_image' must be a path or a list of paths (one per --controlnet), got \(value.serialized())")
            }
            guard item.initImage == nil else { throw fail("'control_image' does not go with 'init_image' (ControlNet is text-to-image only)") }
            item.controlImages = paths.map { $0! }
        }
        if item.initImage != nil {
            do { _ = try StableDiffusionPipeline.img2imgBeginIndex(steps: item.steps, strength: item.strength) } catch PEAError.usage(let reason) {
                throw fail(reason)
            }
        }
    }
}

/// The share of a job one process takes: items whose index is `index` modulo `count`, so the shards of a job
/// together hold every item once, and each shard holds items from the whole file.
public struct JobShard: Equatable, Sendable, CustomStringConvertible {
    public let index: Int
    public let count: Int

    public static let whole = JobShard(index: 0, count: 1)

    public init(index: Int, count: Int) {
        self.index = index
        self.count = count
    }

    public var description: String { "\(index)/\(count)" }

    public func contains(_ item: JobItem) -> Bool { item.index % count == index }

    /// `K/N` with 0 ≤ K < N.
    public static func parse(_ text: String) throws -> JobShard {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, let k = Int(parts[0]), let n = Int(parts[1]), n >= 1, n <= 1_000_000, k >= 0, k < n else {
            throw PEAError.usage("generate: --shard expects K/N with 0 ≤ K < N (e.g. 0/4), or auto; got '\(text)'")
        }
        return JobShard(index: k, count: n)
    }

    /// The shard a job scheduler assigns: a Slurm job array (SLURM_ARRAY_TASK_ID − SLURM_ARRAY_TASK_MIN of
    /// SLURM_ARRAY_TASK_COUNT), or a Kubernetes Indexed Job (JOB_COMPLETION_INDEX, with the count given as
    /// `shards`, the Job's `completions`), and within it the rank of a launcher's job (mpirun, srun:
    /// `LaunchEnvironment`), so `srun -n 16 pea generate …` covers 16 GPUs; a launcher's job alone is shard rank of
    /// its size. No MPI is involved: the launcher's variables say everything.
    public static func automatic(environment: [String: String], shards: Int?) throws -> JobShard {
        let launch = try LaunchEnvironment.detect(environment)
        guard let launch, launch.size > 1 else { return try scheduled(environment: environment, shards: shards) }
        let inScheduledJob = environment["SLURM_ARRAY_TASK_ID"] != nil || environment["JOB_COMPLETION_INDEX"] != nil
        let outer = inScheduledJob ? try scheduled(environment: environment, shards: shards) : .whole
        return JobShard(index: outer.index * launch.size + launch.rank, count: outer.count * launch.size)
    }

    /// The job array's or Indexed Job's shard (see `automatic`).
    static func scheduled(environment: [String: String], shards: Int?) throws -> JobShard {
        func number(_ name: String) throws -> Int? {
            guard let text = environment[name] else { return nil }
            guard let value = Int(text) else { throw PEAError.usage("generate: --shard auto: \(name)='\(text)' is not an integer") }
            return value
        }
        if let task = try number("SLURM_ARRAY_TASK_ID") {
            guard let count = try number("SLURM_ARRAY_TASK_COUNT") else {
                throw PEAError.usage("generate: --shard auto: SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not")
            }
            let minimum = try number("SLURM_ARRAY_TASK_MIN") ?? 0
            let index = task - minimum
            guard count >= 1, index >= 0, index < count else {
                throw PEAError.usage("generate: --shard auto: Slurm array task \(task) (min \(minimum)) is outside an array of \(count) tasks; "
                    + "give the array a contiguous range (e.g. --array=0-\(max(count, 1) - 1)) or use --shard K/N")
            }
            if let shards, shards != count {
                throw PEAError.usage("generate: --shards \(shards) disagrees with the Slurm array's \(count) tasks")
            }
            return JobShard(index: index, count: count)
        }
        if let index = try number("JOB_COMPLETION_INDEX") {
            guard let shards else {
                throw PEAError.usage("generate: --shard auto in a Kubernetes Indexed Job needs --shards N (the Job's completions)")
            }
            guard index >= 0, index < shards else {
                throw PEAError.usage("generate: --shard auto: JOB_COMPLETION_INDEX \(index) is outside --shards \(shards)")
            }
            return JobShard(index: index, count: shards)
        }
        throw PEAError.usage("generate: --shard auto found neither a Slurm job array (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT), "
            + "a Kubernetes Indexed Job (JOB_COMPLETION_INDEX) nor a launcher's job of several processes (mpirun, srun); give --shard K/N")
    }
}

public enum JobBatches {
    /// Groups `items` into batches of up to `size` images: items that can be denoised together (same
    /// `batchKey`), in order of index within a group and groups in order of first appearance. An item is never
    /// split, so an item of more than `size` images is a batch of its own.
    public static func plan(_ items: [JobItem], size: Int) -> [[JobItem]] {
        var groups: [JobItem.BatchKey: [JobItem]] = [:], order: [JobItem.BatchKey] = []
        for item in items {
            if groups[item.batchKey] == nil { order.append(item.batchKey) }
            groups[item.batchKey, default: []].append(item)
        }
        var batches: [[JobItem]] = []
        for key in order {
            var current: [JobItem] = [], images = 0
            for item in groups[key]! {
                if !current.isEmpty, images + item.batch > size {
                    batches.append(current)
                    current = []
                    images = 0
                }
                current.append(item)
                images += item.batch
            }
            if !current.isEmpty { batches.append(current) }
        }
        return batches
    }
}
