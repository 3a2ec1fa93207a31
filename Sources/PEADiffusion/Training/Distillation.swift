// One step of PEA's knowledge distillation (the official train_sd_zh.py / train_sdxl_zh.py `training_step`):
//
//   student ε̂ = UNet(noisy, t, where(uncond, adapter(student_uncond), adapter(student)))
//   teacher ε̂ = UNet(noisy, t, where(uncond, teacher_uncond, teacher))            (no gradient)
//   task     = mean_b( m_task[b] · mean(ε̂_s − target)²[b] )
//   logits   = mean_b( m_kd[b]   · mean(ε̂_s − ε̂_t)²[b] )
//   features = Σ_f mean_b( m_kd[b] · mean(f_t − f_s)²[b] )   over every down block's output (after its
//              downsampler), the mid block's and every up block's
//   loss     = taskWeight · task + logits + featureWeight · features        (official: taskWeight 1, featureWeight 0.1)
//
// Plain training: m_task = m_kd = 1. Hybrid (`zh_or_not` given): m_task = zh_or_not, m_kd = 1 − zh_or_not; the
// batch mean still divides by B, as the official code multiplies by the mask before `.mean()`.
// SDXL: the adapter's pooled output of the *conditional* student states is the student's text_embeds for every
// sample, and the teacher always gets its conditional pooled embedding — the official script never switches the
// pooled vectors to their uncond versions.
// Gradients flow back through the frozen UNet (data gradients only) into the adapter's parameters.

/// The tensors of one distillation batch, on the step's backend. States are before the adapter (student) or
/// the English encoder's output (teacher).
public struct DistillationBatch {
    /// Noisy latents [B, C, h, w].
    public var noisyLatents: Tensor
    /// What the student's prediction is regressed on for the task loss: the noise (ε-prediction) or the
    /// velocity (v-prediction) [B, C, h, w].
    public var target: Tensor
    /// Timesteps [B].
    public var timesteps: Tensor
    public var studentStates: Tensor
    public var studentStatesUncond: Tensor
    public var teacherStates: Tensor
    public var teacherStatesUncond: Tensor
    /// Per sample: 1 → both sides take their uncond states (classifier-free dropout).
    public var uncondMask: [Float]
    /// Per sample, hybrid training only: 1 → a language-specific pair (task loss), 0 → a parallel pair (KD losses).
    public var languageSpecific: [Float]?
    /// SDXL: time_ids [B, 6] and the teacher's pooled English embedding [B, P].
    public var timeIds: Tensor?
    public var teacherTextEmbeds: Tensor?

    public init(noisyLatents: Tensor, target: Tensor, timesteps: Tensor, studentStates: Tensor, studentStatesUncond: Tensor,
                teacherStates: Tensor, teacherStatesUncond: Tensor, uncondMask: [Float], languageSpecific: [Float]? = nil,
                timeIds: Tensor? = nil, teacherTextEmbeds: Tensor? = nil) {
        self.noisyLatents = noisyLatents
        self.target = target
        self.timesteps = timesteps
        self.studentStates = studentStates
        self.studentStatesUncond = studentStatesUncond
        self.teacherStates = teacherStates
        self.teacherStatesUncond = teacherStatesUncond
        self.uncondMask = uncondMask
        self.languageSpecific = languageSpecific
        self.timeIds = timeIds
        self.teacherTextEmbeds = teacherTextEmbeds
    }
}

/// The loss terms of one step (host values).
public struct DistillationLosses: Equatable, Sendable {
    public var task: Float
    public var logits: Float
    public var features: Float
    public var total: Float
}

/// The distillation objective over a frozen UNet; `step` returns the losses and the adapter's gradients.
public struct KnowledgeDistillation {
    public let unet: UNet2DConditionModel
    /// The weight of the feature term (0.1 in the official scripts).
    public var featureWeight: Float
    /// The weight of the task term (1 in the official scripts). On a parallel corpus the logits term already
    /// carries what the task term teaches, without its noise: the task loss is dominated by the irreducible
    /// error of predicting ε, whose gradient is noise at small batches (see tools/toyworld/README.md).
    public var taskWeight: Float
    /// Gradient checkpointing of the student's resnets and transformer blocks (`TapedBackend.checkpointsLayers`):
    /// the same gradients (up to summation order) for less activation memory and a second forward pass of them.
    public var gradientCheckpointing: Bool

    public init(unet: UNet2DConditionModel, featureWeight: Float = 0.1, taskWeight: Float = 1, gradientCheckpointing: Bool = false) {
        self.unet = unet
        self.featureWeight = featureWeight
        self.taskWeight = taskWeight
        self.gradientCheckpointing = gradientCheckpointing
    }

