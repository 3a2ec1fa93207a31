#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import PEADiffusion

/// `pea serve`'s options, declared once for its parser and its help.
enum ServeOptions {
    static let model = CommandOption.value(
        "--model", "DIR|FILE",
        help: "diffusers pipeline folder, or a single-file SD1.x/SD2.x/SDXL checkpoint (with --config/--tokenizer/"
            + "--prediction-type/--vae as `pea generate --model FILE` reads it), loaded once")
    static let host = CommandOption.value(
        "--host", "ADDR", default: "127.0.0.1",
        help: "IPv4 address to listen on; an address other than 127.x.x.x or localhost needs --api-key")
    static let port = CommandOption.value("--port", "N", default: "7860", .range(0...65535),
                                          help: "TCP port; 0: any free port (the one chosen is printed)")
    static let maxBatch = CommandOption.value(
        "--max-batch", "N", default: "1", .range(1...64),
        help: "images denoised together: queued requests with the same size, steps, guidance, sampler, text "
            + "encoder and ControlNet units (model, weight, guidance window; images may differ) are batched up to N "
            + "images (1: one image at a time)")
    static let maxQueue = CommandOption.value("--max-queue", "N", default: "64", .range(1...100_000),
                                              help: "requests that may wait; more are answered 503 with Retry-After")
    static let batchWait = CommandOption.value(
        "--batch-wait", "SECONDS", default: "0",
        help: "how long the oldest queued request may wait for compatible ones while its batch has room "
            + "(0: a batch starts with what is queued)")
    static let apiKey = CommandOption.value(
        "--api-key", "KEY", help: "require 'Authorization: Bearer KEY' on every request (401 otherwise)")
    static let maxSize = CommandOption.value("--max-size", "PIXELS", default: "2048", .range(8...16384),
                                             help: "the largest width or height a request may ask for")
    static let maxSteps = CommandOption.value("--max-steps", "N", default: "150", .range(1...1000),
                                              help: "the most denoising steps a request may ask for")

    /// The same option name as `pea generate --controlnet`, so that `ControlOptions` reads it.
    static let controlnet = CommandOption.repeatable(
        "--controlnet", "DIR",
        help: "a diffusers ControlNetModel folder (as `pea generate --controlnet`), loaded once and checked against the "
            + "model's family; repeatable. Requests name it in alwayson_scripts.controlnet.args[].model by its folder's "
            + "basename or its 0-based index")
    static let requestTimeout = CommandOption.value(
        "--request-timeout", "SECONDS", default: "30",
        help: "how long a client may take to send a request (408 after) or leave a keep-alive connection idle")

