#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import PEADiffusion

/// `pea generate`'s options, declared once for its parser and its help.
enum GenerateOptions {
    static let model = CommandOption.value(
        "--model", "DIR|FILE",
        help: "diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, …), or a single-file SD1.x, SD2.x or "
            + "SDXL base checkpoint (.safetensors or .ckpt in the original LDM / A1111 layout: model.diffusion_model.*, "
            + "first_stage_model.*, and cond_stage_model.transformer.* (SD1), cond_stage_model.model.* (SD2) or "
            + "conditioner.embedders.{0,1}.* (SDXL)); without it, the bundled toy "
            + "world (models/toyworld: 64×64 coloured shapes, \"a red circle\"), and for Chinese prompts (\"一个红色的圆形\") "
            + "its Chinese encoder and the PEA adapter trained by `pea train` (models/toyworld-zh); found above the pea "
            + "executable, in ./models, or where $PEA_MODELS points")
    static let prompt = CommandOption.value("--prompt", "TEXT", help: "what to draw")
    static let prompts = CommandOption.value(
        "--prompts", "FILE", help: "a prompt file to run as a job (below), written to --output-dir")
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
        "--width", "W", help: "image size in pixels, multiples of 8 (default: the model's native size; with --init-image, the image's)",
        label: "--width W --height H")
    static let height = CommandOption.value("--height", "H", help: nil)   // in --width's row
    static let batch = CommandOption.value("--batch", "N", default: "1", .range(1...64), help: "images per prompt")
    static let clipSkip = CommandOption.value("--clip-skip", "K", default: "0", .range(0...64),
                                              help: "use the text encoder's output K layers before the last")
    static let output = CommandOption.value(
        "--output", "PATH.png", help: "where to write (default pea-SEED.png); with several images, PATH-1.png, PATH-2.png, …")
    static let outputDir = CommandOption.value("--output-dir", "OUT", help: "the job's folder: images, results.jsonl, job.json")
    static let batchSize = CommandOption.value(
        "--batch-size", "N", .range(1...256),
        help: "images denoised together (items of the same size, steps, guidance and scheduler; an item is never split) "
            + "(default: 1 on the CPU; on a GPU as many as fit in half its memory, at most 8)")
    static let format = CommandOption.value(
        "--format", "png|tar", default: "png", .choices(JobOutput.Format.allCases.map(\.rawValue)),
        help: "png: OUT/KEY.png files; tar: webdataset shards OUT/shard-000000.tar … of KEY.png + KEY.json, "
            + "\(jobTarShardSize) images each, that `pea train --data` reads")
    static let shard = CommandOption.value(
        "--shard", "K/N|auto",
        help: "take items K, K+N, K+2N, … (0 ≤ K < N) of the file; auto: K and N from a Slurm job array "
            + "(SLURM_ARRAY_TASK_ID − SLURM_ARRAY_TASK_MIN, SLURM_ARRAY_TASK_COUNT) or a Kubernetes Indexed Job "
            + "(JOB_COMPLETION_INDEX, with --shards N), and within it the process's rank under mpirun or srun "
            + "(OMPI_COMM_WORLD_RANK/SIZE, PMI_RANK/SIZE, SLURM_PROCID/SLURM_STEP_NUM_TASKS; no MPI needed)")
    static let shards = CommandOption.value("--shards", "N", .range(1...1_000_000),
                                            help: "with --shard auto in a Kubernetes Indexed Job: its completions")
    static let overwrite = CommandOption.flag(
        "--overwrite", help: "start the job afresh in OUT, even when OUT holds another job (other prompts or settings): "
            + "this shard's recorded files are removed and every image is made again")
    static let variant = CommandOption.value("--variant", "NAME", help: "read weights of that variant when present (e.g. fp16)")
    static let vaeTiling = CommandOption.flag(
        "--vae-tiling", help: "decode the image in overlapping tiles with blended seams (diffusers' enable_vae_tiling): "
            + "memory of one tile however large the image; the image differs slightly from an untiled decode")
    static let cudaGraphs = CommandOption.value(
        "--cuda-graphs", "on|off", default: "on", .choices(["on", "off"]),
        help: "CUDA backend: replay each denoising step's UNet evaluation as a CUDA graph captured once per image size "
            + "and batch (one graph launch per step instead of hundreds of op launches; the same images); off queues every "
            + "op one by one. The CPU backend ignores it")
    static let textEncoder = CommandOption.value(
        "--text-encoder", "DIR",
        help: "PEA: a language-specific text encoder folder (Chinese-CLIP or multilingual CLIP XLM-R, transformers "
            + "format, tokenizer files inside or in tokenizer/) …")
    static let adapter = CommandOption.value(
        "--adapter", "PATH",
        help: "… and its PEA adapter (safetensors, or pytorch_model.bin as the authors release it); together they "
            + "replace the folder's English text encoder(s), for the prompt and the negative/empty prompt alike")
    static let initImage = CommandOption.value(
        "--init-image", "PATH",
        help: "image-to-image, as diffusers' StableDiffusion(XL)Img2ImgPipeline: start from this PNG or JPEG (read as "
            + "RGB, any size) instead of pure noise. It is resized as diffusers' VaeImageProcessor does (Pillow's Lanczos, "
            + "bit-exact) to --width×--height when given, else to its own size rounded down to multiples of 8 (at least 8×8). "
            + "With --mask that default is also Pea's, where diffusers' inpainting pipeline would default to the model's "
            + "native size")
    static let strength = CommandOption.value(
        "--strength", "S", default: "0.8",
        help: "with --init-image (or as a prompt file's default for its init_image items): how much to change the image, in "
            + "(0, 1]: only the last int(steps × S) of the --steps timesteps "
            + "run, starting from the image's latents noised to the first of them (S = 1: every step); a strength that "
            + "leaves no step is an error. With --mask the default is 1.0, as diffusers' inpainting, and S = 1 starts "
            + "from pure noise")
    static let mask = CommandOption.value(
        "--mask", "PATH",
        help: "inpainting, with --init-image, as diffusers' StableDiffusionInpaintPipeline: repaint where this PNG or JPEG "
            + "mask (any size: Lanczos-resized to the output's size like the init image, then greyscale as PIL's "
            + "convert(\"L\") and binarized at 0.5: luma ≥ 128 is repainted) is white and keep where it is black. An inpainting model (UNet with 9 input channels) sees "
            + "the mask and the masked image; an ordinary model's latents outside the mask are replaced after every step "
            + "by the init image's, noised to the next timestep (diffusers' blending). The output is the decoded latents: "
            + "the kept region is not pasted back from the original (diffusers' default). SDXL: ordinary models only "
            + "(blending), and the strength default is 1.0 there too (diffusers' SDXL inpainting: 0.9999)")
    static let maskBlur = CommandOption.value(
        "--mask-blur", "R",
        help: "with --mask (or, with --prompts, the default of items with a \"mask\"): blur the mask first, as diffusers' "
            + "mask_processor.blur(mask, blur_factor=R) before the pipeline: Pillow's GaussianBlur(R) (standard deviation R "
            + "pixels, 0...1000; bit-exact) on the mask at its own size; it is then resized and binarized, so the blur "
            + "rounds the mask's outline rather than feathering it. Default: no blur")
    static let config = CommandOption.value(
        "--config", "DIR",
        help: "with --model FILE: a diffusers pipeline folder whose configs and tokenizer are used instead of the family's "
            + "defaults (SD1: stable-diffusion-v1-5's; SD2: stable-diffusion-2-1's, v-prediction; SDXL: "
            + "stable-diffusion-xl-base-1.0's), as diffusers' from_single_file(config=DIR)")
    static let tokenizer = CommandOption.value(
        "--tokenizer", "DIR",
        help: "with --model FILE: the CLIP tokenizer folder (vocab.json + merges.txt, e.g. a diffusers pipeline's tokenizer/; "
            + "for SDXL a folder holding tokenizer/ and tokenizer_2/, e.g. a diffusers SDXL pipeline); required without --config, since a single file holds none and Pea ships no CLIP vocabulary")
    static let predictionType = CommandOption.value(
        "--prediction-type", "TYPE", .choices(["epsilon", "v_prediction"]),
        help: "with --model FILE: epsilon | v_prediction, what the UNet predicts (the tensors cannot tell; default: the "
            + "config's: epsilon for SD1 and SDXL, v_prediction for SD2, so SD2 512-base files need epsilon)")
    static let vae = CommandOption.value(
        "--vae", "FILE",
        help: "replace the model's VAE with the one in FILE (.safetensors or .ckpt, LDM names as VAEs are released, or "
            + "diffusers' names), as diffusers' AutoencoderKL.from_single_file; the architecture and scaling factor are "
            + "the model's VAE config's")
    static let lora = CommandOption.repeatable(
        "--lora", "FILE[:SCALE]",
        help: "merge a LoRA (.safetensors) into the weights as the model loads, W += SCALE · alpha/rank · up·down, as "
            + "diffusers' load_lora_weights + fuse_lora(lora_scale=SCALE); SCALE defaults to 1.0; repeatable (the deltas "
            + "add up). Reads diffusers/PEFT names (unet.<module>.lora_A/lora_B.weight, text_encoder[_2].…; alpha = rank, or "
            + "as the PEFT config in the file's lora_adapter_metadata says) "
            + "and kohya names (lora_unet_<module>.lora_down/lora_up.weight + .alpha, lora_te_/lora_te1_/lora_te2_), the "
            + "UNet's modules in diffusers' naming (down_blocks_0_…) or the LDM one (input_blocks_1_1_…, as SDXL LoRAs); "
            + "linear and conv (LoCon 3×3) LoRAs. A tensor that matches no module is an error. With "
            + "--text-encoder/--adapter only the UNet part applies")
    static let controlnet = CommandOption.repeatable(
        "--controlnet", "DIR",
        help: "text-to-image guided by a ControlNet (a diffusers ControlNetModel folder: config.json + "
            + "diffusion_pytorch_model.safetensors, for the model's family, SD1.x/SD2.x or SDXL) and its --control-image, as "
            + "diffusers' StableDiffusion(XL)ControlNetPipeline; repeatable: several ControlNets' residuals add up, as "
            + "MultiControlNetModel. With --text-encoder/--adapter the ControlNet sees the adapter's conditioning, as the UNet "
            + "does. In a prompt file, the ControlNets are the job's and each item gives its images as \"control_image\". Not with "
            + "--init-image/--mask; no guess mode")
    static let controlImage = CommandOption.repeatable(
        "--control-image", "PATH",
        help: "the control image (PNG or JPEG, used as RGB in [0, 1]) of each --controlnet, in the same order, of any size: as "
            + "diffusers' control image processor, each is resized with Pillow's Lanczos to the output size, which defaults to "
            + "the first one's rounded down to multiples of 8 (diffusers would refuse control images of differing sizes); "
            + "for a single --prompt")
    static let controlScale = CommandOption.repeatable(
        "--control-scale", "S",
        help: "ControlNet conditioning scale (diffusers' controlnet_conditioning_scale): once for every --controlnet, or "
            + "once per --controlnet in order (default 1.0)")
    static let controlStart = CommandOption.value(
        "--control-start", "F", default: "0.0",
        help: "fraction of the steps before which the ControlNets are off (diffusers' control_guidance_start): step i "
            + "of N uses them unless i/N < F …")
    static let controlEnd = CommandOption.value(
        "--control-end", "F", default: "1.0",
        help: "… or (i+1)/N > this F (control_guidance_end); 0 ≤ --control-start < --control-end ≤ 1")
    static let maxLength = CommandOption.value(
        "--max-length", "N", help: "PEA: tokens per prompt (default 52 for Chinese-CLIP, 77 for XLM-R)")

    static let spec = CommandSpec(
        name: "generate",
        usage: ["pea generate [--model DIR|FILE] --prompt TEXT [options]",
                "pea generate [--model DIR|FILE] --prompts FILE --output-dir OUT [--batch-size N] [--format png|tar] [--shard K/N|auto] [options]"],
        description: """
            Generates images from text with a diffusers Stable Diffusion pipeline folder (SD1.x, SD2.x or SDXL, detected
            from the folder), the same images diffusers makes from the same folder, prompt, seed and settings with a CPU
            generator (`generator=torch.Generator("cpu").manual_seed(seed)`); no safety checker is run. A single-file
            SD1.x/SD2.x/SDXL checkpoint (--model FILE) is read as diffusers' from_single_file reads it: the family from its
            tensors, the configs the family's defaults or --config DIR's, the tokenizer --tokenizer DIR's or --config DIR's.
            """,
        groups: [.init("Options", [model, prompt, prompts, negativePrompt, steps, guidance, scheduler, seed, width, height,
                                   batch, clipSkip, output, initImage, strength, mask, maskBlur, variant, vaeTiling, cudaGraphs,
                                   textEncoder, adapter,
                                   maxLength, config, tokenizer, predictionType, vae, lora, controlnet, controlImage,
                                   controlScale, controlStart, controlEnd]
                    + BackendOptions.inference),
                 .init("Prompt-file jobs", [outputDir, batchSize, format, shard, shards, overwrite], note: """
                    FILE is .jsonl (one object a line: "prompt", and optionally "id" (A–Z a–z 0–9 _ -), "negative_prompt",
                    "seed", "width", "height", "steps", "guidance", "scheduler", "batch" (images of that prompt), "text" (a
                    caption copied into the tar shards' JSON, e.g. the prompt in the language an adapter will learn),
                    "init_image" (image-to-image as --init-image: a path, relative ones from FILE's folder; the image
                    sets the item's size unless it or --width/--height gives one, and is resized to it), "strength"
                    (default --strength), "mask" (inpainting as --mask, beside init_image; its strength defaults to 1.0
                    unless --strength is given), "mask_blur" (as --mask-blur, beside mask; default --mask-blur) and "control_image"
                    (with --controlnet: a path, or a list of paths, one per --controlnet; the first sets the item's size
                    as init_image does, and all are resized to it; every item needs it then)) or
                    any other name as text (one prompt a line); empty lines are skipped. The options above are the
                    defaults of items that do not set their own. Item i (0-based, in file order) without a seed gets
                    --seed + i, so each image is the one `pea generate --prompt P --seed S --batch B` makes alone; without
                    --seed, a random base seed, kept in OUT/job.json for re-runs.
                    Output: OUT/KEY.png (KEY: the id, or the index in 6 digits; KEY-1 … KEY-B when an item makes B
                    images), and OUT/results.jsonl, one line per image: index, id, image, key, prompt, negative_prompt,
                    seed, width, height, steps, guidance, scheduler, batch, text, file, parameters, seconds (the batch's
                    time per image). With --shard K/N (N > 1) results go to results-K-of-N.jsonl and tar shards are named
                    shard-K-of-N-000000.tar, so the shards of a job can share OUT.
                    Resuming: files appear whole or not at all; running the same command again skips what
                    results.jsonl lists and the files hold. SIGINT or SIGTERM stops after the batch in progress (the tar
                    shard in progress is completed) and says how far the job got. OUT holding another job (another
                    prompt file, other settings, other model) is refused unless --overwrite.
                    """)],
        epilogue: """
            Each PNG carries its generation parameters in a `parameters` text chunk (A1111's format). The written paths
            go to stdout; progress goes to stderr.
            """)
}

