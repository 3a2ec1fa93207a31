#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// `pea serve`: the HTTP endpoints over a loaded pipeline, with requests batched by a `GenerationQueue`.
///
/// - `POST /sdapi/v1/txt2img`, `POST /sdapi/v1/img2img`: A1111's API subset (see `parseA1111`).
/// - `POST /v1/images/generations`: OpenAI's images API subset (see `parseOpenAI`).
/// - `GET /health`, `GET /metrics`.
///
/// Image `i` (0-based) of a request with seed `S` is the image `pea generate --seed S+i` makes with the same
/// settings: each image is a `JobItem` of one image, as a prompt file's item, batched by the same rule.
public final class GenerationServer: @unchecked Sendable {
    public struct Configuration: Sendable {
        public var host = "127.0.0.1"
        public var port = 7860
        public var maxBatch = 1
        public var maxQueue = 64
        public var batchWait = 0.0
        /// With a key, every request needs `Authorization: Bearer KEY`.
        public var apiKey: String?
        /// The largest width or height a request may ask for.
        public var maxSize = 2048
        public var maxSteps = 150
        /// The most images one request may ask for (batch_size × n_iter, n).
        public var maxImages = 16
        public var http = HTTPServer.Configuration(requestTimeout: 30)

        public init() {}
    }

    /// The pipelines a request may choose by its `text_encoder` field: "adapter" (PEA) and/or "english".
    public struct Model {
        public var pipelines: [String: StableDiffusionPipeline]
        public var defaultChoice: String
        /// The model folder as given, named in each PNG's parameters.
        public var folder: String
        public var backendName: String
        /// The ControlNets requests may name (`pea serve --controlnet`), by their folder's basename, in order.
        public var controlnets: [(name: String, model: ControlNetModel)]

        public init(pipelines: [String: StableDiffusionPipeline], defaultChoice: String, folder: String, backendName: String,
                    controlnets: [(name: String, model: ControlNetModel)] = []) {
            self.pipelines = pipelines
            self.controlnets = controlnets
            self.defaultChoice = defaultChoice
            self.folder = folder
            self.backendName = backendName
        }
    }

    public let configuration: Configuration
    public let model: Model
    public let metrics = ServeMetrics()
    private var queue: GenerationQueue!
    private var http: HTTPServer!
    /// Schedulers by name, made from the folder's config; used on the queue's thread only.
    private var schedulers: [String: any Scheduler] = [:]
    private let seedLock = PThreadLock()
    private var seedSource: SplitMix64
    private let anyPipeline: StableDiffusionPipeline

    /// The port listened on (the system's choice for port 0).
    public var port: Int { http.port }

    public init(model: Model, configuration: Configuration, warn: @escaping (String) -> Void = { _ in }) throws {
        precondition(model.pipelines[model.defaultChoice] != nil)
        self.model = model
        self.configuration = configuration
        anyPipeline = model.pipelines[model.defaultChoice]!
        seedSource = SplitMix64(seed: UInt64(UInt(bitPattern: time(nil))) ^ UInt64(getpid()) << 32 ^ UInt64(UInt(bitPattern: Int(monotonicSeconds() * 1e9))))
        queue = try GenerationQueue(maxBatch: configuration.maxBatch, maxQueue: configuration.maxQueue,
                                    batchWait: configuration.batchWait) { [unowned self] items, choice in
            let pipeline = self.model.pipelines[choice]!
            let requests = items.map { item in
                var request = item.request
                request.controls = item.controls.map {
                    ControlInput(controlnet: self.model.controlnets[$0.net].model, image: $0.image, scale: $0.scale, start: $0.start, end: $0.end)
                }
                return request
            }
            return try pipeline.generate(requests, scheduler: self.scheduler(items[0].scheduler, pipeline), warn: warn)
        }
        queue.onBatch = { [metrics] images, succeeded in metrics.batch(images: images, succeeded: succeeded) }
        queue.onCancel = { [metrics] in metrics.requestCancelled() }
        do {
            http = try HTTPServer(host: configuration.host, port: configuration.port, configuration: configuration.http) { [unowned self] request in
                self.handle(request)
            }
        } catch {
            queue.stop()
            throw error
        }
    }

    /// Requests waiting for their generation to start.
    public var queueDepth: Int { queue.depth }

