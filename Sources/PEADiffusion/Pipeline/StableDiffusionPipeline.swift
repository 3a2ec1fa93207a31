// Text-to-image with the semantics of diffusers' StableDiffusionPipeline (SD1.x, SD2.x) and
// StableDiffusionXLPipeline (SDXL), without the safety checker: the same folder, prompt, seed and settings
// give the same image as diffusers with a CPU generator. With an init image, image-to-image with the semantics
// of StableDiffusionImg2ImgPipeline and StableDiffusionXLImg2ImgPipeline (a base model's: no aesthetic score,
// no denoising_start): only where the loop starts and its starting latents differ. With a mask as well,
// inpainting with the semantics of StableDiffusionInpaintPipeline and StableDiffusionXLInpaintPipeline (SDXL: an
// ordinary UNet only; padding_mask_crop=None, so the original is not pasted back): a 9-channel inpainting UNet
// sees the mask and the masked image's latents beside the latents; an ordinary 4-channel UNet's latents are
// blended with the init image's after every step.
//
// One pipeline for every family: it is written against DenoisingModel (the denoiser's inputs and what it needs)
// and reads what differs between families from ModelFamily's properties (ModelFamily.swift); the image ↔ latent
// factor is the VAE's. docs/adding-a-model.md explains how a new family (a DiT such as SD3/Flux) plugs in.

/// What to generate: diffusers' `pipe(prompt, negative_prompt, num_inference_steps, guidance_scale, height,
/// width, num_images_per_prompt, generator=torch.Generator("cpu").manual_seed(seed))`.
public struct GenerationRequest {
    public var prompt: String
    public var negativePrompt: String?
    public var steps = 30
    public var guidance: Float = 7.5
    public var seed: UInt64 = 0
    public var width: Int
    public var height: Int
    public var imagesPerPrompt = 1
    /// Image-to-image: diffusers' `image=`, the picture to start from, of any size: the pipeline Lanczos-resizes
    /// it to `width`×`height` as diffusers' VaeImageProcessor does (`VaeImageProcessor.outputSize` is diffusers'
    /// default size for it). nil: text-to-image.
    public var initImage: RGBImage?
    /// diffusers' `strength` (its default 0.8), in (0, 1]: img2img runs the last ⌊steps·strength⌋ of the `steps`
    /// timesteps. A Double, as Python multiplies it (10 × 0.7 is 7.000000000000001 there; in float32 it is below 7).
    public var strength = 0.8
    /// Inpainting: diffusers' `mask_image=`, of any size (Lanczos-resized to `width`×`height` like the init image,
    /// then PIL's convert("L") and binarised at 0.5); white (luma ≥ 128) is repainted, black kept. A mask blur
    /// (`VaeImageProcessor.blur`) is the caller's, before, as in diffusers. nil: no mask. Callers set `strength`
    /// (`inpaintingStrength` is the default that goes with a mask).
    public var mask: RGBImage?
    /// The strength a mask implies when none is given: StableDiffusionInpaintPipeline's default 1.0, not img2img's
    /// 0.8 (diffusers' SDXL inpainting pipeline defaults to 0.9999; Pea uses 1.0 for every family).
    public static let inpaintingStrength = 1.0
    /// ControlNets (text-to-image only), as diffusers' StableDiffusionControlNetPipeline and
    /// StableDiffusionXLControlNetPipeline with one ControlNetModel or a MultiControlNetModel: their residuals
    /// are summed into the UNet's. Empty: none.
    public var controls: [ControlInput] = []

    public init(prompt: String, negativePrompt: String? = nil, width: Int, height: Int) {
        self.prompt = prompt
        self.negativePrompt = negativePrompt
        self.width = width
        self.height = height
    }
}

/// One ControlNet's part in a request: diffusers' `controlnet`, `image`, `controlnet_conditioning_scale`,
/// `control_guidance_start` and `control_guidance_end`. Its residuals are × `scale` at step i of N unless
/// i/N < start or (i+1)/N > end, where they are × 0.
public struct ControlInput {
    public var controlnet: ControlNetModel
    /// The control image, of any size: the pipeline Lanczos-resizes it to the request's width×height as diffusers'
    /// control_image_processor does (`VaeImageProcessor.outputSize` of the first control image is diffusers'
    /// default size for it). With several ControlNets every image is resized to that size, where diffusers would
    /// fail on images of differing sizes.
    public var image: RGBImage
    /// Doubles, as Python computes i/N and scale × keep.
    public var scale = 1.0
    public var start = 0.0
    public var end = 1.0

    public init(controlnet: ControlNetModel, image: RGBImage, scale: Double = 1, start: Double = 0, end: Double = 1) {
        self.controlnet = controlnet
        self.image = image
        self.scale = scale
        self.start = start
        self.end = end
    }

    /// The conditioning scale at step `step` of `steps` (diffusers' conditioning_scale × controlnet_keep[i]).
    func scale(step: Int, of steps: Int) -> Float {
        let off = Double(step) / Double(steps) < start || Double(step + 1) / Double(steps) > end
        return Float(scale * (off ? 0 : 1))
    }
}