/// Images per tar shard of a job.
let jobTarShardSize = 1000

func runGenerate(_ arguments: [String]) throws {
    typealias O = GenerateOptions
    if CommandSpec.asksForHelp(arguments) { print(O.spec.help); return }
    let options = try O.spec.parse(arguments)
    guard options.has(O.textEncoder) == options.has(O.adapter) else {
        throw PEAError.usage("generate: --text-encoder and --adapter go together (PEA: a language-specific encoder and its adapter)")
    }
    switch (try options.optionalString(O.prompt), try options.optionalString(O.prompts)) {
    case (let prompt?, nil):
        if let jobOption = [O.outputDir, O.batchSize, O.format, O.shard, O.shards, O.overwrite].first(where: options.has) {
            throw PEAError.usage("generate: \(jobOption.name) is for prompt-file jobs (--prompts FILE)")
        }
        try runGenerateOne(prompt, options)
    case (nil, let file?):
        guard !options.has(O.output) else {
            throw PEAError.usage("generate: --output is for a single --prompt; a prompt file writes to --output-dir OUT")
        }
        if options.has(O.initImage) {
            throw PEAError.usage("generate: --init-image is for a single --prompt; in a prompt file each item gives its own \"init_image\"")
        }
        if options.has(O.mask) {
            throw PEAError.usage("generate: --mask is for a single --prompt; in a prompt file each item gives its own \"mask\" beside \"init_image\"")
        }
        if options.has(O.controlImage) {
            throw PEAError.usage("generate: --control-image is for a single --prompt; in a prompt file each item gives its own \"control_image\"")
        }
        try runGenerateJob(file, options)
    case (nil, nil): throw PEAError.usage("generate: give --prompt TEXT or --prompts FILE")
    default: throw PEAError.usage("generate: give either --prompt or --prompts, not both")
    }
}