    /// One forward and backward pass: the losses, and d loss / d parameter for every adapter parameter by its
    /// official name (f32, on the batch's backend). `lossScale` multiplies the gradient that starts the
    /// backward pass (loss scaling for f16); the returned gradients are divided by it again.
    public func step(adapter: PEAAdapter, batch: DistillationBatch, lossScale: Float = 1) throws
        -> (losses: DistillationLosses, gradients: [String: Tensor]) {
        let backend = batch.noisyLatents.backend
        let size = batch.noisyLatents.shape[0]
        try check(batch, adapter: adapter)
        let uncondMask = try backend.upload(batch.uncondMask, shape: [size, 1, 1])
        let anyUncond = batch.uncondMask.contains { $0 != 0 }
        // where(mask, uncond, cond) as cond + mask·(uncond − cond): exact for 0/1 masks, and differentiable.
        func select(_ cond: Tensor, _ uncond: Tensor, on b: any ComputeBackend) throws -> Tensor {
            anyUncond ? try b.add(cond, b.mul(uncondMask, b.sub(uncond, cond))) : cond
        }

        // Teacher: no tape, so nothing is kept for a backward pass.
        let teacher = try unet.evaluate(DenoisingInputs(
            sample: batch.noisyLatents, timestep: batch.timesteps,
            encoderHiddenStates: select(batch.teacherStates, batch.teacherStatesUncond, on: backend),
            textEmbeds: batch.teacherTextEmbeds, timeIds: batch.timeIds), keepFeatures: true)

        // Student, recorded.
        let tape = TapedBackend(wrapping: backend)
        tape.checkpointsLayers = gradientCheckpointing
        let parameters = adapter.namedParameters
        for parameter in parameters { tape.requireGradient(parameter.tensor) }
        let conditional = try adapter(tape.wrap(batch.studentStates))
        let context = anyUncond
            ? try select(conditional.sequence, adapter(tape.wrap(batch.studentStatesUncond)).sequence, on: tape)
            : conditional.sequence
        let student = try unet.evaluate(DenoisingInputs(
            sample: tape.wrap(batch.noisyLatents), timestep: tape.wrap(batch.timesteps), encoderHiddenStates: context,
            textEmbeds: conditional.pooled, timeIds: batch.timeIds.map(tape.wrap)), keepFeatures: true)

        // Losses, recorded too (they are tiny), so the backward pass starts from the scalar loss.
        let taskMask = batch.languageSpecific
        let kdMask = batch.languageSpecific.map { $0.map { 1 - $0 } }
        let task = try meanSquaredError(student.sample, batch.target, sampleWeights: taskMask, on: tape)
        let logits = try meanSquaredError(student.sample, teacher.sample, sampleWeights: kdMask, on: tape)
        let studentFeatures = student.features.down + [student.features.mid].compactMap { $0 } + student.features.up
        let teacherFeatures = teacher.features.down + [teacher.features.mid].compactMap { $0 } + teacher.features.up
        var features = try tape.zeros([1], dtype: .f32)
        for (s, t) in zip(studentFeatures, teacherFeatures) {
            features = try tape.add(features, meanSquaredError(s, t, sampleWeights: kdMask, on: tape))
        }
        let weightedTask = taskWeight == 1 ? task : try tape.scale(task, by: taskWeight)
        let total = try tape.add(tape.add(weightedTask, logits), tape.scale(features, by: featureWeight))

        let seed = try backend.upload([lossScale], shape: [1])
        try tape.backward(from: total, seed: seed)
        var gradients: [String: Tensor] = [:]
        for (name, tensor) in parameters {
            var gradient = try tape.gradient(of: tensor).map(tape.unwrap) ?? backend.zeros(tensor.shape, dtype: .f32)
            if gradient.dtype != .f32 { gradient = try backend.cast(gradient, to: .f32) }
            gradients[name] = lossScale == 1 ? gradient : try backend.scale(gradient, by: 1 / lossScale)
        }
        let values = try [task, logits, features, total].map { try tape.downloadFloats($0)[0] }
        return (DistillationLosses(task: values[0], logits: values[1], features: values[2], total: values[3]), gradients)
    }

    /// mean over the batch of (weight[b] ·) the per-sample mean of (a − b)², in f32 → [1].
    func meanSquaredError(_ a: Tensor, _ b: Tensor, sampleWeights: [Float]?, on backend: TapedBackend) throws -> Tensor {
        let size = a.shape[0]
        func f32(_ x: Tensor) throws -> Tensor { x.dtype == .f32 ? x : try backend.cast(x, to: .f32) }
        let difference = try backend.sub(f32(a), f32(b))
        var perSample = try backend.mean(backend.mul(difference, difference).reshaped([size, -1]), dim: 1, keepDim: false)
        if let sampleWeights {
            perSample = try backend.mul(perSample, backend.upload(sampleWeights, shape: [size]))
        }
        return try backend.mean(perSample.reshaped([1, size]), dim: 1, keepDim: false)
    }