    /// Stops accepting connections, answers the requests in progress (their generations finish), then stops
    /// the queue. Only the first call does anything.
    public func stop() {
        http.stop()
        queue.stop()
    }

    private func scheduler(_ name: String?, _ pipeline: StableDiffusionPipeline) throws -> any Scheduler {
        guard let name else { return pipeline.scheduler }
        if let made = schedulers[name] { return made }
        let made = try makeScheduler(name: name, config: pipeline.schedulerConfig)
        schedulers[name] = made
        return made
    }

    private func randomSeed() -> UInt64 {
        seedLock.withLock { seedSource.next() >> 32 }   // as `pea generate` draws its random seeds: 32 bits
    }

    // MARK: - Routing

    static let endpoints = ["/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/images/generations", "/health", "/metrics"]

    func handle(_ request: HTTPRequest) -> HTTPResponse {
        let start = monotonicSeconds()
        let response = route(request)
        let endpoint = GenerationServer.endpoints.contains(request.path) ? request.path : "other"
        metrics.request(endpoint: endpoint, status: response.status, seconds: monotonicSeconds() - start)
        return response
    }

    private func route(_ request: HTTPRequest) -> HTTPResponse {
        if let key = configuration.apiKey, !GenerationServer.authorized(request.headers["Authorization"], key: key) {
            var response = errorResponse(401, "missing or wrong API key: send 'Authorization: Bearer KEY'")
            response.headers.add("WWW-Authenticate", "Bearer")
            return response
        }
        let method: String
        switch request.path {
        case "/health", "/metrics": method = "GET"
        case "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/images/generations": method = "POST"
        default: return errorResponse(404, "no endpoint \(request.path) (endpoints: \(GenerationServer.endpoints.joined(separator: ", ")))")
        }
        guard request.method == method || (method == "GET" && request.method == "HEAD") else {
            var response = errorResponse(405, "\(request.path) takes \(method)")
            response.headers.add("Allow", method)
            return response
        }
        switch request.path {
        case "/health":
            return .json(.object(["status": .string("ok"), "model": .string(model.folder), "backend": .string(model.backendName),
                                  "queue_depth": .number(Double(queueDepth)),
                                  "text_encoders": .array(model.pipelines.keys.sorted().map { .string($0) }),
                                  "controlnets": .array(model.controlnets.map { .string($0.name) })]))
        case "/metrics":
            var response = HTTPResponse.text(metrics.text(queueDepth: queueDepth))
            response.headers = HTTPHeaders([HTTPField(name: "Content-Type", value: "text/plain; version=0.0.4; charset=utf-8")])
            return response
        default:
            do {
                let object = try jsonObject(request.body)
                let a1111 = request.path.hasPrefix("/sdapi/")
                let parsed = a1111 ? try parseA1111(object, imageToImage: request.path == "/sdapi/v1/img2img") : try parseOpenAI(object)
                let images = try queue.submit(parsed.items, choice: parsed.choice, cancelled: HTTPServer.clientHasHungUp)
                let pngs = try encode(parsed.items, images, choice: parsed.choice)
                return a1111 ? a1111Response(object, parsed, pngs) : openAIResponse(pngs)
            } catch let error as RequestError {
                return errorResponse(400, error.message)
            } catch GenerationQueue.Refusal.full {
                var response = errorResponse(503, "the queue is full (\(configuration.maxQueue) requests waiting); retry later")
                response.headers.add("Retry-After", "1")
                return response
            } catch GenerationQueue.Refusal.stopped {
                return errorResponse(503, "the server is stopping")
            } catch GenerationQueue.Refusal.cancelled {
                // Nobody reads it: the client has gone. 499 is nginx's "client closed request", for the metrics.
                return errorResponse(499, "the client closed the connection; its queued images were dropped")
            } catch GenerationQueue.Refusal.failed(let message) {
                return errorResponse(500, "generation failed: \(message)")
            } catch {
                return errorResponse(500, "\(error)")
            }
        }
    }

    private func errorResponse(_ status: Int, _ message: String) -> HTTPResponse {
        .json(.object(["error": .string(message)]), status: status)
    }

    /// Whether `header` is `Bearer KEY`, compared in time independent of where the bytes differ.
    static func authorized(_ header: String?, key: String) -> Bool {
        let given = Array((header ?? "").utf8), expected = Array("Bearer \(key)".utf8)
        var difference = UInt8(given.count == expected.count ? 0 : 1)
        for index in 0..<expected.count {
            difference |= expected[index] ^ (index < given.count ? given[index] : 0)
        }
        return difference == 0
    }

