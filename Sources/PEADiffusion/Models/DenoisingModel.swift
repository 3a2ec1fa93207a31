// The seam between a pipeline and its denoiser: what one evaluation takes (DenoisingInputs) and what the
// pipeline needs to know about the model (DenoisingModel). UNet2DConditionModel is the SD1.x/SD2.x/SDXL
// denoiser; a transformer denoiser (SD3/Flux's DiT) would be another conforming type (docs/adding-a-model.md).

/// One denoiser evaluation: the noisy latent, its timestep and the text states, plus the optional extra
/// conditioning some models take. A part a model does not take is refused by it, not silently ignored.
public struct DenoisingInputs {
    /// Noisy latents [B, C, h, w].
    public var sample: Tensor
    /// One timestep shared by the batch, or one per sample.
    public var timestep: Tensor
    /// The text states attended to [B, T, D].
    public var encoderHiddenStates: Tensor
    /// SDXL's added conditioning (`addition_embed_type: "text_time"`): the pooled text embedding [B, P] and the
    /// six size/crop numbers [B, 6]. Two fields, since callers set them one at a time (`pea bench unet`,
    /// `pea eval unet`); `textTime` is the pair, and a model refuses one half without the other.
    public var textEmbeds: Tensor?
    public var timeIds: Tensor?
    /// LCM's guidance embedding [B, time_cond_proj_dim] (diffusers' `timestep_cond`).
    public var timestepCondition: Tensor?
    /// ControlNet's residuals, added to the UNet's skip connections and to its mid block's output.
    public var controlResiduals: ControlResiduals?

    /// SDXL's two tensors may be given apart here (either may be nil; the model refuses half a pair).
    public init(sample: Tensor, timestep: Tensor, encoderHiddenStates: Tensor, textEmbeds: Tensor? = nil,
                timeIds: Tensor? = nil, timestepCondition: Tensor? = nil, controlResiduals: ControlResiduals? = nil) {
        self.sample = sample
        self.timestep = timestep
        self.encoderHiddenStates = encoderHiddenStates
        self.textEmbeds = textEmbeds
        self.timeIds = timeIds
        self.timestepCondition = timestepCondition
        self.controlResiduals = controlResiduals
    }

    /// SDXL's added conditioning as a pair: nil unless both halves are set.
    public var textTime: (textEmbeds: Tensor, timeIds: Tensor)? {
        get { textEmbeds.flatMap { embeds in timeIds.map { (embeds, $0) } } }
        set {
            textEmbeds = newValue?.textEmbeds
            timeIds = newValue?.timeIds
        }
    }
}

/// ControlNet's output as diffusers' UNet2DConditionModel takes it: `down` (down_block_additional_residuals) is
/// added to the skip connections in order — conv_in's output, then every resnet's and downsampler's output of the
/// down blocks — and `mid` (mid_block_additional_residual) to the mid block's output.
public struct ControlResiduals {
    public var down: [Tensor]
    public var mid: Tensor

    public init(down: [Tensor], mid: Tensor) {
        self.down = down
        self.mid = mid
    }
}

/// A denoiser a pipeline is written against: inputs → prediction (ε, v or flow velocity, as the scheduler's
/// config says), plus what the pipeline must know to build those inputs.
public protocol DenoisingModel {
    /// Channels of the latent it denoises (and predicts).
    var latentChannels: Int { get }
    /// The latent height and width it was trained at (diffusers' `sample_size`), when its config says.
    var sampleSize: Int? { get }
    /// The width D of the text states [B, T, D] it attends to.
    var contextDim: Int { get }
    /// Whether it needs SDXL's added conditioning (`DenoisingInputs.textTime`).
    var takesTextTime: Bool { get }
    /// LCM: the width of the guidance embedding it needs (`DenoisingInputs.timestepCondition`), nil when it takes none.
    var timestepConditionDim: Int? { get }
    /// The dtype it computes and answers in; inputs in another dtype are cast at its boundary.
    var dtype: DType { get }

    /// The prediction for `inputs`, [B, latentChannels, h, w] in `dtype`.
    func callAsFunction(_ inputs: DenoisingInputs) throws -> Tensor
}