/// The settings every generation takes from the command line (for a job: its items' defaults).
struct GenerateSettings {
    var steps: Int
    var guidance: Float
    var batch: Int
    var clipSkip: Int
    var seed: UInt64?
    var width: Int?
    var height: Int?
    var scheduler: String?
    var negativePrompt: String?

    init(_ options: ParsedOptions) throws {
        typealias O = GenerateOptions
        steps = try options.int(O.steps)
        guidance = try options.float(O.guidance)   // finite as a float32: the parser refuses 1e300
        batch = try options.int(O.batch)
        clipSkip = try options.int(O.clipSkip)
        if let text = try options.optionalString(O.seed) {
            guard let value = UInt64(text) else { throw PEAError.usage("generate: --seed expects a non-negative integer, got '\(text)'") }
            seed = value
        }
        width = try options.optionalInt(O.width)
        height = try options.optionalInt(O.height)
        for (name, value) in [("--width", width), ("--height", height)] {
            if let value, value <= 0 || value % 8 != 0 {
                throw PEAError.usage("generate: \(name) must be a positive multiple of 8, got \(value)")
            }
        }
        scheduler = try options.optionalString(O.scheduler)
        negativePrompt = try options.optionalString(O.negativePrompt)
    }

    static func randomSeed() -> UInt64 {
        var random = SplitMix64(seed: UInt64(UInt(bitPattern: time(nil))) ^ UInt64(getpid()) << 32)
        return random.next() >> 32
    }
}