/// An 8-bit RGB image, rows top to bottom.
public struct RGBImage: Equatable, Sendable {
    public let width, height: Int
    public var pixels: [UInt8]
}

public final class StableDiffusionPipeline {
    public let family: ModelFamily
    /// The denoiser: the UNet for SD1.x/SD2.x/SDXL.
    public let denoiser: any DenoisingModel
    public let vae: AutoencoderKL
    public let conditioner: any TextConditioner
    public var scheduler: any Scheduler
    public let schedulerConfig: ConfigFile
    public let backend: any ComputeBackend
    /// diffusers' `enable_vae_tiling()`: decode in tiles (`AutoencoderKL.decodeTiled`), so that a large image needs
    /// one tile's memory; the seams are blended, and the image differs slightly from an untiled decode.
    public var vaeTiling = false
    /// CUDA graphs for the denoising loop (`--cuda-graphs`), on the CUDA backend only: each step's denoiser
    /// evaluation is replayed from a graph captured once per input shape (`CUDAGraphedDenoiser`), bit for bit what
    /// the eager evaluation computes. Off: every op is queued one by one.
    public var cudaGraphs = false {
        didSet { graphedDenoiser = nil }
    }
    /// The graphs of `denoiser`, kept across `generate` calls (a server captures once per shape).
    public private(set) var graphedDenoiser: CUDAGraphedDenoiser?

    public init(family: ModelFamily, denoiser: any DenoisingModel, vae: AutoencoderKL, conditioner: any TextConditioner,
                scheduler: any Scheduler, schedulerConfig: ConfigFile, backend: any ComputeBackend) {
        self.family = family
        self.denoiser = denoiser
        self.vae = vae
        self.conditioner = conditioner
        self.scheduler = scheduler
        self.schedulerConfig = schedulerConfig
        self.backend = backend
    }

    /// Loads a diffusers pipeline folder. `scheduler` is a `SchedulerName` (nil: the folder's own);
    /// `conditioner`, when given, replaces the folder's English text encoders (PEA). `dtype` is the precision
    /// the UNet, text encoders and VAE are stored and computed in (f16/bf16 need the CUDA backend), as diffusers'
    /// `torch_dtype`; as in diffusers' SDXL pipeline, an SDXL VAE whose config has `force_upcast` (the default)
    /// runs in f32 when the rest is f16 (`ModelFamily.upcastsForceUpcastVAE`). Latents, guidance and the scheduler
    /// stay f32. `lora`'s files are merged into the UNet's and the English text encoders' weights (`LoRASet`).
    public static func load(folder: String, backend: any ComputeBackend, scheduler: String? = nil, clipSkip: Int = 0,
                            variant: String? = nil, conditioner: (any TextConditioner)? = nil,
                            dtype: DType = .f32, lora: LoRASet? = nil) throws -> StableDiffusionPipeline {
        try requirePipelineFolder(folder)
        let unet = try UNet2DConditionModel.load(folder: joinPath(folder, "unet"), backend: backend, variant: variant, dtype: dtype,
                                                 wrap: { lora?.weights($0, component: "unet", unet: $1) ?? $0 }).model
        let family = try ModelFamily.detect(folder: folder, unet: unet.config)
        let vaeFolder = joinPath(folder, "vae")
        let vae = try AutoencoderKL.load(folder: vaeFolder, backend: backend, variant: variant,
                                         dtype: family.vaeDType(dtype, vaeFolder: vaeFolder)).model
        let schedulerConfig = family.schedulerConfig(try ConfigFile(path: joinPath(folder, "scheduler/scheduler_config.json")))
        let sampler = try makeScheduler(name: scheduler, config: schedulerConfig)
        let text = try conditioner ?? family.textConditioner(folder: folder, backend: backend, clipSkip: clipSkip, variant: variant,
                                                             dtype: dtype, lora: lora)
        try lora?.requireAllUsed(components: ["unet"] + (conditioner == nil ? family.textComponents.map(\.encoder) : []))
        return StableDiffusionPipeline(family: family, denoiser: unet, vae: vae, conditioner: text, scheduler: sampler,
                                       schedulerConfig: schedulerConfig, backend: backend)
    }

    /// Throws unless `folder` is a diffusers pipeline folder (has model_index.json): checked by `load`, and by
    /// callers that must refuse a wrong folder before doing anything else.
    public static func requirePipelineFolder(_ folder: String) throws {
        guard isRegularFile(joinPath(folder, "model_index.json")) else {
            throw PEAError.invalidFile(path: folder, reason: "not a diffusers pipeline folder (no model_index.json)")
        }
    }

    /// An SD1.x/SD2.x folder's scheduler config as diffusers' StableDiffusionPipeline.__init__ repairs outdated
    /// ones: steps_offset must be 1 and clip_sample false (the XL pipeline does not repair).
    public static func repairedSchedulerConfig(_ config: ConfigFile) -> ConfigFile {
        var values = config.values
        if values["steps_offset"].map({ $0 != .number(1) }) ?? false { values["steps_offset"] = .number(1) }
        if values["clip_sample"] == .bool(true) { values["clip_sample"] = .bool(false) }
        return ConfigFile(path: config.path, values: values)
    }