    // MARK: - Requests

    struct RequestError: Error { let message: String }

    struct Parsed {
        var items: [JobItem]
        var choice: String
        var seed: UInt64
        var samplerLabel: String
    }

    private func jsonObject(_ body: [UInt8]) throws -> [String: JSONValue] {
        let value: JSONValue
        do { value = try JSONValue.parse(body) } catch {
            throw RequestError(message: "the body is not JSON: \(error)")
        }
        guard let object = value.objectValue else { throw RequestError(message: "the body must be a JSON object, got \(value.kindDescription)") }
        return object
    }

    /// Typed reads of a request's fields; a wrong type or value is a `RequestError` naming the field.
    struct Fields {
        let object: [String: JSONValue]
        /// What errors put before a key: "" for the body's own fields, "alwayson_scripts.controlnet.args[0]." for a unit's.
        var prefix = ""

        func value(_ key: String) -> JSONValue? {
            guard let value = object[key], !value.isNull else { return nil }
            return value
        }

        func string(_ key: String) throws -> String? {
            guard let value = value(key) else { return nil }
            guard let text = value.stringValue else { throw RequestError(message: "\(prefix)\(key) must be a string, got \(value.kindDescription)") }
            return text
        }

        func integer(_ key: String, _ range: ClosedRange<Int>) throws -> Int? {
            guard let value = value(key) else { return nil }
            guard let number = value.intValue else { throw RequestError(message: "\(prefix)\(key) must be an integer, got \(value.serialized())") }
            guard range.contains(number) else { throw RequestError(message: "\(prefix)\(key) must be in \(range.lowerBound)...\(range.upperBound), got \(number)") }
            return number
        }

        func number(_ key: String, _ range: ClosedRange<Double>) throws -> Float? {
            try double(key, range).map(Float.init)
        }

        func double(_ key: String, _ range: ClosedRange<Double>) throws -> Double? {
            guard let value = value(key) else { return nil }
            guard let number = value.doubleValue else { throw RequestError(message: "\(prefix)\(key) must be a number, got \(value.kindDescription)") }
            guard range.contains(number) else { throw RequestError(message: "\(prefix)\(key) must be in \(range.lowerBound)...\(range.upperBound), got \(number)") }
            return number
        }
    }

    private func size(_ value: Int?, _ key: String) throws -> Int {
        let size = value ?? anyPipeline.defaultSize
        let multiple = anyPipeline.sizeMultiple
        guard size % multiple == 0 else { throw RequestError(message: "\(key) must be a multiple of \(multiple), got \(size)") }
        return size
    }

    /// Seed -1 (or none): a random one.
    private func seed(_ fields: Fields) throws -> UInt64 {
        guard let seed = try fields.integer("seed", -1...(1 << 53)), seed >= 0 else { return randomSeed() }
        return UInt64(seed)
    }

    private func choice(_ fields: Fields) throws -> String {
        guard let name = try fields.string("text_encoder") else { return model.defaultChoice }
        guard model.pipelines[name] != nil else {
            throw RequestError(message: "text_encoder must be one of \(model.pipelines.keys.sorted().joined(separator: ", ")) for this server, got '\(name)'")
        }
        return name
    }

    /// One item per image, seeds `seed`, `seed`+1, …
    private func items(prompt: String, negativePrompt: String?, seed: UInt64, count: Int, width: Int, height: Int,
                       steps: Int, guidance: Float, scheduler: String?, initImage: InitImage?, controls: [JobItem.Control]) -> [JobItem] {
        (0..<count).map { number in
            var item = JobItem(index: 0, line: 0, id: nil, prompt: prompt, negativePrompt: negativePrompt, seed: seed &+ UInt64(number),
                               width: width, height: height, steps: steps, guidance: guidance, scheduler: scheduler, batch: 1, text: nil)
            if let initImage {
                item.initPixels = initImage.image
                item.maskPixels = initImage.mask
                item.strength = initImage.strength
            }
            item.controls = controls
            return item
        }
    }

    struct InitImage {
        var image: RGBImage
        /// Blurred by `mask_blur`; the pipeline resizes both to `size`.
        var mask: RGBImage?
        var strength: Double
        var size: (width: Int, height: Int)
    }