/// The model a generation runs, as the options choose it: --model (or the bundled toy world, whose Chinese
/// encoder and adapter take Chinese prompts), and --text-encoder/--adapter. The one place that turns --model
/// (folder or single file), --config/--tokenizer/--prediction-type, --variant, --lora and --vae into a pipeline,
/// for `pea generate`, `pea serve` and `pea train` (its teacher) alike.
struct ModelChoice {
    /// The --model folder, or the single-file checkpoint (`isSingleFile`).
    var folder: String
    var pea: (encoder: String, adapter: String)?
    /// The bundled world's notice for stderr, when no --model was given.
    var notice: String?
    /// --model names a file: a single-file checkpoint rather than a diffusers folder.
    var isSingleFile: Bool { isRegularFile(folder) }

    /// Refuses a --model that is neither a pipeline folder nor a file, before anything is loaded or written.
    func requireModel() throws {
        if !isSingleFile { try StableDiffusionPipeline.requirePipelineFolder(folder) }
    }

    /// --model as given, with no PEA encoder (`pea train`'s teacher, `pea serve`'s English pipeline).
    init(model: String) { folder = model }

    init(_ options: ParsedOptions, prompts: [String]) throws {
        typealias O = GenerateOptions
        pea = try options.optionalString(O.textEncoder).flatMap { encoder in try options.optionalString(O.adapter).map { (encoder, $0) } }
        if let model = try options.optionalString(O.model) {
            folder = model
            return
        }
        let bundled: BundledModels
        do { bundled = try BundledModels.locate() } catch PEAError.invalidFile(let path, let reason) {
            throw PEAError.invalidFile(path: path, reason: "no --model given and \(reason); or pass --model DIR")
        }
        folder = bundled.teacher
        let chinese = pea == nil && prompts.contains(where: BundledModels.isChinese)
        if chinese {
            guard prompts.allSatisfy(BundledModels.isChinese) else {
                throw PEAError.usage("generate: without --model, the prompts must be all Chinese or all English (the bundled world reads each language through its own encoder)")
            }
            pea = (bundled.chineseEncoder, bundled.chineseAdapter)
        }
        notice = "pea: no --model: the bundled toy world \(folder)"
            + (chinese ? ", Chinese prompt through its Chinese-CLIP encoder and PEA adapter (\(parentFolder(bundled.chineseAdapter)))" : "")
    }

