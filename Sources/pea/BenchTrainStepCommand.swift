import PEADiffusion

/// `pea bench train-step`'s options (its own, and the sizes it shares with `bench unet`).
enum BenchTrainStepOptions {
    typealias B = BenchModelOptions
    static let adapter = CommandOption.value(
        "--adapter", "IN,HIDDEN,…,OUT",
        help: "the adapter's widths (default 1024,2048,2048,<cross_attention_dim>; SDXL: IN,…,P ending with the pooled "
            + "width P, default 1024,2048,2048,1280, then fc → cross_attention_dim)")
    static let gradientCheckpointing = CommandOption.flag(
        "--gradient-checkpointing", help: "recompute the student's resnets and transformer blocks in the backward pass "
            + "instead of keeping their activations (pea train --gradient-checkpointing)")
    static let spec = CommandSpec(
        name: "bench train-step",
        usage: ["pea bench train-step --config FILE [--latent HxW] [--batch B] [--context-length T]",
                "                     [--adapter IN,HIDDEN,…,OUT] [--gradient-checkpointing] [--repeats R] [--json] [--profile]",
                "                     [--backend auto|cpu|cuda] [--precision fp32|fp16|bf16] [--threads T]"],
        description: """
            Times one step of PEA distillation at the size of a UNet config (random weights; speed does not depend on the
            values): the teacher UNet forward with its block features (no gradient), the adapter on the student's states and
            on the empty prompt's (one sample in ten switched to it, as --uncond-prob 0.1), the student UNet forward and
            backward through the frozen UNet into the adapter, the three losses, and the AdamW update. Inputs are random:
            latent [B,4,H,W], student states [B,T,IN], teacher states [B,T,cross_attention_dim]. The adapter defaults to
            the official training shape 1024,2048,2048,<cross_attention_dim>. An SDXL config (addition_embed_type
            "text_time") is benchmarked with the SDXL adapter form: --adapter IN,…,P ends with the pooled width P that
            the UNet's add embedding expects (projection_class_embeddings_input_dim − 6 × addition_time_embed_dim; 1280
            for SDXL), then fc → cross_attention_dim (default 1024,2048,2048,1280 → 2048, train_sdxl_zh.py's shape);
            the student's pooled text_embeds is the adapter's pooled output on the conditional states, and the inputs
            gain time_ids [B,6] (original size and target size H×8, W×8, crop 0,0) and the teacher's text_embeds [B,P]
            (random). One warm-up step, then R timed (default 3).
            --json prints one object: config, latent_h, latent_w, batch, precision, best_ms, median_ms, optimizer_median_ms
            (the median time from the gradients being ready to the new weights: the clipping norm and AdamW, on the
            backend that holds the adapter), peak_rss_mb (and peak_device_mb on CUDA), page_faults_per_step (the page
            faults of a timed step: memory given back to the kernel and taken again), adapter_parameters. The UNet runs
            in --precision; the adapter, its gradients and AdamW in fp32. --profile (CUDA backend) runs one more step with
            each op call bracketed by GPU events and prints the GPU time per op and the GPU's idle time waiting for the
            host (with --json: the keys profile, a list of {op, calls, ms}, profile_span_ms and profile_device_allocations).
            """,
        groups: [.init("Options", [B.config, B.latent, B.batch, B.contextLength, adapter, gradientCheckpointing, B.repeats, B.json, profileOption]
                                  + BackendOptions.all)])
}