    /// A base64 PNG or JPEG of a request (a `data:` URL prefix allowed), decoded; `field` names it in errors.
    private func decodedImage(_ value: JSONValue?, _ field: String) throws -> RGBImage {
        guard var text = value?.stringValue else { throw RequestError(message: "\(field) must be a base64 image (a string)") }
        if text.hasPrefix("data:"), let comma = text.firstIndex(of: ",") { text = String(text[text.index(after: comma)...]) }
        guard let bytes = base64Decoded(text) else { throw RequestError(message: "\(field) is not base64") }
        do {
            return try bytes.withUnsafeBytes { try ImageDecoder.decodeRGB($0, name: field) }
        } catch {
            throw RequestError(message: "\(error)")
        }
    }

    /// `init_images` (one base64 PNG or JPEG of any size), `denoising_strength` (A1111's default 0.75) and, for
    /// inpainting, `mask` (white repainted, black kept; any size) with `inpainting_mask_invert` (1: the other way
    /// round) and `mask_blur` of an img2img request. Both images are Lanczos-resized to width×height, by default
    /// the init image's size rounded down to multiples of 8 (diffusers'; A1111 defaults width and height to 512
    /// and resizes per its resize_mode, which Pea does not read). `mask_blur` R is diffusers' mask_processor.blur(mask, R):
    /// Pillow's GaussianBlur(R) after the inversion (A1111's order), and the mask is then binarised as diffusers'
    /// inpainting pipeline does; A1111 instead blurs with OpenCV (σ = R, kernel 2·int(2.5R + 0.5) + 1) and keeps
    /// the soft mask for blending, and defaults to R = 4 where Pea's default is no blur. Its other inpainting
    /// fields (mask_blur_x/y, inpainting_fill, inpaint_full_res) are not applied.
    private func initImage(_ fields: Fields, width: Int?, height: Int?, steps: Int) throws -> InitImage {
        guard let value = fields.value("init_images") else { throw RequestError(message: "init_images is required (one base64 image)") }
        guard let list = value.arrayValue, list.count == 1 else {
            throw RequestError(message: "init_images must be a list of one base64 image, got \(value.kindDescription)")
        }
        let image = try decodedImage(list[0], "init_images[0]")
        let size = try outputSize(of: image, "init_images[0]", width: width, height: height)
        var mask: RGBImage?
        let blur = try fields.double("mask_blur", 0...VaeImageProcessor.maximumBlur)
        if let value = fields.value("mask") {
            var decoded = try decodedImage(value, "mask")
            if try fields.integer("inpainting_mask_invert", 0...1) == 1 { decoded.pixels = decoded.pixels.map { 255 - $0 } }
            mask = VaeImageProcessor.blur(decoded, radius: blur ?? 0)
        }   // without a mask, mask_blur is ignored, as A1111 does (its clients send it with every img2img request)
        let strength = try fields.double("denoising_strength", 0...1) ?? 0.75
        guard strength > 0 else { throw RequestError(message: "denoising_strength must be in (0, 1], got 0") }
        do { _ = try StableDiffusionPipeline.img2imgBeginIndex(steps: steps, strength: strength) } catch PEAError.usage(let reason) {
            throw RequestError(message: "denoising_strength: \(reason)")
        }
        return InitImage(image: image, mask: mask, strength: strength, size: size)
    }

    /// sd-webui-controlnet's resize modes (names and numbers), accepted: each leaves an image of the output's size as
    /// it is, and Pea resizes any other as diffusers does (stretching it, the extension's "Just Resize").
    static let resizeModes: [JSONValue] = ["Just Resize", "Crop and Resize", "Resize and Fill", "Inner Fit (Scale to Fit)",
                                           "Outer Fit (Shrink to Fit)", "Envelope (Outer Fit)"].map(JSONValue.string)
        + [0, 1, 2].map { JSONValue.number(Double($0)) }