    /// Loads the pipeline (and the PEA encoder and adapter) on `selection`'s backend.
    func load(_ options: ParsedOptions, scheduler: String?, clipSkip: Int, selection: BackendSelection) throws -> StableDiffusionPipeline {
        typealias O = GenerateOptions
        if let notice { fputs(notice + "\n", stderr) }
        let backend = selection.backend, dtype = selection.dtype
        let conditioner = try peaConditioner(options, selection: selection)
        let lora = try Self.loras(options)
        if let lora, conditioner != nil, lora.components.contains(where: { $0 != "unet" }) {
            fputs("pea: warning: --lora: the text-encoder part of the LoRA does not apply to the --text-encoder/--adapter "
                  + "language encoder; only its UNet part is merged into that pipeline\n", stderr)
        }
        var pipeline = try loadModel(options, scheduler: scheduler, clipSkip: clipSkip, backend: backend, dtype: dtype,
                                     conditioner: conditioner, lora: lora)
        if let vaeFile = try options.optionalString(O.vae) {
            // The model's VAE is loaded and dropped: its config is the swapped VAE's (as from_single_file(config=…)).
            let vae = try AutoencoderKL.load(file: vaeFile, config: pipeline.vae.config, backend: backend, dtype: pipeline.vae.dtype).model
            pipeline = StableDiffusionPipeline(family: pipeline.family, denoiser: pipeline.denoiser, vae: vae, conditioner: pipeline.conditioner,
                                               scheduler: pipeline.scheduler, schedulerConfig: pipeline.schedulerConfig, backend: backend)
        }
        pipeline.vaeTiling = options.has(O.vaeTiling)
        pipeline.cudaGraphs = try options.string(O.cudaGraphs) == "on"
        return pipeline
    }

