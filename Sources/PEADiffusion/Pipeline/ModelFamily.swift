// The families StableDiffusionPipeline runs, and every decision that differs between them, in one place. The
// pipeline reads these properties; it never compares families. What the denoiser itself needs (SDXL's time ids,
// LCM's guidance embedding) it asks the DenoisingModel, not the family. docs/adding-a-model.md says how a new
// family plugs in.

/// Which pipeline a model folder is.
public enum ModelFamily: String, Sendable {
    case sd1 = "SD1"
    case sd2 = "SD2"
    case sdxl = "SDXL"

    /// From `model_index.json`: an XL pipeline class or a `text_encoder_2` means SDXL; otherwise SD2 when the
    /// text encoder is OpenCLIP's (GELU, SD2.x) and SD1 when it is OpenAI's CLIP (quick-GELU, SD1.x).
    public static func detect(folder: String, unet: UNetConfig) throws -> ModelFamily {
        let index = joinPath(folder, "model_index.json")
        if isRegularFile(index) {
            let config = try ConfigFile(path: index)
            let name = try config.optionalString("_class_name") ?? ""
            // SD1.x/SD2.x inpainting folders (a 9-channel UNet) load; generating with them needs a mask.
            if name.contains("Refiner") || name.contains("Img2Img") || (name.contains("Inpaint") && name.contains("XL")) {
                throw PEAError.unsupported("\(index): '\(name)' is not a pipeline Pea runs (SD1.x, SD2.x, SDXL base, SD1.x/SD2.x inpainting)")
            }
            if name.contains("XL") || config.contains("text_encoder_2") { return .sdxl }
        }
        if unet.textTime != nil { return .sdxl }
        let encoderConfig = joinPath(folder, "text_encoder/config.json")
        if isRegularFile(encoderConfig), try ConfigFile(path: encoderConfig).string("hidden_act", default: "quick_gelu") == "gelu" {
            return .sd2
        }
        return .sd1
    }

    /// The folder's scheduler config as this family's diffusers pipeline uses it: SD1.x/SD2.x repair outdated
    /// ones (`StableDiffusionPipeline.repairedSchedulerConfig`); the XL pipeline does not.
    public func schedulerConfig(_ folderConfig: ConfigFile) -> ConfigFile {
        switch self {
        case .sd1, .sd2: return StableDiffusionPipeline.repairedSchedulerConfig(folderConfig)
        case .sdxl: return folderConfig
        }
    }

    /// What image widths and heights must be multiples of, given the VAE's factor: the latent grid needs the
    /// VAE's factor, and diffusers' SD and SDXL pipelines check 8 whatever the VAE (`check_inputs`). Both are
    /// powers of two, so the larger is a multiple of the other. (Flux's pipeline would say 2 × the VAE's factor:
    /// it packs 2×2 latent patches.)
    public func sizeMultiple(vaeScaleFactor: Int) -> Int {
        switch self {
        case .sd1, .sd2, .sdxl: return max(8, vaeScaleFactor)
        }
    }

    /// Whether a VAE whose config has `force_upcast` (the default) runs in f32 when the rest is f16, as diffusers'
    /// SDXL pipeline does (`needs_upcasting = vae.dtype == float16 and vae.config.force_upcast`): SDXL's VAE
    /// overflows f16. The SD1.x/SD2.x pipeline runs the VAE in the pipeline's dtype.
    public var upcastsForceUpcastVAE: Bool {
        switch self {
        case .sd1, .sd2: return false
        case .sdxl: return true
        }
    }

    /// The precision the VAE of `vaeFolder` runs in next to a pipeline in `dtype`: f32 when this family upcasts a
    /// `force_upcast` VAE and `dtype` is f16 (SDXL's VAE overflows f16: black images), else `dtype`. Generation
    /// and training (latent encoding) both ask here.
    public func vaeDType(_ dtype: DType, vaeFolder: String) throws -> DType {
        guard upcastsForceUpcastVAE && dtype == .f16 else { return dtype }
        return vaeDType(dtype, config: try AutoencoderKLConfig(ConfigFile(path: joinPath(ModelFolder.component(vaeFolder, "vae"), "config.json"))))
    }

    /// The same for a VAE whose config is at hand (a single-file checkpoint's).
    public func vaeDType(_ dtype: DType, config: AutoencoderKLConfig) -> DType {
        upcastsForceUpcastVAE && dtype == .f16 && config.forceUpcast ? .f32 : dtype
    }

    /// The pipeline's text components, in order: one CLIP encoder (`tokenizer/` + `text_encoder/`) for SD1.x/SD2.x,
    /// both CLIP encoders (`…_2` too) for SDXL.
    public var textComponents: [(tokenizer: String, encoder: String)] {
        switch self {
        case .sd1, .sd2: return [("tokenizer", "text_encoder")]
        case .sdxl: return [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")]
        }
    }

    /// The family's conditioner over its text stacks (`textComponents`, in order). `forceZerosForEmptyPrompt`:
    /// model_index.json's `force_zeros_for_empty_prompt` (SDXL).
    public func conditioner(_ stacks: [CLIPTextStack], clipSkip: Int, forceZerosForEmptyPrompt: Bool) throws -> any TextConditioner {
        switch self {
        case .sd1, .sd2: return try CLIPConditioner(text: stacks[0], clipSkip: clipSkip)
        case .sdxl: return try SDXLConditioner(first: stacks[0], second: stacks[1], clipSkip: clipSkip,
                                               forceZerosForEmptyPrompt: forceZerosForEmptyPrompt)
        }
    }

    /// A pipeline folder's `force_zeros_for_empty_prompt` (diffusers' default, true, when not set).
    public static func forceZerosForEmptyPrompt(folder: String) throws -> Bool {
        let index = joinPath(folder, "model_index.json")
        return isRegularFile(index) ? try ConfigFile(path: index).bool("force_zeros_for_empty_prompt", default: true) : true
    }

    /// The folder's own text conditioning (`textComponents`).
    public func textConditioner(folder: String, backend: any ComputeBackend, clipSkip: Int, variant: String?,
                                dtype: DType, lora: LoRASet? = nil) throws -> any TextConditioner {
        let stacks = try textComponents.map { tokenizer, encoder in
            CLIPTextStack(tokenizer: try CLIPTokenizer(folder: joinPath(folder, tokenizer)),
                          encoder: try CLIPTextModel.load(folder: joinPath(folder, encoder), backend: backend, variant: variant, dtype: dtype,
                                                          wrap: { lora?.weights($0, component: encoder) ?? $0 }).model)
        }
        return try conditioner(stacks, clipSkip: clipSkip,
                               forceZerosForEmptyPrompt: self == .sdxl ? Self.forceZerosForEmptyPrompt(folder: folder) : true)
    }
}