    /// Channels of the latents denoised: the denoiser's, or for an inpainting UNet (whose input adds the mask
    /// and masked image latents) the VAE's, as diffusers' inpainting pipeline takes them.
    public var latentChannels: Int {
        Self.isInpaintingUNet(denoiser, vae: vae) ? vae.config.latentChannels : denoiser.latentChannels
    }

    /// Pixels per latent cell: the VAE's (8 for SD).
    public var vaeScaleFactor: Int { vae.downsamplingFactor }

    /// What the image width and height must be multiples of (8 for SD: `ModelFamily.sizeMultiple`).
    public var sizeMultiple: Int { family.sizeMultiple(vaeScaleFactor: vaeScaleFactor) }

    /// diffusers' default size: the denoiser's `sample_size` × the VAE factor (512 for SD1.5, 768 for SD2.1-v, 1024 for SDXL).
    public var defaultSize: Int { (denoiser.sampleSize ?? 64) * vaeScaleFactor }

    /// Runs the whole pipeline for one request. `progress(step, steps)` is called after every denoising step;
    /// `warn` gets messages such as prompt truncation.
    public func generate(_ request: GenerationRequest, progress: (Int, Int) -> Void = { _, _ in },
                         warn: (String) -> Void = { _ in }) throws -> [RGBImage] {
        try generate([request], progress: progress, warn: warn)[0]
    }