    /// PEA: the language-specific encoder and the adapter, which replace the model's English text encoder(s)
    /// (nil without --text-encoder/--adapter).
    func peaConditioner(_ options: ParsedOptions, selection: BackendSelection) throws -> PEAConditioner? {
        typealias O = GenerateOptions
        guard let (encoderFolder, adapterPath) = pea else { return nil }
        let maxLength = try options.optionalInt(O.maxLength)
        let encoder = try naming(O.maxLength, in: options, when: maxLength != nil) {
            try LanguageEncoders.load(folder: encoderFolder, backend: selection.backend, maxLength: maxLength, dtype: selection.dtype)
        }
        return try PEAConditioner(encoder: encoder, adapter: PEAAdapter.load(path: adapterPath, backend: selection.backend, dtype: selection.dtype))
    }

    /// The --lora files, read and checked (nil without --lora).
    static func loras(_ options: ParsedOptions) throws -> LoRASet? {
        let specs = try options.strings(GenerateOptions.lora).map(LoRASpec.init(parsing:))
        return try specs.isEmpty ? nil : LoRASet(specs)
    }

    private func loadModel(_ options: ParsedOptions, scheduler: String?, clipSkip: Int, backend: any ComputeBackend, dtype: DType,
                           conditioner: (any TextConditioner)?, lora: LoRASet?) throws -> StableDiffusionPipeline {
        typealias O = GenerateOptions
        if isSingleFile {
            let single = SingleFileOptions(configFolder: try options.optionalString(O.config),
                                           tokenizerFolder: try options.optionalString(O.tokenizer),
                                           predictionType: try options.optionalString(O.predictionType))
            return try naming(O.clipSkip, in: options, when: clipSkip != 0) {
                try StableDiffusionPipeline.load(checkpoint: folder, options: single, backend: backend, scheduler: scheduler,
                                                 clipSkip: clipSkip, conditioner: conditioner, dtype: dtype, lora: lora).pipeline
            }
        }
        for option in [O.config, O.tokenizer, O.predictionType] where options.has(option) {
            throw PEAError.usage("\(options.command): \(option.name) applies to a single-file --model FILE, not a folder")
        }
        let variant = try options.optionalString(O.variant)
        return try naming(O.clipSkip, in: options, when: clipSkip != 0) {
            try StableDiffusionPipeline.load(folder: folder, backend: backend, scheduler: scheduler, clipSkip: clipSkip,
                                             variant: variant, conditioner: conditioner, dtype: dtype, lora: lora)
        }
    }
}