    static let spec = CommandSpec(
        name: "serve",
        usage: ["pea serve --model DIR|FILE [--text-encoder DIR --adapter PATH] [--controlnet DIR]… [--host 127.0.0.1] [--port 7860] [--max-batch N] "
                + "[--max-queue N] [--api-key KEY] [backend options]"],
        description: """
            Loads a pipeline once and serves text-to-image over HTTP/1.1 until SIGTERM or SIGINT, which stop accepting,
            finish the requests in progress and exit 0. Prints 'pea serve: listening on http://HOST:PORT' on stderr and
            the URL on stdout.
            """,
        groups: [.init("Options", [model, GenerateOptions.textEncoder, GenerateOptions.adapter, GenerateOptions.maxLength,
                                   GenerateOptions.variant, GenerateOptions.vaeTiling, GenerateOptions.cudaGraphs, GenerateOptions.config,
                                   GenerateOptions.tokenizer, GenerateOptions.predictionType, GenerateOptions.vae,
                                   GenerateOptions.lora, controlnet, host, port, maxBatch, maxQueue, batchWait, apiKey, maxSize, maxSteps, requestTimeout]
                       + BackendOptions.inference)],
        epilogue: """
            Endpoints (JSON in and out; errors are {"error": MESSAGE} with 400 naming the field, 401, 404, 405, 500, 503):
              POST /sdapi/v1/txt2img       A1111's subset: prompt, negative_prompt, seed (-1: random), steps (20),
                                           cfg_scale (7), width, height (default: the model's size), sampler_name
                                           ("Euler a", "Euler", "DDIM", "DPM++ 2M", "DPM++ 2M Karras", "PLMS", or a
                                           --scheduler name of pea generate; default: the folder's), scheduler
                                           ("Karras" with "DPM++ 2M"), batch_size, n_iter (at most 16 images), text_encoder;
                                           with --controlnet, A1111's ControlNet extension's alwayson_scripts: {"controlnet":
                                           {"args": [unit…]}}, a unit {"enabled" (true; false: skipped), "model" (a
                                           --controlnet folder's basename, a " [hash]" suffix dropped, or its index),
                                           "image" or "input_image" (base64 PNG or JPEG, already preprocessed: "module"
                                           "none" or absent; any size: width/height default to the first unit's rounded
                                           down to multiples of 8, and every image is Lanczos-resized to them, whatever
                                           its resize_mode), "weight" (1; 0…10),
                                           "guidance_start" (0), "guidance_end" (1), "control_mode" ("Balanced" or 0
                                           only)}, as `pea generate --controlnet DIR --control-image …`. The preprocessor's
                                           processor_res, threshold_a, threshold_b and pixel_perfect, and low_vram and
                                           hr_option, are ignored; masks and guess mode are refused. Not on img2img.
                                           Answers {"images": [base64 PNG…], "parameters": {…}, "info": "<JSON>"}.
              POST /sdapi/v1/img2img       the same and init_images (one base64 PNG or JPEG of any size, Lanczos-resized
                                           to width×height, default its size rounded down to multiples of 8),
                                           denoising_strength (0.75); inpainting with mask (a base64 image of any size,
                                           resized likewise, white repainted), inpainting_mask_invert (1: black
                                           repainted) and mask_blur R (default 0: Pillow's GaussianBlur(R) of the mask
                                           before it is binarized, as --mask-blur; A1111's default is 4 and keeps the
                                           blurred mask soft); as `pea generate --init-image [--mask] [--mask-blur]`
                                           (A1111's inpainting_fill and inpaint_full_res are not applied).
              POST /v1/images/generations  OpenAI's subset: prompt, n, size "WxH", response_format "b64_json"; and seed,
                                           steps (30), guidance (7.5), negative_prompt, text_encoder.
                                           Answers {"created": T, "data": [{"b64_json": …, "seed": S}…]}.
              GET /health                  {"status", "model", "backend", "queue_depth", "text_encoders", "controlnets"}
              GET /metrics                 Prometheus text: requests by endpoint and status, images, queue depth,
                                           batches by image count, requests cancelled, request latency histogram.
            Limits: request bodies over \(HTTPLimits().bodyBytes >> 20) MiB are answered 413 before they are read, a header section
            over \(HTTPLimits().headerBytes >> 10) KiB or \(HTTPLimits().headerCount) fields 431, a request sent slower than --request-timeout 408, chunked
            bodies 411; past \(HTTPServer.Configuration().maxConnections) open connections a new one gets 503. A request that fails while generating
            (the device out of memory, say) is answered 500 with the error, and the server goes on.
            Image i (0-based) of a request with seed S is the image `pea generate --seed S+i` makes with the same prompt,
            negative prompt, size, steps, guidance and scheduler, with the same parameters chunk in its PNG (the same
            pixels when denoised alone; within 1/255 per channel when batched with other requests); an omitted
            negative_prompt is pea generate's omitted --negative-prompt. With --text-encoder and --adapter, a request's
            "text_encoder" picks "adapter" (the default: the PEA encoder and adapter) or "english" (the model's own text
            encoder); only requests with the same choice are batched together, and only those with the same ControlNet units
            (model, weight, guidance window) but for their images. A request whose client closes the
            connection while it waits in the queue is dropped (counted as status 499 in the metrics); a batch already
            running is finished.
            """)
}