    /// Denoises several requests together, as diffusers' pipeline does when called with lists of prompts and
    /// negative prompts and a list of generators: one denoiser call per step for every image of every request
    /// (classifier-free guidance batched: all negatives, then all positives), each request with its own
    /// generator seeded with its seed, drawing its `imagesPerPrompt` latents and its scheduler noise as it would
    /// alone — so each request's images are the ones `generate(request)` makes (within float rounding of a
    /// larger batch). The text encoder runs once per distinct prompt and once per distinct negative prompt;
    /// the VAE decodes the whole batch. The requests must share size, steps and guidance; `scheduler` (default:
    /// the pipeline's) is copied, so one pipeline serves requests with different schedulers one batch at a time.
    /// Returns each request's images, in order.
    public func generate(_ requests: [GenerationRequest], scheduler: (any Scheduler)? = nil,
                         progress: (Int, Int) -> Void = { _, _ in }, warn: (String) -> Void = { _ in }) throws -> [[RGBImage]] {
        let requests = try validated(requests)
        let b = backend, first = requests[0], counts = requests.map(\.imagesPerPrompt), count = counts.reduce(0, +)
        let guided = first.guidance > 1 && denoiser.timestepConditionDim == nil

        // Conditioning: [negatives…, positives…] when guided, as diffusers concatenates them.
        let positive = try conditioning(requests.map { .some($0.prompt) }, counts: counts) { prompts in
            try conditioner.encode(prompts!, warn: warn)
        }
        var states = positive.states, pooled = positive.pooled
        if guided {
            // diffusers' negative_prompt=None (the empty prompt, or zeros for SDXL) is a row of its own kind.
            let negative = try conditioning(requests.map(\.negativePrompt), counts: counts) { negatives in
                try conditioner.encodeNegative(negatives, count: negatives?.count ?? 1, warn: warn)
            }
            states = try b.concat([negative.states, positive.states], dim: 0)
            if let p = positive.pooled, let n = negative.pooled { pooled = try b.concat([n, p], dim: 0) }
        }
        let rows = guided ? 2 * count : count
        var textEmbeds: Tensor?, timeIds: Tensor?
        if denoiser.takesTextTime {
            // SDXL's added conditioning: the pooled text embedding, and original size, crop top-left, target
            // size — diffusers' defaults: (H, W), (0, 0), (H, W)
            let ids: [Float] = [first.height, first.width, 0, 0, first.height, first.width].map(Float.init)
            textEmbeds = pooled
            timeIds = try b.upload(Array([[Float]](repeating: ids, count: rows).joined()), shape: [rows, 6])
        }

        // Initial latents from each request's seeded generator: text-to-image scales noise by the scheduler's
        // initial sigma; image-to-image noises the init image's latents to the first timestep it runs.
        var generators = requests.map { TorchGenerator(seed: $0.seed) }
        let latentCell = [latentChannels, first.height / vaeScaleFactor, first.width / vaeScaleFactor]
        func noise() throws -> Tensor {
            let parts = try counts.indices.map { i in try generators[i].randnTensor([counts[i]] + latentCell, backend: b) }
            return parts.count == 1 ? parts[0] : try b.concat(parts, dim: 0)
        }
        var sampler = scheduler ?? self.scheduler
        try sampler.setTimesteps(first.steps)
        let begin = first.initImage == nil ? 0 : try Self.img2imgBeginIndex(steps: first.steps, strength: first.strength)
        var latents: Tensor
        var inpaint: Inpainting?
        if first.mask != nil {
            // diffusers' inpainting prepare_latents then prepare_mask_latents. Each generator draws: the init image's
            // latent sample (not for a 9-channel UNet at strength 1, which starts from noise alone), the noise, then
            // the masked image's latent sample (`inpainting`). Strength 1 starts from noise × init_noise_sigma, not
            // add_noise; below 1, from the image's latents noised to the first timestep run, as img2img.
            let fromNoise = first.strength == 1
            let encoded = fromNoise && Self.isInpaintingUNet(denoiser, vae: vae) ? nil : try initLatents(requests, counts: counts, generators: &generators)
            let drawn = try noise()
            latents = try fromNoise ? b.scale(drawn, by: sampler.initNoiseSigma) : sampler.addNoise(encoded!, noise: drawn, stepIndex: begin)
            inpaint = try inpainting(requests, counts: counts, generators: &generators, imageLatents: encoded, noise: drawn, guided: guided)
        } else if first.initImage != nil {
            // diffusers' prepare_latents: each generator draws its image's latent sample first, then the noise.
            let encoded = try initLatents(requests, counts: counts, generators: &generators)
            latents = try sampler.addNoise(encoded, noise: noise(), stepIndex: begin)
        } else {
            latents = try b.scale(noise(), by: sampler.initNoiseSigma)
        }

        let end = sampler.timesteps.count, steps = end - begin
        let controlImages = try controlImages(requests, counts: counts, guided: guided)
        let unet = loopDenoiser()
        for i in begin..<end {
            var input = try sampler.scaleModelInput(guided ? b.concat([latents, latents], dim: 0) : latents, stepIndex: i)
            if let condition = inpaint?.unetCondition { input = try b.concat([input, condition], dim: 1) }
            let timestep = try b.upload(sampler.modelTimestep(stepIndex: i))
            // The denoiser casts its inputs to its dtype and answers in it; guidance and the scheduler work in f32.
            var inputs = DenoisingInputs(sample: input, timestep: timestep, encoderHiddenStates: states, textEmbeds: textEmbeds, timeIds: timeIds)
            // ControlNets see what the UNet sees (diffusers' control_model_input, prompt_embeds and
            // added_cond_kwargs, not guess mode); several add up as MultiControlNetModel sums them.
            for (control, image) in zip(first.controls, controlImages) {
                let r = try control.controlnet(inputs, condition: image, scale: control.scale(step: i, of: end))
                inputs.controlResiduals = try inputs.controlResiduals.map { sum in
                    ControlResiduals(down: try zip(sum.down, r.down).map { try b.add($0, $1) }, mid: try b.add(sum.mid, r.mid))
                } ?? r
            }
            var prediction = try unet(inputs)
            if prediction.dtype != .f32 { prediction = try b.cast(prediction, to: .f32) }
            if guided {
                let halves = try b.split(prediction, sizes: [count, count], dim: 0)
                prediction = try b.add(halves[0], b.scale(b.sub(halves[1], halves[0]), by: first.guidance))
            }
            latents = try sampler.step(modelOutput: prediction, stepIndex: i, sample: latents, noise: noise)
            if let blend = inpaint?.blend {
                // The kept region follows the init image's latents noised to the next timestep (the clean latents
                // after the last step), with the noise the loop started from: (1 − m)·x_init + m·x, exact for m ∈ {0, 1}.
                let kept = i + 1 < end ? try sampler.addNoise(blend.imageLatents, noise: blend.noise, stepIndex: i + 1) : blend.imageLatents
                latents = try b.add(b.mul(blend.keep, kept), b.mul(blend.repaint, latents))
            }
            progress(i - begin + 1, steps)
        }
        let images = try decode(latents, afterSteps: steps)
        var start = 0
        return counts.map { n in defer { start += n }; return Array(images[start..<start + n]) }
    }

    /// The denoiser the loop calls: the CUDA-graphed one when `cudaGraphs` is on and the backend is CUDA.
    private func loopDenoiser() -> any DenoisingModel {
        guard cudaGraphs, let cuda = backend as? CUDABackend, cuda.supportsGraphs else { return denoiser }
        if graphedDenoiser == nil { graphedDenoiser = CUDAGraphedDenoiser(denoiser, backend: cuda) }
        return graphedDenoiser!
    }

    /// Each ControlNet's image as diffusers' control_image_processor makes it (do_normalize false: x / 255 in
    /// float32, [0, 1]), NCHW, per request repeated for its images, and twice over with guidance as the latents.
    private func controlImages(_ requests: [GenerationRequest], counts: [Int], guided: Bool) throws -> [Tensor] {
        let b = backend
        return try requests[0].controls.indices.map { k in
            let parts = try zip(requests, counts).flatMap { request, n in
                let image = request.controls[k].image
                return repeatElement(try b.upload(Self.unitPixels(image), shape: [1, 3, image.height, image.width]), count: n)
            }
            let batch = parts.count == 1 ? parts[0] : try b.concat(parts, dim: 0)
            return guided ? try b.concat([batch, batch], dim: 0) : batch
        }
    }