/// `pea generate --prompt TEXT`: one request, --batch images, written to --output.
private func runGenerateOne(_ prompt: String, _ options: ParsedOptions) throws {
    typealias O = GenerateOptions
    let settings = try GenerateSettings(options)
    let seed = settings.seed ?? GenerateSettings.randomSeed()
    let output = try options.optionalString(O.output) ?? "pea-\(seed).png"
    guard output.hasSuffix(".png") else { throw PEAError.usage("generate: --output must end in .png, got '\(output)'") }
    let initImage = try readInitImage(options, settings: settings)
    let controls = try ControlOptions(options)
    let controlImages = try readControlImages(options, controls, settings: settings)
    if controlImages != nil, initImage != nil {
        throw PEAError.usage("generate: --controlnet is text-to-image only; it does not go with --init-image or --mask")
    }
    let selection = try BackendOptions.select(options)
    let model = try ModelChoice(options, prompts: [prompt])
    let pipeline = try model.load(options, scheduler: settings.scheduler, clipSkip: settings.clipSkip, selection: selection)

    var request = GenerationRequest(prompt: prompt, negativePrompt: settings.negativePrompt,
                                    width: settings.width ?? pipeline.defaultSize, height: settings.height ?? pipeline.defaultSize)
    if let prepared = initImage {
        request.initImage = prepared.image
        request.strength = prepared.strength
        request.mask = prepared.mask
        (request.width, request.height) = prepared.size
    }
    if let controlImages {
        (request.width, request.height) = controlImages.size
        request.controls = controls.inputs(try controls.load(options, pipeline: pipeline), images: controlImages.images)
    }
    request.steps = settings.steps
    request.guidance = settings.guidance
    request.seed = seed
    request.imagesPerPrompt = settings.batch
    let reporter = ProgressReporter(label: "image")
    let images = try pipeline.generate(request, progress: reporter.update, warn: { printWarning($0) })
    reporter.finish()
    let sampler = a1111SamplerName(settings.scheduler.flatMap(SchedulerName.init(rawValue:)), className: pipeline.scheduler.className)
    let parameters = a1111Parameters(request, sampler: sampler, model: model.folder, family: pipeline.family)
    for (number, image) in images.enumerated() {
        let path = images.count == 1 ? output : "\(output.dropLast(4))-\(number + 1).png"
        try PNGWriter.write(rgb: image.pixels, width: image.width, height: image.height,
                            textChunks: [("parameters", parameters)], to: path)
        print(path)
    }
}

/// --init-image and --mask decoded (the mask blurred by --mask-blur) and --strength checked, before the model
/// loads, with the output size: --width/--height, else the image's rounded down to multiples of 8 (the pipeline
/// resizes both images to it). nil without --init-image.
private func readInitImage(_ options: ParsedOptions, settings: GenerateSettings)
    throws -> (image: RGBImage, strength: Double, mask: RGBImage?, size: (width: Int, height: Int))? {
    typealias O = GenerateOptions
    if options.has(O.maskBlur), !options.has(O.mask) { throw PEAError.usage("generate: --mask-blur goes with --mask (it blurs the mask)") }
    guard let path = try options.optionalString(O.initImage) else {
        if options.has(O.mask) { throw PEAError.usage("generate: --mask needs --init-image (the image to inpaint)") }
        if options.has(O.strength) { throw PEAError.usage("generate: --strength goes with --init-image") }
        return nil
    }
    let maskPath = try options.optionalString(O.mask)
    let strength = maskPath != nil && !options.has(O.strength) ? GenerationRequest.inpaintingStrength : try strengthOption(options)
    _ = try StableDiffusionPipeline.img2imgBeginIndex(steps: settings.steps, strength: strength)
    let blur = try maskBlurOption(options)
    let image = try ImageDecoder.decodeRGB(path: path)
    let size = try VaeImageProcessor.outputSize(of: image, named: path, width: settings.width, height: settings.height)
    let mask = try maskPath.map { VaeImageProcessor.blur(try ImageDecoder.decodeRGB(path: $0), radius: blur ?? 0) }
    return (image, strength, mask, size)
}

/// --mask-blur R, checked; nil when not given.
func maskBlurOption(_ options: ParsedOptions) throws -> Double? {
    try options.optionalDouble(GenerateOptions.maskBlur).map { try VaeImageProcessor.checkedBlur($0, name: "generate: --mask-blur") }
}