func runServe(_ arguments: [String]) throws {
    typealias O = ServeOptions
    if CommandSpec.asksForHelp(arguments) { print(O.spec.help); return }
    let options = try O.spec.parse(arguments)
    guard options.has(O.model) else { throw PEAError.usage("serve: --model DIR|FILE is required") }
    guard options.has(GenerateOptions.textEncoder) == options.has(GenerateOptions.adapter) else {
        throw PEAError.usage("serve: --text-encoder and --adapter go together (PEA: a language-specific encoder and its adapter)")
    }
    var configuration = GenerationServer.Configuration()
    configuration.host = try options.string(O.host)
    configuration.port = try options.int(O.port)
    configuration.maxBatch = try options.int(O.maxBatch)
    configuration.maxQueue = try options.int(O.maxQueue)
    configuration.maxSize = try options.int(O.maxSize)
    configuration.maxSteps = try options.int(O.maxSteps)
    configuration.batchWait = try options.double(O.batchWait)
    guard configuration.batchWait >= 0, configuration.batchWait <= 60 else {
        throw PEAError.usage("serve: --batch-wait must be in 0...60 seconds, got \(configuration.batchWait)")
    }
    configuration.http.requestTimeout = try options.double(O.requestTimeout)
    guard configuration.http.requestTimeout > 0, configuration.http.requestTimeout <= 3600 else {
        throw PEAError.usage("serve: --request-timeout must be in (0, 3600] seconds, got \(configuration.http.requestTimeout)")
    }
    configuration.apiKey = try options.optionalString(O.apiKey)
    if configuration.apiKey?.isEmpty == true { throw PEAError.usage("serve: --api-key must not be empty") }
    let loopback = configuration.host == "localhost" || configuration.host.hasPrefix("127.")
    if !loopback, configuration.apiKey == nil {
        throw PEAError.usage("serve: --host \(configuration.host) is reachable from other machines: give --api-key KEY too")
    }

    let controls = try ControlOptions(options)
    let selection = try BackendOptions.select(options)
    let choice = try ModelChoice(options, prompts: [])
    // The model's English pipeline (the LoRA merged into its UNet and text encoders), and with --text-encoder/--adapter
    // the PEA pipeline beside it, sharing its UNet and VAE.
    let english = try ModelChoice(model: choice.folder).load(options, scheduler: nil, clipSkip: 0, selection: selection)
    var pipelines = ["english": english]
    if let conditioner = try choice.peaConditioner(options, selection: selection) {
        pipelines["adapter"] = StableDiffusionPipeline(family: english.family, denoiser: english.denoiser, vae: english.vae,
                                                       conditioner: conditioner, scheduler: english.scheduler,
                                                       schedulerConfig: english.schedulerConfig, backend: english.backend)
        pipelines["adapter"]!.vaeTiling = english.vaeTiling
        pipelines["adapter"]!.cudaGraphs = english.cudaGraphs
    }
    let model = GenerationServer.Model(pipelines: pipelines, defaultChoice: choice.pea == nil ? "english" : "adapter",
                                       folder: choice.folder, backendName: selection.backend.name,
                                       controlnets: try servedControlNets(controls, options, pipeline: english))

    StopRequest.install()
    let server = try GenerationServer(model: model, configuration: configuration, warn: { printWarning($0) })
    let url = "http://\(configuration.host):\(server.port)"
    fputs("pea serve: listening on \(url)\n", stderr)
    print(url)
    fflush(stdout)
    while StopRequest.received == nil { usleep(100_000) }
    let signal = StopRequest.received == SIGINT ? "SIGINT" : "SIGTERM"
    fputs("pea serve: \(signal): finishing the requests in progress (\(server.queueDepth) waiting)\n", stderr)
    server.stop()
    fputs("pea serve: stopped\n", stderr)
}

/// --controlnet's ControlNets on the pipeline's backend, each checked against it now (not at a request's first use),
/// named by their folders' basenames, which must differ.
private func servedControlNets(_ controls: ControlOptions, _ options: ParsedOptions,
                               pipeline: StableDiffusionPipeline) throws -> [(name: String, model: ControlNetModel)] {
    let models = try controls.load(options, pipeline: pipeline)
    var named: [(name: String, model: ControlNetModel)] = []
    for (folder, model) in zip(controls.folders, models) {
        try pipeline.checkControlNet(model)
        let name = folder.split(separator: "/").last.map(String.init) ?? folder
        if let other = named.first(where: { $0.name == name }) {
            throw PEAError.usage("serve: two --controlnet folders are named '\(name)' (\(other.model.path) and \(folder)): requests name ControlNets by their folders' basenames")
        }
        named.append((name, model))
    }
    return named
}