    /// diffusers' img2img `get_timesteps`: of `steps` timesteps the last ⌊steps·strength⌋ run, so the loop begins
    /// at index steps − ⌊steps·strength⌋ of the scheduler's timesteps (× `scheduler.order`, 1 for every scheduler
    /// here; PNDM's N + 1 timesteps are sliced at that index too, as diffusers slices them). No step left is an
    /// error (diffusers fails on it less clearly).
    public static func img2imgBeginIndex(steps: Int, strength: Double) throws -> Int {
        let run = min(Int(Double(steps) * strength), steps)   // Python's int(): toward zero
        guard run >= 1 else {
            throw PEAError.usage("strength \(strength) is too low for \(steps) steps: int(steps × strength) = 0, so no denoising step would run; raise the strength or the steps")
        }
        return steps - run
    }

    /// What inpainting adds to the loop: the 9-channel UNet's extra input, or the 4-channel blend.
    private struct Inpainting {
        /// [rows, 1 + C, h, w]: the latent-size mask and the masked image's latents, rows as the latents' guided
        /// batch, concatenated after the scaled latents (diffusers' `cat([latents, mask, masked_image_latents])`).
        var unetCondition: Tensor?
        var blend: (imageLatents: Tensor, noise: Tensor, keep: Tensor, repaint: Tensor)?
    }

    /// diffusers' `prepare_mask_latents`, per request: the mask at latent size and, for a 9-channel UNet, the
    /// masked image's latents (one sample from the request's generator). A 4-channel UNet never uses those
    /// latents, but diffusers encodes them anyway, so its generator draws the sample too: later draws (ancestral
    /// noise) follow it.
    private func inpainting(_ requests: [GenerationRequest], counts: [Int], generators: inout [TorchGenerator],
                            imageLatents: Tensor?, noise: Tensor, guided: Bool) throws -> Inpainting {
        let b = backend, first = requests[0]
        let conditioned = Self.isInpaintingUNet(denoiser, vae: vae)
        let h = first.height / vaeScaleFactor, w = first.width / vaeScaleFactor, channels = vae.config.latentChannels
        var masks: [[Float]] = [], maskedPixels: [[Float]] = []
        for request in requests {
            let full = Self.binaryMask(request.mask!)
            masks.append(Self.nearestResized(full, width: request.width, height: request.height, toWidth: w, toHeight: h))
            // diffusers' init_image * (mask < 0.5): the repainted region becomes 0 (grey) in [-1, 1].
            maskedPixels.append(zip(Self.normalizedPixels(request.initImage!), repeatElement(full, count: 3).joined()).map { $1 < 0.5 ? $0 : 0 })
        }
        let maskedLatents: Tensor?
        if conditioned {
            maskedLatents = try sampledLatents(maskedPixels, width: first.width, height: first.height, counts: counts, generators: &generators)
        } else {
            for i in requests.indices { _ = generators[i].randn([1, channels, h, w]) }
            maskedLatents = nil
        }
        // perRequest[i] ([h·w]) over c channels, for each of request i's counts[i] images: [images, c, h, w].
        func rows(_ perRequest: [[Float]], channels c: Int) throws -> Tensor {
            let values = zip(perRequest, counts).flatMap { plane, n in Array(repeatElement(Array(repeatElement(plane, count: c).joined()), count: n).joined()) }
            return try b.upload(values, shape: [counts.reduce(0, +), c, h, w])
        }
        if let maskedLatents {
            let both = try b.concat([rows(masks, channels: 1), maskedLatents], dim: 1)
            return Inpainting(unetCondition: guided ? try b.concat([both, both], dim: 0) : both)
        }
        let keep = try rows(masks.map { $0.map { 1 - $0 } }, channels: channels), repaint = try rows(masks, channels: channels)
        return Inpainting(blend: (imageLatents!, noise, keep, repaint))
    }

    /// Whether the denoiser is an inpainting UNet: latents, a mask channel and the masked image's latents in
    /// (9 channels for SD), the latents out.
    /// Whether the denoiser is an inpainting UNet, which needs an init image and a mask with every request.
    public var isInpainting: Bool { Self.isInpaintingUNet(denoiser, vae: vae) }

    public static func isInpaintingUNet(_ denoiser: any DenoisingModel, vae: AutoencoderKL) -> Bool {
        denoiser.latentChannels == 2 * vae.config.latentChannels + 1
    }

    /// An inpainting mask as diffusers' mask VaeImageProcessor makes it (do_convert_grayscale, do_normalize
    /// false, do_binarize): PIL's convert("L") luma (ITU-R 601-2 in 16-bit fixed point, rounded), / 255 in
    /// float32, then 0 below 0.5 and 1 from 0.5 — so luma 128 and up is repainted. [H·W], rows top to bottom.
    public static func binaryMask(_ image: RGBImage) -> [Float] {
        (0..<(image.width * image.height)).map { p in
            let r = Int(image.pixels[3 * p]), g = Int(image.pixels[3 * p + 1]), bl = Int(image.pixels[3 * p + 2])
            let luma = (r * 19595 + g * 38470 + bl * 7471 + 0x8000) >> 16
            return Float(luma) / 255 < 0.5 ? 0 : 1
        }
    }