    /// `alwayson_scripts.controlnet.args` (sd-webui-controlnet's API; the script's name in any case): each unit with
    /// `enabled` (true) names one of the server's ControlNets by `model` (its folder's basename, A1111's " [hash]"
    /// suffix allowed, or its index) and gives `image` (or `input_image`): a base64 control image, already
    /// preprocessed (`module` "none"), of any size: the first unit's, rounded down to multiples of 8, is the output's
    /// unless width/height are given, and every image is Lanczos-resized to the output's size (as `pea generate`);
    /// `resize_mode` is accepted but every mode resizes so; `weight`
    /// (1), `guidance_start` (0) and `guidance_end` (1) are diffusers' scale and window. `control_mode` Balanced is
    /// diffusers' pipeline; its other modes, masks and guess mode are refused. The unit's other fields
    /// (processor_res, threshold_a/b, pixel_perfect: the preprocessor's; low_vram; hr_option: hires fix) change
    /// nothing Pea does and are ignored.
    private func controls(_ fields: Fields, width: Int?, height: Int?, imageToImage: Bool)
        throws -> (units: [JobItem.Control], size: (width: Int, height: Int)?) {
        guard let scripts = fields.value("alwayson_scripts") else { return ([], nil) }
        guard let scriptObject = scripts.objectValue else {
            throw RequestError(message: "alwayson_scripts must be an object, got \(scripts.kindDescription)")
        }
        guard let script = scriptObject.first(where: { $0.key.lowercased() == "controlnet" })?.value, !script.isNull else { return ([], nil) }
        let argsValue = script.objectValue.map { $0["args"] ?? .null } ?? script
        guard let args = argsValue.isNull ? [] : argsValue.arrayValue else {
            throw RequestError(message: "alwayson_scripts.controlnet.args must be a list of ControlNet units, got \(argsValue.kindDescription)")
        }
        var controls: [JobItem.Control] = []
        var firstName: String?   // the first unit's image field, named in size errors
        for (k, arg) in args.enumerated() {
            let field = "alwayson_scripts.controlnet.args[\(k)]"
            guard let unit = arg.objectValue else { throw RequestError(message: "\(field) must be an object, got \(arg.kindDescription)") }
            let fields = Fields(object: unit, prefix: field + ".")
            if let enabled = fields.value("enabled") {
                guard let on = enabled.boolValue else { throw RequestError(message: "\(field).enabled must be true or false, got \(enabled.serialized())") }
                if !on { continue }
            }
            guard !model.controlnets.isEmpty else {
                throw RequestError(message: "\(field): this server has no ControlNets (start pea serve with --controlnet DIR)")
            }
            if imageToImage {
                throw RequestError(message: "\(field): ControlNet is text-to-image only in Pea: send it to /sdapi/v1/txt2img")
            }
            if let module = try fields.string("module"), module.lowercased() != "none" {
                throw RequestError(message: "\(field).module '\(module)' is a preprocessor, which Pea does not run: send the "
                                   + "preprocessed control image with module \"none\"")
            }
            let net = try controlNet(fields.value("model"), "\(field).model")
            let imageValue = fields.value("image") ?? fields.value("input_image")
            guard let imageValue else { throw RequestError(message: "\(field).image is required (a base64 control image)") }
            var imageText = imageValue
            if let object = imageValue.objectValue {   // the extension's {"image": …, "mask": …} form
                if let mask = object["mask"], !mask.isNull { throw RequestError(message: "\(field).image.mask: Pea does not take ControlNet masks") }
                imageText = object["image"] ?? .null
            }
            let image = try decodedImage(imageText, "\(field).image")
            for key in ["mask", "effective_region_mask"] where fields.value(key) != nil {
                throw RequestError(message: "\(field).\(key): Pea does not take ControlNet masks")
            }
            if let mode = fields.value("resize_mode"), !GenerationServer.resizeModes.contains(mode) {
                throw RequestError(message: "\(field).resize_mode must be one of \(GenerationServer.resizeModes.map { $0.serialized() }.joined(separator: ", ")), "
                                   + "got \(mode.serialized())")
            }
            if let mode = fields.value("control_mode"), mode != .string("Balanced"), mode != .number(0) {
                throw RequestError(message: "\(field).control_mode \(mode.serialized()): Pea implements only \"Balanced\" (0), diffusers' ControlNet pipeline")
            }
            if fields.value("guessmode")?.boolValue == true {
                throw RequestError(message: "\(field).guessmode: Pea has no guess mode")
            }
            let start = try fields.double("guidance_start", 0...1) ?? 0, end = try fields.double("guidance_end", 0...1) ?? 1
            guard start < end else {
                throw RequestError(message: "\(field): guidance_start must be less than guidance_end, got \(start) and \(end)")
            }
            let scale = try fields.double("weight", 0...10) ?? 1
            controls.append(JobItem.Control(net: net, image: image, scale: scale, start: start, end: end))
            if firstName == nil { firstName = "\(field).image" }
        }
        guard let first = controls.first, let name = firstName else { return ([], nil) }
        // As diffusers' control image processor: the first image's size rounded down, unless width/height are given.
        return (controls, try outputSize(of: first.image, name, width: width, height: height))
    }