func runBenchTrainStep(_ arguments: [String]) throws {
    typealias B = BenchModelOptions
    if CommandSpec.asksForHelp(arguments) { print(BenchTrainStepOptions.spec.help); return }
    let command = "bench train-step"
    let options = try BenchTrainStepOptions.spec.parse(arguments)
    let settings = try BenchModelSettings(options)
    let configPath = settings.configPath, latent = settings.latent, batch = settings.batch, repeats = settings.repeats
    let backend = settings.backend, dtype = settings.dtype, contextLength = settings.contextLength

    let config = try UNetConfig(ConfigFile(path: configPath))
    let cross = config.crossAttentionDim[0]
    // SDXL: the adapter's stack ends with the pooled width its add embedding expects, then fc → cross_attention_dim.
    let pooledWidth = config.pooledTextDim
    if let pooledWidth, pooledWidth < 1 {
        throw PEAError.usage("\(command): \(configPath): projection_class_embeddings_input_dim leaves no room for a pooled text embedding")
    }
    let outWidth = pooledWidth ?? cross
    let widths = try (try options.optionalString(BenchTrainStepOptions.adapter) ?? "1024,2048,2048,\(outWidth)").split(separator: ",").map { part -> Int in
        guard let width = Int(part), width > 0 else {
            throw PEAError.usage("\(command): --adapter must be positive widths like 1024,2048,2048,\(outWidth)")
        }
        return width
    }
    guard widths.count >= 2, widths.last == outWidth else {
        throw PEAError.usage(pooledWidth == nil
            ? "\(command): --adapter must end with the UNet's cross_attention_dim \(cross)"
            : "\(command): --adapter must end with the pooled width \(outWidth) this SDXL UNet's add embedding expects "
                + "(projection_class_embeddings_input_dim − 6 × addition_time_embed_dim); fc then maps it to \(cross)")
    }
    let unet = try UNet2DConditionModel(config: config, weights: Weights(RandomWeights(backend: backend, seed: 1, dtype: dtype)))
    let training = try AdapterOptimization(adapter: PEAAdapter.initialized(widths: widths, fcOutput: pooledWidth == nil ? nil : cross, backend: backend, seed: 2),
                                           weightDecay: 0.1, backend: backend)
    var random = SplitMix64(seed: 7)
    func randomTensor(_ shape: [Int]) throws -> Tensor { try backend.upload(random.normals(shape.reduce(1, *)), shape: shape) }
    let latentShape = [batch, config.inChannels, latent.height, latent.width]
    let step = KnowledgeDistillation(unet: unet, gradientCheckpointing: options.has(BenchTrainStepOptions.gradientCheckpointing))
    // SDXL's added conditioning: original size, crop top-left, target size (in pixels), as the pipeline passes them.
    let pixels = [Float(latent.height * 8), Float(latent.width * 8)]
    let timeIds = try pooledWidth.map { _ in
        try backend.upload(Array(repeating: pixels + [0, 0] + pixels, count: batch).flatMap { $0 }, shape: [batch, 6])
    }
    let teacherTextEmbeds = try pooledWidth.map { try randomTensor([batch, $0]) }
    let inputs = DistillationBatch(
        noisyLatents: try randomTensor(latentShape), target: try randomTensor(latentShape),
        timesteps: try backend.upload(HostTensor(ids: (0..<batch).map { 100 + 37 * $0 }, shape: [batch])),
        studentStates: try randomTensor([batch, contextLength, widths[0]]),
        studentStatesUncond: try randomTensor([batch, contextLength, widths[0]]),
        teacherStates: try randomTensor([batch, contextLength, cross]), teacherStatesUncond: try randomTensor([batch, contextLength, cross]),
        uncondMask: (0..<batch).map { $0 % 10 == 9 ? 1 : 0 }, timeIds: timeIds, teacherTextEmbeds: teacherTextEmbeds)

    var times: [Double] = [], optimizerTimes: [Double] = [], faults = 0
    for run in 0...repeats {
        let start = monotonicSeconds(), faultsBefore = pageFaults()
        let gradients = try step.step(adapter: training.adapter, batch: inputs).gradients
        // The optimizer's own time: from the gradients being ready (the clipping norm would wait for them anyway)
        // to the new weights computed. A step ends there.
        try backend.synchronize()
        let optimizerStart = monotonicSeconds()
        _ = try training.apply(gradients, lr: 1e-5, maxNorm: nil)
        try backend.synchronize()
        if run > 0 {
            times.append((monotonicSeconds() - start) * 1000)
            optimizerTimes.append((monotonicSeconds() - optimizerStart) * 1000)
            faults += pageFaults() - faultsBefore
        }
    }
    times.sort()
    optimizerTimes.sort()
    let best = times[0], median = times[times.count / 2], optimizer = optimizerTimes[optimizerTimes.count / 2]
    let faultsPerStep = faults / repeats
    let profile = try settings.profiler?.profiled {
        let gradients = try step.step(adapter: training.adapter, batch: inputs).gradients
        _ = try training.apply(gradients, lr: 1e-5, maxNorm: nil)
        try backend.synchronize()
    }.profile
    var fields: [String: JSONValue] = [
        "config": .string(configPath), "latent_h": .number(Double(latent.height)), "latent_w": .number(Double(latent.width)),
        "batch": .number(Double(batch)), "precision": .string("\(dtype)"), "best_ms": .number(best), "median_ms": .number(median),
        "optimizer_median_ms": .number(optimizer), "peak_rss_mb": .number(peakResidentMegabytes()),
        "page_faults_per_step": .number(Double(faultsPerStep)), "adapter_parameters": .number(Double(training.adapter.parameterCount))]
    if let cuda = backend as? CUDABackend, let stats = try? cuda.memoryStats() {
        fields["peak_device_mb"] = .number(Double(stats.peakBytes) / 1_048_576)
    }
    if let profile { fields.merge(profileJSONFields(profile)) { $1 } }
    if options.has(B.json) {
        print(JSONValue.object(fields).serialized())
    } else {
        print("train-step \(configPath)  latent \(latent.height)x\(latent.width)  batch \(batch)  \(backend.name) \(dtype)  "
            + "best \(formatted(best)) ms  median \(formatted(median)) ms  (optimizer \(formatted(optimizer)) ms)  "
            + "peak RSS \(formatted(peakResidentMegabytes())) MB  \(faultsPerStep) page faults per step")
        if let profile { print(profileTable(profile, of: "one training step (\(dtype), batch \(batch), \(latent.height)x\(latent.width))")) }
    }
}