    /// torch.nn.functional.interpolate(mode="nearest") of one plane: output (y, x) reads input
    /// (⌊y · H/h⌋, ⌊x · W/w⌋), the scale a float32 ratio as torch computes it.
    static func nearestResized(_ plane: [Float], width: Int, height: Int, toWidth w: Int, toHeight h: Int) -> [Float] {
        let sy = Float(height) / Float(h), sx = Float(width) / Float(w)
        return (0..<(h * w)).map { p in
            let y = min(Int(Float(p / w) * sy), height - 1), x = min(Int(Float(p % w) * sx), width - 1)
            return plane[y * width + x]
        }
    }

    /// The first half of diffusers' img2img `prepare_latents`, per request: the init image in [-1, 1]
    /// (`normalizedPixels`) through the VAE encoder, one sample of the latent distribution with the request's
    /// generator (`retrieve_latents(…, generator)`, sample mode: a randn of one image's latent shape, drawn before
    /// the noise), × scaling_factor, repeated for its `imagesPerPrompt` images (one sample shared by them, as
    /// diffusers duplicates it). f32 [images, C, h, w].
    private func initLatents(_ requests: [GenerationRequest], counts: [Int], generators: inout [TorchGenerator]) throws -> Tensor {
        try sampledLatents(requests.map { Self.normalizedPixels($0.initImage!) }, width: requests[0].width, height: requests[0].height,
                           counts: counts, generators: &generators)
    }

    /// diffusers' `_encode_vae_image` with a generator, per request: `images[i]` ([3, H, W] in [-1, 1]) through
    /// the VAE encoder, one latent sample drawn with `generators[i]`, × scaling_factor, repeated `counts[i]` times.
    private func sampledLatents(_ images: [[Float]], width: Int, height: Int, counts: [Int],
                                generators: inout [TorchGenerator]) throws -> Tensor {
        var parts: [Tensor] = []
        for (i, image) in images.enumerated() {
            var pixels = try backend.upload(image, shape: [1, 3, height, width])
            if vae.dtype != .f32 { pixels = try backend.cast(pixels, to: vae.dtype) }
            let (mean, logvar) = try vae.encode(pixels)
            let means = try backend.download(mean).floats(), logvars = try backend.download(logvar).floats()
            let eps = generators[i].randn(mean.shape)
            let scale = vae.config.scalingFactor
            let sample = means.indices.map { latentSample(mean: means[$0], logvar: logvars[$0], eps: eps[$0]) * scale }
            parts += repeatElement(try backend.upload(sample, shape: mean.shape), count: counts[i])
        }
        return parts.count == 1 ? parts[0] : try backend.concat(parts, dim: 0)
    }

    /// An 8-bit RGB image as the VAE encoder's input, [3, H, W] in [-1, 1]: diffusers' VaeImageProcessor.preprocess,
    /// x / 255 then 2x − 1, in float32.
    public static func normalizedPixels(_ image: RGBImage) -> [Float] {
        unitPixels(image).map { 2 * $0 - 1 }
    }

    /// An 8-bit RGB image as [3, H, W] in [0, 1]: x / 255 in float32 (VaeImageProcessor without do_normalize).
    public static func unitPixels(_ image: RGBImage) -> [Float] {
        let plane = image.width * image.height
        var values = [Float](repeating: 0, count: 3 * plane)
        for p in 0..<plane {
            for c in 0..<3 { values[c * plane + p] = Float(image.pixels[p * 3 + c]) / 255 }
        }
        return values
    }

    /// The conditioning rows for `texts[i]` repeated `counts[i]` times. `encode` runs once on the distinct texts
    /// and, when some text is nil, once on nil (one row).
    private func conditioning(_ texts: [String?], counts: [Int], encode: ([String]?) throws -> Conditioning) throws -> Conditioning {
        var distinct: [String] = []
        for case let text? in texts where !distinct.contains(text) { distinct.append(text) }
        var rows: [String?: Conditioning] = [:]
        if !distinct.isEmpty {
            let encoded = try encode(distinct)
            let ones = Array(repeating: 1, count: distinct.count)
            let states = distinct.count == 1 ? [encoded.states] : try backend.split(encoded.states, sizes: ones, dim: 0)
            let pooled = try encoded.pooled.map { distinct.count == 1 ? [$0] : try backend.split($0, sizes: ones, dim: 0) }
            for (i, text) in distinct.enumerated() { rows[text] = Conditioning(states: states[i], pooled: pooled?[i]) }
        }
        if texts.contains(nil) { rows[nil] = try encode(nil) }

        var pieces: [Conditioning] = []
        for (text, count) in zip(texts, counts) { pieces += repeatElement(rows[text]!, count: count) }
        guard pieces.count > 1 else { return pieces[0] }
        let pooled = pieces.allSatisfy { $0.pooled != nil } ? try backend.concat(pieces.map { $0.pooled! }, dim: 0) : nil
        return Conditioning(states: try backend.concat(pieces.map(\.states), dim: 0), pooled: pooled)
    }