    /// The output size a request's image implies (`VaeImageProcessor.outputSize`: width/height where given, else
    /// the image's rounded down to the size multiple), which like a given width or height must be within --max-size.
    private func outputSize(of image: RGBImage, _ field: String, width: Int?, height: Int?) throws -> (width: Int, height: Int) {
        let size: (width: Int, height: Int)
        do {
            size = try VaeImageProcessor.outputSize(of: image, named: field, width: width, height: height, multiple: anyPipeline.sizeMultiple)
        } catch { throw RequestError(message: "\(error)") }
        for (value, key) in [(size.width, "width"), (size.height, "height")] where value > configuration.maxSize {
            throw RequestError(message: "\(field): its \(key) rounded down (the output's \(key)) must be at most \(configuration.maxSize), got \(value)")
        }
        return size
    }

    /// The index of the ControlNet a unit's `model` names: a loaded folder's basename (A1111's " [hash]" suffix
    /// dropped) or an index.
    private func controlNet(_ value: JSONValue?, _ field: String) throws -> Int {
        let names = model.controlnets.map(\.name)
        let known = "this server's ControlNets: " + names.enumerated().map { "\($0) \"\($1)\"" }.joined(separator: ", ")
        guard let value else { throw RequestError(message: "\(field) is required (\(known))") }
        if let index = value.intValue {
            guard names.indices.contains(index) else { throw RequestError(message: "\(field) \(index) is no ControlNet's index (\(known))") }
            return index
        }
        guard var name = value.stringValue else { throw RequestError(message: "\(field) must be a name or an index, got \(value.kindDescription)") }
        if name.hasSuffix("]"), let open = name.lastIndex(of: "["), open > name.startIndex, name[name.index(before: open)] == " " {
            name = String(name[..<name.index(before: open)])
        }
        if let index = names.firstIndex(of: name) ?? Int(name).flatMap({ names.indices.contains($0) ? $0 : nil }) { return index }
        throw RequestError(message: "\(field) '\(value.stringValue!)' is not a ControlNet of this server (\(known))")
    }

    /// The request's alwayson_scripts as echoed back: the ControlNet units without their images.
    static func withoutControlImages(_ scripts: JSONValue) -> JSONValue {
        guard var object = scripts.objectValue else { return scripts }
        for (name, script) in object where name.lowercased() == "controlnet" {
            func stripped(_ args: JSONValue) -> JSONValue {
                .array((args.arrayValue ?? []).map { arg in
                    guard var unit = arg.objectValue else { return arg }
                    unit["image"] = nil
                    unit["input_image"] = nil
                    return .object(unit)
                })
            }
            if var scriptObject = script.objectValue, let args = scriptObject["args"], args.arrayValue != nil {
                scriptObject["args"] = stripped(args)
                object[name] = .object(scriptObject)
            } else if script.arrayValue != nil {
                object[name] = stripped(script)
            }
        }
        return .object(object)
    }