/// --controlnet's folders with --control-scale, --control-start and --control-end, checked before the model
/// loads: one scale for all or one each, 0 ≤ start < end ≤ 1, folders holding a config.json. The images come
/// from --control-image (a single prompt) or from each item's control_image (a prompt file).
struct ControlOptions {
    var folders: [String] = []
    var scales: [Double] = []
    var start = 0.0, end = 1.0

    init(_ options: ParsedOptions) throws {
        typealias O = GenerateOptions
        folders = options.strings(O.controlnet)
        guard !folders.isEmpty else {
            if let stray = [O.controlImage, O.controlScale, O.controlStart, O.controlEnd].first(where: options.has) {
                throw PEAError.usage("generate: \(stray.name) goes with --controlnet DIR")
            }
            return
        }
        scales = try options.strings(O.controlScale).map { text -> Double in
            guard let value = Double(text), Float(value).isFinite else {
                throw PEAError.usage("generate: --control-scale expects a number finite in float32, got '\(text)'")
            }
            return value
        }
        guard scales.count <= 1 || scales.count == folders.count else {
            throw PEAError.usage("generate: give --control-scale once (for every --controlnet) or once per --controlnet (\(folders.count)), got \(scales.count)")
        }
        start = try options.double(O.controlStart)
        end = try options.double(O.controlEnd)
        guard start >= 0, start < end, end <= 1 else {
            throw PEAError.usage("generate: --control-start and --control-end must satisfy 0 ≤ start < end ≤ 1, got \(start) and \(end)")
        }
        for folder in folders where !isRegularFile(joinPath(folder, "config.json")) {
            throw PEAError.invalidFile(path: folder, reason: "not a diffusers ControlNet folder (no config.json)")
        }
    }

    /// The ControlNets, in the UNet's precision (diffusers' pipelines take one torch_dtype).
    func load(_ options: ParsedOptions, pipeline: StableDiffusionPipeline) throws -> [ControlNetModel] {
        let variant = try options.optionalString(GenerateOptions.variant)
        return try folders.map { try ControlNetModel.load(folder: $0, backend: pipeline.backend, variant: variant, dtype: pipeline.denoiser.dtype).model }
    }

    /// The request's part for each ControlNet, with its image.
    func inputs(_ models: [ControlNetModel], images: [RGBImage]) -> [ControlInput] {
        zip(models, images).enumerated().map { k, pair in
            ControlInput(controlnet: pair.0, image: pair.1, scale: scales.isEmpty ? 1 : scales[scales.count == 1 ? 0 : k], start: start, end: end)
        }
    }

    /// Control images decoded, with the output size: `width`/`height` where given, else the first image's rounded
    /// down to multiples of 8 (diffusers' get_default_height_width; the pipeline resizes every image to it).
    /// `fail` makes the error for a reason (prefixed with "generate:", or with the prompt file's line).
    static func readImages(_ paths: [String], width: Int?, height: Int?, fail: (String) -> PEAError)
        throws -> (images: [RGBImage], size: (width: Int, height: Int)) {
        let images = try paths.map { try ImageDecoder.decodeRGB(path: $0) }
        do {
            return (images, try VaeImageProcessor.outputSize(of: images[0], named: paths[0], width: width, height: height))
        } catch PEAError.invalidFile(let path, let reason) {
            throw fail("control image \(path): \(reason)")
        }
    }
}

/// --control-image decoded for --controlnet (a single prompt): one per ControlNet, with the output size
/// (`ControlOptions.readImages`). nil without --controlnet.
private func readControlImages(_ options: ParsedOptions, _ controls: ControlOptions, settings: GenerateSettings)
    throws -> (images: [RGBImage], size: (width: Int, height: Int))? {
    let paths = options.strings(GenerateOptions.controlImage)
    guard !controls.folders.isEmpty else { return nil }
    guard paths.count == controls.folders.count else {
        throw PEAError.usage("generate: give one --control-image per --controlnet, in the same order (\(controls.folders.count) --controlnet, \(paths.count) --control-image)")
    }
    return try ControlOptions.readImages(paths, width: settings.width, height: settings.height) { PEAError.usage("generate: " + $0) }
}

/// --strength (default 0.8), in (0, 1].
func strengthOption(_ options: ParsedOptions) throws -> Double {
    let strength = try options.double(GenerateOptions.strength)
    guard strength > 0, strength <= 1 else {
        throw PEAError.usage("generate: --strength must be in (0, 1], got \(strength)")
    }
    return strength
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