    /// latents → 8-bit images: vae.decode(latents / scaling_factor), then (x / 2 + 0.5) clamped to [0, 1],
    /// × 255 and rounded, as diffusers' VaeImageProcessor.postprocess with output_type "pil". The VAE casts the
    /// (f32) latents to its own dtype; `floats()` reads its answer whatever that dtype is. Latents or an image
    /// that are not finite are an error (`afterSteps`, the denoising steps run, goes into its message), never
    /// an image: checked once here rather than after every step, which would cost a download per step.
    public func decode(_ latents: Tensor, afterSteps steps: Int? = nil) throws -> [RGBImage] {
        guard try backend.download(latents).floats().allSatisfy(\.isFinite) else {
            let when = steps.map { "after the \($0) denoising steps" } ?? "before decoding"
            throw PEAError.backend("the latents are not finite \(when); likely cause: a guidance scale or scheduler config too large for float32, or non-finite model or adapter weights")
        }
        let scaled = try backend.scale(latents, by: 1 / vae.config.scalingFactor)
        let image = try backend.download(vaeTiling ? vae.decodeTiled(scaled) : vae.decode(scaled)).floats()
        guard image.allSatisfy(\.isFinite) else {
            throw PEAError.backend("the VAE decoded finite latents to values that are not finite; likely cause: VAE weights that overflow \(vae.dtype) (try --precision fp32) or are not finite")
        }
        let (count, channels, height, width) = (latents.shape[0], 3, latents.shape[2] * vaeScaleFactor, latents.shape[3] * vaeScaleFactor)
        return (0..<count).map { n in
            var pixels = [UInt8](repeating: 0, count: height * width * 3)
            for c in 0..<channels {
                let plane = (n * channels + c) * height * width
                for p in 0..<(height * width) {
                    pixels[p * 3 + c] = eightBitSample(image[plane + p])
                }
            }
            return RGBImage(width: width, height: height, pixels: pixels)
        }
    }

    /// The requests checked, with their init images and masks resized to their size (after the checks, so that
    /// no oversized request allocates).
    private func validated(_ requests: [GenerationRequest]) throws -> [GenerationRequest] {
        guard let request = requests.first else { throw PEAError.usage("generate: no requests") }
        for other in requests.dropFirst() where other.width != request.width || other.height != request.height
            || other.steps != request.steps || other.guidance != request.guidance {
            throw PEAError.usage("requests denoised together must share size, steps and guidance: \(request.width)×\(request.height), "
                + "\(request.steps) steps, guidance \(request.guidance) beside \(other.width)×\(other.height), \(other.steps) steps, guidance \(other.guidance)")
        }
        let multiple = sizeMultiple
        guard request.width > 0, request.height > 0, request.width % multiple == 0, request.height % multiple == 0 else {
            throw PEAError.usage("width and height must be positive multiples of \(multiple), got \(request.width)×\(request.height)")
        }
        guard request.steps >= 1 else { throw PEAError.usage("steps must be at least 1, got \(request.steps)") }
        guard requests.allSatisfy({ $0.imagesPerPrompt >= 1 }) else { throw PEAError.usage("batch must be at least 1") }
        guard request.guidance.isFinite else { throw PEAError.usage("guidance must be finite, got \(request.guidance)") }
        if requests.contains(where: { $0.initImage != nil }) {
            // The loop's start depends on strength, so an img2img batch shares it.
            for other in requests where !(other.strength > 0 && other.strength <= 1) {
                throw PEAError.usage("strength must be in (0, 1], got \(other.strength)")
            }
            guard requests.allSatisfy({ $0.initImage != nil && $0.strength == request.strength }) else {
                throw PEAError.usage("requests denoised together must all be image-to-image with the same strength, or all text-to-image")
            }
            for other in requests { try Self.requireWellFormed(other.initImage!, "init image") }
            _ = try Self.img2imgBeginIndex(steps: request.steps, strength: request.strength)
        }
        try validateMasks(requests)
        try validateControls(requests)
        // The largest buffers are the VAE decoder's at full resolution (one tile's when tiling).
        let images = requests.reduce(0) { $0 + Double($1.imagesPerPrompt) }
        let decoded = vaeTiling ? Double(min(request.width, vae.config.sampleSize) * min(request.height, vae.config.sampleSize))
                                : Double(request.width) * Double(request.height)
        try MemoryBudget.require(Self.decodeBytesPerPixel(vae) * decoded * images, on: backend,
                                 for: "\(Int(images)) image(s) of \(request.width)×\(request.height)") {
            PEAError.usage("\($0); ask for smaller images" + (vaeTiling ? "" : " or decode in tiles (--vae-tiling)"))
        }
        return requests.map { request in
            var request = request
            request.initImage = request.initImage.map { VaeImageProcessor.resize($0, width: request.width, height: request.height) }
            request.mask = request.mask.map { VaeImageProcessor.resize($0, width: request.width, height: request.height) }
            for k in request.controls.indices {
                request.controls[k].image = VaeImageProcessor.resize(request.controls[k].image, width: request.width, height: request.height)
            }
            return request
        }
    }