    /// A1111's sampler names (and Pea's own scheduler names) as a `SchedulerName`; nil: the model folder's.
    static func schedulerName(sampler: String?, scheduler: String?) throws -> String? {
        let karras = try { () throws -> Bool in
            switch scheduler?.lowercased() {
            case nil, "", "automatic": return false
            case "karras": return true
            default: throw RequestError(message: "scheduler must be Automatic or Karras, got '\(scheduler!)'")
            }
        }()
        // The names `pea generate` writes into PNGs (`a1111SamplerName`), read back.
        let names = Dictionary(uniqueKeysWithValues: SchedulerName.allCases.map { (a1111SamplerName($0, className: ""), $0) })
        guard let sampler, !sampler.isEmpty else {
            if karras { throw RequestError(message: "scheduler Karras goes with sampler_name \"DPM++ 2M\"") }
            return nil
        }
        guard var name = names[sampler] ?? SchedulerName(rawValue: sampler) else {
            throw RequestError(message: "sampler_name must be one of \(names.keys.sorted().map { "\"\($0)\"" }.joined(separator: ", ")) "
                               + "(or a Pea scheduler: \(SchedulerName.allCases.map(\.rawValue).joined(separator: ", "))), got '\(sampler)'")
        }
        if karras {
            guard name == .dpmpp2M || name == .dpmpp2MKarras else {
                throw RequestError(message: "scheduler Karras goes with sampler_name \"DPM++ 2M\", not '\(sampler)'")
            }
            name = .dpmpp2MKarras
        }
        return name.rawValue
    }

    /// `POST /sdapi/v1/txt2img`: prompt (default ""), negative_prompt (omitted: none, as `pea generate` without
    /// --negative-prompt), seed (-1: random), steps (20), cfg_scale (7), width/height (the model's size, or the
    /// control images'), sampler_name + scheduler, batch_size × n_iter images, text_encoder, ControlNet units
    /// (`controls`). `POST /sdapi/v1/img2img` (with `imageToImage`): the same and `init_images`,
    /// `denoising_strength`, `mask`, `mask_blur` (`initImage`); width/height default to the init image's rounded
    /// down to multiples of 8.
    func parseA1111(_ object: [String: JSONValue], imageToImage: Bool = false) throws -> Parsed {
        let fields = Fields(object: object)
        let count = (try fields.integer("batch_size", 1...configuration.maxImages) ?? 1) * (try fields.integer("n_iter", 1...configuration.maxImages) ?? 1)
        guard count <= configuration.maxImages else {
            throw RequestError(message: "batch_size × n_iter must be at most \(configuration.maxImages), got \(count)")
        }
        let scheduler = try GenerationServer.schedulerName(sampler: fields.string("sampler_name"), scheduler: fields.string("scheduler"))
        let width = try fields.integer("width", 1...configuration.maxSize), height = try fields.integer("height", 1...configuration.maxSize)
        let steps = try fields.integer("steps", 1...configuration.maxSteps) ?? 20
        let initImage = imageToImage ? try self.initImage(fields, width: width, height: height, steps: steps) : nil
        let controls = try self.controls(fields, width: width, height: height, imageToImage: imageToImage)
        return try parsed(fields, prompt: fields.string("prompt") ?? "", count: count,
                          width: size(initImage?.size.width ?? controls.size?.width ?? width, "width"),
                          height: size(initImage?.size.height ?? controls.size?.height ?? height, "height"),
                          steps: steps, guidance: fields.number("cfg_scale", 0...100) ?? 7, scheduler: scheduler, initImage: initImage,
                          controls: controls.units)
    }

    /// `POST /v1/images/generations`: prompt (required), n (1), size "WxH" (the model's size), response_format
    /// b64_json; Pea's seed (random), steps (30), guidance (7.5), negative_prompt, text_encoder.
    func parseOpenAI(_ object: [String: JSONValue]) throws -> Parsed {
        let fields = Fields(object: object)
        guard let prompt = try fields.string("prompt") else { throw RequestError(message: "prompt is required") }
        if let format = try fields.string("response_format"), format != "b64_json" {
            throw RequestError(message: "response_format must be b64_json (this server returns no URLs), got '\(format)'")
        }
        var width: Int?, height: Int?
        if let text = try fields.string("size") {
            let parts = text.split(separator: "x", omittingEmptySubsequences: false)
            guard parts.count == 2, let w = Int(parts[0]), let h = Int(parts[1]) else {
                throw RequestError(message: "size must be WIDTHxHEIGHT, e.g. \"512x512\", got '\(text)'")
            }
            for (value, name) in [(w, "width"), (h, "height")] where !(1...configuration.maxSize).contains(value) {
                throw RequestError(message: "size: \(name) must be in 1...\(configuration.maxSize), got \(value)")
            }
            (width, height) = (w, h)
        }
        return try parsed(fields, prompt: prompt, count: fields.integer("n", 1...configuration.maxImages) ?? 1,
                          width: size(width, "size: width"), height: size(height, "size: height"),
                          steps: fields.integer("steps", 1...configuration.maxSteps) ?? 30,
                          guidance: fields.number("guidance", 0...100) ?? 7.5, scheduler: nil, initImage: nil, controls: [])
    }

    private func parsed(_ fields: Fields, prompt: String, count: Int, width: Int, height: Int, steps: Int, guidance: Float,
                        scheduler: String?, initImage: InitImage?, controls: [JobItem.Control]) throws -> Parsed {
        if anyPipeline.isInpainting, initImage?.mask == nil {
            throw RequestError(message: "this server's model is an inpainting model: send init_images and a mask to /sdapi/v1/img2img")
        }
        let negative = try fields.string("negative_prompt")
        let choice = try choice(fields)
        let seed = try seed(fields)
        let className = scheduler == nil ? model.pipelines[choice]!.scheduler.className : ""
        return Parsed(items: items(prompt: prompt, negativePrompt: negative, seed: seed, count: count, width: width, height: height,
                                   steps: steps, guidance: guidance, scheduler: scheduler, initImage: initImage, controls: controls),
                      choice: choice, seed: seed,
                      samplerLabel: a1111SamplerName(scheduler.flatMap(SchedulerName.init(rawValue:)), className: className))
    }

    // MARK: - Responses

    struct EncodedImage {
        var base64: String
        var parameters: String
        var seed: UInt64
    }

    /// Each image as a PNG with the `parameters` chunk `pea generate` writes.
    private func encode(_ items: [JobItem], _ images: [[RGBImage]], choice: String) throws -> [EncodedImage] {
        let family = model.pipelines[choice]!.family
        return try zip(items, images).map { item, itemImages in
            let scheduler = item.scheduler.flatMap(SchedulerName.init(rawValue:))
            let sampler = a1111SamplerName(scheduler, className: scheduler == nil ? model.pipelines[choice]!.scheduler.className : "")
            let parameters = a1111Parameters(item.request, sampler: sampler, model: model.folder, family: family)
            let image = itemImages[0]
            let png = try PNGWriter.encode(rgb: image.pixels, width: image.width, height: image.height, textChunks: [("parameters", parameters)])
            return EncodedImage(base64: base64Encoded(png), parameters: parameters, seed: item.seed)
        }
    }

    private func a1111Response(_ object: [String: JSONValue], _ parsed: Parsed, _ images: [EncodedImage]) -> HTTPResponse {
        let first = parsed.items[0]
        var parameters = object
        parameters["init_images"] = nil   // the request's own images are not sent back
        parameters["mask"] = nil
        parameters["alwayson_scripts"] = object["alwayson_scripts"].map(GenerationServer.withoutControlImages)
        if first.isImageToImage { parameters["denoising_strength"] = .number(first.strength) }
        parameters["prompt"] = .string(first.prompt)
        parameters["seed"] = object["seed"] ?? .number(-1)
        parameters["steps"] = .number(Double(first.steps))
        parameters["cfg_scale"] = .number(Double(first.guidance))
        parameters["width"] = .number(Double(first.width))
        parameters["height"] = .number(Double(first.height))
        parameters["sampler_name"] = .string(parsed.samplerLabel)
        parameters["text_encoder"] = .string(parsed.choice)
        let seeds = images.map { JSONValue.number(Double($0.seed)) }
        let info: JSONValue = .object([
            "prompt": .string(first.prompt), "all_prompts": .array(images.map { _ in .string(first.prompt) }),
            "negative_prompt": .string(first.negativePrompt ?? ""),
            "all_negative_prompts": .array(images.map { _ in .string(first.negativePrompt ?? "") }),
            "seed": .number(Double(parsed.seed)), "all_seeds": .array(seeds),
            "width": .number(Double(first.width)), "height": .number(Double(first.height)),
            "sampler_name": .string(parsed.samplerLabel), "cfg_scale": .number(Double(first.guidance)),
            "steps": .number(Double(first.steps)), "batch_size": .number(Double(object["batch_size"]?.intValue ?? 1)),
            "sd_model_name": .string(model.folder.split(separator: "/").last.map(String.init) ?? model.folder),
            "text_encoder": .string(parsed.choice),
            "denoising_strength": first.isImageToImage ? .number(first.strength) : .null,
            "infotexts": .array(images.map { .string($0.parameters) }),
        ])
        return .json(.object(["images": .array(images.map { .string($0.base64) }), "parameters": .object(parameters),
                              "info": .string(info.serialized())]))
    }

    private func openAIResponse(_ images: [EncodedImage]) -> HTTPResponse {
        .json(.object(["created": .number(Double(time(nil))),
                       "data": .array(images.map { .object(["b64_json": .string($0.base64), "seed": .number(Double($0.seed))]) })]))
    }
}