    private func check(_ batch: DistillationBatch, adapter: PEAAdapter) throws {
        let size = batch.noisyLatents.shape.first ?? 0
        func require(_ ok: Bool, _ message: @autoclosure () -> String) throws {
            if !ok { throw PEAError.shapeMismatch("kd-step: \(message())") }
        }
        try require(batch.noisyLatents.rank == 4, "noisy_latents must be [B, C, h, w], got \(batch.noisyLatents.shape)")
        try require(batch.target.shape == batch.noisyLatents.shape, "the target \(batch.target.shape) must match noisy_latents \(batch.noisyLatents.shape)")
        try require(batch.timesteps.count == size, "timesteps must have \(size) values, got \(batch.timesteps.shape)")
        for (name, states) in [("student_states", batch.studentStates), ("student_states_uncond", batch.studentStatesUncond)] {
            try require(states.rank == 3 && states.shape[0] == size && states.shape[2] == adapter.inputDim,
                        "\(name) must be [\(size), L, \(adapter.inputDim)] (the adapter's input width), got \(states.shape)")
        }
        try require(batch.studentStatesUncond.shape == batch.studentStates.shape,
                    "student_states_uncond \(batch.studentStatesUncond.shape) must match student_states \(batch.studentStates.shape)")
        try require(batch.teacherStatesUncond.shape == batch.teacherStates.shape,
                    "teacher_states_uncond \(batch.teacherStatesUncond.shape) must match teacher_states \(batch.teacherStates.shape)")
        try require(batch.uncondMask.count == size, "uncond_mask must have \(size) values, got \(batch.uncondMask.count)")
        try require(batch.uncondMask.allSatisfy { $0 == 0 || $0 == 1 }, "uncond_mask values must be 0 or 1")
        if let mask = batch.languageSpecific {
            try require(mask.count == size, "zh_or_not must have \(size) values, got \(mask.count)")
            try require(mask.allSatisfy { $0 == 0 || $0 == 1 }, "zh_or_not values must be 0 or 1")
        }
        try require(adapter.outputDim == unet.config.crossAttentionDim[0],
                    "the adapter produces \(adapter.outputDim)-wide states but the UNet's cross_attention_dim is \(unet.config.crossAttentionDim[0])")
        if unet.takesTextTime {
            try require(adapter.isSDXL, "this UNet (SDXL) needs the SDXL adapter form (with fc and a pooled output)")
            try require(batch.timeIds != nil && batch.teacherTextEmbeds != nil, "this UNet (SDXL) needs time_ids and teacher_text_embeds")
        } else {
            try require(!adapter.isSDXL, "an SDXL-form adapter (with fc) needs an SDXL UNet")
            try require(batch.timeIds == nil && batch.teacherTextEmbeds == nil, "time_ids and teacher_text_embeds are SDXL's; this UNet takes neither")
        }
    }
}

extension DistillationBatch {
    /// Reads a batch from a safetensors file with `pea eval kd-step`'s names (docs/command-line.md):
    /// noisy_latents, noise (or `target`, which wins when both are present), timesteps, student_states,
    /// student_states_uncond, teacher_states, teacher_states_uncond, uncond_mask, optional zh_or_not, and for SDXL
    /// time_ids and teacher_text_embeds. Floating-point tensors are uploaded in f32.
    public static func load(path: String, backend: any ComputeBackend) throws -> DistillationBatch {
        let inputs = try InputTensors(path: path)
        func floats(_ name: String) throws -> Tensor { try inputs.tensor(name, on: backend) }
        func optional(_ name: String) throws -> Tensor? { try inputs.optionalTensor(name, on: backend) }
        func mask(_ name: String) throws -> [Float] { try inputs.host(name, floatOnly: false).floats() }
        return DistillationBatch(
            noisyLatents: try floats("noisy_latents"),
            target: try optional("target") ?? floats("noise"),
            timesteps: try inputs.tensor("timesteps", on: backend, floatOnly: false),
            studentStates: try floats("student_states"), studentStatesUncond: try floats("student_states_uncond"),
            teacherStates: try floats("teacher_states"), teacherStatesUncond: try floats("teacher_states_uncond"),
            uncondMask: try mask("uncond_mask"),
            languageSpecific: inputs.contains("zh_or_not") ? try mask("zh_or_not") : nil,
            timeIds: try optional("time_ids"), teacherTextEmbeds: try optional("teacher_text_embeds"))
    }
}