    private func validateMasks(_ requests: [GenerationRequest]) throws {
        let masked = requests.filter { $0.mask != nil }.count
        if Self.isInpaintingUNet(denoiser, vae: vae), masked < requests.count {
            throw PEAError.usage("this is an inpainting UNet (\(denoiser.latentChannels) input channels: latents, mask and masked image latents); "
                + "it needs an init image and a mask (--init-image and --mask)")
        }
        guard masked > 0 else { return }
        guard masked == requests.count else {
            throw PEAError.usage("requests denoised together must all be inpainting (with a mask), or none")
        }
        // StableDiffusionXLInpaintPipeline blends as the SD one does; its 9-channel path is not checked against
        // diffusers here (no fixture), so it is refused rather than guessed.
        guard family != .sdxl || !Self.isInpaintingUNet(denoiser, vae: vae) else {
            throw PEAError.unsupported("SDXL inpainting UNets (9 input channels) are not supported yet; an ordinary SDXL model inpaints by blending")
        }
        for request in requests {
            guard request.initImage != nil else { throw PEAError.usage("a mask goes with an init image (--mask needs --init-image)") }
            try Self.requireWellFormed(request.mask!, "mask")
        }
    }

    /// Refuses a ControlNet this pipeline cannot use: another family's, one whose image embedding does not land
    /// on the latents' grid, one taking other than RGB. `pea serve` checks its ControlNets with it as they load.
    public func checkControlNet(_ controlnet: ControlNetModel) throws {
        guard let unet = denoiser as? UNet2DConditionModel else {
            throw PEAError.unsupported("ControlNet needs a UNet denoiser (SD1.x, SD2.x, SDXL)")
        }
        try controlnet.checkCompatible(with: unet.config)
        guard controlnet.config.conditioningDownsampling == vaeScaleFactor else {
            throw PEAError.invalidFile(path: controlnet.path, reason: "this ControlNet embeds its image at 1/\(controlnet.config.conditioningDownsampling) size but the VAE's latents are 1/\(vaeScaleFactor); it does not fit this pipeline")
        }
        guard controlnet.config.conditioningChannels == 3 else {
            throw PEAError.unsupported("\(controlnet.path): a ControlNet taking \(controlnet.config.conditioningChannels)-channel images (Pea gives it RGB)")
        }
    }

    private func validateControls(_ requests: [GenerationRequest]) throws {
        let first = requests[0], controls = first.controls
        for other in requests.dropFirst() {
            guard other.controls.count == controls.count,
                  zip(other.controls, controls).allSatisfy({ $0.controlnet === $1.controlnet && $0.scale == $1.scale && $0.start == $1.start && $0.end == $1.end }) else {
                throw PEAError.usage("requests denoised together must use the same ControlNets with the same scale, start and end")
            }
        }
        guard !controls.isEmpty else { return }
        if first.initImage != nil {
            // diffusers has separate ControlNet img2img and inpainting pipelines, not checked against here.
            throw PEAError.unsupported("ControlNet with an init image or mask (image-to-image, inpainting) is not supported yet; ControlNet is text-to-image only")
        }
        for control in controls {
            try checkControlNet(control.controlnet)
            guard control.start >= 0, control.start < control.end, control.end <= 1 else {
                throw PEAError.usage("ControlNet start and end must satisfy 0 ≤ start < end ≤ 1, got start \(control.start), end \(control.end)")
            }
            // The residuals are scaled in float32: 1e300 is a finite Double but an infinite scale.
            guard Float(control.scale).isFinite else { throw PEAError.usage("ControlNet scale must be finite in float32, got \(control.scale)") }
        }
        for request in requests {
            for control in request.controls { try Self.requireWellFormed(control.image, "control image") }
        }
    }

    /// Refuses an image (`what`, for the message) whose bytes are not 3 per pixel of its width×height: the images a
    /// caller builds by hand, which are resized before anything else reads them.
    private static func requireWellFormed(_ image: RGBImage, _ what: String) throws {
        guard image.width > 0, image.height > 0, image.pixels.count == image.width * image.height * 3 else {
            throw PEAError.usage("the \(what) holds \(image.pixels.count) bytes, not 3 per pixel of its \(image.width)×\(image.height)")
        }
    }

    /// The bytes per output pixel the VAE decoder's largest layers hold at once: block_out_channels[0] channels of
    /// f32, its input, output and a norm's temporary alive together.
    public static func decodeBytesPerPixel(_ vae: AutoencoderKL) -> Double {
        Double(vae.config.blockOutChannels.first ?? 128) * 4 * 3
    }
}

/// A decoded value in about [-1, 1] as an 8-bit sample: (x / 2 + 0.5) clamped to [0, 1], × 255, rounded half to
/// even. Total: ±∞ clamp, and NaN (which `decode` refuses before it gets here) gives 0 instead of trapping.
func eightBitSample(_ x: Float) -> UInt8 {
    guard !x.isNaN else { return 0 }
    let value = min(max(x / 2 + 0.5, 0), 1)
    return UInt8((value * 255).rounded(.toNearestOrEven))
}
